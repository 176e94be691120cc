//! An OCI bundle: its `config.json`, checked for what husk needs before a VM is started, and
//! what the VM is sized from. The spec travels to the agent as JSON, as the bundle has it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::settings::{Settings, GUEST_OVERHEAD_MIB};

/// The largest bind-mounted host file copied into the guest (Docker's resolv.conf, hosts and
/// hostname are a few hundred bytes).
const MAX_HOST_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle {0} has no config.json")]
    NoConfig(String),
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not valid JSON: {message}")]
    Json { path: String, message: String },
    #[error("config.json: {0}")]
    Invalid(String),
    #[error("the container's root file system {0} does not exist or is not a directory")]
    NoRootfs(String),
}

/// A loaded bundle.
#[derive(Debug)]
pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    /// `config.json`, as it is (it goes to the agent so).
    pub spec: Value,
    /// The same, typed.
    pub oci: oci_spec::runtime::Spec,
    /// The root file system directory, absolute.
    pub rootfs: PathBuf,
}

impl Bundle {
    /// Load and check `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let path = dir.join("config.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::NoConfig(dir.display().to_string()))
            }
            Err(source) => {
                return Err(BundleError::Read { path: path.display().to_string(), source })
            }
        };
        let spec: Value = serde_json::from_slice(&bytes).map_err(|e| BundleError::Json {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        check(&spec)?;
        let oci = serde_json::from_value(spec.clone())
            .map_err(|e| BundleError::Invalid(e.to_string()))?;
        let root = spec["root"]["path"].as_str().unwrap_or_default();
        let rootfs = dir.join(root);
        if !rootfs.is_dir() {
            return Err(BundleError::NoRootfs(rootfs.display().to_string()));
        }
        let bundle = Bundle { dir, spec, oci, rootfs };
        bundle.refuse_shared_binds()?;
        Ok(bundle)
    }

    /// The spec's bind mounts: (source, destination).
    fn binds(&self) -> impl Iterator<Item = (&str, &str)> {
        let mounts = self.spec["mounts"].as_array().map(Vec::as_slice).unwrap_or_default();
        mounts
            .iter()
            .filter(|m| {
                m["type"].as_str() == Some("bind")
                    || m["options"].as_array().is_some_and(|o| {
                        o.iter().any(|o| o.as_str() == Some("bind") || o.as_str() == Some("rbind"))
                    })
            })
            .filter_map(|m| Some((m["source"].as_str()?, m["destination"].as_str().unwrap_or(""))))
    }

    /// Refuse bind mounts of anything but small host files (which go in as copies, see
    /// [`Bundle::host_files`]): a host directory or device cannot reach the guest without a
    /// shared file system, and the same path inside the guest would be another one.
    fn refuse_shared_binds(&self) -> Result<(), BundleError> {
        for (source, destination) in self.binds() {
            let shareable = std::fs::metadata(source)
                .map(|meta| meta.is_file() && meta.len() <= MAX_HOST_FILE)
                .unwrap_or(false);
            if !shareable {
                return Err(BundleError::Invalid(format!(
                    "cannot bind-mount {source} at {destination}: husk runs the container in a \
                     VM, and bind mounts and volumes of host directories need a shared file \
                     system, which husk does not have yet (only host files of up to {} KiB are \
                     copied in)",
                    MAX_HOST_FILE >> 10
                )));
            }
        }
        Ok(())
    }

    /// Whether the container's process has a terminal.
    pub fn terminal(&self) -> bool {
        self.spec["process"]["terminal"].as_bool().unwrap_or(false)
    }

    /// The spec's annotations.
    pub fn annotations(&self) -> serde_json::Map<String, Value> {
        self.spec["annotations"].as_object().cloned().unwrap_or_default()
    }

    /// Guest memory: the container's memory limit plus what the guest itself needs, else the
    /// configured default.
    pub fn guest_mem_mib(&self, settings: &Settings) -> u64 {
        match self.spec["linux"]["resources"]["memory"]["limit"].as_i64() {
            Some(limit) if limit > 0 => (limit as u64).div_ceil(1 << 20) + GUEST_OVERHEAD_MIB,
            _ => settings.default_memory_mib,
        }
    }

    /// vCPUs: enough for the container's CPU quota, else the configured default; never more
    /// than `max_vcpus` (by default the host's CPUs).
    pub fn guest_vcpus(&self, settings: &Settings) -> u8 {
        let cpu = &self.spec["linux"]["resources"]["cpu"];
        let wanted = match (cpu["quota"].as_i64(), cpu["period"].as_u64()) {
            (Some(quota), Some(period)) if quota > 0 && period > 0 => {
                (quota as u64).div_ceil(period).max(1)
            }
            _ => u64::from(settings.default_vcpus),
        };
        wanted.min(u64::from(settings.max_vcpus)).max(1) as u8
    }

    /// The small host files the spec bind-mounts (Docker's resolv.conf, hosts, hostname), which
    /// go to the guest as copies (`load` refused every other bind source).
    pub fn host_files(&self) -> Vec<(String, Vec<u8>)> {
        self.binds()
            .filter_map(|(source, _)| Some((source.to_string(), std::fs::read(source).ok()?)))
            .collect()
    }
}

/// What husk needs from a spec before it starts a VM; the agent checks the rest.
fn check(spec: &Value) -> Result<(), BundleError> {
    let invalid = |m: &str| Err(BundleError::Invalid(m.into()));
    if !spec.is_object() {
        return invalid("not a JSON object");
    }
    if !spec["ociVersion"].is_string() {
        return invalid("ociVersion is missing");
    }
    match spec["root"]["path"].as_str() {
        Some(p) if !p.is_empty() => {}
        _ => return invalid("root.path is missing"),
    }
    let process = &spec["process"];
    if !process.is_object() {
        return invalid("process is missing");
    }
    match process["args"].as_array() {
        Some(args) if !args.is_empty() && args.iter().all(Value::is_string) => {}
        _ => return invalid("process.args must be a non-empty list of strings"),
    }
    match process["cwd"].as_str() {
        Some(cwd) if cwd.starts_with('/') => {}
        _ => return invalid("process.cwd must be an absolute path"),
    }
    for stage in ["createContainer", "startContainer"] {
        if spec["hooks"][stage].as_array().is_some_and(|hooks| !hooks.is_empty()) {
            return Err(BundleError::Invalid(format!(
                "husk cannot run {stage} hooks: they run in the container's namespaces, which \
                 are inside its VM"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_tests::tiny_guest::TempDir;
    use serde_json::json;

    fn bundle_with(config: Option<&str>, rootfs: bool) -> TempDir {
        let dir = TempDir::new("runtime-bundle");
        if let Some(config) = config {
            std::fs::write(dir.path().join("config.json"), config).unwrap();
        }
        if rootfs {
            std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        }
        dir
    }

    fn good() -> Value {
        json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
               "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}})
    }

    #[test]
    fn bad_bundles_say_what_is_wrong() {
        let d = bundle_with(None, true);
        assert!(Bundle::load(d.path()).unwrap_err().to_string().contains("has no config.json"));
        let d = bundle_with(Some("{"), true);
        assert!(Bundle::load(d.path()).unwrap_err().to_string().contains("is not valid JSON"));
        let d = bundle_with(Some(&good().to_string()), false);
        let e = Bundle::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("root file system") && e.contains("does not exist"), "{e}");
        let mut no_args = good();
        no_args["process"]["args"] = json!([]);
        let d = bundle_with(Some(&no_args.to_string()), true);
        assert!(Bundle::load(d.path()).unwrap_err().to_string().contains("process.args"));
        let mut in_guest_hook = good();
        in_guest_hook["hooks"] = json!({"createContainer": [{"path": "/bin/true"}]});
        let d = bundle_with(Some(&in_guest_hook.to_string()), true);
        let e = Bundle::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("cannot run createContainer hooks"), "{e}");
        let mut host_hooks = good();
        host_hooks["hooks"] = json!({"prestart": [{"path": "/bin/true"}], "createContainer": []});
        let d = bundle_with(Some(&host_hooks.to_string()), true);
        assert!(Bundle::load(d.path()).is_ok());
    }

    #[test]
    fn only_small_host_files_can_be_bind_mounted() {
        let d = bundle_with(None, true);
        let file = d.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 localhost\n").unwrap();
        let big = d.path().join("big");
        std::fs::write(&big, vec![0u8; MAX_HOST_FILE as usize + 1]).unwrap();
        let with_bind = |source: &Path, options: Value| {
            let mut spec = good();
            spec["mounts"] = json!([{"destination": "/data", "type": "none",
                                      "source": source, "options": options}]);
            std::fs::write(d.path().join("config.json"), spec.to_string()).unwrap();
            Bundle::load(d.path())
        };
        let bundle = with_bind(&file, json!(["rbind", "ro"])).unwrap();
        assert_eq!(
            bundle.host_files(),
            [(file.display().to_string(), b"127.0.0.1 localhost\n".to_vec())]
        );
        for source in [d.path(), &big, Path::new("/no/such/dir")] {
            let e = with_bind(source, json!(["bind"])).unwrap_err().to_string();
            assert!(e.contains("at /data") && e.contains("need a shared file system"), "{e}");
        }
        // A mount that is not a bind is the guest's own.
        assert!(with_bind(d.path(), json!(["nosuid"])).is_ok());
    }

    #[test]
    fn guest_size_follows_the_limits() {
        let settings = Settings {
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_cmdline: String::new(),
            default_memory_mib: 200,
            default_vcpus: 1,
            max_vcpus: 2,
            log_level: log::LevelFilter::Warn,
            cache_dir: "/c".into(),
            boot_timeout: std::time::Duration::from_secs(1),
            vm_templates: true,
        };
        let bundle = |spec: &Value| Bundle {
            dir: "/b".into(),
            spec: spec.clone(),
            oci: serde_json::from_value(spec.clone()).unwrap(),
            rootfs: "/b/rootfs".into(),
        };
        let mut spec = good();
        let b = bundle(&spec);
        assert_eq!((b.guest_mem_mib(&settings), b.guest_vcpus(&settings)), (200, 1));
        spec["linux"] = json!({"resources": {"memory": {"limit": 64 << 20},
                                              "cpu": {"quota": 150000, "period": 100000}}});
        let b = bundle(&spec);
        assert_eq!(b.guest_mem_mib(&settings), 64 + GUEST_OVERHEAD_MIB);
        assert_eq!(b.guest_vcpus(&settings), 2);
        spec["linux"]["resources"]["cpu"]["quota"] = json!(400000);
        assert_eq!(bundle(&spec).guest_vcpus(&settings), 2, "max_vcpus caps the quota's 4");
    }
}
