//! A container's record under `--root/<id>/`: `state.json` (what `husk state` reports, plus
//! what husk needs to find and clean up the container's VM process), the VM's vsock socket,
//! its console log and its rootfs image. Every command that reads and changes a container
//! holds the directory's lock (flock), so concurrent commands on one container are serialized.

pub mod process;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The OCI version `husk state` reports.
pub const OCI_VERSION: &str = "1.2.0";

/// The status a container was last put in by husk; `stopped` is derived from its VM process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// The container's VM process (0 until it has been started).
    pub pid: i32,
    /// Its start time in clock ticks since boot, to tell it from a later process with its pid.
    pub pid_start_time: u64,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339.
    pub created: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub annotations: serde_json::Map<String, serde_json::Value>,
    /// The disk image the guest mounts as the container's root.
    pub image: DiskImage,
}

/// A file system image attached to the VM as a virtio-blk disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskImage {
    pub path: PathBuf,
    /// For mount(2) in the guest: "erofs" or "ext4".
    pub fstype: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("container \"{0}\" does not exist")]
    NotExist(String),
    #[error("container with id \"{0}\" already exists")]
    Exists(String),
    #[error("invalid container id {0:?}: use 1 to 128 letters, digits, '_', '.' and '-', starting with a letter or digit")]
    InvalidId(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("the state of container \"{id}\" is unreadable ({path}): {message}")]
    Corrupt { id: String, path: String, message: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io { what, path: path.display().to_string(), source }
}

/// A container's directory under the root, locked while this value lives.
pub struct Container {
    dir: PathBuf,
    id: String,
    /// Holds the flock.
    _lock: File,
}

impl Container {
    /// Create the record of a new container: its directory (atomically: an id in use is an
    /// error), locked.
    pub fn create(root: &Path, id: &str) -> Result<Self, StateError> {
        check_id(id)?;
        std::fs::create_dir_all(root).map_err(io("creating the state root", root))?;
        let dir = root.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.into()))
            }
            Err(e) => return Err(io("creating the state directory", &dir)(e)),
        }
        let lock = lock(&dir)?;
        Ok(Container { dir, id: id.into(), _lock: lock })
    }

    /// Open and lock an existing container's record.
    pub fn open(root: &Path, id: &str) -> Result<Self, StateError> {
        check_id(id)?;
        let dir = root.join(id);
        let lock = match lock(&dir) {
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotExist(id.into()))
            }
            other => other?,
        };
        // Deleted while we waited for the lock.
        if !dir.join("state.json").exists() && !dir.exists() {
            return Err(StateError::NotExist(id.into()));
        }
        Ok(Container { dir, id: id.into(), _lock: lock })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM's hybrid vsock socket.
    pub fn vsock_path(&self) -> PathBuf {
        vsock_path(&self.dir)
    }

    pub fn load(&self) -> Result<Record, StateError> {
        load(&self.dir, &self.id)
    }

    /// The copy of the bundle's config.json that `create` keeps: `exec` builds processes from
    /// it and the hooks come from it after the bundle may be gone.
    pub fn spec_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The kept spec, typed; `None` when it is missing or unreadable (a create that died
    /// early).
    pub fn spec(&self) -> Option<oci_spec::runtime::Spec> {
        serde_json::from_slice(&std::fs::read(self.spec_path()).ok()?).ok()
    }

    /// Write `state.json` atomically (a temporary file renamed over it).
    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let json = serde_json::to_vec_pretty(record).expect("a record serializes");
        std::fs::write(&tmp, json).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("writing", &path))
    }

    /// Remove the directory and everything in it.
    pub fn destroy(self) -> Result<(), StateError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing the state directory", &self.dir)(e)),
        }
    }
}

/// The guest's serial console output in a container directory.
pub fn console_path(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

/// The VM's hybrid vsock socket in a container directory.
pub fn vsock_path(dir: &Path) -> PathBuf {
    dir.join("vsock.sock")
}

pub fn check_id(id: &str) -> Result<(), StateError> {
    if husk_agent_protocol::valid_id(id) {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.into()))
    }
}

fn lock(dir: &Path) -> Result<File, StateError> {
    let file = File::open(dir).map_err(io("opening the state directory", dir))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("locking", dir)(std::io::Error::last_os_error()));
    }
    Ok(file)
}

fn load(dir: &Path, id: &str) -> Result<Record, StateError> {
    let path = dir.join("state.json");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StateError::NotExist(id.into()))
        }
        Err(e) => return Err(io("reading", &path)(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        id: id.into(),
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

impl Record {
    /// The status now: `stopped` once the VM process is gone, whatever was recorded.
    pub fn current_status(&self) -> Status {
        match self.status {
            Status::Creating | Status::Stopped => self.status,
            _ if process::alive(self.pid, self.pid_start_time) => self.status,
            _ => Status::Stopped,
        }
    }

    /// runc's `state` JSON.
    pub fn to_oci_state(&self) -> serde_json::Value {
        let status = self.current_status();
        let pid = if status == Status::Stopped { 0 } else { self.pid };
        let mut state = serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": pid,
            "status": status.name(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
        });
        if !self.annotations.is_empty() {
            state["annotations"] = serde_json::Value::Object(self.annotations.clone());
        }
        state
    }
}

/// Now, in RFC 3339 with nanoseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// The ids of the containers under `root`, sorted.
pub fn list_ids(root: &Path) -> Result<Vec<String>, StateError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io("reading the state root", root)(e)),
    };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("state.json").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| husk_agent_protocol::valid_id(id))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Read a container's record without taking its lock (for `list`, which must not block on a
/// container being created).
pub fn peek(root: &Path, id: &str) -> Result<Record, StateError> {
    load(&root.join(id), id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_tests::tiny_guest::TempDir;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            pid: std::process::id() as i32,
            pid_start_time: process::start_time(std::process::id() as i32).unwrap(),
            status: Status::Running,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: now_rfc3339(),
            annotations: Default::default(),
            image: DiskImage { path: "/i".into(), fstype: "erofs".into() },
        }
    }

    #[test]
    fn create_save_open_destroy() {
        let root = TempDir::new("runtime-state");
        let c = Container::create(root.path(), "c1").unwrap();
        assert!(matches!(Container::create(root.path(), "c1"), Err(StateError::Exists(_))));
        c.save(&record("c1")).unwrap();
        drop(c);
        let c = Container::open(root.path(), "c1").unwrap();
        let r = c.load().unwrap();
        assert_eq!(r.current_status(), Status::Running);
        let state = r.to_oci_state();
        assert_eq!(state["status"], "running");
        assert_eq!(state["pid"], std::process::id());
        assert_eq!(list_ids(root.path()).unwrap(), vec!["c1".to_string()]);
        c.destroy().unwrap();
        assert!(matches!(Container::open(root.path(), "c1"), Err(StateError::NotExist(_))));
        assert!(list_ids(root.path()).unwrap().is_empty());
    }

    #[test]
    fn a_gone_process_is_stopped() {
        let mut r = record("c2");
        r.pid_start_time += 1;
        assert_eq!(r.current_status(), Status::Stopped);
        assert_eq!(r.to_oci_state()["pid"], 0);
    }

    #[test]
    fn bad_ids_are_refused() {
        let root = TempDir::new("runtime-state");
        for id in ["", "../x", "a/b", ".hidden"] {
            assert!(matches!(Container::create(root.path(), id), Err(StateError::InvalidId(_))));
        }
        assert!(matches!(Container::open(root.path(), "nope"), Err(StateError::NotExist(_))));
    }
}
