//! Executing a parsed request against a [`BlockIo`] and guest memory, and completing
//! rejected chains.
//!
//! Every completion says what to put in the used ring: the status byte written (if any) and
//! the used length, the number of bytes written into device-writable descriptors including
//! the status byte. A failed request reports only the status byte (used length 1) even if
//! part of an `IN` buffer was filled: the guest must not trust the data of a failed read.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::backend::{BackendError, BlockIo};
use super::request::{BlkContext, GuestBuf, Rejected, Request, RequestKind, Segment};

/// Errors while executing a valid request. Both complete the request with `IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The disk failed.
    #[error("disk operation of request {head_index} failed")]
    Backend {
        /// Head index of the request.
        head_index: u16,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// Guest memory that parsing checked is no longer accessible (the memory table changed).
    #[error("guest memory at {addr:#x} length {len:#x} of request {head_index} is not accessible")]
    GuestMemory {
        /// Head index of the request.
        head_index: u16,
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
}

/// The outcome of one chain: what goes into the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head index of the chain.
    pub head_index: u16,
    /// The status byte written into the chain, or `None` if the chain had no usable status
    /// byte (or writing it failed).
    pub status: Option<u8>,
    /// Used length for the used ring.
    pub used_len: u32,
}

impl Completion {
    /// Whether the request succeeded (status `OK`).
    pub fn is_ok(&self) -> bool {
        self.status == Some(VIRTIO_BLK_S_OK as u8)
    }
}

/// Executes `req` against `disk`, synchronously, and writes its status byte.
pub fn execute<G: GuestMemory + ?Sized>(
    req: &Request,
    mem: &G,
    disk: &mut dyn BlockIo,
    ctx: &BlkContext,
) -> Completion {
    let (status, data_len) = match run(req, mem, disk, ctx) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            // Host I/O errors can be provoked at will by a guest (repeat a read of a bad
            // block), so they are logged as quietly as the guest's own mistakes; the
            // counters returned by `process_queue` make them visible.
            tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "request failed");
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    finish(req.head_index, Some(req.status_addr), status, data_len, mem)
}

/// Runs `req`'s disk operations; returns the data bytes that went to the guest.
fn run<G: GuestMemory + ?Sized>(
    req: &Request,
    mem: &G,
    disk: &mut dyn BlockIo,
    ctx: &BlkContext,
) -> Result<u32, ExecuteError> {
    let head_index = req.head_index;
    let backend = |source| ExecuteError::Backend { head_index, source };
    match &req.kind {
        RequestKind::In { sector, bufs, len } => {
            let slices = guest_slices(mem, bufs, Permissions::Write, head_index)?;
            disk.read_vectored_at(
                &plain_slices(&slices),
                sector << super::config::SECTOR_SHIFT,
            )
            .map_err(backend)?;
            // The backend wrote through plain pointers: record the dirty pages.
            for s in &slices {
                s.bitmap().mark_dirty(0, s.len());
            }
            Ok(*len)
        }
        RequestKind::Out { sector, bufs, .. } => {
            let slices = guest_slices(mem, bufs, Permissions::Read, head_index)?;
            disk.write_vectored_at(
                &plain_slices(&slices),
                sector << super::config::SECTOR_SHIFT,
            )
            .map_err(backend)?;
            Ok(0)
        }
        RequestKind::Flush => disk.flush().map(|()| 0).map_err(backend),
        RequestKind::GetId { bufs, .. } => write_id(mem, bufs, &ctx.id, head_index),
        RequestKind::Discard(segments) => {
            every_segment(segments, |s| disk.discard(s.offset(), s.len())).map_err(backend)
        }
        RequestKind::WriteZeroes(segments) => {
            let may_unmap = ctx.limits.write_zeroes_may_unmap;
            every_segment(segments, |s| {
                disk.write_zeroes(s.offset(), s.len(), s.unmap && may_unmap)
            })
            .map_err(backend)
        }
    }
}

/// Runs `op` on every non-empty segment, all of them even after a failure (a range
/// that failed does not stop the others), and returns the first error.
fn every_segment(
    segments: &[Segment],
    mut op: impl FnMut(&Segment) -> Result<(), BackendError>,
) -> Result<u32, BackendError> {
    let mut first_error = None;
    for s in nonempty(segments) {
        if let Err(e) = op(s) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(0), Err)
}

fn nonempty(segments: &[Segment]) -> impl Iterator<Item = &Segment> {
    segments.iter().filter(|s| !s.is_empty())
}

/// Completes a chain that [`Request::parse`] rejected: writes `IOERR` / `UNSUPP` if it has a
/// usable status byte (used length 1), otherwise writes nothing (used length 0).
pub fn complete_rejected<G: GuestMemory + ?Sized>(rejected: &Rejected, mem: &G) -> Completion {
    tracing::debug!(
        head_index = rejected.head_index,
        error = %rejected.error,
        has_status = rejected.status_addr.is_some(),
        "descriptor chain rejected"
    );
    finish(
        rejected.head_index,
        rejected.status_addr,
        rejected.error.status(),
        0,
        mem,
    )
}

/// Writes `status` to a request's status byte and says what goes into the used ring (for
/// requests completed outside [`execute`], e.g. by the io_uring engine).
pub fn finish_status<G: GuestMemory + ?Sized>(
    head_index: u16,
    status_addr: GuestAddress,
    status: u8,
    data_len: u32,
    mem: &G,
) -> Completion {
    finish(head_index, Some(status_addr), status, data_len, mem)
}

/// The host memory behind `bufs` as plain slices (no dirty tracking), or None if some of it
/// is not accessible.
pub fn guest_slices_plain<'a, G: GuestMemory + ?Sized>(
    mem: &'a G,
    bufs: &[GuestBuf],
    access: Permissions,
) -> Option<Vec<VolatileSlice<'a>>> {
    guest_slices(mem, bufs, access, 0)
        .ok()
        .map(|s| plain_slices(&s))
}

fn finish<G: GuestMemory + ?Sized>(
    head_index: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    data_len: u32,
    mem: &G,
) -> Completion {
    let Some(addr) = status_addr else {
        return Completion {
            head_index,
            status: None,
            used_len: 0,
        };
    };
    match mem.write_obj(status, addr) {
        Ok(()) => Completion {
            head_index,
            status: Some(status),
            used_len: data_len.saturating_add(1),
        },
        Err(e) => {
            tracing::debug!(head_index, addr = addr.0, error = %e, "writing the status byte failed");
            Completion {
                head_index,
                status: None,
                used_len: 0,
            }
        }
    }
}

/// Writes up to 20 bytes of the id into `bufs` (a shorter buffer gets a truncated id, as
/// QEMU does); returns the bytes written.
fn write_id<G: GuestMemory + ?Sized>(
    mem: &G,
    bufs: &[GuestBuf],
    id: &[u8],
    head_index: u16,
) -> Result<u32, ExecuteError> {
    let mut rest = id;
    let mut written = 0u32;
    for b in bufs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(b.len as usize);
        mem.write_slice(&rest[..n], b.addr)
            .map_err(|_| ExecuteError::GuestMemory {
                head_index,
                addr: b.addr.0,
                len: b.len,
            })?;
        rest = &rest[n..];
        written += n as u32;
    }
    Ok(written)
}

/// The host slices behind `bufs`, in order (a buffer that spans memory regions yields several).
fn guest_slices<'a, G: GuestMemory + ?Sized>(
    mem: &'a G,
    bufs: &[GuestBuf],
    access: Permissions,
    head_index: u16,
) -> Result<Vec<VolatileSlice<'a, BS<'a, G::Bitmap>>>, ExecuteError> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        let err = || ExecuteError::GuestMemory {
            head_index,
            addr: b.addr.0,
            len: b.len,
        };
        let mut covered = 0usize;
        for s in mem
            .get_slices(b.addr, b.len as usize, access)
            .map_err(|_| err())?
        {
            let s = s.map_err(|_| err())?;
            covered += s.len();
            out.push(s);
        }
        if covered != b.len as usize {
            return Err(err());
        }
    }
    Ok(out)
}

/// The same memory as `slices`, without dirty tracking, for the backend.
fn plain_slices<'a, B: vm_memory::bitmap::BitmapSlice>(
    slices: &[VolatileSlice<'a, B>],
) -> Vec<VolatileSlice<'a>> {
    slices
        .iter()
        .map(|s| {
            // SAFETY: `s` covers `s.len()` bytes of guest memory mapped for at least 'a (the
            // borrow of the guest memory object `guest_slices` took). vm-memory's `xen`
            // feature is off, so the pointer guard merely carries the pointer and dropping it
            // unmaps nothing. The new slice has the same lifetime and length, so it cannot
            // outlive or exceed the mapping. Dirty tracking is redone by the caller.
            unsafe { VolatileSlice::new(s.ptr_guard_mut().as_ptr(), s.len()) }
        })
        .collect()
}
