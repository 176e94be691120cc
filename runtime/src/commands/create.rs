//! `husk create`: check the bundle, make the rootfs disk image, start the container's VM
//! process in the background and return once the guest agent has created the container; the
//! VM process's pid goes to `--pid-file`. On any failure nothing is left behind.

use anyhow::{anyhow, bail, Context};

use crate::bundle::Bundle;
use crate::cli::{CreateArgs, GlobalArgs};
use crate::commands::{refuse_preserved_fds, self_command, settings, write_pid_file};
use crate::container::{now_rfc3339, process, Container, Record, Status};
use crate::rootfs_image::RootfsImages;
use crate::settings::Settings;
use crate::sync_pipe::spawn_reported;

pub fn run(global: &GlobalArgs, args: &CreateArgs) -> anyhow::Result<()> {
    let (container, record) = create(global, args)?;
    drop(container);
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, record.pid)?;
    }
    Ok(())
}

/// Create the container, returning its record (locked) with its VM process running.
pub fn create(global: &GlobalArgs, args: &CreateArgs) -> anyhow::Result<(Container, Record)> {
    refuse_preserved_fds(args.preserve_fds)?;
    crate::container::check_id(&args.id)?;
    let settings = settings(global)?;
    let container = Container::create(&global.root, &args.id)?;
    match create_in(global, &settings, &container, args) {
        Ok(record) => Ok((container, record)),
        Err(e) => {
            if let Err(cleanup) = crate::commands::delete::clean_up(container) {
                log::error!("cleaning up after a failed create: {cleanup}");
            }
            Err(e)
        }
    }
}

/// The runc errors for a terminal without a console socket and the other way round.
pub fn check_console(terminal: bool, console_socket: bool, detached: bool) -> anyhow::Result<()> {
    match (terminal, console_socket) {
        (true, false) if detached => {
            bail!("cannot allocate tty if husk will detach without setting console socket")
        }
        (false, true) => bail!("cannot use console socket if husk will not allocate tty"),
        _ => Ok(()),
    }
}

/// The record of a new container from `args` (its VM process not yet started).
pub fn new_record(
    settings: &Settings,
    container: &Container,
    bundle: &Bundle,
) -> anyhow::Result<Record> {
    let image = rootfs_disk(settings, &bundle.rootfs, container.id())?;
    let record = Record {
        id: container.id().into(),
        pid: 0,
        pid_start_time: 0,
        status: Status::Creating,
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: now_rfc3339(),
        annotations: bundle.annotations(),
        image,
    };
    container.save(&record)?;
    // `exec` builds its processes from the spec's process, as runc does; the bundle may be
    // gone by then.
    let spec_path = container.spec_path();
    std::fs::write(&spec_path, serde_json::to_vec(&bundle.spec)?)
        .with_context(|| format!("writing {}", spec_path.display()))?;
    Ok(record)
}

fn create_in(
    global: &GlobalArgs,
    settings: &Settings,
    container: &Container,
    args: &CreateArgs,
) -> anyhow::Result<Record> {
    let bundle = Bundle::load(&args.bundle)?;
    check_console(bundle.terminal(), args.console_socket.is_some(), true)?;
    let mut record = new_record(settings, container, &bundle)?;
    let mut cmd = self_command(global);
    cmd.arg("vm-process").arg(container.id());
    if let Some(socket) = &args.console_socket {
        cmd.arg("--console-socket").arg(socket);
    }
    let child = spawn_reported(cmd, "the container's VM process")
        .map_err(|e| anyhow!("cannot create container \"{}\": {e}", container.id()))?;
    record.pid = child.id() as i32;
    record.pid_start_time = process::start_time(record.pid)
        .ok_or_else(|| anyhow!("the container's VM process exited right after creating it"))?;
    record.status = Status::Created;
    container.save(&record)?;
    Ok(record)
}

/// The container's rootfs as a disk image from the cache (see `rootfs_image`), held through a
/// link in the cache's `in-use/` (the cache's file system; `delete` removes it).
fn rootfs_disk(
    settings: &Settings,
    rootfs: &std::path::Path,
    id: &str,
) -> anyhow::Result<crate::container::DiskImage> {
    let images = RootfsImages::new(&settings.cache_dir)?;
    let in_use = settings.cache_dir.join(IN_USE);
    std::fs::create_dir_all(&in_use).with_context(|| format!("creating {}", in_use.display()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let link = in_use.join(format!("{id}-{nanos:x}"));
    let image = images
        .prepare(rootfs, &link)
        .with_context(|| format!("cannot make a disk image of {}", rootfs.display()))?;
    log::debug!(
        "rootfs image {} of {id}: {}",
        image.key,
        if image.from_cache { "from the cache" } else { "built" }
    );
    if let Some(reason) = &image.ext4_reason {
        log::info!("the rootfs image of {id} is ext4: {reason}");
    }
    Ok(crate::container::DiskImage { path: image.path, fstype: image.fstype.as_str().into() })
}

/// Where containers' links to their rootfs images live, under the image cache.
const IN_USE: &str = "in-use";
