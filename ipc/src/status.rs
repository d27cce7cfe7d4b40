//! The status page: a small memfd the VMM creates and seals, mapped `MAP_SHARED` by the
//! VMM and by one worker.
//!
//! Both processes write it concurrently (the worker its heartbeat, counters and, from its
//! SIGSYS handler, the violation record; the VMM may reset it between workers), so the
//! layout is a fixed `#[repr(C)]` struct made of atomics only: every bit pattern is a
//! valid value, and a hostile worker can at worst write meaningless numbers. It cannot
//! shrink the file under the VMM's mapping (SIGBUS) because the VMM seals it against
//! shrinking and growing and then seals the seals, before any worker sees the fd.
//!
//! Layout (version [`LAYOUT_VERSION`], [`LAYOUT_SIZE`] bytes at offset 0 of a
//! [`STATUS_PAGE_SIZE`]-byte file; the rest of the file is zero and reserved):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic [`STATUS_MAGIC`] |
//! | 8 | 4 | layout version |
//! | 12 | 4 | worker pid |
//! | 16 | 8 | progress counter (heartbeat) |
//! | 24 | 8 | requests completed |
//! | 32 | 8 | requests failed |
//! | 40 | 8 | violation count (every trap, recorded or not) |
//! | 48 | 4 | violation state: 0 none, 1 being written, 2 recorded |
//! | 52 | 4 | violation arch (`AUDIT_ARCH_*`) |
//! | 56 | 8 | violation syscall number |
//! | 64 | 48 | violation arguments 0..6 |
//! | 112 | 8 | violation instruction pointer |
//! | 120 | 8 | rings started (each ran inflight recovery) |
//! | 128 | 8 | requests resubmitted for a predecessor |
//! | 136 | 4 | crash kind, from the worker's own fault handlers: 0 none, a signal number, or [`CRASH_PANIC`] |
//! | 140 | 4 | idle: 1 while the worker sleeps in its event loop, notifications on (a kick, a completion or a message wakes it) |
//! | 144 | 8 | crash address (the faulting address, when the kernel gave one) |
//! | 152 | 4 | worker end, from its reaper after it reaped the worker: 0 not yet, 1 exited, 2 killed by a signal |
//! | 156 | 4 | worker end value: exit status or signal number |
//! | 160 | 8 | rings found corrupt (each needs DEVICE_NEEDS_RESET, which the VMM sets) |
//! | 168 | 40 | requests completed by type: read, write, flush, discard (and write zeroes), other |
//! | 208 | 8 | bytes read (completed reads) |
//! | 216 | 8 | bytes written (completed writes) |
//! | 224 | 8 | requests in flight (taken from a ring, not yet completed) |
//! | 232 | 8 | sum of request latencies, microseconds |
//! | 240 | 96 | request latencies by bucket ([`LATENCY_BOUNDS_US`], then the rest) |
//! | 336 | 176 | reserved (zero) |
//!
//! The request counters and latencies are the worker's own measure of its work (from a
//! chain's pop to its used entry), for metrics; nothing the VMM decides rests on them.
//!
//! The crash record is the worker's own word, written as it dies; the end record is its
//! reaper's, written once the worker can write nothing more. The VMM believes a crash only
//! where both agree.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::num::NonZeroUsize;
use std::ops::Deref;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use serde::{Deserialize, Serialize};

/// `b"BHSTATUS"` read as a little-endian u64.
pub const STATUS_MAGIC: u64 = u64::from_le_bytes(*b"BHSTATUS");
/// Version of the layout below; bump on any change of offsets or meaning.
pub const LAYOUT_VERSION: u32 = 4;
/// Size of the memfd (one page).
pub const STATUS_PAGE_SIZE: usize = 4096;
/// Size of [`StatusPage`].
pub const LAYOUT_SIZE: usize = 512;

/// Upper bounds (inclusive, microseconds) of the request latency buckets; one more bucket
/// holds the rest.
pub const LATENCY_BOUNDS_US: [u64; 11] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];
/// Latency buckets on the page: the bounded ones and the rest.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;
/// Request types counted on the page, in page order.
pub const REQUEST_TYPES: [&str; 5] = ["read", "write", "flush", "discard", "other"];

/// A worker's request counters, as it publishes them (see the layout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounters {
    /// Completed, by [`REQUEST_TYPES`].
    pub by_type: [u64; 5],
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub in_flight: u64,
    pub latency_sum_us: u64,
    /// Completed requests per latency bucket (not cumulative).
    pub latency: [u64; LATENCY_BUCKETS],
}

impl RequestCounters {
    /// The bucket of a request that took `us` microseconds.
    pub fn bucket(us: u64) -> usize {
        LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BOUNDS_US.len())
    }
}
/// Seals the VMM applies and every mapper requires.
pub const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

/// Exit code of a worker whose SIGSYS handler recorded a violation (128 + SIGSYS, the
/// shell's convention for death by that signal). The supervisor reads the violation
/// record when it sees it.
pub const EXIT_POLICY_VIOLATION: i32 = 128 + libc::SIGSYS;

/// Crash kind of a panic (not a signal number).
pub const CRASH_PANIC: u32 = 0x1_0000;
/// Exit status of a worker that panicked (Rust's own for a panicking main).
pub const EXIT_PANIC: i32 = 101;

/// End state: the reaper has not reaped the worker (or there is no reaper).
const END_NONE: u32 = 0;
const END_EXITED: u32 = 1;
const END_SIGNALED: u32 = 2;

/// Violation state: nothing recorded.
pub const VIOLATION_NONE: u32 = 0;
/// Violation state: a handler claimed the record and is writing it.
pub const VIOLATION_WRITING: u32 = 1;
/// Violation state: the record is complete.
pub const VIOLATION_RECORDED: u32 = 2;

// The signal handler relies on these being plain lock-free loads and stores.
#[cfg(not(target_has_atomic = "64"))]
compile_error!("the status page needs lock-free 64-bit atomics");

/// The shared layout. Only ever accessed through a mapping ([`StatusMapping`]); all
/// fields are atomics so that concurrent writes from the other process are well defined
/// and every value is valid.
#[repr(C)]
pub struct StatusPage {
    magic: AtomicU64,
    layout_version: AtomicU32,
    worker_pid: AtomicU32,
    progress: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    violation_count: AtomicU64,
    violation_state: AtomicU32,
    violation_arch: AtomicU32,
    violation_nr: AtomicU64,
    violation_args: [AtomicU64; 6],
    violation_ip: AtomicU64,
    rings_started: AtomicU64,
    resubmitted: AtomicU64,
    crash_kind: AtomicU32,
    idle: AtomicU32,
    crash_addr: AtomicU64,
    end_how: AtomicU32,
    end_value: AtomicU32,
    rings_broken: AtomicU64,
    requests_by_type: [AtomicU64; 5],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    in_flight: AtomicU64,
    latency_sum_us: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    reserved: [AtomicU64; 22],
}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<StatusPage>() == LAYOUT_SIZE);
    assert!(LAYOUT_SIZE <= STATUS_PAGE_SIZE);
    assert!(align_of::<StatusPage>() == 8);
    assert!(offset_of!(StatusPage, magic) == 0);
    assert!(offset_of!(StatusPage, layout_version) == 8);
    assert!(offset_of!(StatusPage, worker_pid) == 12);
    assert!(offset_of!(StatusPage, progress) == 16);
    assert!(offset_of!(StatusPage, completed) == 24);
    assert!(offset_of!(StatusPage, failed) == 32);
    assert!(offset_of!(StatusPage, violation_count) == 40);
    assert!(offset_of!(StatusPage, violation_state) == 48);
    assert!(offset_of!(StatusPage, violation_arch) == 52);
    assert!(offset_of!(StatusPage, violation_nr) == 56);
    assert!(offset_of!(StatusPage, violation_args) == 64);
    assert!(offset_of!(StatusPage, violation_ip) == 112);
    assert!(offset_of!(StatusPage, rings_started) == 120);
    assert!(offset_of!(StatusPage, resubmitted) == 128);
    assert!(offset_of!(StatusPage, crash_kind) == 136);
    assert!(offset_of!(StatusPage, crash_addr) == 144);
    assert!(offset_of!(StatusPage, end_how) == 152);
    assert!(offset_of!(StatusPage, end_value) == 156);
    assert!(offset_of!(StatusPage, rings_broken) == 160);
    assert!(offset_of!(StatusPage, requests_by_type) == 168);
    assert!(offset_of!(StatusPage, bytes_read) == 208);
    assert!(offset_of!(StatusPage, bytes_written) == 216);
    assert!(offset_of!(StatusPage, in_flight) == 224);
    assert!(offset_of!(StatusPage, latency_sum_us) == 232);
    assert!(offset_of!(StatusPage, latency) == 240);
    assert!(offset_of!(StatusPage, reserved) == 336);
};

/// Errors of creating, validating and mapping a status page.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The memfd name contains a NUL byte.
    #[error("status page name {name:?} contains a NUL byte")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// `memfd_create` failed.
    #[error("failed to create status page memfd {name:?}")]
    Create {
        /// The name.
        name: String,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// Setting the size failed.
    #[error("failed to size status page to {size} bytes")]
    Resize {
        /// Requested size.
        size: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Adding the seals failed.
    #[error("failed to seal status page with {seals:?}")]
    Seal {
        /// Requested seals.
        seals: SealFlag,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// `fstat` failed.
    #[error("failed to stat status page fd")]
    Stat(#[source] std::io::Error),
    /// The fd does not support seals, so it is not a memfd.
    #[error("status page fd is not a memfd (F_GET_SEALS failed)")]
    NotMemfd(#[source] nix::Error),
    /// The fd is not a regular file (memfds are).
    #[error("status page fd is not a regular file (file type {file_type:?})")]
    NotRegularFile {
        /// What it is.
        file_type: std::fs::FileType,
    },
    /// Required seals are missing.
    #[error("status page memfd has seals {found:#x}, needs at least {required:#x}")]
    MissingSeals {
        /// Seals present.
        found: i32,
        /// Seals required.
        required: i32,
    },
    /// The file has the wrong size.
    #[error("status page memfd is {size} bytes, expected exactly {expected}")]
    WrongSize {
        /// Actual size.
        size: u64,
        /// Expected size.
        expected: usize,
    },
    /// `mmap` failed.
    #[error("failed to map the {size}-byte status page")]
    Map {
        /// Mapping size.
        size: usize,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The magic number does not match.
    #[error("status page magic is {found:#018x}, expected {expected:#018x}")]
    BadMagic {
        /// Found.
        found: u64,
        /// Expected.
        expected: u64,
    },
    /// The layout version does not match.
    #[error("status page layout version is {found}, expected {expected}")]
    BadVersion {
        /// Found.
        found: u32,
        /// Expected.
        expected: u32,
    },
}

impl fmt::Debug for StatusPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.snapshot(), f)
    }
}

impl StatusPage {
    /// Creates a status page: a memfd named `name` (for `/proc/PID/fd` listings), sized to
    /// [`STATUS_PAGE_SIZE`], sealed with [`REQUIRED_SEALS`], initialised with magic and
    /// layout version, and mapped. Returns the fd (close-on-exec; pass it to the worker
    /// over the control channel or clear the flag in the child) and the VMM's mapping.
    pub fn create(name: &str) -> Result<(File, StatusMapping), StatusError> {
        let cname = CString::new(name).map_err(|_| StatusError::InvalidName {
            name: name.to_owned(),
        })?;
        let fd = memfd_create(
            cname.as_c_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|source| StatusError::Create {
            name: name.to_owned(),
            source,
        })?;
        let file = File::from(fd);
        file.set_len(STATUS_PAGE_SIZE as u64)
            .map_err(|source| StatusError::Resize {
                size: STATUS_PAGE_SIZE,
                source,
            })?;
        fcntl(&file, FcntlArg::F_ADD_SEALS(REQUIRED_SEALS)).map_err(|source| {
            StatusError::Seal {
                seals: REQUIRED_SEALS,
                source,
            }
        })?;
        let mapping = StatusMapping::map_unchecked(&file)?;
        mapping.page().magic.store(STATUS_MAGIC, Ordering::Relaxed);
        mapping
            .page()
            .layout_version
            .store(LAYOUT_VERSION, Ordering::Release);
        Ok((file, mapping))
    }

    /// Magic number as currently stored.
    pub fn magic(&self) -> u64 {
        self.magic.load(Ordering::Acquire)
    }

    /// Layout version as currently stored.
    pub fn layout_version(&self) -> u32 {
        self.layout_version.load(Ordering::Acquire)
    }

    /// The worker's pid as it reported it (untrusted: the VMM knows the pid it spawned).
    pub fn worker_pid(&self) -> u32 {
        self.worker_pid.load(Ordering::Relaxed)
    }

    /// Worker side: records the worker's pid.
    pub fn set_pid(&self, pid: u32) {
        self.worker_pid.store(pid, Ordering::Relaxed);
    }

    /// Worker side: bumps the progress counter (the heartbeat). Call once per loop
    /// iteration of the I/O loop.
    pub fn bump_progress(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// The progress counter. The supervisor compares successive values; a counter that
    /// stops while requests are pending means a hung worker.
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Worker side: publishes absolute totals (for a worker that keeps its own counts).
    pub fn set_completed(&self, completed: u64, failed: u64) {
        self.completed.store(completed, Ordering::Relaxed);
        self.failed.store(failed, Ordering::Relaxed);
    }

    /// Worker side: adds `n` successfully completed requests.
    pub fn add_completed(&self, n: u64) {
        self.completed.fetch_add(n, Ordering::Relaxed);
    }

    /// Worker side: adds `n` requests completed with an error status.
    pub fn add_failed(&self, n: u64) {
        self.failed.fetch_add(n, Ordering::Relaxed);
    }

    /// Worker side: publishes how many rings it started (each after inflight recovery)
    /// and how many requests it resubmitted for a predecessor, in total.
    pub fn set_recovery(&self, rings_started: u64, resubmitted: u64) {
        self.resubmitted.store(resubmitted, Ordering::Relaxed);
        self.rings_started.store(rings_started, Ordering::Release);
    }

    /// Rings the worker started.
    pub fn rings_started(&self) -> u64 {
        self.rings_started.load(Ordering::Acquire)
    }

    /// Requests the worker resubmitted for a predecessor.
    pub fn resubmitted(&self) -> u64 {
        self.resubmitted.load(Ordering::Relaxed)
    }

    /// Requests completed successfully.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Requests completed with an error status.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records a seccomp violation; returns whether this call wrote the record (only the
    /// first violation is kept; every call counts in the violation count).
    ///
    /// Async-signal-safe, so the worker's SIGSYS handler may call it: it performs only
    /// lock-free atomic operations on memory that is already mapped (64-bit atomics are
    /// lock-free on every target this compiles for, see the `compile_error!` above). It
    /// does not allocate, take locks, make system calls, touch thread-locals or `errno`,
    /// and cannot panic (no indexing, no arithmetic overflow checks: the count wraps).
    /// A handler that interrupts another thread's handler in the middle of a write sees
    /// the record claimed and returns `false` without waiting.
    pub fn record_violation(&self, nr: u64, args: [u64; 6], arch: u32, ip: u64) -> bool {
        self.violation_count.fetch_add(1, Ordering::Relaxed);
        if self
            .violation_state
            .compare_exchange(
                VIOLATION_NONE,
                VIOLATION_WRITING,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return false;
        }
        self.write_violation(nr, args, arch, ip);
        true
    }

    /// Writes the record's fields, then publishes them to a reader that loads the state
    /// with Acquire. Async-signal-safe (plain atomic stores).
    fn write_violation(&self, nr: u64, args: [u64; 6], arch: u32, ip: u64) {
        self.violation_nr.store(nr, Ordering::Relaxed);
        for (slot, value) in self.violation_args.iter().zip(args) {
            slot.store(value, Ordering::Relaxed);
        }
        self.violation_arch.store(arch, Ordering::Relaxed);
        self.violation_ip.store(ip, Ordering::Relaxed);
        self.violation_state
            .store(VIOLATION_RECORDED, Ordering::Release);
    }

    /// Records the trap a worker is dying of, overwriting whatever the record held: the
    /// SIGSYS handler's last word. A compromised worker can write any record into its
    /// page before it traps (the page is shared memory), so the one kept must be the
    /// handler's, with the kernel's syscall number and arguments. Async-signal-safe as
    /// [`Self::record_violation`] is.
    pub fn record_trap(&self, nr: u64, args: [u64; 6], arch: u32, ip: u64) {
        self.violation_count.fetch_add(1, Ordering::Relaxed);
        self.violation_state
            .store(VIOLATION_WRITING, Ordering::Relaxed);
        self.write_violation(nr, args, arch, ip);
    }

    /// The violation record, if a violation has been (or is being) recorded.
    pub fn violation(&self) -> Option<ViolationRecord> {
        let state = self.violation_state.load(Ordering::Acquire);
        if state == VIOLATION_NONE {
            return None;
        }
        let mut args = [0u64; 6];
        for (value, slot) in args.iter_mut().zip(&self.violation_args) {
            *value = slot.load(Ordering::Relaxed);
        }
        Some(ViolationRecord {
            complete: state == VIOLATION_RECORDED,
            nr: self.violation_nr.load(Ordering::Relaxed),
            args,
            arch: self.violation_arch.load(Ordering::Relaxed),
            ip: self.violation_ip.load(Ordering::Relaxed),
        })
    }

    /// Worker side: how many rings it found corrupt so far.
    pub fn set_rings_broken(&self, n: u64) {
        self.rings_broken.store(n, Ordering::Release);
    }

    /// Rings the worker says it found corrupt (the VMM answers with DEVICE_NEEDS_RESET).
    pub fn rings_broken(&self) -> u64 {
        self.rings_broken.load(Ordering::Acquire)
    }

    /// Worker side: publishes its request counters.
    pub fn set_request_counters(&self, c: &RequestCounters) {
        for (slot, v) in self.requests_by_type.iter().zip(c.by_type) {
            slot.store(v, Ordering::Relaxed);
        }
        for (slot, v) in self.latency.iter().zip(c.latency) {
            slot.store(v, Ordering::Relaxed);
        }
        self.bytes_read.store(c.bytes_read, Ordering::Relaxed);
        self.bytes_written.store(c.bytes_written, Ordering::Relaxed);
        self.in_flight.store(c.in_flight, Ordering::Relaxed);
        self.latency_sum_us
            .store(c.latency_sum_us, Ordering::Release);
    }

    /// The worker's request counters (its word; each field read on its own).
    pub fn request_counters(&self) -> RequestCounters {
        let mut c = RequestCounters {
            latency_sum_us: self.latency_sum_us.load(Ordering::Acquire),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            ..Default::default()
        };
        for (v, slot) in c.by_type.iter_mut().zip(&self.requests_by_type) {
            *v = slot.load(Ordering::Relaxed);
        }
        for (v, slot) in c.latency.iter_mut().zip(&self.latency) {
            *v = slot.load(Ordering::Relaxed);
        }
        c
    }

    /// Worker side: it is about to sleep until a kick, a completion or a message (true),
    /// or it woke.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(u32::from(idle), Ordering::Release);
    }

    /// Whether the worker says it sleeps in its event loop with its rings' notifications
    /// on: pending work that no kick announced is then the driver's to announce, and
    /// requests in flight the disk's to finish.
    pub fn idle(&self) -> bool {
        self.idle.load(Ordering::Acquire) == 1
    }

    /// Worker side, from a fault handler or the panic hook: records how it is crashing
    /// (a signal number or [`CRASH_PANIC`]) and the faulting address (0 if none). The
    /// first record stays. Async-signal-safe like [`Self::record_violation`].
    pub fn record_crash(&self, kind: u32, addr: u64) {
        if self
            .crash_kind
            .compare_exchange(0, kind, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.crash_addr.store(addr, Ordering::Release);
        }
    }

    /// The worker's own crash record, if it wrote one.
    pub fn crash(&self) -> Option<CrashRecord> {
        match self.crash_kind.load(Ordering::Acquire) {
            0 => None,
            kind => Some(CrashRecord {
                kind,
                addr: self.crash_addr.load(Ordering::Acquire),
            }),
        }
    }

    /// Reaper side, once it has reaped the worker: how the worker ended.
    pub fn record_end(&self, end: WorkerEnd) {
        let (how, value) = match end {
            WorkerEnd::Exited(code) => (END_EXITED, code as u32),
            WorkerEnd::Signaled(sig) => (END_SIGNALED, sig as u32),
        };
        self.end_value.store(value, Ordering::Relaxed);
        self.end_how.store(how, Ordering::Release);
    }

    /// How the worker ended, as its reaper recorded it.
    pub fn end(&self) -> Option<WorkerEnd> {
        let how = self.end_how.load(Ordering::Acquire);
        let value = self.end_value.load(Ordering::Relaxed) as i32;
        match how {
            END_EXITED => Some(WorkerEnd::Exited(value)),
            END_SIGNALED => Some(WorkerEnd::Signaled(value)),
            _ => None,
        }
    }

    /// VMM side: clears everything but magic and version, before handing the page to a
    /// new worker.
    pub fn reset(&self) {
        self.worker_pid.store(0, Ordering::Relaxed);
        self.progress.store(0, Ordering::Relaxed);
        self.completed.store(0, Ordering::Relaxed);
        self.failed.store(0, Ordering::Relaxed);
        self.violation_count.store(0, Ordering::Relaxed);
        self.violation_arch.store(0, Ordering::Relaxed);
        self.violation_nr.store(0, Ordering::Relaxed);
        for slot in &self.violation_args {
            slot.store(0, Ordering::Relaxed);
        }
        self.violation_ip.store(0, Ordering::Relaxed);
        self.rings_started.store(0, Ordering::Relaxed);
        self.resubmitted.store(0, Ordering::Relaxed);
        self.crash_kind.store(0, Ordering::Relaxed);
        self.idle.store(0, Ordering::Relaxed);
        self.crash_addr.store(0, Ordering::Relaxed);
        self.end_value.store(0, Ordering::Relaxed);
        self.end_how.store(END_NONE, Ordering::Relaxed);
        self.rings_broken.store(0, Ordering::Relaxed);
        self.set_request_counters(&RequestCounters::default());
        for slot in &self.reserved {
            slot.store(0, Ordering::Relaxed);
        }
        self.violation_state
            .store(VIOLATION_NONE, Ordering::Release);
    }

    /// A plain copy of every field, for printing and logging. Fields are read one by one,
    /// so the copy is not atomic as a whole.
    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            magic: self.magic(),
            layout_version: self.layout_version(),
            worker_pid: self.worker_pid(),
            progress: self.progress(),
            completed: self.completed(),
            failed: self.failed(),
            violation_count: self.violation_count.load(Ordering::Relaxed),
            violation: self.violation(),
            rings_started: self.rings_started(),
            resubmitted: self.resubmitted(),
        }
    }
}

/// A crash as the worker's own fault handler or panic hook recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashRecord {
    /// The signal number, or [`CRASH_PANIC`].
    pub kind: u32,
    /// The faulting address, 0 if none.
    pub addr: u64,
}

/// How a worker ended, as its reaper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerEnd {
    Exited(i32),
    Signaled(i32),
}

impl WorkerEnd {
    /// The status its reaper exits with: the worker's own, or 128 + the signal (the
    /// shell's convention), truncated to 8 bits as exit statuses are.
    pub fn exit_code(self) -> i32 {
        let code = match self {
            WorkerEnd::Exited(c) => c,
            WorkerEnd::Signaled(sig) => 128 + sig,
        };
        code & 0xff
    }
}

/// Signals of a fault: a worker killed by one crashed.
pub const FAULT_SIGNALS: [i32; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];

/// A signal's name, for reports.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGSYS => "SIGSYS".into(),
        other => format!("signal {other}"),
    }
}

/// How a worker crashed, from its own crash record and its reaper's end record, when the
/// two agree that it did: e.g. `crashed: SIGSEGV at address 0x10`. A fault signal that
/// killed it counts without a record of its own; a record the end contradicts (the
/// worker's word alone) does not.
pub fn describe_crash(crash: Option<CrashRecord>, end: Option<WorkerEnd>) -> Option<String> {
    match end? {
        WorkerEnd::Signaled(sig) if FAULT_SIGNALS.contains(&sig) => Some(match crash {
            Some(c) if c.kind == sig as u32 && c.addr != 0 => {
                format!("crashed: {} at address {:#x}", signal_name(sig), c.addr)
            }
            _ => format!("crashed: {}", signal_name(sig)),
        }),
        WorkerEnd::Exited(code)
            if code == 128 + libc::SIGABRT
                && crash.is_some_and(|c| c.kind == libc::SIGABRT as u32) =>
        {
            Some("crashed: aborted (SIGABRT)".to_string())
        }
        WorkerEnd::Exited(EXIT_PANIC) if crash.is_some_and(|c| c.kind == CRASH_PANIC) => {
            Some("crashed: panicked (its message is above)".to_string())
        }
        _ => None,
    }
}

/// A seccomp violation as recorded by the worker's SIGSYS handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationRecord {
    /// Whether the handler finished writing the record (false: it was interrupted, or
    /// the worker wrote a state value this layout does not define).
    pub complete: bool,
    /// Syscall number.
    pub nr: u64,
    /// The six syscall arguments.
    pub args: [u64; 6],
    /// `AUDIT_ARCH_*` value from `siginfo`.
    pub arch: u32,
    /// Instruction pointer of the trapping syscall.
    pub ip: u64,
}

/// Plain copy of a status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    /// Magic number.
    pub magic: u64,
    /// Layout version.
    pub layout_version: u32,
    /// Pid the worker reported.
    pub worker_pid: u32,
    /// Heartbeat counter.
    pub progress: u64,
    /// Requests completed successfully.
    pub completed: u64,
    /// Requests completed with an error.
    pub failed: u64,
    /// Violations trapped (including unrecorded ones).
    pub violation_count: u64,
    /// The first violation, if any.
    pub violation: Option<ViolationRecord>,
    /// Rings started (each after inflight recovery).
    pub rings_started: u64,
    /// Requests resubmitted for a predecessor.
    pub resubmitted: u64,
}

/// A `MAP_SHARED` mapping of a status page; unmapped on drop. Dereferences to
/// [`StatusPage`].
pub struct StatusMapping {
    ptr: NonNull<StatusPage>,
}

// SAFETY: the mapping is owned by this value and only reached through `&StatusPage`,
// whose fields are all atomics: sharing it between threads (or sending it to another
// thread, e.g. a static read by a signal handler) is what atomics are for.
unsafe impl Send for StatusMapping {}
// SAFETY: see `Send`; `&StatusMapping` only hands out `&StatusPage`, which is `Sync`.
unsafe impl Sync for StatusMapping {}

impl fmt::Debug for StatusMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusMapping")
            .field("addr", &self.ptr)
            .field("page", self.page())
            .finish()
    }
}

impl StatusMapping {
    /// Validates `file` and maps it. Use this for any status page fd received from
    /// another process. Checks, in an order that leaves no window for the other side to
    /// change what was checked:
    /// 1. `F_GET_SEALS` succeeds: the fd is a memfd (shmem);
    /// 2. the seals include [`REQUIRED_SEALS`]: the size can no longer change;
    /// 3. it is a regular file of exactly [`STATUS_PAGE_SIZE`] bytes;
    /// 4. after mapping: magic and layout version match.
    pub fn map(file: &File) -> Result<StatusMapping, StatusError> {
        let seals = fcntl(file, FcntlArg::F_GET_SEALS).map_err(StatusError::NotMemfd)?;
        let required = REQUIRED_SEALS.bits();
        if seals & required != required {
            return Err(StatusError::MissingSeals {
                found: seals,
                required,
            });
        }
        let meta = file.metadata().map_err(StatusError::Stat)?;
        let file_type = meta.file_type();
        if !file_type.is_file() {
            return Err(StatusError::NotRegularFile { file_type });
        }
        if meta.len() != STATUS_PAGE_SIZE as u64 {
            return Err(StatusError::WrongSize {
                size: meta.len(),
                expected: STATUS_PAGE_SIZE,
            });
        }
        let mapping = Self::map_unchecked(file)?;
        let magic = mapping.magic();
        if magic != STATUS_MAGIC {
            return Err(StatusError::BadMagic {
                found: magic,
                expected: STATUS_MAGIC,
            });
        }
        let version = mapping.layout_version();
        if version != LAYOUT_VERSION {
            return Err(StatusError::BadVersion {
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        Ok(mapping)
    }

    /// Maps without validation; callers have established that `file` is at least
    /// [`STATUS_PAGE_SIZE`] bytes and sealed against shrinking.
    fn map_unchecked(file: &File) -> Result<StatusMapping, StatusError> {
        let len = NonZeroUsize::new(STATUS_PAGE_SIZE).expect("page size is not zero");
        // SAFETY: a fresh mapping chosen by the kernel (no address hint, no MAP_FIXED), so
        // no existing Rust object is affected. The fd is borrowed for the call only.
        let addr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(|source| StatusError::Map {
            size: STATUS_PAGE_SIZE,
            source,
        })?;
        Ok(StatusMapping { ptr: addr.cast() })
    }

    /// The mapped page.
    pub fn page(&self) -> &StatusPage {
        // SAFETY: `ptr` is a live, page-aligned mapping of STATUS_PAGE_SIZE >=
        // size_of::<StatusPage>() bytes that stays mapped until `self` is dropped, and the
        // file behind it cannot shrink (sealed), so no access faults. StatusPage consists
        // of atomics only: every bit pattern is valid and concurrent writes by the other
        // process are atomic operations, not data races.
        unsafe { self.ptr.as_ref() }
    }
}

impl Deref for StatusMapping {
    type Target = StatusPage;

    fn deref(&self) -> &StatusPage {
        self.page()
    }
}

impl Drop for StatusMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from our own mmap of STATUS_PAGE_SIZE bytes, and no reference
        // from `page()` can outlive `self`.
        let _ = unsafe { munmap(self.ptr.cast(), STATUS_PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_trap_record_replaces_a_forged_one() {
        let (_fd, page) = StatusPage::create("test-trap").unwrap();
        assert!(page.record_violation(59, [0x4141_4141; 6], 0xc000_003e, 1));
        page.record_trap(2, [1, 2, 3, 4, 5, 6], 0xc000_003e, 7);
        let v = page.violation().unwrap();
        assert!(v.complete);
        assert_eq!((v.nr, v.args, v.ip), (2, [1, 2, 3, 4, 5, 6], 7));
    }

    #[test]
    fn a_crash_needs_both_records_to_agree() {
        let segv = Some(CrashRecord {
            kind: 11,
            addr: 0x10,
        });
        assert_eq!(
            describe_crash(segv, Some(WorkerEnd::Signaled(11))).as_deref(),
            Some("crashed: SIGSEGV at address 0x10")
        );
        // Killed by a fault signal without a record of its own: still a crash.
        assert_eq!(
            describe_crash(None, Some(WorkerEnd::Signaled(7))).as_deref(),
            Some("crashed: SIGBUS")
        );
        let panic = Some(CrashRecord {
            kind: CRASH_PANIC,
            addr: 0,
        });
        assert!(describe_crash(panic, Some(WorkerEnd::Exited(EXIT_PANIC))).is_some());
        // A record the end contradicts is the worker's word alone: no crash.
        assert_eq!(describe_crash(panic, Some(WorkerEnd::Exited(159))), None);
        assert_eq!(describe_crash(segv, Some(WorkerEnd::Exited(0))), None);
        assert_eq!(describe_crash(segv, Some(WorkerEnd::Signaled(9))), None);
        assert_eq!(describe_crash(segv, None), None);
        assert_eq!(WorkerEnd::Signaled(9).exit_code(), 137);
        assert_eq!(WorkerEnd::Exited(EXIT_POLICY_VIOLATION).exit_code(), 159);
        assert_eq!(
            WorkerEnd::Exited(256).exit_code(),
            0,
            "8 bits, as an exit status"
        );
        let abort = Some(CrashRecord { kind: 6, addr: 0 });
        assert!(describe_crash(abort, Some(WorkerEnd::Exited(134))).is_some());
        assert_eq!(describe_crash(None, Some(WorkerEnd::Exited(134))), None);
    }

    #[test]
    fn crash_and_end_records_are_kept_and_reset() {
        let (_fd, page) = StatusPage::create("test-crash").unwrap();
        assert_eq!((page.crash(), page.end()), (None, None));
        page.record_crash(11, 0x10);
        page.record_crash(7, 0x20);
        assert_eq!(
            page.crash(),
            Some(CrashRecord {
                kind: 11,
                addr: 0x10
            }),
            "the first stays"
        );
        page.record_end(WorkerEnd::Signaled(11));
        assert_eq!(page.end(), Some(WorkerEnd::Signaled(11)));
        page.reset();
        assert_eq!((page.crash(), page.end()), (None, None));
    }
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    fn memfd(name: &str, size: u64, seals: Option<SealFlag>) -> File {
        let fd = memfd_create(
            CString::new(name).unwrap().as_c_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let file = File::from(fd);
        file.set_len(size).unwrap();
        if let Some(seals) = seals {
            fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).unwrap();
        }
        file
    }

    #[test]
    fn create_then_map_twice() {
        let (file, vmm) = StatusPage::create("status-test").unwrap();
        assert_eq!(vmm.magic(), STATUS_MAGIC);
        assert_eq!(vmm.layout_version(), LAYOUT_VERSION);
        let seals = fcntl(&file, FcntlArg::F_GET_SEALS).unwrap();
        assert_eq!(seals & REQUIRED_SEALS.bits(), REQUIRED_SEALS.bits());
        assert_eq!(file.metadata().unwrap().len(), STATUS_PAGE_SIZE as u64);

        let worker = StatusMapping::map(&file).unwrap();
        assert_ne!(worker.ptr, vmm.ptr, "second mapping is a distinct mapping");
        worker.set_pid(1234);
        worker.bump_progress();
        worker.bump_progress();
        worker.add_completed(5);
        worker.add_failed(2);
        assert_eq!(vmm.worker_pid(), 1234);
        assert_eq!(vmm.progress(), 2);
        assert_eq!(vmm.completed(), 5);
        assert_eq!(vmm.failed(), 2);
        assert_eq!(vmm.violation(), None);
        worker.set_completed(100, 7);
        assert_eq!((vmm.completed(), vmm.failed()), (100, 7));
        worker.add_completed(5);
        worker.add_failed(2);
        assert_eq!((vmm.completed(), vmm.failed()), (105, 9));

        // A third mapping through a duplicated fd, as a worker receiving it would have.
        let dup = file.try_clone().unwrap();
        let third = StatusMapping::map(&dup).unwrap();
        assert_eq!(third.progress(), 2);
        assert_eq!(EXIT_POLICY_VIOLATION, 159);

        // Growing or shrinking the sealed file is refused.
        assert!(file.set_len(1).is_err());
        assert!(file.set_len(2 * STATUS_PAGE_SIZE as u64).is_err());
        // So is adding any further seal.
        assert!(fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).is_err());

        vmm.reset();
        assert_eq!(third.snapshot().progress, 0);
        assert_eq!(third.magic(), STATUS_MAGIC);
    }

    #[test]
    fn create_rejects_nul_in_name() {
        assert!(matches!(
            StatusPage::create("a\0b"),
            Err(StatusError::InvalidName { .. })
        ));
    }

    #[test]
    fn map_rejects_regular_file() {
        let path = std::env::temp_dir().join(format!("ipc-status-{}", std::process::id()));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(&[0u8; STATUS_PAGE_SIZE]).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = StatusMapping::map(&file).unwrap_err();
        // On tmpfs a regular file supports F_GET_SEALS but carries F_SEAL_SEAL only.
        assert!(
            matches!(
                err,
                StatusError::NotMemfd(_) | StatusError::MissingSeals { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn map_rejects_non_file() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(a));
        assert!(matches!(
            StatusMapping::map(&file),
            Err(StatusError::NotMemfd(_))
        ));
    }

    #[test]
    fn map_rejects_wrong_size() {
        for size in [
            0,
            64,
            STATUS_PAGE_SIZE as u64 - 1,
            2 * STATUS_PAGE_SIZE as u64,
        ] {
            let file = memfd("wrong-size", size, Some(REQUIRED_SEALS));
            let err = StatusMapping::map(&file).unwrap_err();
            assert!(
                matches!(err, StatusError::WrongSize { size: s, expected: STATUS_PAGE_SIZE } if s == size),
                "{err:?}"
            );
        }
    }

    #[test]
    fn map_rejects_unsealed_and_partly_sealed() {
        let file = memfd("unsealed", STATUS_PAGE_SIZE as u64, None);
        let err = StatusMapping::map(&file).unwrap_err();
        assert!(
            matches!(err, StatusError::MissingSeals { found: 0, .. }),
            "{err:?}"
        );
        // Sealed against growing only: could still be truncated under the mapping.
        let file = memfd(
            "grow-only",
            STATUS_PAGE_SIZE as u64,
            Some(SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
        );
        assert!(matches!(
            StatusMapping::map(&file),
            Err(StatusError::MissingSeals { .. })
        ));
        // A memfd created without MFD_ALLOW_SEALING reports F_SEAL_SEAL only.
        let fd = memfd_create(c"no-sealing", MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(STATUS_PAGE_SIZE as u64).unwrap();
        assert!(matches!(
            StatusMapping::map(&file),
            Err(StatusError::MissingSeals { .. })
        ));
    }

    #[test]
    fn map_rejects_bad_magic_and_version() {
        // Correct size and seals but never initialised: magic is zero.
        let file = memfd("zero", STATUS_PAGE_SIZE as u64, Some(REQUIRED_SEALS));
        let err = StatusMapping::map(&file).unwrap_err();
        assert!(
            matches!(err, StatusError::BadMagic { found: 0, .. }),
            "{err:?}"
        );

        let (file, vmm) = StatusPage::create("bad-version").unwrap();
        vmm.layout_version
            .store(LAYOUT_VERSION + 1, Ordering::Relaxed);
        assert!(matches!(
            StatusMapping::map(&file),
            Err(StatusError::BadVersion { found, expected: LAYOUT_VERSION }) if found == LAYOUT_VERSION + 1
        ));
        vmm.magic.store(!STATUS_MAGIC, Ordering::Relaxed);
        assert!(matches!(
            StatusMapping::map(&file),
            Err(StatusError::BadMagic { .. })
        ));
    }

    #[test]
    fn concurrent_counter_updates() {
        let (file, vmm) = StatusPage::create("concurrent").unwrap();
        let worker = Arc::new(StatusMapping::map(&file).unwrap());
        const THREADS: u64 = 4;
        const ITERS: u64 = 50_000;
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let w = Arc::clone(&worker);
                std::thread::spawn(move || {
                    for _ in 0..ITERS {
                        w.bump_progress();
                        w.add_completed(1);
                        w.add_failed(2);
                    }
                })
            })
            .collect();
        // The other side reads concurrently and sees monotonic values.
        let mut last = 0;
        while handles.iter().any(|h| !h.is_finished()) {
            let p = vmm.progress();
            assert!(p >= last);
            last = p;
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(vmm.progress(), THREADS * ITERS);
        assert_eq!(vmm.completed(), THREADS * ITERS);
        assert_eq!(vmm.failed(), 2 * THREADS * ITERS);
    }

    #[test]
    fn record_violation_then_snapshot() {
        let (file, vmm) = StatusPage::create("violation").unwrap();
        let worker = StatusMapping::map(&file).unwrap();
        worker.set_pid(42);
        let args = [u64::MAX - 100, 0x7fff_0000_1000, 0, 1, 2, 3];
        assert!(worker.record_violation(257, args, 0xc000_003e, 0x7f00_dead_beef));
        // A second violation counts but does not overwrite the first.
        assert!(!worker.record_violation(59, [0; 6], 0xc000_003e, 1));
        let snap = vmm.snapshot();
        assert_eq!(
            snap,
            StatusSnapshot {
                magic: STATUS_MAGIC,
                layout_version: LAYOUT_VERSION,
                worker_pid: 42,
                progress: 0,
                completed: 0,
                failed: 0,
                violation_count: 2,
                violation: Some(ViolationRecord {
                    complete: true,
                    nr: 257,
                    args,
                    arch: 0xc000_003e,
                    ip: 0x7f00_dead_beef,
                }),
                rings_started: 0,
                resubmitted: 0,
            }
        );
        // Snapshots serialize (through the crate codec) and print.
        let bytes = crate::codec::encode(&snap).unwrap();
        assert_eq!(
            crate::codec::decode::<StatusSnapshot>(&bytes).unwrap(),
            snap
        );
        assert!(format!("{vmm:?}").contains("257"));

        // A hostile state value is reported as an incomplete record, not trusted.
        vmm.violation_state.store(77, Ordering::Relaxed);
        assert!(!vmm.violation().unwrap().complete);
        vmm.reset();
        assert_eq!(worker.violation(), None);
        assert!(worker.record_violation(1, [0; 6], 0, 0));
    }

    #[test]
    fn record_violation_from_signal_handler() {
        use std::sync::OnceLock;
        static PAGE: OnceLock<StatusMapping> = OnceLock::new();
        extern "C" fn handler(_: libc::c_int) {
            if let Some(page) = PAGE.get() {
                page.record_violation(999, [1, 2, 3, 4, 5, 6], 7, 8);
            }
        }
        let (file, vmm) = StatusPage::create("signal").unwrap();
        PAGE.set(StatusMapping::map(&file).unwrap()).unwrap();
        // SIGUSR2 stands in for SIGSYS so the test does not disturb other handlers.
        // SAFETY: installs a handler that only calls the async-signal-safe
        // record_violation on a page that stays mapped (it lives in a static).
        let old =
            unsafe { libc::signal(libc::SIGUSR2, handler as *const () as libc::sighandler_t) };
        assert_ne!(old, libc::SIG_ERR);
        // SAFETY: raising a signal we installed a handler for; the handler runs on this
        // thread before raise returns.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        let v = vmm.violation().unwrap();
        assert!(v.complete);
        assert_eq!(
            (v.nr, v.args, v.arch, v.ip),
            (999, [1, 2, 3, 4, 5, 6], 7, 8)
        );
    }
}
