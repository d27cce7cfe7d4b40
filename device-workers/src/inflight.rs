//! Inflight I/O tracking for split virtqueues (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
//! GET_INFLIGHT_FD / SET_INFLIGHT_FD), so a worker that replaces a dead one resubmits what
//! the dead one popped and never completed, and nothing the dead one completed twice.
//!
//! Per queue the region holds a 16-byte header and one 16-byte entry per descriptor:
//!
//! ```text
//! header: features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
//! entry:  inflight u8 | padding [u8; 5] | next u16 | counter u64
//! ```
//!
//! Popping a head sets its `counter` (a global, increasing value) and `inflight = 1`.
//! Completing it (one used entry at a time here, so a batch is one head) first stores the
//! head in `last_batch_head`, then publishes the used entry and used idx in guest memory,
//! then clears `inflight` and stores the new used idx in the header. A new worker repairs
//! (header used idx != ring used idx: the last head was published but not cleared), then
//! resubmits every head still marked, oldest counter first, and pops new ones from
//! `used idx + resubmitted`.
//!
//! The region is written by workers, so a new worker treats it as untrusted: head indices
//! and sizes are checked, and an inconsistent queue region is reset rather than trusted.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

const HEADER: usize = 16;
const ENTRY: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH: usize = 12;
const OFF_USED_IDX: usize = 14;
const ENTRY_INFLIGHT: usize = 0;
const ENTRY_NEXT: usize = 6;
const ENTRY_COUNTER: usize = 8;
/// The region layout version this worker writes.
const VERSION: u16 = 1;

/// Bytes one queue of `queue_size` descriptors takes, 64-byte aligned.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).next_multiple_of(64)
}

/// Errors of the inflight region (each one a refused vhost-user message).
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("cannot create the inflight region")]
    Create(#[source] std::io::Error),
    #[error("cannot map the inflight region ({size} bytes at offset {offset})")]
    Map {
        size: u64,
        offset: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("inflight region for {num_queues} queues of {queue_size}: {why}")]
    Shape {
        num_queues: u16,
        queue_size: u16,
        why: String,
    },
    #[error("cannot hand the inflight region to the frontend")]
    Dup(#[source] std::io::Error),
}

/// The region of one worker: its own memfd, created before the sandbox (no memfd_create
/// afterwards) and handed out on GET_INFLIGHT_FD, or the region the frontend keeps and
/// gives back with SET_INFLIGHT_FD (after a restart, a predecessor's).
#[derive(Debug)]
pub struct InflightRegion {
    own: File,
    own_map: MmapRegion,
    own_capacity: usize,
    /// The frontend's region from SET_INFLIGHT_FD: (mapping, its size).
    adopted: Option<(MmapRegion, usize)>,
    num_queues: u16,
    /// The largest ring the region was sized for.
    max_queue_size: u16,
    /// Set by GET or SET; 0 until then (nothing is tracked).
    queue_size: u16,
    /// The next counter value: above every counter in the region.
    counter: u64,
}

impl InflightRegion {
    /// A zeroed, sealed memfd region big enough for `num_queues` rings of `max_queue_size`.
    pub fn create(num_queues: u16, max_queue_size: u16) -> Result<Self, InflightError> {
        let capacity = usize::from(num_queues) * queue_region_size(max_queue_size);
        // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd.
        let fd = unsafe {
            libc::memfd_create(
                c"bulkhead-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(capacity as u64)
            .map_err(InflightError::Create)?;
        // Sealed against shrinking and growing: whoever maps it later (the VMM, the next
        // worker) can rely on its size.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(InflightError::Create(std::io::Error::last_os_error()));
        }
        // The mapping keeps its own descriptor (duplicated now, before the sandbox).
        let map = map_shared(
            file.try_clone().map_err(InflightError::Create)?,
            0,
            capacity,
        )?;
        Ok(InflightRegion {
            own: file,
            own_map: map,
            own_capacity: capacity,
            adopted: None,
            num_queues,
            max_queue_size,
            queue_size: 0,
            counter: 1,
        })
    }

    /// The descriptors the region holds (the memfd and the mapping's own), which the
    /// sandbox must keep open.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut fds = vec![self.own.as_raw_fd()];
        fds.extend(self.own_map.file_offset().map(|fo| fo.file().as_raw_fd()));
        fds
    }

    /// GET_INFLIGHT_FD: the frontend asks for `want.num_queues` rings of `want.queue_size`.
    /// Hands out a duplicate of our memfd, its contents zeroed: a frontend asks again
    /// after every device reset (QEMU frees its region on reset) and gets a fresh region.
    pub fn hand_out(
        &mut self,
        want: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File), InflightError> {
        let size = self.check_shape(want.num_queues, want.queue_size, self.own_capacity)?;
        let file = self.own.try_clone().map_err(InflightError::Dup)?;
        let zeroes = vec![0u8; size];
        self.own_map
            .get_slice(0, size)
            .expect("checked against the capacity")
            .write_slice(&zeroes, 0)
            .expect("the zeroed range lies inside the mapping");
        self.adopted = None;
        self.queue_size = want.queue_size;
        self.counter = 1;
        Ok((
            VhostUserInflight::new(size as u64, 0, want.num_queues, want.queue_size),
            file,
        ))
    }

    /// SET_INFLIGHT_FD: maps the region the frontend keeps (ours, or a predecessor's).
    pub fn adopt(&mut self, file: File, info: &VhostUserInflight) -> Result<(), InflightError> {
        let size = usize::try_from(info.mmap_size).unwrap_or(usize::MAX);
        self.check_shape(info.num_queues, info.queue_size, size)?;
        let map = map_shared(file, info.mmap_offset, size)?;
        self.adopted = Some((map, size));
        self.queue_size = info.queue_size;
        self.counter = 1;
        Ok(())
    }

    fn check_shape(
        &self,
        num_queues: u16,
        queue_size: u16,
        available: usize,
    ) -> Result<usize, InflightError> {
        let bad = |why: String| InflightError::Shape {
            num_queues,
            queue_size,
            why,
        };
        if num_queues == 0 || num_queues > self.num_queues {
            return Err(bad(format!("the device has {} queues", self.num_queues)));
        }
        if queue_size == 0 || queue_size > self.max_queue_size {
            return Err(bad(format!(
                "queue size must be 1..={}",
                self.max_queue_size
            )));
        }
        let size = usize::from(num_queues) * queue_region_size(queue_size);
        if size > available {
            return Err(bad(format!(
                "needs {size} bytes, the region has {available}"
            )));
        }
        Ok(size)
    }

    /// The tracker for queue `index` of `ring_size` descriptors, or None when the region
    /// does not cover it (no GET/SET yet, or another ring size: nothing is tracked).
    pub fn queue(&mut self, index: usize, ring_size: u16) -> Option<QueueInflight<'_>> {
        if self.queue_size == 0
            || ring_size != self.queue_size
            || index >= usize::from(self.num_queues)
        {
            return None;
        }
        let (map, capacity) = match &self.adopted {
            Some((map, size)) => (map, *size),
            None => (&self.own_map, self.own_capacity),
        };
        let len = queue_region_size(self.queue_size);
        let offset = index * len;
        if offset + len > capacity {
            return None;
        }
        Some(QueueInflight {
            slice: map
                .get_slice(offset, len)
                .expect("checked against the capacity"),
            size: self.queue_size,
            counter: &mut self.counter,
        })
    }
}

fn map_shared(file: File, offset: u64, size: usize) -> Result<MmapRegion, InflightError> {
    let err = |source| InflightError::Map {
        size: size as u64,
        offset,
        source,
    };
    MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(err)
}

/// What a new worker must do with a ring before serving it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads the previous worker popped and never completed, oldest first.
    pub resubmit: Vec<u16>,
    /// The last head was published but not cleared: repaired.
    pub repaired: bool,
    /// The queue's region made no sense (wrong size, bad links): it was reset.
    pub reset: bool,
}

/// One queue's slice of the region, with the region's counter.
#[derive(Debug)]
pub struct QueueInflight<'a> {
    slice: VolatileSlice<'a, ()>,
    size: u16,
    counter: &'a mut u64,
}

fn load<T: vm_memory::AtomicAccess, B: BitmapSlice>(s: &VolatileSlice<'_, B>, at: usize) -> T {
    s.load(at, Ordering::Acquire)
        .expect("offsets are inside the queue's slice")
}

fn store<T: vm_memory::AtomicAccess, B: BitmapSlice>(s: &VolatileSlice<'_, B>, at: usize, v: T) {
    s.store(v, at, Ordering::Release)
        .expect("offsets are inside the queue's slice")
}

impl QueueInflight<'_> {
    fn entry(&self, head: u16) -> usize {
        HEADER + ENTRY * usize::from(head)
    }

    /// Zeroes this queue's region (the guest reset the ring: nothing is in flight).
    pub fn clear(&mut self) {
        let zeroes = vec![0u8; self.slice.len()];
        self.slice
            .write_slice(&zeroes, 0)
            .expect("the slice's own length");
    }

    /// Prepares the ring for serving, given the used idx in guest memory: initialises a
    /// fresh region, repairs the last completion, and lists the heads to resubmit.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        let mut recovery = Recovery::default();
        let version: u16 = load(&self.slice, OFF_VERSION);
        let desc_num: u16 = load(&self.slice, OFF_DESC_NUM);
        if version == 0 && desc_num == 0 {
            self.init(ring_used_idx);
            return recovery;
        }
        if version != VERSION || desc_num != self.size {
            tracing::warn!(
                version,
                desc_num,
                size = self.size,
                "inflight region does not match the ring: reset"
            );
            self.clear();
            self.init(ring_used_idx);
            recovery.reset = true;
            return recovery;
        }
        let header_used: u16 = load(&self.slice, OFF_USED_IDX);
        if header_used != ring_used_idx {
            // Published but not cleared: the used entry is in guest memory already.
            let last: u16 = load(&self.slice, OFF_LAST_BATCH);
            if last < self.size {
                store(&self.slice, self.entry(last) + ENTRY_INFLIGHT, 0u8);
            }
            store(&self.slice, OFF_USED_IDX, ring_used_idx);
            recovery.repaired = true;
        }
        let mut pending: Vec<(u64, u16)> = Vec::new();
        let mut max_counter = 0;
        for head in 0..self.size {
            let at = self.entry(head);
            let counter: u64 = load(&self.slice, at + ENTRY_COUNTER);
            max_counter = max_counter.max(counter);
            if load::<u8, _>(&self.slice, at + ENTRY_INFLIGHT) != 0 {
                pending.push((counter, head));
            }
        }
        pending.sort_unstable();
        recovery.resubmit = pending.into_iter().map(|(_, head)| head).collect();
        *self.counter = (*self.counter).max(max_counter.saturating_add(1));
        recovery
    }

    fn init(&mut self, ring_used_idx: u16) {
        store(&self.slice, OFF_DESC_NUM, self.size);
        store(&self.slice, OFF_LAST_BATCH, 0u16);
        store(&self.slice, OFF_USED_IDX, ring_used_idx);
        // The version goes last: a region with a version is complete.
        store(&self.slice, OFF_VERSION, VERSION);
    }
}

/// How queue processing reports its progress to the inflight region (or to nothing).
pub trait InflightLog {
    /// `head` was taken off the avail ring.
    fn popped(&mut self, head: u16);
    /// `head`'s used entry is about to be published.
    fn completing(&mut self, head: u16);
    /// `head`'s used entry and the used idx `used_idx` are published.
    fn completed(&mut self, head: u16, used_idx: u16);
}

/// No tracking (the frontend did not negotiate inflight).
#[derive(Debug, Default)]
pub struct NoInflight;

impl InflightLog for NoInflight {
    fn popped(&mut self, _head: u16) {}
    fn completing(&mut self, _head: u16) {}
    fn completed(&mut self, _head: u16, _used_idx: u16) {}
}

impl InflightLog for QueueInflight<'_> {
    fn popped(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let at = self.entry(head);
        store(&self.slice, at + ENTRY_COUNTER, *self.counter);
        *self.counter += 1;
        store(&self.slice, at + ENTRY_NEXT, 0u16);
        store(&self.slice, at + ENTRY_INFLIGHT, 1u8);
    }

    fn completing(&mut self, head: u16) {
        if head < self.size {
            store(&self.slice, OFF_LAST_BATCH, head);
        }
    }

    fn completed(&mut self, head: u16, used_idx: u16) {
        if head < self.size {
            store(&self.slice, self.entry(head) + ENTRY_INFLIGHT, 0u8);
        }
        store(&self.slice, OFF_USED_IDX, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (InflightRegion, File) {
        let mut r = InflightRegion::create(queues, 1024).unwrap();
        let (info, file) = r
            .hand_out(&VhostUserInflight::new(0, 0, queues, size))
            .unwrap();
        assert_eq!(
            info.mmap_size as usize,
            usize::from(queues) * queue_region_size(size)
        );
        (r, file)
    }

    #[test]
    fn fresh_region_initialises_and_tracks() {
        let (mut r, _file) = region(2, 8);
        let mut q = r.queue(1, 8).unwrap();
        assert_eq!(q.recover(5), Recovery::default());
        q.popped(3);
        q.popped(6);
        q.completing(6);
        q.completed(6, 6);
        // A successor sees head 3 still in flight.
        let (info, file) = (
            VhostUserInflight::new(2 * queue_region_size(8) as u64, 0, 2, 8),
            _file,
        );
        let mut next = InflightRegion::create(2, 1024).unwrap();
        next.adopt(file, &info).unwrap();
        let mut q = next.queue(1, 8).unwrap();
        let rec = q.recover(6);
        assert_eq!(rec.resubmit, vec![3]);
        assert!(!rec.repaired);
    }

    #[test]
    fn published_but_not_cleared_is_repaired_not_resubmitted() {
        let (mut r, file) = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(0);
        q.popped(2);
        q.popped(4);
        q.popped(1);
        // Head 4 was published (ring used idx 1) and the worker died before clearing it.
        q.completing(4);
        let info = VhostUserInflight::new(queue_region_size(8) as u64, 0, 1, 8);
        let mut next = InflightRegion::create(1, 1024).unwrap();
        next.adopt(file, &info).unwrap();
        let mut q = next.queue(0, 8).unwrap();
        let rec = q.recover(1);
        assert!(rec.repaired);
        assert_eq!(rec.resubmit, vec![2, 1], "oldest first");
        // New pops count on from above the old counters.
        q.popped(5);
        let rec = q.recover(1);
        assert_eq!(rec.resubmit, vec![2, 1, 5]);
    }

    #[test]
    fn a_region_for_another_ring_size_is_reset() {
        let (mut r, _file) = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(0);
        q.popped(1);
        // Forge a wrong descriptor count, as a hostile predecessor might.
        store(&q.slice, OFF_DESC_NUM, 300u16);
        let rec = q.recover(0);
        assert!(rec.reset);
        assert!(rec.resubmit.is_empty());
        assert!(r.queue(0, 16).is_none(), "another ring size is not tracked");
    }

    #[test]
    fn shapes_are_checked() {
        let mut r = InflightRegion::create(2, 1024).unwrap();
        assert!(r.hand_out(&VhostUserInflight::new(0, 0, 3, 128)).is_err());
        assert!(r.hand_out(&VhostUserInflight::new(0, 0, 2, 2048)).is_err());
        assert!(r.hand_out(&VhostUserInflight::new(0, 0, 2, 256)).is_ok());
        // Again after a device reset: a fresh (zeroed) region, another ring size.
        let mut q = r.queue(1, 256).unwrap();
        q.recover(0);
        q.popped(7);
        let (info, _f) = r.hand_out(&VhostUserInflight::new(0, 0, 2, 128)).unwrap();
        assert_eq!(info.queue_size, 128);
        assert!(r.queue(1, 128).unwrap().recover(0).resubmit.is_empty());
    }
}
