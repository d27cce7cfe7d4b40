//! Draining one virtqueue: pop chains, parse, execute, publish used entries, decide whether
//! the guest must be signalled. The event glue (kick fd, call fd, epoll) lives in the
//! vhost-user handler, which calls [`process_queue`] on every kick.
//!
//! The loop is the usual notification-suppressing one: disable notifications, drain the avail
//! ring, publish, then re-enable and re-check the avail index, looping while the guest added
//! more in between (with `VIRTIO_RING_F_EVENT_IDX` virtio-queue writes `avail_event`, without
//! it the `NO_NOTIFY` used flag). Whether to signal is decided once per drained batch with
//! `needs_notification` (always true without EVENT_IDX, `used_event` based with it), so a
//! batch costs at most one call-fd write by the caller.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::backend::DiskBackend;
use super::execute::{complete_rejected, execute, Completion};
use super::request::{BlkContext, Request};

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

/// What one [`process_queue`] call did.
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
}

/// Drains `queue`, executing each request against `disk`.
///
/// `queue_index` only labels errors and logs. Returns [`QueueError`] only for ring-level
/// corruption; see there.
pub fn process_queue<M: GuestMemory>(
    queue: &mut Queue,
    queue_index: u16,
    mem: &M,
    disk: &mut dyn DiskBackend,
    ctx: &BlkContext,
) -> Result<QueueOutcome, QueueError> {
    if !queue.ready() {
        return Err(QueueError::NotReady { queue_index });
    }
    let ring = |source| QueueError::Ring {
        queue_index,
        source,
    };
    let mut outcome = QueueOutcome::default();
    loop {
        queue.disable_notification(mem).map_err(ring)?;
        let mut added = false;
        while let Some(chain) = next_chain(queue, queue_index, mem)? {
            let head_index = chain.head_index();
            if head_index >= queue.size() {
                // Checked here because virtio-queue's add_used would log this at error level,
                // which would let a guest flood the logs.
                tracing::debug!(
                    queue_index,
                    head_index,
                    "avail entry with an out-of-range head index dropped"
                );
                outcome.dropped += 1;
                continue;
            }
            let completion = handle_chain(chain, mem, disk, ctx, usize::from(queue.size()));
            queue
                .add_used(mem, head_index, completion.used_len)
                .map_err(ring)?;
            added = true;
            outcome.completed += 1;
            if !completion.is_ok() {
                outcome.failed += 1;
            }
        }
        if added && queue.needs_notification(mem).map_err(ring)? {
            outcome.signal = true;
        }
        if !queue.enable_notification(mem).map_err(ring)? {
            break;
        }
    }
    Ok(outcome)
}

/// Parses and executes one chain.
fn handle_chain<M: GuestMemory>(
    chain: virtio_queue::DescriptorChain<&M>,
    mem: &M,
    disk: &mut dyn DiskBackend,
    ctx: &BlkContext,
    queue_size: usize,
) -> Completion {
    match Request::parse(chain, ctx, queue_size) {
        Ok(req) => execute(&req, mem, disk, ctx),
        Err(rejected) => complete_rejected(&rejected, mem),
    }
}

/// Pops the next available chain, turning an avail index jump into a [`QueueError`] (virtio
/// queue's `pop_descriptor_chain` would log it and report an empty ring).
fn next_chain<'m, M: GuestMemory>(
    queue: &mut Queue,
    queue_index: u16,
    mem: &'m M,
) -> Result<Option<virtio_queue::DescriptorChain<&'m M>>, QueueError> {
    let next_avail = queue.next_avail();
    let size = queue.size();
    match queue.iter(mem) {
        Ok(mut iter) => Ok(iter.next()),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => {
            let avail_idx = queue
                .avail_idx(mem, Ordering::Relaxed)
                .unwrap_or(Wrapping(0))
                .0;
            Err(QueueError::AvailIndex {
                queue_index,
                avail_idx,
                next_avail,
                size,
            })
        }
        Err(virtio_queue::Error::QueueNotReady) => Err(QueueError::NotReady { queue_index }),
        Err(source) => Err(QueueError::Ring {
            queue_index,
            source,
        }),
    }
}
