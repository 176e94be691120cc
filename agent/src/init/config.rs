//! What the agent tells a container process it starts, and what that process answers, over
//! their private channel (see `channel`).

use std::path::PathBuf;

use oci_spec::runtime::{LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::container::spec::{Ns, NsPlan};

/// Agent to helper.
#[derive(Serialize, Deserialize)]
pub enum ToInit {
    Config(Box<InitConfig>),
    /// Execute the container's program (a container's own process waits for this).
    Start,
}

/// Helper to agent.
#[derive(Serialize, Deserialize)]
pub enum FromInit {
    /// Set up; a terminal's pty master comes with this message.
    Ready,
    /// Setup or exec failed; the helper exits after sending this.
    Failed(String),
}

#[derive(Serialize, Deserialize)]
pub struct InitConfig {
    pub process: Process,
    /// The cgroup directory to join first.
    pub cgroup: PathBuf,
    /// The container's seccomp profile (an exec gets its container's, as with runc).
    pub seccomp: Option<LinuxSeccomp>,
    pub setup: Setup,
}

#[derive(Serialize, Deserialize)]
pub enum Setup {
    /// A container's own process: new namespaces and the root file system.
    Create(Box<CreateSetup>),
    /// An exec: join these namespaces of the container's process, whose pidfd the helper got
    /// as its second descriptor argument. (The pid namespace is joined by the agent.)
    Exec { namespaces: Vec<Ns> },
}

#[derive(Serialize, Deserialize)]
pub struct CreateSetup {
    pub spec: Spec,
    pub rootfs: RootfsSource,
    pub mode: RootfsMode,
    /// Namespaces to create or join; a new pid namespace is made by the agent.
    pub namespaces: NsPlan,
    /// An empty directory the helper mounts a tmpfs on, in its own mount namespace, to stage
    /// the root file system.
    pub staging: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RootfsSource {
    Directory(PathBuf),
    Block { device: PathBuf, fstype: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootfsMode {
    ReadOnly,
    Overlay,
    Writable,
}
