//! The VM-wide state KVM holds outside the vCPUs: the in-kernel irqchip (both PICs and the
//! IOAPIC), the PIT, and the kvmclock, so that a restored guest's monotonic clock goes on from
//! where it was saved.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{ioctl, SnapshotError};

/// The irqchip, PIT and clock of a VM whose vCPUs are paused.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    fd.get_irqchip(&mut chip).map_err(ioctl("get the irqchip"))?;
    Ok(chip)
}

impl VmState {
    /// Read the state of VM `fd`.
    pub fn save(fd: &VmFd) -> Result<Self, SnapshotError> {
        let mut clock = fd.get_clock().map_err(ioctl("get the clock"))?;
        // No flags on restore: KVM_CLOCK_REALTIME would move the clock on by the time the
        // snapshot waited (every restore of a template would find its guest's timers long
        // expired), and the stable bit is KVM's to decide.
        clock.flags = 0;
        Ok(VmState {
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(ioctl("get the PIT"))?,
            clock,
        })
    }

    /// Write this state into VM `fd`, which has its irqchip and PIT.
    pub fn restore(&self, fd: &VmFd) -> Result<(), SnapshotError> {
        fd.set_pit2(&self.pit).map_err(ioctl("set the PIT"))?;
        fd.set_clock(&self.clock).map_err(ioctl("set the clock"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(ioctl("set the irqchip"))?;
        }
        Ok(())
    }
}
