//! The io_uring engine: requests are submitted as the queue is drained and complete when
//! the kernel says so, in any order, while the worker goes on serving kicks and vhost-user
//! messages. A kick costs one `io_uring_enter` for the whole drained batch; completions
//! wake the event loop through an eventfd registered with the ring.
//!
//! Everything about the ring is fixed before the sandbox ([`UringEngine::new`]): it is
//! created disabled, the disk is its only registered file, the completion eventfd is
//! registered, its io-wq workers are bounded, and `IORING_REGISTER_RESTRICTIONS` allows only
//! the opcodes used here (READV, WRITEV, FSYNC) on that registered file (`IOSQE_FIXED_FILE`
//! required, `IOSQE_IO_DRAIN` allowed for flushes); then the ring is enabled. Once
//! sandboxed the worker may call `io_uring_enter` but neither `io_uring_setup` nor
//! `io_uring_register` (its seccomp policy), so the ring can never reach another file or
//! do anything else.
//!
//! Requests the ring does not take (GET_ID, discard, write-zeroes, resubmissions for a dead
//! predecessor) run synchronously through [`SyncBackend`], which also finishes short
//! transfers.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{check_range, total_len, BlockIo};
use super::engine::{Processed, RequestEngine};
use super::execute::{execute, finish_status, guest_slices_plain};
use super::request::{BlkContext, Request, RequestKind};
use super::sync_backend::{iovecs, SyncBackend};
use crate::vhost::device::Reaped;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

/// Submission queue entries; the completion queue is twice as large.
const RING_ENTRIES: u32 = 256;
/// Requests in flight in the ring at most; a queue holding more waits in its avail ring
/// until completions make room (the completion queue never overflows).
pub const MAX_IN_FLIGHT: usize = 2 * RING_ENTRIES as usize;
/// The most io-wq workers the ring may start, bound and unbound (flushes and buffered
/// writes run there): it keeps the worker's process count, and so its RLIMIT_NPROC, small.
pub const MAX_IOWQ_WORKERS: u32 = 4;
/// The registered file index of the disk.
const DISK: types::Fixed = types::Fixed(0);

/// Why an io_uring engine could not be set up (the worker then falls back to the sync
/// backend when the engine was not asked for explicitly).
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("cannot {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A request the ring is working on.
struct InFlight {
    queue: u16,
    head: u16,
    status_addr: GuestAddress,
    op: Op,
    /// The guest buffers as the kernel sees them; kept here until the request completes.
    iov: IoVecs,
}

/// iovecs into guest memory.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers address guest memory, which is mapped for the whole process (not
// for a thread); whichever thread holds the engine may hand them to the kernel.
unsafe impl Send for IoVecs {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
}

/// The io_uring engine.
pub struct UringEngine {
    ring: IoUring,
    /// Signalled by the kernel when a completion is posted.
    completions: EventFd,
    /// The same file: the size, synchronous requests, short transfers' remainders.
    sync: SyncBackend,
    /// In-flight requests by slot (the entries' user_data).
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Entries pushed since the last `io_uring_enter`.
    unsubmitted: usize,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("ring_fd", &self.ring.as_raw_fd())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Sets up and restricts the ring for `sync`'s file. Must run before the sandbox. On
    /// failure `sync` comes back with the error.
    pub fn new(sync: SyncBackend) -> Result<Self, (UringError, SyncBackend)> {
        let completions = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(source) => {
                let e = UringError::Setup {
                    what: "create the completion eventfd",
                    source,
                };
                return Err((e, sync));
            }
        };
        match Self::ring(&sync, &completions) {
            Ok(ring) => Ok(UringEngine {
                ring,
                completions,
                sync,
                slots: Vec::new(),
                free: Vec::new(),
                unsubmitted: 0,
            }),
            Err(e) => Err((e, sync)),
        }
    }

    fn ring(sync: &SyncBackend, completions: &EventFd) -> Result<IoUring, UringError> {
        let setup = |what| move |source| UringError::Setup { what, source };
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(RING_ENTRIES)
            .map_err(setup("create an io_uring"))?;
        let submitter = ring.submitter();
        submitter
            .register_files(&[sync.file().as_raw_fd()])
            .map_err(setup("register the disk with the io_uring"))?;
        submitter
            .register_eventfd(completions.as_raw_fd())
            .map_err(setup("register the completion eventfd"))?;
        let mut max_workers = [MAX_IOWQ_WORKERS, MAX_IOWQ_WORKERS];
        submitter
            .register_iowq_max_workers(&mut max_workers)
            .map_err(setup("bound the io_uring's io-wq workers"))?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
            Restriction::sqe_flags_allowed(squeue::Flags::IO_DRAIN.bits()),
        ];
        submitter
            .register_restrictions(&mut allowed)
            .map_err(setup("restrict the io_uring"))?;
        submitter
            .register_enable_rings()
            .map_err(setup("enable the io_uring"))?;
        Ok(ring)
    }

    /// Requests the ring is working on.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Hands `req` (from queue `queue`) to the ring if it is a read, a write or a flush
    /// whose buffers are in guest memory; the caller runs anything else synchronously
    /// (the request comes back).
    pub fn submit<G: GuestMemory>(
        &mut self,
        queue: u16,
        req: Request,
        mem: &G,
    ) -> Result<(), Request> {
        let (op, iov) = match &req.kind {
            RequestKind::In { sector, bufs, len } | RequestKind::Out { sector, bufs, len } => {
                let read = matches!(req.kind, RequestKind::In { .. });
                // A read writes guest memory; a write reads it.
                let access = if read {
                    vm_memory::Permissions::Write
                } else {
                    vm_memory::Permissions::Read
                };
                let Some(slices) = guest_slices_plain(mem, bufs, access) else {
                    return Err(req);
                };
                let offset = sector << super::config::SECTOR_SHIFT;
                let len = u64::from(*len);
                let op = if read {
                    Op::Read { offset, len }
                } else {
                    Op::Write { offset, len }
                };
                (op, IoVecs(iovecs(&slices, 0)))
            }
            RequestKind::Flush => (Op::Flush, IoVecs(Vec::new())),
            _ => return Err(req),
        };
        if let Op::Read { offset, len } | Op::Write { offset, len } = op {
            // Parsing checked the range against the capacity; check it against the file
            // again, and leave the error (and its IOERR) to the sync path.
            if check_range(offset, len, self.sync.size()).is_err() {
                return Err(req);
            }
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let flight = InFlight {
            queue,
            head: req.head_index,
            status_addr: req.status_addr,
            op,
            iov,
        };
        let entry = match op {
            Op::Read { offset, .. } => {
                opcode::Readv::new(DISK, flight.iov.0.as_ptr(), flight.iov.0.len() as u32)
                    .offset(offset)
                    .build()
            }
            Op::Write { offset, .. } => {
                opcode::Writev::new(DISK, flight.iov.0.as_ptr(), flight.iov.0.len() as u32)
                    .offset(offset)
                    .build()
            }
            // Drained: starts after every earlier request completed, and later ones wait
            // for it, so it covers every write the guest saw complete before it.
            Op::Flush => opcode::Fsync::new(DISK)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(slot as u64);
        self.slots[slot] = Some(flight);
        loop {
            // SAFETY: the entry points at the iovec array now owned by `self.slots[slot]`
            // (a Vec's heap buffer does not move when the Vec does) and, through it, at guest
            // memory, which stays mapped until the request completes: the vhost handler
            // drains the ring before it replaces or drops the memory table.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // The submission queue is full: hand what is there to the kernel first.
            self.submit_pending();
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// One `io_uring_enter` for everything pushed since the last one.
    pub fn submit_pending(&mut self) {
        if self.unsubmitted == 0 && self.ring.submission().is_empty() {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Completion queue busy: reaping makes room; the caller reaps on the
                // eventfd, and the entries stay queued for the next enter.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => {
                    tracing::warn!("io_uring_enter failed: {e}");
                    break;
                }
            }
        }
        self.unsubmitted = 0;
    }

    /// Completes what the ring finished: writes each status byte into guest memory and
    /// appends the used entries to `out`.
    pub fn reap<G: GuestMemory>(&mut self, mem: &G, out: &mut Vec<Reaped>) {
        let _ = self.completions.read();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in cqes {
            let Some(flight) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot as usize);
            let ok = self.finish(&flight, res);
            let (status, data_len) = match (ok, flight.op) {
                (true, Op::Read { len, .. }) => (VIRTIO_BLK_S_OK as u8, len as u32),
                (true, _) => (VIRTIO_BLK_S_OK as u8, 0),
                (false, _) => (VIRTIO_BLK_S_IOERR as u8, 0),
            };
            let c = finish_status(flight.head, flight.status_addr, status, data_len, mem);
            out.push(Reaped {
                queue: flight.queue,
                head: c.head_index,
                used_len: c.used_len,
                ok: c.is_ok(),
            });
        }
    }

    /// Waits until every in-flight request completed, and reaps them (before the memory
    /// table changes or a ring stops).
    pub fn drain<G: GuestMemory>(&mut self, mem: &G, out: &mut Vec<Reaped>) {
        self.submit_pending();
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("io_uring_enter failed while draining: {e}");
                    break;
                }
            }
            self.reap(mem, out);
        }
    }

    /// Whether the request went through whole; a short transfer is finished with the sync
    /// backend.
    fn finish(&mut self, flight: &InFlight, res: i32) -> bool {
        if res < 0 {
            tracing::debug!(
                head = flight.head,
                error = %io::Error::from_raw_os_error(-res),
                "request failed"
            );
            return false;
        }
        let done = res as u64;
        let (offset, len, write) = match flight.op {
            Op::Flush => return true,
            Op::Read { offset, len } => (offset, len, false),
            Op::Write { offset, len } => (offset, len, true),
        };
        if done >= len {
            return true;
        }
        let bufs: Vec<VolatileSlice<'_>> = flight
            .iov
            .0
            .iter()
            .map(|v| {
                // SAFETY: each iovec was built from a slice of guest memory that is still
                // mapped (the memory table is only replaced after draining), `iov_len` bytes
                // long; the slice lives only for this call.
                unsafe { VolatileSlice::new(v.iov_base.cast(), v.iov_len) }
            })
            .collect();
        debug_assert_eq!(total_len(&bufs), len);
        let rest = if write {
            self.sync.write_rest(&bufs, offset, done)
        } else {
            self.sync.read_rest(&bufs, offset, done)
        };
        rest.is_ok()
    }
}

/// Reads, writes and flushes go to the ring; anything else (GET_ID, discard,
/// write-zeroes, a request whose buffers are not all in guest memory) runs at once on the
/// file, as do resubmissions.
impl RequestEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn has_room(&self) -> bool {
        self.in_flight() < MAX_IN_FLIGHT
    }

    fn process(
        &mut self,
        queue_index: u16,
        req: Request,
        mem: &GuestMemoryMmap,
        ctx: &BlkContext,
    ) -> Processed {
        match self.submit(queue_index, req, mem) {
            Ok(()) => Processed::Submitted,
            Err(req) => Processed::Executed(execute(&req, mem, &mut self.sync, ctx)),
        }
    }

    fn submit_pending(&mut self) {
        UringEngine::submit_pending(self);
    }

    fn sync_io(&mut self) -> &mut dyn BlockIo {
        &mut self.sync
    }

    fn fds(&self) -> Vec<RawFd> {
        vec![self.ring.as_raw_fd(), self.completions.as_raw_fd()]
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.completions.as_raw_fd())
    }

    fn completions_ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    fn reap(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        UringEngine::reap(self, mem, out);
    }

    fn drain(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        UringEngine::drain(self, mem, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::request::GuestBuf;
    use crate::blk::sync_backend::tests::{contents, pattern, temp_disk};
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MEM: u64 = 1 << 20;
    const STATUS: u64 = 0x1000;

    fn engine(size: usize) -> UringEngine {
        let sync = SyncBackend::new(temp_disk(size)).unwrap();
        UringEngine::new(sync)
            .map_err(|(e, _)| e)
            .expect("an io_uring on this kernel")
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn req(head: u16, kind: RequestKind) -> Request {
        Request {
            head_index: head,
            kind,
            status_addr: GuestAddress(STATUS + u64::from(head)),
        }
    }

    fn buf(addr: u64, len: u32) -> GuestBuf {
        GuestBuf {
            addr: GuestAddress(addr),
            len,
        }
    }

    /// One raw entry through the ring; its CQE result.
    fn raw(e: &mut UringEngine, entry: squeue::Entry) -> i32 {
        // SAFETY: the entries used below reference no memory (NOP, fsync).
        unsafe { e.ring.submission().push(&entry) }.unwrap();
        e.ring.submit_and_wait(1).unwrap();
        e.ring.completion().next().unwrap().result()
    }

    #[test]
    fn requests_complete_out_of_the_submitting_call() {
        let mut e = engine(65536);
        let m = mem();
        let p = pattern(65536);
        m.write_slice(&[0x5a; 8192], GuestAddress(0x10000)).unwrap();
        let reqs = [
            req(
                0,
                RequestKind::In {
                    sector: 8,
                    bufs: vec![buf(0x20000, 512), buf(0x30000, 3584)],
                    len: 4096,
                },
            ),
            req(
                1,
                RequestKind::Out {
                    sector: 64,
                    bufs: vec![buf(0x10000, 8192)],
                    len: 8192,
                },
            ),
            req(2, RequestKind::Flush),
        ];
        for r in reqs {
            assert!(e.submit(0, r, &m).is_ok());
        }
        assert_eq!(e.in_flight(), 3);
        e.submit_pending();
        let mut out = Vec::new();
        e.drain(&m, &mut out);
        assert_eq!(e.in_flight(), 0);
        out.sort_by_key(|r| r.head);
        let used: Vec<(u16, u32, bool)> = out.iter().map(|r| (r.head, r.used_len, r.ok)).collect();
        assert_eq!(used, [(0, 4097, true), (1, 1, true), (2, 1, true)]);
        for head in 0..3 {
            let st: u8 = m.read_obj(GuestAddress(STATUS + head)).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_OK as u8);
        }
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got[..512], GuestAddress(0x20000))
            .unwrap();
        m.read_slice(&mut got[512..], GuestAddress(0x30000))
            .unwrap();
        assert_eq!(got, p[4096..8192]);
        let c = contents(e.sync.file());
        assert!(c[32768..40960].iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn other_requests_come_back_for_the_sync_path() {
        let mut e = engine(4096);
        let m = mem();
        let id = req(
            0,
            RequestKind::GetId {
                bufs: vec![buf(0x2000, 20)],
                len: 20,
            },
        );
        assert!(e.submit(0, id, &m).is_err());
        // A buffer outside guest memory: the sync path reports IOERR for it.
        let far = req(
            1,
            RequestKind::In {
                sector: 0,
                bufs: vec![buf(MEM + 0x1000, 512)],
                len: 512,
            },
        );
        assert!(e.submit(0, far, &m).is_err());
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn more_requests_than_the_submission_queue_holds() {
        let mut e = engine(4096 * 4);
        let m = mem();
        let n = RING_ENTRIES as usize + 40;
        for i in 0..n {
            let r = req(
                i as u16,
                RequestKind::In {
                    sector: (i % 32) as u64,
                    bufs: vec![buf(0x40000 + 512 * i as u64, 512)],
                    len: 512,
                },
            );
            assert!(e.submit(1, r, &m).is_ok());
        }
        let mut out = Vec::new();
        e.drain(&m, &mut out);
        assert_eq!(out.len(), n);
        assert!(out
            .iter()
            .all(|r| r.ok && r.queue == 1 && r.used_len == 513));
    }

    #[test]
    fn the_ring_refuses_other_opcodes_and_unregistered_files() {
        let mut e = engine(4096);
        // NOP is not on the allow list.
        let nop = opcode::Nop::new().build().flags(squeue::Flags::FIXED_FILE);
        assert_eq!(raw(&mut e, nop), -libc::EACCES);
        // An allowed opcode on a plain fd (no IOSQE_FIXED_FILE): refused too.
        let fd = e.sync.file().as_raw_fd();
        let plain = opcode::Fsync::new(types::Fd(fd)).build();
        assert_eq!(raw(&mut e, plain), -libc::EACCES);
        // The allowed form works.
        let fixed = opcode::Fsync::new(DISK).build();
        assert_eq!(raw(&mut e, fixed), 0);
        // And the ring takes no new registrations.
        let other = temp_disk(512);
        assert!(e
            .ring
            .submitter()
            .register_files_update(0, &[other.as_raw_fd()])
            .is_err());
    }
}
