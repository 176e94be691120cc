//! `husk vm run`: boot one micro-VM from flags (and `HUSK_KERNEL` / `HUSK_INITRD`), with its
//! console on stdio or in a file, and exit with 0 when the guest ends itself.

use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use vmm::config::{ConsoleConfig, ConsoleOutput, VmConfig};
use vmm::devices::virtio::block::BlockConfig;
use vmm::devices::virtio::net::NetConfig;
use vmm::devices::virtio::vsock::VsockConfig;
use vmm::micro_vm::{GuestExit, MicroVm};

use crate::signals;
use crate::terminal::RawTerminal;

/// Flags of `husk vm run`.
#[derive(Args, Debug)]
pub struct VmRunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, env = "HUSK_KERNEL")]
    kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long, env = "HUSK_INITRD")]
    initrd: Option<PathBuf>,
    /// Appended to the command line husk builds (console, devices, reboot=k).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Where the serial console goes: `stdio` (output to stdout, stdin to the guest) or a file.
    #[arg(long, default_value = "stdio")]
    console: String,
    /// A raw disk image as the next virtio-blk disk (/dev/vda, /dev/vdb, ...): PATH[,ro][,id=ID].
    #[arg(long = "disk", value_name = "PATH[,ro][,id=ID]", value_parser = parse_disk)]
    disks: Vec<BlockConfig>,
    /// A virtio-net card on host tap TAP (created if missing, gone when husk exits unless it
    /// existed before): TAP[,mac=MAC].
    #[arg(long = "net", value_name = "TAP[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A vsock device: host clients connect to this Unix socket and send `CONNECT <port>\n`;
    /// guest connections to host port P reach the Unix socket `PATH_P`.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long, default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u64,
}

/// `TAP[,mac=aa:bb:cc:dd:ee:ff]`.
fn parse_net(spec: &str) -> Result<NetConfig, String> {
    let mut parts = spec.split(',');
    let tap_name =
        parts.next().filter(|t| !t.is_empty()).ok_or("the network card needs a tap name")?;
    let mut net = NetConfig { tap_name: tap_name.to_owned(), mac: None };
    for option in parts {
        match option.split_once('=') {
            Some(("mac", mac)) => net.mac = Some(parse_mac(mac)?),
            _ => return Err(format!("unknown network option {option:?} (expected mac=MAC)")),
        }
    }
    Ok(net)
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| if b.len() == 2 { u8::from_str_radix(b, 16).ok() } else { None })
        .collect::<Option<_>>()
        .ok_or_else(|| format!("invalid MAC address {text:?}"))?;
    bytes.try_into().map_err(|_| format!("invalid MAC address {text:?}"))
}

/// `PATH[,ro][,id=ID]`; the path is everything before the first comma.
fn parse_disk(spec: &str) -> Result<BlockConfig, String> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or("the disk needs a path")?;
    let mut disk = BlockConfig { path: PathBuf::from(path), read_only: false, id: None };
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => disk.read_only = true,
            Some(("id", id)) => disk.id = Some(id.to_owned()),
            _ => return Err(format!("unknown disk option {option:?} (expected ro or id=ID)")),
        }
    }
    Ok(disk)
}

impl VmRunArgs {
    fn console(&self) -> ConsoleConfig {
        match self.console.as_str() {
            "stdio" => ConsoleConfig { output: ConsoleOutput::Stdout, read_stdin: true },
            path => ConsoleConfig {
                output: ConsoleOutput::File(PathBuf::from(path)),
                read_stdin: false,
            },
        }
    }

    fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            // The file is the caller's, who may rewrite it while the VM runs: copied.
            share_boot_files: false,
            small_boot_pages: false,
            initrd: self.initrd.clone(),
            extra_cmdline: self.cmdline.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            console: self.console(),
            disks: self.disks.clone(),
            nets: self.nets.clone(),
            vsock: self
                .vsock_uds
                .clone()
                .map(|uds_path| VsockConfig { guest_cid: self.vsock_cid, uds_path }),
        }
    }
}

/// Run the VM; returns the process exit code.
pub fn run(args: &VmRunArgs) -> i32 {
    match boot_and_wait(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("husk: error: {e:#}");
            1
        }
    }
}

fn boot_and_wait(args: &VmRunArgs) -> anyhow::Result<i32> {
    let config = args.vm_config();
    let vm = MicroVm::new(&config).context("cannot start the micro-VM")?;
    let stop_evt = vm.stop_event().context("cannot create the stop event")?;
    signals::forward_to(&stop_evt).context("cannot install signal handlers")?;
    let _raw = if config.console.read_stdin {
        RawTerminal::enable(std::io::stdin().as_fd())
            .context("cannot put the terminal in raw mode")?
    } else {
        None
    };
    let outcome = vm.run().context("the micro-VM failed")?;
    Ok(match outcome.exit {
        GuestExit::Reset | GuestExit::PowerOff => 0,
        GuestExit::Stopped => 128 + signals::received().unwrap_or(libc::SIGTERM),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = parse_disk("/a/b.img").unwrap();
        assert_eq!((d.path, d.read_only, d.id), (PathBuf::from("/a/b.img"), false, None));
        let d = parse_disk("x.img,ro,id=root").unwrap();
        assert_eq!((d.read_only, d.id.as_deref()), (true, Some("root")));
        assert!(parse_disk("").is_err());
        assert!(parse_disk("x.img,rw").unwrap_err().contains("unknown disk option"));
    }

    #[test]
    fn net_specs() {
        let n = parse_net("tap0").unwrap();
        assert_eq!((n.tap_name.as_str(), n.mac), ("tap0", None));
        let n = parse_net("tap1,mac=02:00:00:aa:bb:0f").unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0xaa, 0xbb, 0x0f]));
        assert!(parse_net("tap1,mac=02:00:00:aa:bb").unwrap_err().contains("invalid MAC"));
        assert!(parse_net("tap1,mac=02:00:00:aa:bb:xyz").unwrap_err().contains("invalid MAC"));
        assert!(parse_net("").is_err());
        assert!(parse_net("tap0,mtu=9000").unwrap_err().contains("unknown network option"));
    }
}
