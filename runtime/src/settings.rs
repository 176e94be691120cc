//! husk's own settings: the guest kernel and initramfs, the default guest size, the log level,
//! where rootfs images are cached. Each comes from, in order of precedence: a global flag, the
//! environment (`HUSK_KERNEL`, `HUSK_INITRD`, `HUSK_LOG`, ...), the config file (`HUSK_CONFIG` or
//! `/etc/husk/config.toml`), and last the assets `make install` put next to the binary
//! (`<prefix>/bin/husk` finds `<prefix>/share/husk/`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The config file read when `HUSK_CONFIG` does not name another.
pub const DEFAULT_CONFIG: &str = "/etc/husk/config.toml";
/// The guest kernel's file name under `<prefix>/share/husk/`.
pub const KERNEL_FILE: &str = "vmlinux";
/// The guest image's file name under `<prefix>/share/husk/`.
pub const INITRD_FILE: &str = "husk-guest.cpio.gz";

/// Guest memory when the spec sets no memory limit.
const DEFAULT_MEM_MIB: u64 = 256;
/// What the guest needs besides the container's memory limit (kernel, agent, page cache).
pub const GUEST_OVERHEAD_MIB: u64 = 96;

/// The config file (`/etc/husk/config.toml`); every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Appended to the guest kernel command line.
    pub kernel_cmdline: Option<String>,
    pub default_memory_mib: Option<u64>,
    pub default_vcpus: Option<u8>,
    /// The most vCPUs a guest gets, whatever its CPU quota (default: the host's CPUs; more
    /// makes the vCPUs share them).
    pub max_vcpus: Option<u8>,
    /// error, warn, info or debug.
    pub log_level: Option<String>,
    pub cache_dir: Option<PathBuf>,
    /// How long a guest may take to boot and answer, in seconds.
    pub boot_timeout_secs: Option<u64>,
    /// Restore container VMs from a saved, booted guest instead of booting each (default
    /// true; `HUSK_VM_TEMPLATES=0` turns it off).
    pub vm_templates: Option<bool>,
}

/// Overrides from global flags.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

/// The settings in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_cmdline: String,
    pub default_memory_mib: u64,
    pub default_vcpus: u8,
    pub max_vcpus: u8,
    pub log_level: log::LevelFilter,
    pub cache_dir: PathBuf,
    pub boot_timeout: std::time::Duration,
    pub vm_templates: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading the config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error(
        "invalid log level {0:?} (log_level or HUSK_LOG: expected error, warn, info or debug)"
    )]
    LogLevel(String),
    #[error("invalid HUSK_VM_TEMPLATES {0:?} (expected 0 or 1)")]
    VmTemplates(String),
    #[error(
        "no guest {what}: none at {default} (installed by `make install`); set {env}, \
         --{flag} or `{flag}` in {config}"
    )]
    NoAsset {
        what: &'static str,
        default: String,
        env: &'static str,
        flag: &'static str,
        config: String,
    },
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `<prefix>/share/husk`, where `<prefix>/bin/husk` is this binary.
fn share_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.join("share/husk"))
}

impl Settings {
    /// Read the settings: flags over environment over config file over installed defaults.
    pub fn load(overrides: &Overrides) -> Result<Self, SettingsError> {
        let config_path = env_path("HUSK_CONFIG").unwrap_or_else(|| DEFAULT_CONFIG.into());
        let file = read_config(&config_path)?;
        let share = share_dir();
        let asset = |flag: &Option<PathBuf>,
                     env: &'static str,
                     configured: &Option<PathBuf>,
                     name: &str,
                     what: &'static str,
                     flag_name: &'static str| {
            if let Some(p) = flag.clone().or_else(|| env_path(env)).or_else(|| configured.clone()) {
                return Ok(p);
            }
            let default = share.as_ref().map(|s| s.join(name));
            match default {
                Some(p) if p.is_file() => Ok(p),
                _ => Err(SettingsError::NoAsset {
                    what,
                    default: default
                        .map_or("<prefix>/share/husk".into(), |p| p.display().to_string()),
                    env,
                    flag: flag_name,
                    config: config_path.display().to_string(),
                }),
            }
        };
        let kernel =
            asset(&overrides.kernel, "HUSK_KERNEL", &file.kernel, KERNEL_FILE, "kernel", "kernel")?;
        let initrd = asset(
            &overrides.initrd,
            "HUSK_INITRD",
            &file.initrd,
            INITRD_FILE,
            "initramfs",
            "initrd",
        )?;
        let log_level = match (env_log_level()?, file.log_level.as_deref()) {
            (Some(level), _) => level,
            (None, Some(level)) => parse_level(level)?,
            (None, None) => log::LevelFilter::Warn,
        };
        let kernel_cmdline =
            std::env::var("HUSK_KERNEL_CMDLINE").ok().or(file.kernel_cmdline).unwrap_or_default();
        Ok(Settings {
            kernel,
            initrd,
            kernel_cmdline,
            default_memory_mib: file.default_memory_mib.unwrap_or(DEFAULT_MEM_MIB),
            default_vcpus: file.default_vcpus.unwrap_or(1),
            max_vcpus: file.max_vcpus.unwrap_or_else(host_cpus),
            log_level,
            cache_dir: env_path("HUSK_CACHE_DIR")
                .or(file.cache_dir)
                .unwrap_or_else(|| "/var/lib/husk/images".into()),
            boot_timeout: std::time::Duration::from_secs(file.boot_timeout_secs.unwrap_or(120)),
            vm_templates: env_vm_templates()?.or(file.vm_templates).unwrap_or(true),
        })
    }
}

/// The CPUs this process may run on (at most 255).
fn host_cpus() -> u8 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u8::try_from(cpus).unwrap_or(u8::MAX)
}

/// Whether `HUSK_VM_TEMPLATES` asks for VM templates, if it is set (and not empty).
fn env_vm_templates() -> Result<Option<bool>, SettingsError> {
    match std::env::var("HUSK_VM_TEMPLATES") {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => match v.as_str() {
            "1" | "true" => Ok(Some(true)),
            "0" | "false" => Ok(Some(false)),
            _ => Err(SettingsError::VmTemplates(v)),
        },
        Err(_) => Ok(None),
    }
}

/// The log level `HUSK_LOG` names, if it is set (and not empty).
pub fn env_log_level() -> Result<Option<log::LevelFilter>, SettingsError> {
    match std::env::var("HUSK_LOG") {
        Ok(level) if !level.is_empty() => parse_level(&level).map(Some),
        _ => Ok(None),
    }
}

fn parse_level(level: &str) -> Result<log::LevelFilter, SettingsError> {
    match level {
        "error" => Ok(log::LevelFilter::Error),
        "warn" | "warning" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        other => Err(SettingsError::LogLevel(other.into())),
    }
}

/// The config file's contents; a missing file is an empty config.
fn read_config(path: &Path) -> Result<ConfigFile, SettingsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(source) => {
            return Err(SettingsError::Read { path: path.display().to_string(), source })
        }
    };
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_keys() {
        let c: ConfigFile = toml::from_str(
            "kernel = \"/k\"\ninitrd = \"/i\"\ndefault_memory_mib = 512\ndefault_vcpus = 2\n\
             max_vcpus = 4\nlog_level = \"debug\"\nkernel_cmdline = \"quiet\"\n",
        )
        .unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!((c.default_memory_mib, c.default_vcpus), (Some(512), Some(2)));
        assert_eq!(c.max_vcpus, Some(4));
        assert!(toml::from_str::<ConfigFile>("kernal = \"/k\"").is_err(), "typos are errors");
        assert!(parse_level("loud").is_err());
    }
}
