//! Draining one virtqueue: pop chains, parse, hand each request to the engine, publish
//! the used entries of those that completed, decide whether the guest must be signalled.
//! The event glue (kick fd, call fd, epoll) lives in the vhost-user data plane, which
//! calls [`process_queue`] on every kick.
//!
//! The loop is the usual notification-suppressing one: disable notifications, drain the avail
//! ring, publish, then re-enable and re-check the avail index, looping while the guest added
//! more in between (with `VIRTIO_RING_F_EVENT_IDX` virtio-queue writes `avail_event`, without
//! it the `NO_NOTIFY` used flag). Whether to signal is decided once per drained batch with
//! `needs_notification` (always true without EVENT_IDX, `used_event` based with it), so a
//! batch costs at most one call-fd write by the caller.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

use super::engine::{Processed, RequestEngine};
use super::execute::{complete_rejected, execute, Completion};
use super::request::{BlkContext, Request};
use super::stats::{Kind, RequestStats};
use crate::inflight::InflightLog;
use crate::vhost::device::{QueueError, QueueOutcome};

/// Drains `queue` into `engine`, and tells `log` (the inflight region) about each head as
/// it is popped and completed. The same loop serves every engine: a request the engine
/// runs at once ([`Processed::Executed`]: a synchronous engine's, or a rejected chain) is
/// published now; one it submits ([`Processed::Submitted`]) completes later through the
/// engine's `reap`. When the engine is full, stops with requests left in the avail ring
/// and notifications off (`throttled`): the caller drains the queue again once
/// completions made room.
///
/// `queue_index` labels errors and logs and tells an asynchronous engine where the
/// completion goes. Returns [`QueueError`] only for ring-level corruption; see there.
pub fn process_queue(
    queue: &mut Queue,
    queue_index: u16,
    mem: &GuestMemoryMmap,
    engine: &mut dyn RequestEngine,
    ctx: &BlkContext,
    log: &mut dyn InflightLog,
    stats: &mut RequestStats,
) -> Result<QueueOutcome, QueueError> {
    if !queue.ready() {
        return Err(QueueError::NotReady { queue_index });
    }
    let mut outcome = QueueOutcome::default();
    let result = drain(
        queue,
        queue_index,
        mem,
        engine,
        ctx,
        log,
        stats,
        &mut outcome,
    );
    // Whatever ended the pass (a ring error included), requests already handed to the
    // engine go to the kernel now, not at some later pass or during a reset.
    engine.submit_pending();
    result.map(|()| outcome)
}

/// The body of [`process_queue`]: drains the ring until it stays empty with notifications
/// on, or the engine is full.
#[allow(clippy::too_many_arguments)]
fn drain(
    queue: &mut Queue,
    queue_index: u16,
    mem: &GuestMemoryMmap,
    engine: &mut dyn RequestEngine,
    ctx: &BlkContext,
    log: &mut dyn InflightLog,
    stats: &mut RequestStats,
    outcome: &mut QueueOutcome,
) -> Result<(), QueueError> {
    let ring = |source| QueueError::Ring {
        queue_index,
        source,
    };
    let queue_size = usize::from(queue.size());
    loop {
        queue.disable_notification(mem).map_err(ring)?;
        // Used entries published in this batch.
        let mut added = false;
        loop {
            if !engine.has_room() {
                engine.submit_pending();
                outcome.throttled = true;
                if added && queue.needs_notification(mem).map_err(ring)? {
                    outcome.signal = true;
                }
                return Ok(());
            }
            let Some(chain) = next_popped(queue, queue_index, mem, outcome, log)? else {
                break;
            };
            let head_index = chain.head_index();
            let processed = match Request::parse(chain, ctx, queue_size) {
                Ok(req) => {
                    let (kind, bytes) = Kind::of(&req.kind);
                    stats.start(queue_index, head_index, kind, bytes);
                    engine.process(queue_index, req, mem, ctx)
                }
                Err(rejected) => {
                    stats.start(queue_index, head_index, Kind::Other, 0);
                    Processed::Executed(complete_rejected(&rejected, mem))
                }
            };
            match processed {
                Processed::Submitted => outcome.submitted += 1,
                Processed::Executed(completion) => {
                    complete(queue, mem, head_index, &completion, log).map_err(ring)?;
                    stats.finish(queue_index, head_index, completion.is_ok());
                    added = true;
                    outcome.count_completed(completion.is_ok());
                }
            }
        }
        engine.submit_pending();
        if added && queue.needs_notification(mem).map_err(ring)? {
            outcome.signal = true;
        }
        if !queue.enable_notification(mem).map_err(ring)? {
            break;
        }
    }
    Ok(())
}

/// Publishes one used entry, bracketed by the inflight log (see [`crate::inflight`]).
fn complete<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head_index: u16,
    completion: &Completion,
    log: &mut dyn InflightLog,
) -> Result<(), virtio_queue::Error> {
    log.completing(head_index);
    queue.add_used(mem, head_index, completion.used_len)?;
    log.completed(head_index, queue.next_used());
    Ok(())
}

/// Executes again the heads a dead worker popped and never completed (oldest first), at
/// once on the engine's synchronous path, and completes them on `queue`, then tells
/// whether the guest must be signalled.
///
/// virtio-queue builds descriptor chains only from an avail ring, and the guest's avail
/// ring may already hold other heads in those slots. So the heads go into a private avail
/// ring, in a scratch region mapped just above guest RAM, and a private queue on the real
/// descriptor table pops them. Only parsing sees the scratch region (a descriptor pointing
/// there reads back our own ring); data moves through `mem`, the guest's RAM alone, where
/// such an address is refused like any other outside guest RAM.
#[allow(clippy::too_many_arguments)]
pub fn process_resubmitted(
    queue: &mut Queue,
    queue_index: u16,
    mem: &GuestMemoryMmap,
    engine: &mut dyn RequestEngine,
    ctx: &BlkContext,
    heads: &[u16],
    log: &mut dyn InflightLog,
    stats: &mut RequestStats,
) -> Result<QueueOutcome, QueueError> {
    let mut outcome = QueueOutcome::default();
    let size = queue.size();
    let heads: Vec<u16> = heads.iter().copied().filter(|&h| h < size).collect();
    if heads.is_empty() {
        return Ok(outcome);
    }
    let fail = |why: String| QueueError::Resubmit { queue_index, why };
    let ring = |source| QueueError::Ring {
        queue_index,
        source,
    };
    let avail_len = 4 + 2 * u64::from(size) + 2;
    let used_offset = avail_len.next_multiple_of(4);
    let scratch_len = (used_offset + 4 + 8 * u64::from(size) + 2).next_multiple_of(4096);
    let base = mem
        .last_addr()
        .checked_add(1)
        .map(|a| GuestAddress(a.0.next_multiple_of(4096)))
        .ok_or_else(|| fail("guest RAM ends at the top of the address space".into()))?;
    let scratch = MmapRegion::new(scratch_len as usize)
        .map_err(|e| fail(format!("map {scratch_len} bytes: {e}")))?;
    let region = GuestRegionMmap::new(scratch, base)
        .ok_or_else(|| fail(format!("scratch region at {:#x}", base.0)))?;
    let replay_mem = mem
        .insert_region(Arc::new(region))
        .map_err(|e| fail(format!("scratch region at {:#x}: {e}", base.0)))?;
    let write = |offset: u64, value: u16| {
        replay_mem
            .write_obj(value, base.unchecked_add(offset))
            .map_err(|e| fail(format!("write the private ring: {e}")))
    };
    write(0, 0)?;
    write(2, heads.len() as u16)?;
    for (i, &head) in heads.iter().enumerate() {
        write(4 + 2 * i as u64, head)?;
    }
    let mut replay = Queue::new(size).map_err(ring)?;
    replay
        .try_set_desc_table_address(GuestAddress(queue.desc_table()))
        .map_err(ring)?;
    replay.try_set_avail_ring_address(base).map_err(ring)?;
    replay
        .try_set_used_ring_address(base.unchecked_add(used_offset))
        .map_err(ring)?;
    replay.set_ready(true);
    for _ in 0..heads.len() {
        let Some(chain) = replay.pop_descriptor_chain(&replay_mem) else {
            break;
        };
        let head_index = chain.head_index();
        let completion = match Request::parse(chain, ctx, usize::from(size)) {
            Ok(req) => {
                let (kind, bytes) = Kind::of(&req.kind);
                stats.start(queue_index, head_index, kind, bytes);
                execute(&req, mem, engine.sync_io(), ctx)
            }
            Err(rejected) => {
                stats.start(queue_index, head_index, Kind::Other, 0);
                complete_rejected(&rejected, mem)
            }
        };
        complete(queue, mem, head_index, &completion, log).map_err(ring)?;
        stats.finish(queue_index, head_index, completion.is_ok());
        outcome.count_completed(completion.is_ok());
    }
    outcome.signal = queue.needs_notification(mem).map_err(ring)?;
    Ok(outcome)
}

/// The next chain with a usable head index, told to the inflight log as popped. Avail
/// entries whose head lies outside the descriptor table are consumed and counted as
/// dropped, never put in the used ring.
fn next_popped<'m, M: GuestMemory>(
    queue: &mut Queue,
    queue_index: u16,
    mem: &'m M,
    outcome: &mut QueueOutcome,
    log: &mut dyn InflightLog,
) -> Result<Option<virtio_queue::DescriptorChain<&'m M>>, QueueError> {
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
        log.popped(head_index);
        return Ok(Some(chain));
    }
    Ok(None)
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
