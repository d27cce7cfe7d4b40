//! What the vhost-user backend needs from a device, and what a device answers: the
//! [`VhostDevice`] trait, the [`QueueOutcome`] of one pass over a queue (or the
//! [`QueueError`] that says the ring itself is corrupt), and [`Reaped`] completions of
//! requests that finished asynchronously. A leaf: devices (virtio-blk, in the `blk` module)
//! and the data plane both build on it.

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::inflight::InflightLog;

/// What the handler needs from a device (virtio-blk today).
pub trait VhostDevice {
    /// Device feature bits (virtio), without the transport/ring bits the handler adds.
    fn device_features(&self) -> u64;
    /// The device's configuration space.
    fn config(&self) -> &[u8];
    /// Number of queues the device offers.
    fn num_queues(&self) -> usize;
    /// Drains `queue`, reporting pops and completions to `log`.
    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        log: &mut dyn InflightLog,
    ) -> Result<QueueOutcome, QueueError>;
    /// A descriptor that becomes readable when requests submitted asynchronously have
    /// completed (None: every request completes within `process_queue`).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// A descriptor that becomes readable when the device can take requests again
    /// without any completion (its rate limit refilled); the event loop then calls
    /// [`VhostDevice::reap`], which serves the rings that waited.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether the device takes new requests now (false while full or rate-limited: then
    /// a ring's new requests are no work for a polling loop).
    fn accepting(&self) -> bool {
        true
    }
    /// New I/O limits, from the VMM.
    fn set_rate_limit(&mut self, _limit: ipc::messages::RateLimit) {}
    /// Collects asynchronously completed requests (their status bytes written).
    fn reap(&mut self, _mem: &GuestMemoryMmap, _out: &mut Vec<Reaped>) {}
    /// Whether asynchronous completions are waiting (looked at without a syscall).
    fn completions_ready(&mut self) -> bool {
        false
    }
    /// Waits for every asynchronous request in flight and collects it (before the memory
    /// table changes or a ring stops).
    fn drain(&mut self, _mem: &GuestMemoryMmap, _out: &mut Vec<Reaped>) {}
    /// The device's own counts and latencies of its requests, for the status page.
    fn request_counters(&self) -> ipc::status::RequestCounters {
        ipc::status::RequestCounters::default()
    }
    /// Serves again `heads`, which a dead predecessor popped and never completed.
    fn resubmit(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        heads: &[u16],
        log: &mut dyn InflightLog,
    ) -> Result<QueueOutcome, QueueError>;
}

/// What one pass over a queue did (a drain, or the resubmission of a predecessor's
/// requests). The one outcome type from the device's queue loop up to the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// The guest must be signalled (write the call fd once).
    pub signal: bool,
    /// Chains put in the used ring, successful or not.
    pub completed: u32,
    /// Of those, the ones completed with a non-OK status or without a status byte.
    pub failed: u32,
    /// Avail entries with a head index outside the descriptor table: consumed but not put in
    /// the used ring (a used entry with such an id would be meaningless to the driver).
    pub dropped: u32,
    /// Requests handed to an asynchronous engine (they complete later, as [`Reaped`]).
    pub submitted: u32,
    /// The engine was full: requests wait in the avail ring, notifications still off, to
    /// be taken once completions made room.
    pub throttled: bool,
}

impl QueueOutcome {
    /// Counts one chain put in the used ring; `ok`: with status OK.
    pub fn count_completed(&mut self, ok: bool) {
        self.completed += 1;
        if !ok {
            self.failed += 1;
        }
    }

    /// This pass followed by `next` on the same queue.
    pub fn then(self, next: QueueOutcome) -> QueueOutcome {
        QueueOutcome {
            signal: self.signal || next.signal,
            completed: self.completed + next.completed,
            failed: self.failed + next.failed,
            dropped: self.dropped + next.dropped,
            submitted: self.submitted + next.submitted,
            throttled: next.throttled,
        }
    }
}

/// Queue-level corruption or misuse. The caller must stop serving this queue and mark the
/// device broken (`DEVICE_NEEDS_RESET`): the rings themselves cannot be trusted any more.
/// Bad requests never produce a `QueueError`; they complete with an error status.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue has not been set up (or was reset).
    #[error("queue {queue_index} is not ready")]
    NotReady {
        /// Queue index.
        queue_index: u16,
    },
    /// The avail index moved further than the queue size past the last entry we consumed:
    /// the driver claims more pending requests than the ring holds.
    #[error("queue {queue_index}: avail index {avail_idx} is more than the queue size {size} ahead of the next entry {next_avail}")]
    AvailIndex {
        /// Queue index.
        queue_index: u16,
        /// The avail index the driver published.
        avail_idx: u16,
        /// The next avail entry we would consume.
        next_avail: u16,
        /// The queue size.
        size: u16,
    },
    /// The private ring that replays in-flight heads could not be set up.
    #[error("queue {queue_index}: cannot set up the resubmission ring")]
    Resubmit {
        /// Queue index.
        queue_index: u16,
        /// What failed.
        why: String,
    },
    /// Reading or writing the rings in guest memory failed.
    #[error("queue {queue_index}: ring access failed")]
    Ring {
        /// Queue index.
        queue_index: u16,
        /// virtio-queue's error.
        #[source]
        source: virtio_queue::Error,
    },
}

/// A request that completed asynchronously: what goes into queue `queue`'s used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub queue: u16,
    pub head: u16,
    pub used_len: u32,
    pub ok: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_are_counted_with_their_failures() {
        let mut o = QueueOutcome::default();
        o.count_completed(true);
        o.count_completed(false);
        o.count_completed(true);
        assert_eq!((o.completed, o.failed), (3, 1));
    }

    #[test]
    fn a_pass_after_another_adds_up_and_keeps_the_last_throttle() {
        let first = QueueOutcome {
            signal: true,
            completed: 2,
            failed: 1,
            dropped: 1,
            submitted: 0,
            throttled: true,
        };
        let next = QueueOutcome {
            signal: false,
            completed: 3,
            failed: 0,
            dropped: 0,
            submitted: 4,
            throttled: false,
        };
        assert_eq!(
            first.then(next),
            QueueOutcome {
                signal: true,
                completed: 5,
                failed: 1,
                dropped: 1,
                submitted: 4,
                throttled: false,
            }
        );
    }
}
