//! An io_uring backend: a batch of reads, writes and flushes goes to the kernel with one
//! `io_uring_enter`, which also waits for all of them.
//!
//! Everything about the ring is fixed before the sandbox ([`UringBackend::new`]): it is
//! created disabled, the disk is its only registered file, its io-wq workers are bounded,
//! and `IORING_REGISTER_RESTRICTIONS` allows only the opcodes used here (READV, WRITEV,
//! FSYNC) on that registered file (`IOSQE_FIXED_FILE` required, `IOSQE_IO_DRAIN` allowed for
//! flushes); then the ring is enabled. Once sandboxed the worker may call `io_uring_enter`
//! but neither `io_uring_setup` nor `io_uring_register` (its seccomp policy), so the ring
//! can never reach another file or do anything else.
//!
//! Discard and write-zeroes are rare and go through [`SyncBackend`]'s fallocate, as do the
//! remainders of short reads and writes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use vm_memory::VolatileSlice;

use super::backend::{check_range, run_one, total_len, BackendError, DiskBackend, DiskOp};
use super::sync_backend::{iovecs, SyncBackend};

/// Submission queue entries; a larger batch is submitted in several rounds.
const RING_ENTRIES: u32 = 256;
/// The most io-wq workers the ring may start, bound and unbound (flushes and buffered
/// writes run there): it keeps the worker's process count, and so its RLIMIT_NPROC, small.
pub const MAX_IOWQ_WORKERS: u32 = 4;
/// The registered file index of the disk.
const DISK: types::Fixed = types::Fixed(0);

/// Why an io_uring backend could not be set up (the worker then falls back to the sync
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

/// The io_uring backend.
pub struct UringBackend {
    ring: IoUring,
    /// The same file, for the size, fallocate, and finishing short transfers.
    sync: SyncBackend,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("ring_fd", &self.ring.as_raw_fd())
            .field("sync", &self.sync)
            .finish()
    }
}

impl UringBackend {
    /// Sets up and restricts the ring for `sync`'s file. Must run before the sandbox. On
    /// failure `sync` comes back with the error.
    pub fn new(sync: SyncBackend) -> Result<Self, (UringError, SyncBackend)> {
        match Self::ring(&sync) {
            Ok(ring) => Ok(UringBackend { ring, sync }),
            Err(e) => Err((e, sync)),
        }
    }

    fn ring(sync: &SyncBackend) -> Result<IoUring, UringError> {
        let setup = |what| move |source| UringError::Setup { what, source };
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(RING_ENTRIES)
            .map_err(setup("create an io_uring"))?;
        let submitter = ring.submitter();
        submitter
            .register_files(&[sync.file().as_raw_fd()])
            .map_err(setup("register the disk with the io_uring"))?;
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

    /// The ring's descriptor (kept open through the sandbox).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Submits the ops in `indices` (reads, writes, flushes) and waits for all of them;
    /// stores each result in `results`.
    fn submit(
        &mut self,
        ops: &[DiskOp<'_>],
        indices: &[usize],
        results: &mut [Result<(), BackendError>],
    ) {
        // The iovec arrays must stay put until the kernel is done with them.
        let iovs: Vec<Vec<libc::iovec>> = indices
            .iter()
            .map(|&i| match &ops[i] {
                DiskOp::Read { bufs, .. } | DiskOp::Write { bufs, .. } => iovecs(bufs, 0),
                _ => Vec::new(),
            })
            .collect();
        // Transferred bytes per op; a short one is finished synchronously below.
        let mut done: Vec<Option<io::Result<u64>>> = indices.iter().map(|_| None).collect();
        let mut next = 0;
        while next < indices.len() {
            let mut queued = 0;
            {
                let mut sq = self.ring.submission();
                while next + queued < indices.len() {
                    let k = next + queued;
                    let entry = match &ops[indices[k]] {
                        DiskOp::Read { offset, .. } => {
                            opcode::Readv::new(DISK, iovs[k].as_ptr(), iovs[k].len() as u32)
                                .offset(*offset)
                                .build()
                        }
                        DiskOp::Write { offset, .. } => {
                            opcode::Writev::new(DISK, iovs[k].as_ptr(), iovs[k].len() as u32)
                                .offset(*offset)
                                .build()
                        }
                        // Drained: starts after every earlier op of the batch completed, and
                        // later ones wait for it, as if run one by one.
                        _ => opcode::Fsync::new(DISK)
                            .flags(types::FsyncFlags::DATASYNC)
                            .build()
                            .flags(squeue::Flags::IO_DRAIN),
                    }
                    .user_data(k as u64);
                    // SAFETY: the entry points at `iovs[k]` and, through it, at guest memory
                    // slices borrowed for the whole call; both outlive the submission, since
                    // this function waits below until the kernel completed every entry.
                    if unsafe { sq.push(&entry) }.is_err() {
                        break;
                    }
                    queued += 1;
                }
            }
            let mut waiting = queued;
            while waiting > 0 {
                match self.ring.submit_and_wait(waiting) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // The ring itself failed: nothing more will complete; fail what is
                        // left of this round.
                        for d in done.iter_mut().skip(next).take(queued) {
                            if d.is_none() {
                                *d = Some(Err(io::Error::new(e.kind(), e.to_string())));
                            }
                        }
                        break;
                    }
                }
                for cqe in self.ring.completion() {
                    let k = cqe.user_data() as usize;
                    if let Some(slot) = done.get_mut(k) {
                        let res = cqe.result();
                        *slot = Some(if res < 0 {
                            Err(io::Error::from_raw_os_error(-res))
                        } else {
                            Ok(res as u64)
                        });
                        waiting = waiting.saturating_sub(1);
                    }
                }
            }
            next += queued.max(1);
        }
        for (k, &i) in indices.iter().enumerate() {
            results[i] = self.finish(&ops[i], done[k].take());
        }
    }

    /// Turns one op's completion into its result, finishing a short transfer with the sync
    /// backend.
    fn finish(
        &mut self,
        op: &DiskOp<'_>,
        done: Option<io::Result<u64>>,
    ) -> Result<(), BackendError> {
        let done = done.unwrap_or_else(|| Err(io::Error::other("not submitted")));
        match op {
            DiskOp::Read { bufs, offset } => {
                let total = total_len(bufs);
                match done {
                    Ok(n) if n >= total => Ok(()),
                    Ok(n) => self.sync.read_rest(bufs, *offset, n),
                    Err(source) => Err(BackendError::Read {
                        offset: *offset,
                        len: total,
                        source,
                    }),
                }
            }
            DiskOp::Write { bufs, offset } => {
                let total = total_len(bufs);
                match done {
                    Ok(n) if n >= total => Ok(()),
                    Ok(n) => self.sync.write_rest(bufs, *offset, n),
                    Err(source) => Err(BackendError::Write {
                        offset: *offset,
                        len: total,
                        source,
                    }),
                }
            }
            _ => done.map(drop).map_err(BackendError::Flush),
        }
    }
}

impl DiskBackend for UringBackend {
    fn size(&self) -> u64 {
        self.sync.size()
    }

    fn read_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let op = DiskOp::Read {
            bufs: bufs.to_vec(),
            offset,
        };
        self.run_batch(std::slice::from_ref(&op)).remove(0)
    }

    fn write_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let op = DiskOp::Write {
            bufs: bufs.to_vec(),
            offset,
        };
        self.run_batch(std::slice::from_ref(&op)).remove(0)
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        self.run_batch(&[DiskOp::Flush]).remove(0)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.sync.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.sync.write_zeroes(offset, len, unmap)
    }

    fn run_batch(&mut self, ops: &[DiskOp<'_>]) -> Vec<Result<(), BackendError>> {
        let mut results: Vec<Result<(), BackendError>> = ops.iter().map(|_| Ok(())).collect();
        let size = self.size();
        let mut ring_ops = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match op {
                DiskOp::Read { bufs, offset } | DiskOp::Write { bufs, offset } => {
                    match check_range(*offset, total_len(bufs), size) {
                        Ok(()) => ring_ops.push(i),
                        Err(e) => results[i] = Err(e),
                    }
                }
                DiskOp::Flush => ring_ops.push(i),
                // Rare; fallocate through the sync backend, in batch order before the
                // ring's ops (virtio-blk orders nothing between requests in flight).
                DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => {
                    results[i] = run_one(&mut self.sync, op);
                }
            }
        }
        if !ring_ops.is_empty() {
            self.submit(ops, &ring_ops, &mut results);
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::sync_backend::tests::{contents, pattern, temp_disk};

    fn backend(size: usize) -> UringBackend {
        let sync = SyncBackend::new(temp_disk(size)).unwrap();
        UringBackend::new(sync)
            .map_err(|(e, _)| e)
            .expect("an io_uring on this kernel")
    }

    /// One raw entry through the ring; its CQE result.
    fn raw(disk: &mut UringBackend, entry: squeue::Entry) -> i32 {
        // SAFETY: the entries used below reference no memory (NOP, fsync).
        unsafe { disk.ring.submission().push(&entry) }.unwrap();
        disk.ring.submit_and_wait(1).unwrap();
        disk.ring.completion().next().unwrap().result()
    }

    #[test]
    fn a_batch_of_reads_writes_and_a_flush_in_one_go() {
        let mut disk = backend(16384);
        let p = pattern(16384);
        let mut r1 = [0u8; 512];
        let mut r2 = [0u8; 1536];
        let mut w1 = [0x11u8; 4096];
        let mut w2 = [0x22u8; 1024];
        let mut w3 = [0x33u8; 3072];
        let ops = [
            DiskOp::Read {
                bufs: vec![
                    VolatileSlice::from(&mut r1[..]),
                    VolatileSlice::from(&mut r2[..]),
                ],
                offset: 512,
            },
            DiskOp::Write {
                bufs: vec![VolatileSlice::from(&mut w1[..])],
                offset: 8192,
            },
            DiskOp::Write {
                bufs: vec![
                    VolatileSlice::from(&mut w2[..]),
                    VolatileSlice::from(&mut w3[..]),
                ],
                offset: 12288,
            },
            DiskOp::Flush,
            // Past the end: refused without reaching the ring; the rest still runs.
            DiskOp::Read {
                bufs: vec![],
                offset: 16385,
            },
        ];
        let results = disk.run_batch(&ops);
        assert!(results[..4].iter().all(Result::is_ok), "{results:?}");
        assert!(matches!(results[4], Err(BackendError::OutOfRange { .. })));
        drop(ops);
        assert_eq!(&r1[..], &p[512..1024]);
        assert_eq!(&r2[..], &p[1024..2560]);
        let c = contents(disk.sync.file());
        assert!(c[8192..12288].iter().all(|&x| x == 0x11));
        assert!(c[12288..13312].iter().all(|&x| x == 0x22));
        assert!(c[13312..16384].iter().all(|&x| x == 0x33));
        assert_eq!(&c[..8192], &p[..8192]);
    }

    #[test]
    fn batches_larger_than_the_ring_are_split() {
        let mut disk = backend(4096 * 8);
        let mut bufs: Vec<[u8; 8]> = vec![[0; 8]; RING_ENTRIES as usize * 2 + 3];
        let ops: Vec<DiskOp<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| DiskOp::Read {
                bufs: vec![VolatileSlice::from(&mut b[..])],
                offset: (i % 4096) as u64 * 8,
            })
            .collect();
        let results = disk.run_batch(&ops);
        assert!(results.iter().all(Result::is_ok));
        drop(ops);
        let p = pattern(4096 * 8);
        for (i, b) in bufs.iter().enumerate() {
            let at = (i % 4096) * 8;
            assert_eq!(&b[..], &p[at..at + 8], "op {i}");
        }
    }

    #[test]
    fn the_ring_refuses_other_opcodes_and_unregistered_files() {
        let mut disk = backend(4096);
        // NOP is not on the allow list.
        let nop = opcode::Nop::new().build().flags(squeue::Flags::FIXED_FILE);
        assert_eq!(raw(&mut disk, nop), -libc::EACCES);
        // An allowed opcode on a plain fd (no IOSQE_FIXED_FILE): refused too.
        let fd = disk.sync.file().as_raw_fd();
        let plain = opcode::Fsync::new(types::Fd(fd)).build();
        assert_eq!(raw(&mut disk, plain), -libc::EACCES);
        // The allowed form works.
        let fixed = opcode::Fsync::new(DISK).build();
        assert_eq!(raw(&mut disk, fixed), 0);
        // And the ring takes no new registrations.
        let other = temp_disk(512);
        assert!(disk
            .ring
            .submitter()
            .register_files_update(0, &[other.as_raw_fd()])
            .is_err());
    }

    #[test]
    fn discard_and_write_zeroes_go_through_fallocate() {
        let mut disk = backend(8192);
        let results = disk.run_batch(&[DiskOp::WriteZeroes {
            offset: 4096,
            len: 4096,
            unmap: false,
        }]);
        assert!(results[0].is_ok(), "{results:?}");
        let c = contents(disk.sync.file());
        assert!(c[4096..].iter().all(|&x| x == 0));
        assert_eq!(&c[..4096], &pattern(8192)[..4096]);
    }
}
