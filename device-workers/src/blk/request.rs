//! Parsing one virtio-blk request out of a descriptor chain (virtio v1.2, 5.2.6).
//!
//! Everything in a chain is hostile guest input. [`Request::parse`] enforces the spec's MUSTs
//! and our own limits before a single byte of guest data moves, and either returns a
//! [`Request`] whose every guest range is known to lie inside guest memory, or a [`Rejected`]
//! that says whether the chain has a usable status byte.
//!
//! # Framing we accept
//! The spec lets a driver frame a request over descriptors any way it likes. We accept the
//! framing every driver we know of uses (Linux, Windows viostor, SeaBIOS, OVMF, our test guest),
//! as Firecracker does, and reject the rest with `IOERR`:
//! - the first descriptor is device-readable and holds exactly the 16-byte header (a header
//!   split across descriptors, or a header descriptor that also carries data, is rejected);
//! - then zero or more data descriptors, all device-writable (`IN`, `GET_ID`) or all
//!   device-readable (`OUT`, `DISCARD`, `WRITE_ZEROES`); `FLUSH` ignores them;
//! - the last descriptor is device-writable, at least one byte long, and the status byte is its
//!   last byte (the spec puts `status` at the very end of the request).
//!
//! Discard / write-zeroes segments are read byte-wise across the data descriptors, so their
//! framing is free.
//!
//! # What a rejected chain yields
//! - With a usable status byte (the chain ends normally in a device-writable descriptor of at
//!   least one byte inside guest memory): complete with `IOERR` (or `UNSUPP` for an unknown
//!   request type and for bad discard / write-zeroes flags) and used length 1.
//! - Without one (empty chain, loop, chain longer than the queue, bad indirect table, last
//!   descriptor device-readable, empty or outside guest memory): complete with used length 0
//!   and write nothing.
//!
//! Either way the error is the guest's: it is logged at `debug` level only.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, Permissions};

use super::config::{BlkConfig, BlkLimits, SECTOR_SHIFT, SECTOR_SIZE};

/// Length of the virtio-blk request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u32 = 16;
/// Length of one discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const SEGMENT_LEN: u32 = 16;
/// Length of the `GET_ID` answer.
pub const ID_BYTES: usize = 20;

/// What the device knows about its disk that parsing needs: read-only, capacity, the serial
/// id returned by `GET_ID`, and the limits advertised in the config space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkContext {
    /// The disk is read-only (`VIRTIO_BLK_F_RO` offered): writes, discards and write-zeroes
    /// fail with `IOERR`.
    pub readonly: bool,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// The serial id, NUL-padded (a 20-byte id is not NUL-terminated, per the spec).
    pub id: [u8; ID_BYTES],
    /// Limits advertised in the config space.
    pub limits: BlkLimits,
}

impl BlkContext {
    /// Context for a disk described by `config` and built with `limits`. `serial` is truncated
    /// to 20 bytes.
    pub fn new(config: &BlkConfig, limits: BlkLimits, readonly: bool, serial: &[u8]) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        Self {
            readonly,
            capacity: config.capacity(),
            id,
            limits,
        }
    }
}

/// Why a chain was rejected. [`ParseError::status`] gives the virtio status it maps to when
/// the chain has a usable status byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The head index yields no descriptor (out of range, or a bad indirect table at the head).
    #[error("chain with head index {0} yields no descriptor")]
    EmptyChain(u16),
    /// More descriptors than the queue size (possible through an indirect table).
    #[error("chain has more than {max} descriptors")]
    ChainTooLong {
        /// The limit (the queue size).
        max: usize,
    },
    /// The chain stopped before a descriptor without NEXT: a loop, a next index outside the
    /// table, a bad indirect table or more than 4 GiB in total.
    #[error("chain ends after {count} descriptors in a descriptor that still has NEXT set (loop, bad next index or bad indirect table)")]
    ChainTruncated {
        /// Descriptors read before the chain stopped.
        count: usize,
    },
    /// `addr + len` overflows.
    #[error("descriptor at {addr:#x} with length {len:#x} overflows the address space")]
    AddressOverflow {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// The descriptor is not entirely inside guest memory.
    #[error("descriptor at {addr:#x} with length {len:#x} is outside guest memory")]
    OutOfGuestMemory {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// The last descriptor is device-readable, so it cannot hold the status byte.
    #[error("last descriptor at {addr:#x} is device-readable: no status byte")]
    StatusNotWritable {
        /// Descriptor address.
        addr: u64,
    },
    /// The last descriptor is empty.
    #[error("last descriptor at {addr:#x} is empty: no status byte")]
    StatusEmpty {
        /// Descriptor address.
        addr: u64,
    },
    /// The header sits in a device-writable descriptor.
    #[error("header descriptor at {addr:#x} is device-writable")]
    HeaderWritable {
        /// Descriptor address.
        addr: u64,
    },
    /// The header descriptor is not exactly 16 bytes (a split header or header plus data).
    #[error("header descriptor has length {len}, expected exactly 16")]
    HeaderLength {
        /// Descriptor length.
        len: u32,
    },
    /// Reading the header or the segments from guest memory failed.
    #[error("reading {len} bytes of guest memory at {addr:#x} failed")]
    GuestRead {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor at {addr:#x} of a type-{req_type} request must be device-{}", if *.must_be_writable { "writable" } else { "readable" })]
    DataDirection {
        /// Request type.
        req_type: u32,
        /// Descriptor address.
        addr: u64,
        /// The direction the descriptor must have.
        must_be_writable: bool,
    },
    /// More data descriptors than `seg_max`.
    #[error("request has {count} data descriptors, more than seg_max {max}")]
    TooManyDataDescriptors {
        /// Data descriptors in the chain.
        count: usize,
        /// `seg_max`.
        max: u32,
    },
    /// The total data length overflows 32 bits.
    #[error("total data length overflows 32 bits")]
    DataTooLong,
    /// A read or write whose length is not a multiple of 512.
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength {
        /// Data length.
        len: u32,
    },
    /// A read or write past the end of the disk.
    #[error("access of {sectors} sectors at sector {sector} is beyond the capacity of {capacity} sectors")]
    OutOfCapacity {
        /// First sector.
        sector: u64,
        /// Sector count.
        sectors: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("request type {0} on a read-only disk")]
    ReadOnly(u32),
    /// A request type we do not implement.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// A discard / write-zeroes payload that is empty or not a whole number of segments.
    #[error("discard/write-zeroes payload of {len} bytes is not a non-zero multiple of 16")]
    SegmentPayload {
        /// Payload length.
        len: u32,
    },
    /// More discard / write-zeroes segments than the config space allows.
    #[error("request carries {count} segments, more than the limit {max}")]
    TooManySegments {
        /// Segments in the request.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// A segment with unknown flags, or with UNMAP on a discard.
    #[error("segment flags {flags:#x} are not supported for request type {req_type}")]
    SegmentFlags {
        /// Request type.
        req_type: u32,
        /// The flags.
        flags: u32,
    },
    /// A segment larger than the config space allows.
    #[error("segment of {num_sectors} sectors exceeds the limit of {max} sectors")]
    SegmentTooLarge {
        /// Segment length in sectors.
        num_sectors: u32,
        /// The limit.
        max: u32,
    },
}

impl ParseError {
    /// The virtio status this error completes the request with, if the chain has a usable
    /// status byte: `UNSUPP` for an unknown type or bad segment flags (5.2.6.2), `IOERR`
    /// otherwise.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) | Self::SegmentFlags { .. } => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain [`Request::parse`] rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request with head index {head_index} rejected")]
pub struct Rejected {
    /// Head index of the chain (for the used ring).
    pub head_index: u16,
    /// Where to write the status, if the chain has a usable status byte.
    pub status_addr: Option<GuestAddress>,
    /// Why.
    #[source]
    pub error: ParseError,
}

/// A guest buffer: a descriptor's range, known to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes (non-zero).
    pub len: u32,
}

/// One discard / write-zeroes segment, validated against the capacity and the limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// UNMAP flag (write-zeroes only).
    pub unmap: bool,
}

impl Segment {
    /// Byte offset of the segment.
    pub fn offset(&self) -> u64 {
        // Cannot overflow: parse checked `sector + num_sectors <= capacity` and the capacity
        // is a byte size shifted right by 9.
        self.sector << SECTOR_SHIFT
    }

    /// Length of the segment in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) << SECTOR_SHIFT
    }

    /// Whether the segment covers no sector.
    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at `sector` into `bufs`.
    In {
        /// First sector.
        sector: u64,
        /// Device-writable buffers, in order.
        bufs: Vec<GuestBuf>,
        /// Total length (a multiple of 512).
        len: u32,
    },
    /// Write `len` bytes from `bufs` at `sector`.
    Out {
        /// First sector.
        sector: u64,
        /// Device-readable buffers, in order.
        bufs: Vec<GuestBuf>,
        /// Total length (a multiple of 512).
        len: u32,
    },
    /// Flush the disk's volatile cache.
    Flush,
    /// Write the serial id into `bufs` (at most 20 bytes).
    GetId {
        /// Device-writable buffers, in order.
        bufs: Vec<GuestBuf>,
        /// Total length of `bufs`.
        len: u32,
    },
    /// Discard the segments.
    Discard(Vec<Segment>),
    /// Zero the segments.
    WriteZeroes(Vec<Segment>),
}

/// A parsed, validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head index of the chain (for the used ring).
    pub head_index: u16,
    /// What to do.
    pub kind: RequestKind,
    /// Where the status byte goes (inside guest memory).
    pub status_addr: GuestAddress,
}

/// `struct virtio_blk_outhdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RequestHeader {
    req_type: u32,
    ioprio: u32,
    sector: u64,
}

// SAFETY: `RequestHeader` is `repr(C)`, made of integers only and has no padding (4 + 4 + 8
// bytes, naturally aligned), so every byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// Checks that a descriptor's range does not overflow and lies inside guest memory.
fn check_desc<G: GuestMemory + ?Sized>(mem: &G, desc: &Descriptor) -> Result<(), ParseError> {
    let addr = desc.addr().0;
    let len = desc.len();
    addr.checked_add(u64::from(len))
        .ok_or(ParseError::AddressOverflow { addr, len })?;
    let access = if desc.is_write_only() {
        Permissions::Write
    } else {
        Permissions::Read
    };
    if len > 0 && !mem.check_range(desc.addr(), len as usize, access) {
        return Err(ParseError::OutOfGuestMemory { addr, len });
    }
    Ok(())
}

impl Request {
    /// Parses and validates the chain. `max_descriptors` is the queue size: the spec forbids
    /// longer chains, including through an indirect table.
    ///
    /// The chain is walked at most once and at most `max_descriptors + 1` steps (virtio-queue's
    /// iterator also stops after the queue size, which is how a loop ends), so a hostile
    /// chain cannot make us spin.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        ctx: &BlkContext,
        max_descriptors: usize,
    ) -> Result<Request, Rejected>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head_index = chain.head_index();
        let reject = |status_addr, error| Rejected {
            head_index,
            status_addr,
            error,
        };

        let mut chain = chain;
        let mut descs: Vec<Descriptor> = Vec::new();
        for desc in chain.by_ref() {
            if descs.len() == max_descriptors {
                return Err(reject(
                    None,
                    ParseError::ChainTooLong {
                        max: max_descriptors,
                    },
                ));
            }
            descs.push(desc);
        }
        let mem = chain.memory();

        let Some(last) = descs.last() else {
            return Err(reject(None, ParseError::EmptyChain(head_index)));
        };
        if last.has_next() {
            return Err(reject(
                None,
                ParseError::ChainTruncated { count: descs.len() },
            ));
        }

        // The status byte first: it decides how every later error is reported.
        if !last.is_write_only() {
            return Err(reject(
                None,
                ParseError::StatusNotWritable {
                    addr: last.addr().0,
                },
            ));
        }
        if last.len() == 0 {
            return Err(reject(
                None,
                ParseError::StatusEmpty {
                    addr: last.addr().0,
                },
            ));
        }
        check_desc(mem, last).map_err(|e| reject(None, e))?;
        // Cannot overflow: check_desc proved addr + len does not.
        let status_addr = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);

        Self::parse_body(mem, &descs, ctx)
            .map(|kind| Request {
                head_index,
                kind,
                status_addr,
            })
            .map_err(|e| reject(Some(status_addr), e))
    }

    /// Everything after the status byte is known to be usable.
    fn parse_body<G: GuestMemory + ?Sized>(
        mem: &G,
        descs: &[Descriptor],
        ctx: &BlkContext,
    ) -> Result<RequestKind, ParseError> {
        // descs is non-empty; if it has a single descriptor, that one is the (writable)
        // status descriptor, and the header check below rejects it.
        let header_desc = &descs[0];
        if header_desc.is_write_only() {
            return Err(ParseError::HeaderWritable {
                addr: header_desc.addr().0,
            });
        }
        if header_desc.len() != HEADER_LEN {
            return Err(ParseError::HeaderLength {
                len: header_desc.len(),
            });
        }
        check_desc(mem, header_desc)?;
        let header: RequestHeader =
            mem.read_obj(header_desc.addr())
                .map_err(|_| ParseError::GuestRead {
                    addr: header_desc.addr().0,
                    len: HEADER_LEN,
                })?;
        let req_type = u32::from_le(header.req_type);
        let sector = u64::from_le(header.sector);

        let data_descs = &descs[1..descs.len() - 1];
        // Validate every data descriptor's range, whatever the type.
        for d in data_descs {
            check_desc(mem, d)?;
        }

        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let is_in = req_type == VIRTIO_BLK_T_IN;
                if !is_in && ctx.readonly {
                    return Err(ParseError::ReadOnly(req_type));
                }
                let (bufs, len) = collect_bufs(data_descs, req_type, is_in, ctx)?;
                if u64::from(len) % SECTOR_SIZE != 0 {
                    return Err(ParseError::UnalignedLength { len });
                }
                let sectors = u64::from(len) >> SECTOR_SHIFT;
                check_capacity(sector, sectors, ctx.capacity)?;
                Ok(if is_in {
                    RequestKind::In { sector, bufs, len }
                } else {
                    RequestKind::Out { sector, bufs, len }
                })
            }
            VIRTIO_BLK_T_FLUSH => Ok(RequestKind::Flush),
            VIRTIO_BLK_T_GET_ID => {
                let (bufs, len) = collect_bufs(data_descs, req_type, true, ctx)?;
                Ok(RequestKind::GetId { bufs, len })
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if ctx.readonly {
                    return Err(ParseError::ReadOnly(req_type));
                }
                let (bufs, len) = collect_bufs(data_descs, req_type, false, ctx)?;
                let segments = read_segments(mem, &bufs, len, req_type, ctx)?;
                Ok(if req_type == VIRTIO_BLK_T_DISCARD {
                    RequestKind::Discard(segments)
                } else {
                    RequestKind::WriteZeroes(segments)
                })
            }
            other => Err(ParseError::Unsupported(other)),
        }
    }
}

/// Checks direction and count of the data descriptors and sums their lengths. Empty
/// descriptors are dropped.
fn collect_bufs(
    data_descs: &[Descriptor],
    req_type: u32,
    writable: bool,
    ctx: &BlkContext,
) -> Result<(Vec<GuestBuf>, u32), ParseError> {
    if data_descs.len() > ctx.limits.seg_max as usize {
        return Err(ParseError::TooManyDataDescriptors {
            count: data_descs.len(),
            max: ctx.limits.seg_max,
        });
    }
    let mut bufs = Vec::with_capacity(data_descs.len());
    let mut total: u32 = 0;
    for d in data_descs {
        if d.is_write_only() != writable {
            return Err(ParseError::DataDirection {
                req_type,
                addr: d.addr().0,
                must_be_writable: writable,
            });
        }
        if d.len() == 0 {
            continue;
        }
        total = total.checked_add(d.len()).ok_or(ParseError::DataTooLong)?;
        bufs.push(GuestBuf {
            addr: d.addr(),
            len: d.len(),
        });
    }
    Ok((bufs, total))
}

fn check_capacity(sector: u64, sectors: u64, capacity: u64) -> Result<(), ParseError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ParseError::OutOfCapacity {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Reads and validates the discard / write-zeroes segments. The payload is copied out of
/// guest memory once, so the guest cannot change a segment after it was checked.
fn read_segments<G: GuestMemory + ?Sized>(
    mem: &G,
    bufs: &[GuestBuf],
    len: u32,
    req_type: u32,
    ctx: &BlkContext,
) -> Result<Vec<Segment>, ParseError> {
    if len == 0 || len % SEGMENT_LEN != 0 {
        return Err(ParseError::SegmentPayload { len });
    }
    let (max_seg, max_sectors) = if req_type == VIRTIO_BLK_T_DISCARD {
        (ctx.limits.max_discard_seg, ctx.limits.max_discard_sectors)
    } else {
        (
            ctx.limits.max_write_zeroes_seg,
            ctx.limits.max_write_zeroes_sectors,
        )
    };
    let count = len / SEGMENT_LEN;
    if count > max_seg {
        return Err(ParseError::TooManySegments {
            count,
            max: max_seg,
        });
    }
    // Bounded by max_seg * 16, a limit we advertised.
    let mut payload = vec![0u8; len as usize];
    let mut pos = 0usize;
    for b in bufs {
        let n = b.len as usize;
        mem.read_slice(&mut payload[pos..pos + n], b.addr)
            .map_err(|_| ParseError::GuestRead {
                addr: b.addr.0,
                len: b.len,
            })?;
        pos += n;
    }

    let allowed_flags = if req_type == VIRTIO_BLK_T_WRITE_ZEROES {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    let mut segments = Vec::with_capacity(count as usize);
    for raw in payload.chunks_exact(SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let num_sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        if flags & !allowed_flags != 0 {
            return Err(ParseError::SegmentFlags { req_type, flags });
        }
        if num_sectors > max_sectors {
            return Err(ParseError::SegmentTooLarge {
                num_sectors,
                max: max_sectors,
            });
        }
        check_capacity(sector, u64::from(num_sectors), ctx.capacity)?;
        segments.push(Segment {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
}
