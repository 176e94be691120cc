//! husk-agent: the guest's PID 1. Placeholder until the guest-agent issue: it builds, states
//! what it is, and exits non-zero so that nobody mistakes it for a working agent.

fn main() {
    eprintln!(
        "husk-agent {}: not implemented yet (see the guest-agent issue)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(1);
}
