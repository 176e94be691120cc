//! The guest's wall clock (CLOCK_REALTIME), set from the host's when the two are more than a
//! second apart: a VM's clock falls behind while the VM is paused or its host sleeps.

use nix::sys::time::{TimeSpec, TimeValLike};
use nix::time::{clock_gettime, clock_settime, ClockId};

use crate::error::{Error, Result};

/// How far apart the clocks may be before the guest's is set.
const TOLERANCE_NS: i64 = 1_000_000_000;

/// Set the clock to the host's time unless it is within a second of it already; whether it was
/// set. Unless `may_set` (the agent is the guest's PID 1; elsewhere the clock is its host's), a
/// change that is needed is refused.
pub fn set_if_off(seconds: i64, nanos: u32, may_set: bool) -> Result<bool> {
    if seconds < 0 || i64::from(nanos) >= TOLERANCE_NS {
        return Err(Error::InvalidArgument(format!("invalid time {seconds}.{nanos:09}")));
    }
    let host = TimeSpec::new(seconds, i64::from(nanos));
    let now = clock_gettime(ClockId::CLOCK_REALTIME)
        .map_err(|e| Error::internal("reading the clock", &e))?;
    if !off(now, host) {
        return Ok(false);
    }
    if !may_set {
        return Err(Error::FailedPrecondition(
            "SetTime: this agent is not the guest's PID 1 (it would set its host's clock)".into(),
        ));
    }
    clock_settime(ClockId::CLOCK_REALTIME, host)
        .map_err(|e| Error::internal("setting the clock", &e))?;
    log::info!("clock set from {now} to {host}");
    Ok(true)
}

/// Whether two times are more than the tolerance apart.
fn off(a: TimeSpec, b: TimeSpec) -> bool {
    (a.num_nanoseconds() - b.num_nanoseconds()).abs() > TOLERANCE_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_apart_is_close_enough() {
        let t = |s, ns| TimeSpec::new(s, ns);
        assert!(!off(t(100, 0), t(100, 0)));
        assert!(!off(t(100, 0), t(101, 0)));
        assert!(!off(t(101, 0), t(100, 0)));
        assert!(off(t(100, 0), t(101, 1)));
        assert!(off(t(101, 500_000_000), t(100, 499_999_999)));
        assert!(off(t(0, 0), t(1_700_000_000, 0)));
    }

    #[test]
    fn only_a_needed_change_is_refused_here() {
        // This machine's clock is never set: may_set is false throughout.
        let now = clock_gettime(ClockId::CLOCK_REALTIME).unwrap();
        let (s, ns) = (now.tv_sec(), now.tv_nsec() as u32);
        assert!(!set_if_off(s, ns, false).unwrap());
        assert!(matches!(set_if_off(s - 60, ns, false), Err(Error::FailedPrecondition(_))));
        assert!(matches!(set_if_off(s, 1_000_000_000, false), Err(Error::InvalidArgument(_))));
        assert!(matches!(set_if_off(-1, 0, false), Err(Error::InvalidArgument(_))));
    }
}
