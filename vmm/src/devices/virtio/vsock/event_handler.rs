//! The vsock device on the VMM's event loop. `init` registers the activation event only; the
//! first activation registers the queue events, and [`Muxer::sync`](super::unix::Muxer::sync),
//! run after every event, keeps the listener, the host sockets and the deadline timer registered
//! with exactly the interest they need (so nothing is polled that cannot be served).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::VirtioDevice;

/// The per-fd data the device registers its events with.
pub mod token {
    /// The rx queue's event (its index).
    pub const RX_QUEUE: u32 = 0;
    /// The tx queue's event.
    pub const TX_QUEUE: u32 = 1;
    /// The event queue's event.
    pub const EVENT_QUEUE: u32 = 2;
    /// The activation (and reset) event.
    pub const ACTIVATE: u32 = 3;
    /// The listening socket.
    pub const LISTENER: u32 = 4;
    /// The deadline timer.
    pub const TIMER: u32 = 5;
    /// A host client or connection socket (looked up by fd).
    pub const STREAM: u32 = 6;
}

/// Each queue and the data its event is registered with.
const QUEUE_TOKENS: [(usize, u32); 3] =
    [(RX_QUEUE, token::RX_QUEUE), (TX_QUEUE, token::TX_QUEUE), (EVENT_QUEUE, token::EVENT_QUEUE)];

impl Vsock {
    fn on_activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activate_evt.read() {
            log::warn!("vsock: cannot read the activation event: {e}");
        }
        if self.is_activated() && !self.registered {
            self.register_queue_events(ops);
        }
    }

    fn register_queue_events(&mut self, ops: &mut EventOps) {
        for (index, data) in QUEUE_TOKENS {
            let Some(evt) = self.queue_events().get(index) else {
                continue;
            };
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("vsock: cannot register queue {index}'s event: {e:?}");
                return;
            }
        }
        self.registered = true;
    }

    fn on_queue_event(&mut self, index: usize) {
        if let Some(Err(e)) = self.queue_events().get(index).map(|evt| evt.read()) {
            log::warn!("vsock: cannot read queue {index}'s event: {e}");
        }
        if index == TX_QUEUE && self.is_activated() {
            self.process_tx();
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) =
            ops.add(Events::with_data(&self.activate_evt, token::ACTIVATE, EventSet::IN))
        {
            log::error!("vsock: cannot register the activation event: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            token::ACTIVATE => self.on_activate_event(ops),
            token::RX_QUEUE => self.on_queue_event(RX_QUEUE),
            token::TX_QUEUE => self.on_queue_event(TX_QUEUE),
            token::EVENT_QUEUE => self.on_queue_event(EVENT_QUEUE),
            token::LISTENER => self.muxer.accept_clients(),
            token::TIMER => self.muxer.handle_timer(),
            token::STREAM => self.muxer.handle_stream_event(events.fd(), events.event_set()),
            other => log::warn!("vsock: event with unknown data {other}"),
        }
        let active = self.is_activated();
        if active {
            self.process_rx();
        }
        self.muxer.sync(ops, active);
    }
}
