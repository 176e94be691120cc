//! `husk run`: create and start a container. With --detach it returns once the container runs;
//! without, this process is the container's VM process: stdio or the terminal are its own, the
//! signals it gets go to the container, it exits with the container's status, and (as runc
//! does, unless --keep) the container is deleted when it ends.

use crate::bundle::Bundle;
use crate::cli::{GlobalArgs, RunArgs};
use crate::commands::create::{self, check_console, new_record};
use crate::commands::{delete, refuse_preserved_fds, settings, start, write_pid_file};
use crate::container::{process, Container, Status};
use crate::session::TerminalMode;
use crate::signals;
use crate::vm_process::boot_and_create;

/// Returns the exit status to exit with.
pub fn run(global: &GlobalArgs, args: &RunArgs) -> anyhow::Result<i32> {
    if args.detach {
        let (container, record) = create::create(global, &args.create)?;
        drop(container);
        start::run(global, &record.id)?;
        if let Some(pid_file) = &args.create.pid_file {
            write_pid_file(pid_file, record.pid)?;
        }
        return Ok(0);
    }
    refuse_preserved_fds(args.create.preserve_fds)?;
    signals::block_forwarded();
    let settings = settings(global)?;
    let container = Container::create(&global.root, &args.create.id)?;
    let id = args.create.id.clone();
    let created = (|| {
        let bundle = Bundle::load(&args.create.bundle)?;
        check_console(bundle.terminal(), args.create.console_socket.is_some(), false)?;
        let mut record = new_record(&settings, &container, &bundle)?;
        let terminal =
            TerminalMode::for_process(bundle.terminal(), args.create.console_socket.as_deref());
        let created =
            boot_and_create(&settings, container.dir(), &record, &bundle, &terminal, false)?;
        record.pid = std::process::id() as i32;
        record.pid_start_time = process::start_time(record.pid).unwrap_or_default();
        record.status = Status::Created;
        container.save(&record)?;
        if let Some(pid_file) = &args.create.pid_file {
            write_pid_file(pid_file, record.pid)?;
        }
        created.start(&id)?;
        record.status = Status::Running;
        container.save(&record)?;
        start::poststart(&container, &record);
        anyhow::Ok(created)
    })();
    let created = match created {
        Ok(created) => created,
        Err(e) => {
            if let Err(cleanup) = delete::clean_up(container) {
                log::error!("cleaning up after a failed run: {cleanup:#}");
            }
            return Err(e);
        }
    };
    // Other commands (state, kill, exec) may now work on the container.
    drop(container);
    let code = created.serve();
    if !args.keep {
        delete::clean_up(Container::open(&global.root, &id)?)?;
    }
    Ok(code)
}
