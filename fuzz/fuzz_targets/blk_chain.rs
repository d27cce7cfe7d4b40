//! The worker's virtio-blk request parser over descriptor chains shaped like a driver's:
//! a header (a known request type most of the time, any sector), data segments of
//! driver-like lengths and directions (often right, sometimes flipped), discard and
//! write-zeroes payloads, a status byte, and sometimes the whole chain behind an indirect
//! descriptor. `blk_request` feeds raw descriptor tables, which rarely form such chains;
//! this target reaches the checks deep inside a plausible request. Each parsed request must
//! also keep the parser's promises: buffers non-empty and inside guest RAM, lengths that
//! add up, whole sectors, every access within the disk.
#![no_main]

use device_workers::blk::{BlkConfig, BlkContext, BlkLimits, RequestKind, Request};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 64;
const MEM: u64 = 1 << 20;
/// Rings live below this; request headers, payloads, data and indirect tables above.
const DATA_START: u64 = 0x4_0000;
const DISK_SECTORS: u64 = 2048;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// A guest address in the data area, usually aligned, sometimes anywhere (even past RAM).
fn addr(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0..=9)? {
        0 => u.arbitrary::<u64>()?,
        1 => u.int_in_range(DATA_START..=MEM + 4096)?,
        _ => DATA_START + u64::from(u.int_in_range(0u32..=((MEM - DATA_START) / 512 - 1) as u32)?) * 512,
    })
}

/// A length a driver would use, or sometimes any.
fn len(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.arbitrary()?,
        1 => 0,
        2 => u.int_in_range(1..=511)?,
        _ => 512 * u.int_in_range(1..=16)?,
    })
}

/// Descriptors of one chain (their `next` is filled in by the caller) after writing its
/// header and payloads into guest memory.
fn chain(u: &mut Unstructured, mem: &GuestMemoryMmap) -> Result<Vec<(u64, u32, u16)>> {
    let kind = match u.int_in_range(0..=12)? {
        0 | 1 | 2 => T_IN,
        3 | 4 | 5 => T_OUT,
        6 => T_FLUSH,
        7 => T_GET_ID,
        8 | 9 => T_DISCARD,
        10 | 11 => T_WRITE_ZEROES,
        _ => u.arbitrary()?,
    };
    let sector = match u.int_in_range(0..=3)? {
        0 => u.arbitrary()?,
        _ => u.int_in_range(0..=DISK_SECTORS + 8)?,
    };
    let header_at = addr(u)?;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    let _ = mem.write_slice(&header, GuestAddress(header_at));
    let header_len = if u.ratio(1, 8)? { len(u)? } else { 16 };
    let header_flags = if u.ratio(1, 16)? { F_WRITE } else { 0 };
    let mut descs = vec![(header_at, header_len, header_flags)];
    // The direction the type wants for its data, flipped now and then.
    let device_writes = matches!(kind, T_IN | T_GET_ID);
    for _ in 0..u.int_in_range(0..=6)? {
        let at = addr(u)?;
        let mut n = len(u)?;
        if matches!(kind, T_DISCARD | T_WRITE_ZEROES) {
            // One or more 16-byte segments: sector, sector count, flags.
            let segments = u.int_in_range(1..=3)?;
            n = if u.ratio(1, 8)? { n } else { 16 * segments };
            for s in 0..segments {
                let mut seg = [0u8; 16];
                let seg_sector: u64 = if u.ratio(1, 4)? {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0..=DISK_SECTORS)?
                };
                let count: u32 = if u.ratio(1, 4)? {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0..=64)?
                };
                let flags: u32 = if u.ratio(1, 4)? { u.arbitrary()? } else { 0 };
                seg[0..8].copy_from_slice(&seg_sector.to_le_bytes());
                seg[8..12].copy_from_slice(&count.to_le_bytes());
                seg[12..16].copy_from_slice(&flags.to_le_bytes());
                let _ = mem.write_slice(&seg, GuestAddress(at.wrapping_add(16 * u64::from(s))));
            }
        }
        let write = device_writes != u.ratio(1, 16)?;
        descs.push((at, n, if write { F_WRITE } else { 0 }));
    }
    let status_len = if u.ratio(1, 8)? { len(u)? } else { 1 };
    let status_flags = if u.ratio(1, 16)? { 0 } else { F_WRITE };
    descs.push((addr(u)?, status_len, status_flags));
    Ok(descs)
}

fn check(request: &Request) {
    let bufs_ok = |bufs: &[device_workers::blk::request::GuestBuf], len: u32| {
        let sum: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
        assert_eq!(sum, u64::from(len), "buffer lengths add up to the request's");
        for b in bufs {
            assert!(b.len > 0, "an empty buffer");
            assert!(
                b.addr.0.checked_add(u64::from(b.len)).is_some_and(|end| end <= MEM),
                "a buffer outside guest RAM: {b:?}"
            );
        }
    };
    match &request.kind {
        RequestKind::In { sector, bufs, len } | RequestKind::Out { sector, bufs, len } => {
            bufs_ok(bufs, *len);
            assert_eq!(len % 512, 0, "whole sectors");
            assert!(sector + u64::from(len / 512) <= DISK_SECTORS, "within the disk");
        }
        RequestKind::GetId { bufs, len } => bufs_ok(bufs, *len),
        RequestKind::Flush => {}
        RequestKind::Discard(segments) | RequestKind::WriteZeroes(segments) => {
            for s in segments {
                assert!(s.sector + u64::from(s.num_sectors) <= DISK_SECTORS, "within the disk");
            }
        }
    }
    assert!(request.status_addr.0 < MEM, "the status byte inside guest RAM");
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return;
    };
    let mut table: Vec<RawDescriptor> = Vec::new();
    let mut heads = Vec::new();
    for _ in 0..u.int_in_range(1..=4).unwrap_or(1) {
        let Ok(descs) = chain(&mut u, &mem) else {
            break;
        };
        let indirect = u.ratio(1, 5).unwrap_or(false);
        let chain_descs = |first: u16| -> Vec<RawDescriptor> {
            descs
                .iter()
                .enumerate()
                .map(|(i, &(a, l, f))| {
                    let last = i + 1 == descs.len();
                    let next = if last { 0 } else { first + i as u16 + 1 };
                    let flags = if last { f } else { f | F_NEXT };
                    RawDescriptor::from(SplitDescriptor::new(a, l, flags, next))
                })
                .collect()
        };
        if indirect {
            // The chain in a table of its own in guest RAM; one descriptor points at it.
            let Ok(at) = addr(&mut u) else { break };
            for (i, d) in chain_descs(0).iter().enumerate() {
                let _ = mem.write_obj(*d, GuestAddress(at.wrapping_add(16 * i as u64)));
            }
            let table_len = 16 * descs.len() as u32;
            heads.push(table.len() as u16);
            table.push(RawDescriptor::from(SplitDescriptor::new(at, table_len, F_INDIRECT, 0)));
        } else {
            let first = table.len() as u16;
            if usize::from(first) + descs.len() > usize::from(QSIZE) {
                break;
            }
            heads.push(first);
            table.extend(chain_descs(first));
        }
    }
    for (i, d) in table.iter().enumerate() {
        let _ = vq.desc_table().store(i as u16, *d);
    }
    for &head in &heads {
        let idx = vq.avail().idx().load();
        let _ = vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .map(|r| r.store(head));
        vq.avail().idx().store(idx.wrapping_add(1));
    }
    let limits = BlkLimits::default();
    let Ok(cfg) = BlkConfig::new(DISK_SECTORS * 512, 512, 1, &limits) else {
        return;
    };
    let ctx = BlkContext::new(&cfg, limits, false, b"fuzz-chain");
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        if let Ok(request) = Request::parse(chain, &ctx, usize::from(QSIZE)) {
            check(&request);
        }
    }
});
