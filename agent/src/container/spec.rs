//! Checking what the host sends before anything is set up: the OCI spec and process it gives,
//! and which namespaces a container gets. A bad document is an INVALID_ARGUMENT here, not a
//! half-made container.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A namespace a container can have of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ns {
    Mount,
    Uts,
    Ipc,
    Pid,
    Cgroup,
}

impl Ns {
    pub fn clone_flag(self) -> nix::sched::CloneFlags {
        use nix::sched::CloneFlags as F;
        match self {
            Ns::Mount => F::CLONE_NEWNS,
            Ns::Uts => F::CLONE_NEWUTS,
            Ns::Ipc => F::CLONE_NEWIPC,
            Ns::Pid => F::CLONE_NEWPID,
            Ns::Cgroup => F::CLONE_NEWCGROUP,
        }
    }
}

/// How the container's namespaces are made: new ones, or existing ones joined by path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsPlan {
    pub new: Vec<Ns>,
    pub join: Vec<(Ns, PathBuf)>,
}

impl NsPlan {
    /// The container's namespaces that differ from the agent's (an exec joins these).
    pub fn own(&self) -> Vec<Ns> {
        self.new.iter().copied().chain(self.join.iter().map(|(ns, _)| *ns)).collect()
    }

    pub fn has(&self, ns: Ns) -> bool {
        self.own().contains(&ns)
    }
}

/// Parse the spec's JSON and check what the agent relies on.
pub fn parse(json: &[u8]) -> Result<Spec> {
    let spec: Spec = serde_json::from_slice(json)
        .map_err(|e| Error::InvalidArgument(format!("the OCI spec is not valid: {e}")))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("the OCI spec has no process".into()))?;
    check_process(process)?;
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        if !dest.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "mount destination {} is not absolute",
                dest.display()
            )));
        }
        if is_bind(m) && !m.source().as_deref().is_some_and(Path::is_absolute) {
            return Err(Error::InvalidArgument(format!(
                "bind mount on {} needs an absolute source",
                dest.display()
            )));
        }
    }
    if let Some(linux) = spec.linux() {
        if let Some(profile) = linux.seccomp() {
            crate::init::seccomp::compile(profile).map_err(Error::InvalidArgument)?;
        }
        for key in linux.sysctl().iter().flat_map(|s| s.keys()) {
            if key.is_empty()
                || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(Error::InvalidArgument(format!("sysctl key {key:?}")));
            }
        }
    }
    let plan = namespaces(&spec)?;
    if spec.hostname().as_deref().is_some_and(|h| !h.is_empty()) && !plan.has(Ns::Uts) {
        return Err(Error::InvalidArgument(
            "the spec sets a hostname but gives the container no UTS namespace".into(),
        ));
    }
    Ok(spec)
}

/// Whether a mount is a bind mount (its source a path, not a file system).
pub fn is_bind(m: &Mount) -> bool {
    m.options().iter().flatten().any(|o| o == "bind" || o == "rbind")
        || m.typ().as_deref() == Some("bind")
}

/// Parse an exec's process JSON and check it.
pub fn parse_process(json: &[u8]) -> Result<Process> {
    let process: Process = serde_json::from_slice(json)
        .map_err(|e| Error::InvalidArgument(format!("the OCI process is not valid: {e}")))?;
    check_process(&process)?;
    Ok(process)
}

fn check_process(p: &Process) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidArgument(what));
    let args = p.args().as_deref().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return bad("the process has no args".into());
    }
    if !p.cwd().is_absolute() {
        return bad(format!("the process cwd {} is not absolute", p.cwd().display()));
    }
    for s in args.iter().chain(p.env().iter().flatten()) {
        if s.contains('\0') {
            return bad(format!("{s:?} contains a NUL byte"));
        }
    }
    if let Some(e) = p.env().iter().flatten().find(|e| !e.contains('=')) {
        return bad(format!("environment entry {e:?} is not NAME=value"));
    }
    for r in p.rlimits().iter().flatten() {
        if r.soft() > r.hard() {
            return bad(format!("rlimit {:?}: soft {} above hard {}", r.typ(), r.soft(), r.hard()));
        }
    }
    Ok(())
}

/// Which namespaces the container gets. Every container gets its own mount namespace (its
/// root is set up there). The network namespace is the guest's: the VM is the container's
/// network boundary, configured by the host, so a network entry (new or by path) is ignored.
/// User and time namespaces are refused.
pub fn namespaces(spec: &Spec) -> Result<NsPlan> {
    let mut plan = NsPlan { new: vec![Ns::Mount], join: vec![] };
    let list = spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    for n in &list {
        let ns = match n.typ() {
            LinuxNamespaceType::Mount => {
                if n.path().is_some() {
                    return Err(Error::InvalidArgument(
                        "joining an existing mount namespace is not supported".into(),
                    ));
                }
                continue;
            }
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::Uts => Ns::Uts,
            LinuxNamespaceType::Ipc => Ns::Ipc,
            LinuxNamespaceType::Pid => Ns::Pid,
            LinuxNamespaceType::Cgroup => Ns::Cgroup,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{other:?} namespaces are not supported in the guest"
                )))
            }
        };
        if plan.has(ns) {
            return Err(Error::InvalidArgument(format!("namespace {ns:?} is listed twice")));
        }
        match n.path() {
            Some(path) if !path.is_absolute() => {
                return Err(Error::InvalidArgument(format!(
                    "namespace path {} is not absolute",
                    path.display()
                )))
            }
            Some(path) => plan.join.push((ns, path.clone())),
            None => plan.new.push(ns),
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMESPACES: &str =
        r#"[{"type":"pid"},{"type":"uts"},{"type":"mount"},{"type":"network"}]"#;

    fn spec_with(namespaces: &str, extra_linux: &str, process: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{process},"root":{{"path":"rootfs"}},
               "hostname":"box","linux":{{"namespaces":{namespaces}{extra_linux}}}}}"#
        )
    }

    fn spec(extra_linux: &str, process: &str) -> String {
        spec_with(NAMESPACES, extra_linux, process)
    }

    const PROC: &str = r#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#;

    #[test]
    fn good_spec_and_its_namespaces() {
        let s = parse(spec("", PROC).as_bytes()).unwrap();
        let plan = namespaces(&s).unwrap();
        assert_eq!(plan.new, vec![Ns::Mount, Ns::Pid, Ns::Uts]);
        assert!(plan.join.is_empty());
    }

    fn invalid(json: &str) -> String {
        match parse(json.as_bytes()) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT for {json}, got {other:?}"),
        }
    }

    #[test]
    fn bad_specs_are_invalid_arguments() {
        assert!(invalid("{").contains("not valid"));
        assert!(invalid(r#"{"ociVersion":"1.0.2","root":{"path":"r"}}"#).contains("no process"));
        let no_args = r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#;
        assert!(invalid(&spec("", no_args)).contains("no args"));
        let rel_cwd = r#"{"args":["sh"],"cwd":"tmp","user":{"uid":0,"gid":0}}"#;
        assert!(invalid(&spec("", rel_cwd)).contains("not absolute"));
        let bad_env = r#"{"args":["sh"],"cwd":"/","env":["X"],"user":{"uid":0,"gid":0}}"#;
        assert!(invalid(&spec("", bad_env)).contains("NAME=value"));
        let user_ns = r#"[{"type":"uts"},{"type":"user"}]"#;
        assert!(invalid(&spec_with(user_ns, "", PROC)).contains("not supported"));
        let twice = r#"[{"type":"uts"},{"type":"uts"}]"#;
        assert!(invalid(&spec_with(twice, "", PROC)).contains("twice"));
        let no_uts = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"hostname":"x","linux":{"namespaces":[]}}"#;
        assert!(invalid(no_uts).contains("UTS"));
        let seccomp = r#","seccomp":{"defaultAction":"SCMP_ACT_NOTIFY"}"#;
        assert!(invalid(&spec(seccomp, PROC)).contains("SCMP_ACT_NOTIFY is not supported"));
    }
}
