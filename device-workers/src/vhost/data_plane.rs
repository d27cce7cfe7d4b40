//! The data plane: the rings, guest memory and the device, and what happens on a kick, a
//! completion or a poll. Drains a ring through the device's queue loop, recovers what a
//! predecessor left in flight when a ring starts, publishes asynchronous completions,
//! signals the guest, and keeps the counters the status page shows. The protocol handler
//! (the `handler` module) sets all of this up from the frontend's messages.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device::{QueueOutcome, Reaped, VhostDevice};
use super::ring::{RingState, Vring};
use crate::inflight::{InflightLog, InflightRegion, NoInflight};
use crate::quiet::guest_warn;

/// A change of the kick eventfds the event loop watches.
#[derive(Debug)]
pub struct KickChanges {
    /// Every kick to watch now: `(queue index, fd)`.
    pub watch: Vec<(usize, RawFd)>,
    /// Kicks no ring uses any more: still open, so the loop can take them out of its set
    /// before it drops them.
    pub retired: Vec<EventFd>,
}

/// Totals since the worker started, for the status page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    /// Requests completed, failures included (both paths count alike).
    pub completed: u64,
    pub failed: u64,
}

impl Totals {
    /// One request completed asynchronously (`ok`: with status OK).
    fn count(&mut self, ok: bool) {
        self.completed += 1;
        self.failed += u64::from(!ok);
    }

    /// A pass over a ring (its synchronous completions).
    fn add(&mut self, done: &QueueOutcome) {
        self.completed += u64::from(done.completed);
        self.failed += u64::from(done.failed);
    }
}

/// The rings, the guest memory they live in, and the device serving them.
#[derive(Debug)]
pub struct DataPlane<D> {
    device: D,
    mem: Option<GuestMemoryMmap>,
    vrings: Vec<Vring>,
    /// Rings whose kick registration or state changed since the event loop last looked.
    dirty: bool,
    /// Rings found corrupt since the worker started.
    rings_broken: u64,
    /// Kick eventfds the frontend replaced or a stop dropped, kept open until the event
    /// loop has taken them out of its epoll set: closing our descriptor does not end the
    /// registration while the frontend still holds the same eventfd, and a later
    /// SET_VRING_KICK of that eventfd on the same descriptor number would then fail to
    /// register (EEXIST).
    retired_kicks: Vec<EventFd>,
    totals: Totals,
    /// Inflight tracking: created before the sandbox, or adopted from the frontend.
    inflight: Option<InflightRegion>,
    /// Requests resubmitted for predecessors, since start.
    resubmitted: u64,
    /// Rings started (each ran inflight recovery first), since start.
    rings_started: u64,
    /// Where the next pass over throttled rings starts (see [`throttled_order`]).
    next_throttled: usize,
}

/// The order in which `n` rings are served after a completion or a refill, starting at
/// `start`: a rotation, so that when room comes back one request at a time (a rate limit
/// refilling), every throttled ring gets its turn instead of the first one taking it all.
fn throttled_order(n: usize, start: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (start + k) % n.max(1))
}

impl<D: VhostDevice> DataPlane<D> {
    pub fn new(device: D) -> Self {
        let vrings = (0..device.num_queues()).map(|_| Vring::new()).collect();
        DataPlane {
            device,
            mem: None,
            vrings,
            dirty: true,
            rings_broken: 0,
            retired_kicks: Vec::new(),
            totals: Totals::default(),
            inflight: None,
            resubmitted: 0,
            rings_started: 0,
            next_throttled: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, for what is done once the worker is confined (parsing its image).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Requests resubmitted on behalf of a dead predecessor.
    pub fn resubmitted(&self) -> u64 {
        self.resubmitted
    }

    /// Rings started since this backend began (the frontend's restarts included).
    pub fn rings_started(&self) -> u64 {
        self.rings_started
    }

    /// The device's counts and latencies of its requests.
    pub fn request_counters(&self) -> ipc::status::RequestCounters {
        self.device.request_counters()
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Rings found corrupt since the worker started (each one the device must answer with
    /// DEVICE_NEEDS_RESET, which only the VMM can set).
    pub fn rings_broken(&self) -> u64 {
        self.rings_broken
    }

    /// The device's completion descriptor, if it completes requests asynchronously.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.device.completion_fd()
    }

    /// The device's wake descriptor (its rate limit refilled), if it has one.
    pub fn wake_fd(&self) -> Option<RawFd> {
        self.device.wake_fd()
    }

    /// What the event loop must change in its epoll set, if anything changed since it last
    /// looked. Clears the dirty flag.
    pub fn take_kick_changes(&mut self) -> Option<KickChanges> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        Some(KickChanges {
            watch: self
                .vrings
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.watched_kick().map(|fd| (i, fd)))
                .collect(),
            retired: std::mem::take(&mut self.retired_kicks),
        })
    }

    /// Handles a kick on ring `index`: clears the eventfd, drains the ring, signals.
    pub fn kick(&mut self, index: usize) {
        if let Some(kick) = self.vrings.get(index).and_then(|v| v.kick.as_ref()) {
            // Reading resets the counter; a spurious wake-up reads EAGAIN, harmless.
            let _ = kick.read();
        }
        self.process(index);
    }

    /// Drains ring `index` if it is live; a ring just started first recovers what a
    /// predecessor left in flight.
    pub fn process(&mut self, index: usize) {
        let Some(mem) = self.mem.as_ref() else { return };
        let Some(vring) = self.vrings.get_mut(index) else {
            return;
        };
        if !vring.live() {
            return;
        }
        // At most ipc's MAX_QUEUES rings.
        let queue_index = index as u16;
        let size = vring.queue.size();
        let mut tracker = self.inflight.as_mut().and_then(|r| r.queue(index, size));
        let mut untracked = NoInflight;
        // What this call did, and the error that broke the ring, if one did. A failed
        // step counts nothing (what it published before failing is left out of the
        // totals); the steps before it count.
        let mut done = QueueOutcome::default();
        let mut broke = None;
        if vring.state.take_recovery() {
            let used = match vring.queue.used_idx(mem, Ordering::Acquire) {
                Ok(u) => u.0,
                Err(e) => {
                    guest_warn!("queue {index}: cannot read the used idx: {e}");
                    vring.state = vring.state.broken();
                    self.rings_broken += 1;
                    self.dirty = true;
                    return;
                }
            };
            vring.queue.set_next_used(used);
            if let Some(t) = tracker.as_mut() {
                let recovery = t.recover(used);
                let n = recovery.resubmit.len() as u16;
                vring.queue.set_next_avail(used.wrapping_add(n));
                if n > 0 || recovery.repaired {
                    tracing::info!(
                        "queue {index}: resuming at used idx {used}: {n} request(s) resubmitted{}",
                        if recovery.repaired {
                            ", last completion repaired"
                        } else {
                            ""
                        }
                    );
                }
                match self.device.resubmit(
                    queue_index,
                    &mut vring.queue,
                    mem,
                    &recovery.resubmit,
                    t,
                ) {
                    Ok(outcome) => done = outcome,
                    Err(e) => broke = Some(e),
                }
                self.resubmitted += u64::from(n);
            }
            self.rings_started += 1;
            // Signal once whatever happened: a predecessor may have died between publishing
            // a used entry and writing the call fd, and a driver without a timeout (Linux)
            // would wait for that interrupt forever. A spurious one costs nothing.
            done.signal = true;
        }
        if broke.is_none() {
            let log: &mut dyn InflightLog = match tracker.as_mut() {
                Some(t) => t,
                None => &mut untracked,
            };
            match self
                .device
                .process_queue(queue_index, &mut vring.queue, mem, log)
            {
                Ok(drained) => done = done.then(drained),
                Err(e) => {
                    done.throttled = false;
                    broke = Some(e);
                }
            }
        }
        self.totals.add(&done);
        match broke {
            None => vring.state = vring.state.passed(done.throttled),
            Some(e) => {
                guest_warn!("{e}");
                guest_warn!(
                    "queue {index}: the ring is corrupt; not serving it until it is set up again"
                );
                vring.state = vring.state.broken();
                self.rings_broken += 1;
                self.dirty = true;
            }
        }
        if done.signal {
            vring.signal(index);
        }
    }

    /// Drains every live ring (after setup changes, so nothing queued before a kick was
    /// registered waits forever).
    pub fn process_all(&mut self) {
        for index in 0..self.vrings.len() {
            self.process(index);
        }
    }

    /// Whether there is work without a kick or a completion event: a live ring whose avail
    /// idx moved past what was taken, or completions waiting in the device. Reads memory
    /// only (for polling).
    pub fn has_work(&mut self) -> bool {
        if self.device.completions_ready() {
            return true;
        }
        // A full or rate-limited device takes nothing new: its rings wait for a
        // completion or its wake descriptor, not for a spinning loop.
        if !self.device.accepting() {
            return false;
        }
        let Some(mem) = self.mem.as_ref() else {
            return false;
        };
        self.vrings.iter().any(|v| {
            v.live()
                && v.queue
                    .avail_idx(mem, Ordering::Acquire)
                    .is_ok_and(|a| a.0 != v.queue.next_avail())
        })
    }

    /// Publishes what the device completed since the last look, then serves the rings
    /// that had to wait for room.
    pub fn reap(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let mut reaped = Vec::new();
        self.device.reap(mem, &mut reaped);
        self.publish(&reaped);
        let n = self.vrings.len();
        let start = self.next_throttled;
        self.next_throttled = (start + 1) % n.max(1);
        for index in throttled_order(n, start) {
            if self.vrings[index].state == RingState::Throttled {
                self.process(index);
            }
        }
    }

    /// Waits for every request the device has in flight and publishes it: nothing may
    /// touch guest memory or a ring once the memory table changes or the ring stops.
    pub(super) fn drain(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let mut reaped = Vec::new();
        self.device.drain(mem, &mut reaped);
        self.publish(&reaped);
    }

    /// Puts asynchronously completed requests in their used rings (bracketed by the
    /// inflight log, like synchronous ones) and signals each ring once.
    fn publish(&mut self, reaped: &[Reaped]) {
        let Some(mem) = self.mem.as_ref() else { return };
        let mut touched = vec![false; self.vrings.len()];
        for r in reaped {
            let index = usize::from(r.queue);
            let Some(vring) = self.vrings.get_mut(index) else {
                continue;
            };
            if !vring.state.serving() {
                // The ring stopped (or broke) under the request: the frontend no longer
                // expects it.
                continue;
            }
            let size = vring.queue.size();
            let mut tracker = self.inflight.as_mut().and_then(|t| t.queue(index, size));
            if let Some(t) = tracker.as_mut() {
                t.completing(r.head);
            }
            if let Err(e) = vring.queue.add_used(mem, r.head, r.used_len) {
                tracing::warn!("queue {index}: cannot publish a completion: {e}");
                vring.state = vring.state.broken();
                self.dirty = true;
                continue;
            }
            if let Some(t) = tracker.as_mut() {
                t.completed(r.head, vring.queue.next_used());
            }
            self.totals.count(r.ok);
            touched[index] = true;
        }
        for (index, vring) in self.vrings.iter_mut().enumerate() {
            if !touched[index] {
                continue;
            }
            if !matches!(vring.queue.needs_notification(mem), Ok(false)) {
                vring.signal(index);
            }
        }
    }

    // Setup, for the protocol handler.

    /// Offers inflight tracking with `region`.
    pub(super) fn set_inflight(&mut self, region: InflightRegion) {
        self.inflight = Some(region);
    }

    pub(super) fn inflight_mut(&mut self) -> Option<&mut InflightRegion> {
        self.inflight.as_mut()
    }

    pub(super) fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.mem.as_ref()
    }

    /// A new memory table (the caller drained first).
    pub(super) fn set_memory(&mut self, mem: GuestMemoryMmap) {
        self.mem = Some(mem);
    }

    pub(super) fn rings_mut(&mut self) -> &mut [Vring] {
        &mut self.vrings
    }

    pub(super) fn ring_mut(&mut self, index: usize) -> Option<&mut Vring> {
        self.vrings.get_mut(index)
    }

    /// Tells the event loop to look at the rings' kicks again.
    pub(super) fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Keeps `kick` open until the event loop took it out of its set.
    pub(super) fn retire_kick(&mut self, kick: Option<EventFd>) {
        self.retired_kicks.extend(kick);
        self.dirty = true;
    }

    /// GET_VRING_BASE, after draining: stops ring `index` (its kick and call dropped,
    /// nothing in flight any more) and returns its next avail index.
    pub(super) fn stop_ring(&mut self, index: usize) -> Option<u16> {
        let vring = self.vrings.get_mut(index)?;
        vring.state = vring.state.stopped();
        let kick = vring.kick.take();
        vring.call = None;
        let next_avail = vring.queue.next_avail();
        let size = vring.queue.size();
        self.retire_kick(kick);
        // Drained (and synchronous requests complete between messages), so nothing is in
        // flight now: a stopped ring starts afresh.
        if let Some(mut q) = self.inflight.as_mut().and_then(|r| r.queue(index, size)) {
            q.clear();
        }
        Some(next_avail)
    }

    /// SET_VRING_KICK: ring `index` watches `kick` and starts (recovery due) if it was
    /// stopped.
    pub(super) fn start_ring(&mut self, index: usize, kick: EventFd) -> Option<()> {
        let vring = self.vrings.get_mut(index)?;
        let old = vring.kick.replace(kick);
        vring.state = vring.state.kick_set();
        self.retire_kick(old);
        Some(())
    }

    /// Whether any ring is started (SET_INFLIGHT_FD must come before).
    pub(super) fn any_started(&self) -> bool {
        self.vrings.iter().any(|v| v.state.started())
    }

    /// Back to no rings set up: drains, then every ring is new (its kick retired).
    pub(super) fn reset_rings(&mut self) {
        self.drain();
        for v in &mut self.vrings {
            let old = std::mem::take(v);
            self.retired_kicks.extend(old.kick);
        }
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_rings_take_turns() {
        let firsts: Vec<usize> = (0..6)
            .map(|start| throttled_order(3, start % 3).next().unwrap())
            .collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(throttled_order(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(throttled_order(0, 0).count(), 0);
    }

    /// Both paths count a failed request as completed and as failed (the asynchronous
    /// one once counted only successes as completed).
    #[test]
    fn failures_count_as_completed_on_both_paths() {
        let mut sync = Totals::default();
        let mut done = QueueOutcome::default();
        done.count_completed(true);
        done.count_completed(false);
        sync.add(&done);
        let mut uring = Totals::default();
        uring.count(true);
        uring.count(false);
        assert_eq!((sync.completed, sync.failed), (2, 1));
        assert_eq!((uring.completed, uring.failed), (2, 1));
    }
}
