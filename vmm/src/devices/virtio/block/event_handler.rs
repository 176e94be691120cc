//! The block device on the VMM's event loop: it waits for its activation event, then registers
//! its queue event (once, however often the driver resets and re-activates it) and serves the
//! request queue each time the driver notifies it.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;
use crate::devices::virtio::device::VirtioDevice;

/// Event data of the activation event.
const ACTIVATE_EVENT: u32 = 0;
/// Event data of the request queue's event.
const QUEUE_EVENT: u32 = 1;

impl Block {
    /// The driver set DRIVER_OK: start listening to the queue.
    fn on_activate(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activate_evt.read() {
            log::warn!(
                "block {}: cannot read the activation event: {e}",
                self.disk.path().display()
            );
        }
        if self.queue_events_registered {
            return;
        }
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::with_data(evt, QUEUE_EVENT, EventSet::IN)) {
                log::error!(
                    "block {}: cannot watch the queue event: {e}",
                    self.disk.path().display()
                );
                return;
            }
        }
        self.queue_events_registered = true;
    }

    /// The driver notified the queue: serve it, or drop the notification if not activated.
    fn on_queue_event(&mut self) {
        for evt in &self.queue_evts {
            if let Err(e) = evt.read() {
                log::warn!(
                    "block {}: cannot read the queue event: {e}",
                    self.disk.path().display()
                );
            }
        }
        if self.is_activated() {
            self.process_queue();
        } else {
            log::debug!("block {}: queue notified before activation", self.disk.path().display());
        }
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN))
        {
            log::error!(
                "block {}: cannot watch the activation event: {e}",
                self.disk.path().display()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_EVENT => self.on_activate(ops),
            QUEUE_EVENT => self.on_queue_event(),
            other => log::warn!("block {}: unexpected event {other}", self.disk.path().display()),
        }
    }
}
