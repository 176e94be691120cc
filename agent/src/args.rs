//! The agent's command line: a handful of `--flag VALUE` settings, each also read from its
//! environment variable (as PID 1, `HUSK_AGENT_*=...` words on the kernel command line reach
//! /init as its environment). Parsed by hand rather than with clap: the agent's binary is a
//! file in every guest's RAM, and clap was 150 KB of it for five flags.

use std::path::PathBuf;

use crate::listen::Addr;

/// The agent's settings.
#[derive(Debug, PartialEq)]
pub struct Args {
    /// Where the ttrpc service listens [PID 1: vsock:1024].
    pub listen: Option<Addr>,
    /// Where the stdio streams are accepted [PID 1: vsock:1025].
    pub stdio_listen: Option<Addr>,
    /// The cgroup v2 directory under which container cgroups are made [PID 1:
    /// /sys/fs/cgroup/containers].
    pub cgroup_root: Option<PathBuf>,
    /// Where container roots are staged and host files copied.
    pub state_dir: PathBuf,
    /// Also send the log lines to this address (see `logging`).
    pub log_to: Option<Addr>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Args),
    /// `--help` or `--version`: print this and exit.
    Print(String),
}

const USAGE: &str = "husk's guest agent

Usage: husk-agent [OPTIONS]

Options (each also from its environment variable):
      --listen <ADDR>          where the ttrpc service listens, vsock:PORT or unix:PATH
                               [HUSK_AGENT_LISTEN; PID 1: vsock:1024]
      --stdio-listen <ADDR>    where the stdio streams are accepted
                               [HUSK_AGENT_STDIO_LISTEN; PID 1: vsock:1025]
      --cgroup-root <DIR>      the cgroup v2 directory for container cgroups
                               [HUSK_AGENT_CGROUP_ROOT; PID 1: /sys/fs/cgroup/containers]
      --state-dir <DIR>        where container roots are staged and host files copied
                               [HUSK_AGENT_STATE_DIR; default: /run/husk-agent]
      --log-to <ADDR>          also send the log lines there; vsock:PORT is the host's port
                               (lines are dropped, never waited for, when it is slow)
                               [HUSK_AGENT_LOG_TO; default: the console only]
  -h, --help                   print this
  -V, --version                print the version
";

/// The flags that take a value and their environment variables.
const FLAGS: [(&str, &str); 5] = [
    ("--listen", "HUSK_AGENT_LISTEN"),
    ("--stdio-listen", "HUSK_AGENT_STDIO_LISTEN"),
    ("--cgroup-root", "HUSK_AGENT_CGROUP_ROOT"),
    ("--state-dir", "HUSK_AGENT_STATE_DIR"),
    ("--log-to", "HUSK_AGENT_LOG_TO"),
];

/// Parse `args` (without the program name); `env` looks up an environment variable. A flag
/// given twice takes the last value, as clap did.
pub fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Parsed, String> {
    let mut values: [Option<String>; FLAGS.len()] = Default::default();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "-h" | "--help" => return Ok(Parsed::Print(USAGE.to_string())),
            "-V" | "--version" => {
                return Ok(Parsed::Print(format!("husk-agent {}\n", env!("CARGO_PKG_VERSION"))))
            }
            _ => {}
        }
        let (flag, inline) = match word.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (word.as_str(), None),
        };
        let Some(i) = FLAGS.iter().position(|(f, _)| *f == flag) else {
            return Err(format!("unexpected argument {word:?} (see --help)"));
        };
        let value = match inline {
            Some(v) => v,
            None => words.next().cloned().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        values[i] = Some(value);
    }
    for (value, (_, var)) in values.iter_mut().zip(FLAGS) {
        if value.is_none() {
            *value = env(var).filter(|v| !v.is_empty());
        }
    }
    let [listen, stdio_listen, cgroup_root, state_dir, log_to] = values;
    let addr = |flag: &str, v: Option<String>| {
        v.map(|v| v.parse::<Addr>().map_err(|e| format!("{flag}: {e}"))).transpose()
    };
    Ok(Parsed::Run(Args {
        listen: addr("--listen", listen)?,
        stdio_listen: addr("--stdio-listen", stdio_listen)?,
        cgroup_root: cgroup_root.map(PathBuf::from),
        state_dir: PathBuf::from(state_dir.as_deref().unwrap_or("/run/husk-agent")),
        log_to: addr("--log-to", log_to)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn run(s: &str, env: &[(&str, &str)]) -> Result<Args, String> {
        let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        match parse(&words(s), lookup)? {
            Parsed::Run(a) => Ok(a),
            Parsed::Print(p) => panic!("printed {p}"),
        }
    }

    #[test]
    fn flags_then_environment_then_defaults() {
        let a = run("--listen unix:/a --stdio-listen=unix:/b --cgroup-root /cg", &[]).unwrap();
        assert_eq!(a.listen, Some(Addr::Unix("/a".into())));
        assert_eq!(a.stdio_listen, Some(Addr::Unix("/b".into())));
        assert_eq!(a.cgroup_root, Some(PathBuf::from("/cg")));
        assert_eq!(a.state_dir, PathBuf::from("/run/husk-agent"));
        assert_eq!(a.log_to, None);

        let env = [("HUSK_AGENT_LOG_TO", "vsock:1026"), ("HUSK_AGENT_LISTEN", "vsock:9")];
        let a = run("--listen vsock:7 --listen vsock:8", &env).unwrap();
        assert_eq!(a.listen, Some(Addr::Vsock(8)), "the flag wins, the last one");
        assert_eq!(a.log_to, Some(Addr::Vsock(1026)), "from the environment");
        let a = run("", &[("HUSK_AGENT_STATE_DIR", "/s"), ("HUSK_AGENT_LISTEN", "")]).unwrap();
        assert_eq!((a.state_dir, a.listen), (PathBuf::from("/s"), None));
    }

    #[test]
    fn bad_words_are_errors_and_help_and_version_print() {
        for (bad, why) in [
            ("--listen", "--listen needs a value"),
            ("--listen tcp:1", "--listen: \"tcp:1\": expected vsock:PORT or unix:PATH"),
            ("quiet", "unexpected argument \"quiet\""),
            ("--bogus=1", "unexpected argument \"--bogus=1\""),
        ] {
            let err = run(bad, &[]).unwrap_err();
            assert!(err.starts_with(why), "{bad}: {err}");
        }
        let err = run("", &[("HUSK_AGENT_LOG_TO", "vsock:x")]).unwrap_err();
        assert!(err.starts_with("--log-to: bad vsock port"), "{err}");
        let Ok(Parsed::Print(help)) = parse(&words("--listen unix:/a --help"), |_| None) else {
            panic!("--help prints")
        };
        assert!(help.contains("--stdio-listen <ADDR>"), "{help}");
        let Ok(Parsed::Print(v)) = parse(&words("-V"), |_| None) else { panic!("-V prints") };
        assert_eq!(v, format!("husk-agent {}\n", env!("CARGO_PKG_VERSION")));
    }
}
