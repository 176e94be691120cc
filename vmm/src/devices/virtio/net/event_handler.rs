//! The network device on the VMM's event loop.
//!
//! At first only the activation event is watched. The first activation adds the two queue
//! events and the tap; later activations (after a reset) find them there already. The tap is
//! watched edge-triggered: the device stops reading it while the guest has no rx buffer, and
//! a level-triggered tap would then wake the loop again and again. What restarts reading is
//! the rx queue's notification, or the next frame arriving on the tap. Until the device is
//! activated (and after a reset) the data paths do nothing: notifications are drained and
//! ignored, and frames stay queued in the tap.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Net, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::device::VirtioDevice;

impl Net {
    fn on_activate(&mut self, ops: &mut EventOps) {
        drain(&self.activate_evt, "activation");
        if !self.is_activated() {
            // Reset before the loop got to the activation.
            return;
        }
        if !self.io_events_registered {
            self.register_io_events(ops);
            self.io_events_registered = true;
        }
        // Chains and frames may have come before the activation reached the loop.
        self.process_tx();
        self.process_rx();
    }

    fn register_io_events(&self, ops: &mut EventOps) {
        let rx_queue = Events::new(&self.queue_evts[RX_QUEUE], EventSet::IN);
        let tx_queue = Events::new(&self.queue_evts[TX_QUEUE], EventSet::IN);
        let tap = Events::new(&self.tap, EventSet::IN | EventSet::EDGE_TRIGGERED);
        let watched = [(rx_queue, "rx queue event"), (tx_queue, "tx queue event"), (tap, "tap")];
        for (events, what) in watched {
            if let Err(e) = ops.add(events) {
                log::error!("net {}: cannot watch the {what}: {e}", self.tap_name());
            }
        }
    }

    fn on_tap_event(&mut self, events: EventSet) {
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            log::error!("net {}: the tap reports an error or hang-up", self.tap_name());
        }
        self.process_rx();
    }
}

/// Reset an event fd's counter; an empty one is fine.
fn drain(evt: &EventFd, what: &str) {
    if let Err(e) = evt.read() {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            log::error!("net: cannot read the {what} event: {e}");
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            log::error!("net {}: cannot watch the activation event: {e}", self.tap_name());
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            self.on_activate(ops);
        } else if fd == self.queue_evts[RX_QUEUE].as_raw_fd() {
            drain(&self.queue_evts[RX_QUEUE], "rx queue");
            self.process_rx();
        } else if fd == self.queue_evts[TX_QUEUE].as_raw_fd() {
            drain(&self.queue_evts[TX_QUEUE], "tx queue");
            self.process_tx();
        } else if fd == self.tap.as_raw_fd() {
            self.on_tap_event(events.event_set());
        } else {
            log::warn!("net {}: event on unknown fd {fd}", self.tap_name());
        }
    }
}
