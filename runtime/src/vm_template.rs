//! VM templates: a guest booted to its agent once and saved (see the VMM's `snapshot`
//! module), from which every container VM of the same kind is restored instead of booting,
//! as Kata's VM templates and Firecracker's snapshots do. The kind is everything a guest is
//! booted with: kernel, initramfs, command line, memory, vCPUs and the devices' layout (the
//! template's rootfs disk is empty; the restored VM's is the container's, which its guest
//! learns from a configuration change; the template's NICs have MACs of their own,
//! [`nic_mac`], which the agent trades for the container's). Restored guests share the
//! template's memory file through the page cache until they write a page.
//!
//! A template lives in `<cache>/templates/<key>/`, made under a name of its own and renamed
//! into place, so that no create ever sees half a template; creates that need one that is
//! being made wait for it (the flock of `<cache>/templates/.<key>.lock`) instead of each
//! booting its own. Templates not used for a while are removed once a new one is made.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context};
use husk_agent_protocol::hybrid_vsock::SocketPath;
use sha2::{Digest, Sha256};
use vmm::config::{ConsoleOutput, VmConfig};
use vmm::devices::virtio::block::BlockConfig;
use vmm::devices::virtio::net::NetConfig;
use vmm::micro_vm::MicroVm;
use vmm::snapshot::{SnapshotError, STATE_FILE};

use crate::agent;
use crate::settings::Settings;

/// How long a template must have gone unused to be removed.
const STALE_AFTER: Duration = Duration::from_secs(3600);
/// How long the template VM's vsock connections may take to close before it is saved.
const QUIET_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a failed template boot's console an error quotes.
const CONSOLE_TAIL: u64 = 2048;

/// The MAC of a template's NIC `index` (locally administered: "husk" and the index), which
/// every guest restored from it has until the agent is told the container's.
pub fn nic_mac(index: usize) -> [u8; 6] {
    [0x02, b'h', b'u', b's', b'k', index as u8]
}

/// The directory of the template for VMs of `config`, made now if there is none.
pub fn ready(settings: &Settings, config: &VmConfig) -> anyhow::Result<PathBuf> {
    let root = settings.cache_dir.join("templates");
    let key = key(config)?;
    let dir = root.join(&key);
    let made = || dir.join(STATE_FILE).is_file();
    if made() {
        // Its modification time says when it was last used (see `remove_stale`).
        let _ = File::open(&dir).and_then(|d| d.set_modified(SystemTime::now()));
        return Ok(dir);
    }
    fs::create_dir_all(&root)
        .with_context(|| format!("cannot create the template directory {}", root.display()))?;
    let lock_path = root.join(format!(".{key}.lock"));
    let _lock = crate::rootfs_image::lock(&lock_path, true)
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    if made() {
        return Ok(dir);
    }
    let partial = root.join(format!(".{key}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    // Only root reads a template: its memory is a guest kernel's, random generator state
    // included (each restored guest is reseeded, but its first moments are the template's).
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&partial)
        .with_context(|| format!("cannot create the template directory {}", partial.display()))?;
    let result = make(settings, config, &partial).and_then(|()| {
        fs::rename(&partial, &dir)
            .with_context(|| format!("cannot move the template to {}", dir.display()))
    });
    let _ = fs::remove_dir_all(&partial);
    result?;
    remove_stale(&root, &key);
    Ok(dir)
}

/// The template's name: a digest of what the guest boots with and of this husk binary (whose
/// VMM wrote the device state), the host side of the devices left out.
fn key(config: &VmConfig) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the husk binary")?;
    let meta = fs::metadata(&exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let mut h = Sha256::new();
    for part in [
        config.kernel.display().to_string(),
        config.initrd.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        config.extra_cmdline.clone(),
        format!("{} MiB, {} vCPUs", config.mem_mib, config.vcpus),
        format!("small boot pages {}", config.small_boot_pages),
        format!("disks {:?}", config.disks.iter().map(|d| d.read_only).collect::<Vec<_>>()),
        format!("nets {}", config.nets.len()),
        format!("vsock {:?}", config.vsock.as_ref().map(|v| v.guest_cid)),
        format!(
            "husk {}:{}:{}:{}.{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec()
        ),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// Boot a VM of `config` with empty disks in `dir`, wait for its agent, save it there.
fn make(settings: &Settings, config: &VmConfig, dir: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    let empty = dir.join("empty-disk");
    File::create(&empty).with_context(|| format!("cannot create {}", empty.display()))?;
    let console = dir.join("console");
    let vsock = SocketPath::new(&dir.join("vsock.sock"))
        .with_context(|| format!("cannot open the template directory {}", dir.display()))?;
    let mut template = config.clone();
    template.disks = config
        .disks
        .iter()
        .map(|d| BlockConfig { path: empty.clone(), read_only: d.read_only, id: None })
        .collect();
    // The container's taps serve the template's boot: its guest does not bring its NICs up.
    template.nets = config
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| NetConfig { tap_name: n.tap_name.clone(), mac: Some(nic_mac(i)) })
        .collect();
    template.console.output = ConsoleOutput::File(console.clone());
    if let Some(v) = template.vsock.as_mut() {
        v.uds_path = vsock.path().to_path_buf();
    }
    let ready = agent::ReadySignal::listen(vsock.path()).ok();
    let vm = MicroVm::new(&template).context("cannot start the template VM")?;
    let stop = vm.stop_event().context("cannot create the VM's stop event")?;
    let snapshot = vm.snapshot_handle().context("cannot create the VM's snapshot event")?;
    let thread = crate::threads::try_spawn("vmm", move || vm.run())
        .context("cannot start the VMM thread")?;
    let running = || !thread.is_finished();
    let client = agent::wait_ready(vsock.path(), settings.boot_timeout, ready.as_ref(), running);
    let answered = client.is_some();
    // Closing the client closes its connection; the guest's readiness connection closes as
    // well. The VM is saved once neither is left (`SnapshotError::Busy` until then).
    drop(client);
    let saved = answered.then(|| {
        let deadline = Instant::now() + QUIET_TIMEOUT;
        loop {
            match snapshot.take(dir) {
                Err(SnapshotError::Busy(why)) if Instant::now() < deadline => {
                    log::debug!("the template VM is not ready to be saved: {why}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => break other,
            }
        }
    });
    let _ = stop.write(1);
    let ended = thread.join();
    match saved {
        None => Err(anyhow!(
            "the template VM's agent did not answer (its console: {})",
            console_tail(&console)
        )),
        Some(Err(e)) => Err(e).context("cannot save the template VM"),
        Some(Ok(())) => {
            if let Ok(Err(e)) = ended {
                log::debug!("the template VM ended with: {e}");
            }
            log::debug!("VM template {} made in {:?}", dir.display(), start.elapsed());
            Ok(())
        }
    }
}

/// The end of a console file, for an error message.
fn console_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL)));
        let _ = f.read_to_string(&mut text);
    }
    match text.trim() {
        "" => "empty".into(),
        t => t.to_string(),
    }
}

/// Remove the templates in `root` other than `current` unused for long, their locks, and what
/// a create killed while it made one left.
fn remove_stale(root: &Path, current: &str) {
    crate::stale::remove_older_than(root, &[current, &format!(".{current}.lock")], STALE_AFTER);
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_tests::tiny_guest::TempDir;

    fn age(path: &Path, by: Duration) {
        File::open(path).unwrap().set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn templates_and_leftovers_unused_for_long_go_and_the_current_one_stays() {
        let tmp = TempDir::new("templates-stale");
        let root = tmp.path();
        for dir in ["current", "old", "recent", ".old.1234"] {
            fs::create_dir(root.join(dir)).unwrap();
            fs::write(root.join(dir).join(STATE_FILE), "{}").unwrap();
        }
        for lock in [".current.lock", ".old.lock"] {
            fs::write(root.join(lock), "").unwrap();
        }
        for name in ["current", ".current.lock", "old", ".old.1234", ".old.lock"] {
            age(&root.join(name), 2 * STALE_AFTER);
        }
        remove_stale(root, "current");
        let mut left: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".current.lock", "current", "recent"]);
    }
}
