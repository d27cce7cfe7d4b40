//! End-to-end tests of parse + execute + process_queue against virtio-queue's guest-side mock,
//! a `GuestMemoryMmap` and a disk file (or an in-memory disk). Every bad-input case checks the
//! status byte / used length, that the file is untouched, and that the next valid request is
//! still served.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::MemBackend;
use super::config::{BlkConfig, BlkLimits};
use super::engine::RequestEngine;
use super::queue::process_queue;
use super::request::BlkContext;
use super::sync_backend::tests::{contents, pattern, temp_disk};
use super::sync_backend::SyncBackend;
use crate::inflight::NoInflight;
use crate::vhost::device::{QueueError, QueueOutcome};

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 0x10_0000;
const DISK_SIZE: usize = 64 * 1024;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const UNTOUCHED: u8 = 0xee;
/// The used ring. virtio-queue 0.18's mock places its used ring right after `avail.end()`,
/// which counts ring entries, not bytes, so it overlaps the avail ring (entries and
/// `used_event`). We keep the mock's descriptor table and avail ring and put the used ring
/// here ourselves.
const USED: u64 = 0x2000;

fn ctx(readonly: bool) -> BlkContext {
    let limits = BlkLimits::default();
    let cfg = BlkConfig::new(DISK_SIZE as u64, 512, 1, &limits).unwrap();
    BlkContext::new(&cfg, limits, readonly, b"bulkhead-test-disk-id")
}

struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    q: Queue,
    ctx: BlkContext,
    stats: super::stats::RequestStats,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap, readonly: bool) -> Self {
        let vq = MockSplitQueue::new(mem, QSIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_used_ring_address(Some(USED as u32), Some(0));
        mem.write_slice(&[0u8; 4 + 8 * QSIZE as usize + 2], GuestAddress(USED))
            .unwrap();
        Self {
            mem,
            vq,
            q,
            ctx: ctx(readonly),
            stats: Default::default(),
        }
    }

    fn header(&self, addr: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    /// Writes a chain at descriptor index `at` (linked with NEXT) and makes it available.
    fn chain_at(&self, at: u16, descs: &[(u64, u32, u16)]) {
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = i as u16;
                let (flags, next) = if i + 1 < n {
                    (flags | VRING_DESC_F_NEXT as u16, at + i + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&raw, at).unwrap();
    }

    fn chain(&self, descs: &[(u64, u32, u16)]) {
        self.chain_at(0, descs);
    }

    /// Writes raw descriptors (flags and next as given) at index 0 and makes index 0 available.
    fn raw_descs(&self, descs: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.vq
                .desc_table()
                .store(
                    i as u16,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        self.push_avail(0);
    }

    fn push_avail(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    fn status_slot(&self, addr: u64) {
        self.mem.write_obj(UNTOUCHED, GuestAddress(addr)).unwrap();
    }

    fn run(&mut self, disk: &mut dyn RequestEngine) -> QueueOutcome {
        process_queue(
            &mut self.q,
            0,
            self.mem,
            disk,
            &self.ctx,
            &mut NoInflight,
            &mut self.stats,
        )
        .unwrap()
    }

    /// (id, len) of the most recent used entry.
    fn last_used(&self) -> (u32, u32) {
        let idx = self.used_idx();
        assert!(idx > 0, "nothing in the used ring");
        let e = USED + 4 + 8 * u64::from((idx - 1) % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
        (id, len)
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Submits a simple request: header, data descriptors, status.
    fn simple(&self, req_type: u32, sector: u64, data: &[(u64, u32, u16)]) {
        self.header(HDR, req_type, sector);
        self.status_slot(STATUS);
        let mut descs = vec![(HDR, 16, R)];
        descs.extend_from_slice(data);
        descs.push((STATUS, 1, W));
        self.chain(&descs);
    }

    /// Expects the last request to have completed with `status` and `len`.
    fn expect(&self, status: u8, used_len: u32) {
        assert_eq!(self.status(), status, "status byte");
        assert_eq!(self.last_used().1, used_len, "used len");
    }

    /// Expects the last chain to have completed without a status byte.
    fn expect_no_status(&self, status_addr: u64) {
        assert_eq!(self.last_used().1, 0, "used len");
        let b: u8 = self.mem.read_obj(GuestAddress(status_addr)).unwrap();
        assert_eq!(b, UNTOUCHED, "status byte must not be written");
    }

    /// A valid read after a bad request: the worker keeps serving.
    fn still_serves(&mut self, disk: &mut dyn RequestEngine) {
        self.mem
            .write_slice(&[0u8; 512], GuestAddress(DATA + 0x8000))
            .unwrap();
        self.simple(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x8000, 512, W)]);
        let before = self.used_idx();
        let out = self.run(disk);
        assert_eq!(out.completed, 1);
        assert_eq!(self.used_idx(), before.wrapping_add(1));
        self.expect(OK, 513);
        assert_eq!(
            self.read_guest(DATA + 0x8000, 512),
            disk_bytes_for_check(disk, 0, 512)
        );
    }
}

fn disk_bytes_for_check(_disk: &mut dyn RequestEngine, off: usize, len: usize) -> Vec<u8> {
    // Sector 0 is never modified by the tests that call `still_serves`.
    pattern(DISK_SIZE)[off..off + len].to_vec()
}

fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn file_disk() -> SyncBackend {
    SyncBackend::new(temp_disk(DISK_SIZE)).unwrap()
}

fn mem_disk() -> MemBackend {
    let mut d = MemBackend::new(DISK_SIZE);
    d.data = pattern(DISK_SIZE);
    d
}

// ---- valid requests -------------------------------------------------------------------------

#[test]
fn in_reads_the_file() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    h.simple(
        VIRTIO_BLK_T_IN,
        2,
        &[(DATA, 512, W), (DATA + 0x1000, 512, W)],
    );
    let out = h.run(&mut disk);
    assert_eq!(
        out,
        QueueOutcome {
            signal: true,
            completed: 1,
            failed: 0,
            dropped: 0,
            ..QueueOutcome::default()
        }
    );
    h.expect(OK, 1025);
    assert_eq!(h.last_used().0, 0);
    let p = pattern(DISK_SIZE);
    assert_eq!(h.read_guest(DATA, 512), &p[1024..1536]);
    assert_eq!(h.read_guest(DATA + 0x1000, 512), &p[1536..2048]);
}

#[test]
fn out_writes_the_file_and_nothing_else() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xa5; 1024], GuestAddress(DATA + 0x1000))
        .unwrap();
    h.simple(
        VIRTIO_BLK_T_OUT,
        4,
        &[(DATA, 512, R), (DATA + 0x1000, 1024, R)],
    );
    h.run(&mut disk);
    h.expect(OK, 1);
    let mut want = pattern(DISK_SIZE);
    want[2048..2560].fill(0x5a);
    want[2560..3584].fill(0xa5);
    assert_eq!(contents(disk.file()), want);
    h.still_serves(&mut disk);
}

#[test]
fn requests_are_counted_by_type_with_their_bytes() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    h.simple(VIRTIO_BLK_T_IN, 0, &[(DATA, 1024, W)]);
    h.run(&mut disk);
    h.simple(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
    h.run(&mut disk);
    h.simple(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.run(&mut disk);
    let c = h.stats.counters();
    assert_eq!(c.by_type, [1, 1, 1, 0, 0]);
    assert_eq!((c.bytes_read, c.bytes_written, c.in_flight), (1024, 512, 0));
    assert_eq!(c.latency.iter().sum::<u64>(), 3);
}

#[test]
fn flush_reaches_the_backend() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = mem_disk();
    h.simple(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.run(&mut disk);
    h.expect(OK, 1);
    assert_eq!(disk.flushes, 1);
    // Also on a real file.
    let mut disk = file_disk();
    h.simple(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.run(&mut disk);
    h.expect(OK, 1);
}

#[test]
fn get_id_full_and_short_buffers() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = mem_disk();
    mem.write_slice(&[0xcc; 32], GuestAddress(DATA)).unwrap();
    h.simple(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 32, W)]);
    h.run(&mut disk);
    h.expect(OK, 21);
    assert_eq!(h.read_guest(DATA, 20), b"bulkhead-test-disk-i");
    assert_eq!(h.read_guest(DATA + 20, 12), [0xcc; 12]);

    // A buffer shorter than 20 bytes gets a truncated id (as QEMU does), nothing past it.
    mem.write_slice(&[0xcc; 32], GuestAddress(DATA)).unwrap();
    h.simple(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 8, W)]);
    h.run(&mut disk);
    h.expect(OK, 9);
    assert_eq!(h.read_guest(DATA, 8), b"bulkhead");
    assert_eq!(h.read_guest(DATA + 8, 24), [0xcc; 24]);

    // No buffer at all: OK, nothing written.
    h.simple(VIRTIO_BLK_T_GET_ID, 0, &[]);
    h.run(&mut disk);
    h.expect(OK, 1);

    // A short serial is NUL-padded.
    let mut short = Harness::new(&mem, false);
    short.ctx.id = [0; 20];
    short.ctx.id[..3].copy_from_slice(b"abc");
    mem.write_slice(&[0xcc; 32], GuestAddress(DATA)).unwrap();
    short.simple(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    short.run(&mut disk);
    short.expect(OK, 21);
    assert_eq!(&short.read_guest(DATA, 20)[..4], b"abc\0");
}

fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_punches_and_write_zeroes_zeroes() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    let mut want = pattern(DISK_SIZE);

    mem.write_slice(&segment(16, 16, 0), GuestAddress(DATA))
        .unwrap();
    h.simple(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]);
    h.run(&mut disk);
    h.expect(OK, 1);
    want[8192..16384].fill(0); // ext4 / tmpfs punch holes; the content must then read zero
    assert_eq!(contents(disk.file()), want);

    mem.write_slice(&segment(40, 3, 0), GuestAddress(DATA))
        .unwrap();
    h.simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]);
    h.run(&mut disk);
    h.expect(OK, 1);
    want[40 * 512..43 * 512].fill(0);
    assert_eq!(contents(disk.file()), want);

    mem.write_slice(&segment(64, 8, 1), GuestAddress(DATA))
        .unwrap();
    h.simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]);
    h.run(&mut disk);
    h.expect(OK, 1);
    want[64 * 512..72 * 512].fill(0);
    assert_eq!(contents(disk.file()), want);
    assert_eq!(disk.file().metadata().unwrap().len(), DISK_SIZE as u64);
    h.still_serves(&mut disk);
}

// ---- bad input ------------------------------------------------------------------------------

/// Runs one bad OUT-ish request against a file disk, expects `status`/`len` (or no status),
/// the file untouched, and service afterwards.
fn bad_case(readonly: bool, setup: impl FnOnce(&Harness), expect: Option<(u8, u32)>) {
    let mem = guest();
    let mut h = Harness::new(&mem, readonly);
    let mut disk = file_disk();
    mem.write_slice(&[0x77; 0x4000], GuestAddress(DATA))
        .unwrap();
    h.status_slot(STATUS);
    setup(&h);
    let out = h.run(&mut disk);
    assert_eq!(out.completed, 1);
    assert_eq!(out.failed, 1);
    assert!(out.signal);
    match expect {
        Some((status, len)) => h.expect(status, len),
        None => h.expect_no_status(STATUS),
    }
    assert_eq!(contents(disk.file()), pattern(DISK_SIZE), "file modified");
    // IN buffers of rejected requests are not written either.
    assert!(h.read_guest(DATA, 0x4000).iter().all(|&b| b == 0x77));
    h.still_serves(&mut disk);
}

#[test]
fn descriptor_outside_guest_ram() {
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_OUT, 0, &[(MEM_SIZE as u64 - 256, 512, R)]),
        Some((IOERR, 1)),
    );
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_IN, 0, &[(0x4000_0000, 512, W)]),
        Some((IOERR, 1)),
    );
}

#[test]
fn descriptor_address_overflow() {
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_OUT, 0, &[(u64::MAX - 100, 512, R)]),
        Some((IOERR, 1)),
    );
    // The status descriptor itself overflowing: no status byte.
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
            h.chain(&[(HDR, 16, R), (u64::MAX, 2, W)]);
        },
        None,
    );
}

#[test]
fn descriptor_loop_completes_without_status() {
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            let n = VRING_DESC_F_NEXT as u16;
            // 0 -> 1 -> 2 -> 1 -> 2 ...; 2 would be the status descriptor.
            h.raw_descs(&[
                (HDR, 16, R | n, 1),
                (DATA, 512, R | n, 2),
                (STATUS, 1, W | n, 1),
            ]);
        },
        None,
    );
}

#[test]
fn next_index_outside_the_table_completes_without_status() {
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            let n = VRING_DESC_F_NEXT as u16;
            h.raw_descs(&[(HDR, 16, R | n, 1), (STATUS, 1, W | n, 500)]);
        },
        None,
    );
}

#[test]
fn chain_longer_than_the_queue_via_indirect_table() {
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            let table = 0x5_0000u64;
            let n = 2 * QSIZE; // header, data..., status
            for i in 0..n {
                let (addr, len, flags) = if i == 0 {
                    (HDR, 16, R)
                } else if i == n - 1 {
                    (STATUS, 1, W)
                } else {
                    (DATA, 512, R)
                };
                let flags = if i + 1 < n {
                    flags | VRING_DESC_F_NEXT as u16
                } else {
                    flags
                };
                h.mem
                    .write_obj(
                        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i + 1)),
                        GuestAddress(table + 16 * u64::from(i)),
                    )
                    .unwrap();
            }
            h.raw_descs(&[(table, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16, 0)]);
        },
        None,
    );
}

#[test]
fn indirect_chain_within_limits_is_served() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    h.header(HDR, VIRTIO_BLK_T_IN, 1);
    h.status_slot(STATUS);
    let table = 0x5_0000u64;
    let descs = [
        (HDR, 16, R | VRING_DESC_F_NEXT as u16, 1u16),
        (DATA, 512, W | VRING_DESC_F_NEXT as u16, 2),
        (STATUS, 1, W, 0),
    ];
    for (i, &(a, l, f, nx)) in descs.iter().enumerate() {
        mem.write_obj(
            RawDescriptor::from(SplitDescriptor::new(a, l, f, nx)),
            GuestAddress(table + 16 * i as u64),
        )
        .unwrap();
    }
    h.raw_descs(&[(table, 48, VRING_DESC_F_INDIRECT as u16, 0)]);
    h.run(&mut disk);
    h.expect(OK, 513);
    assert_eq!(h.read_guest(DATA, 512), &pattern(DISK_SIZE)[512..1024]);
}

#[test]
fn header_in_a_device_writable_descriptor() {
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            h.chain(&[(HDR, 16, W), (DATA, 512, R), (STATUS, 1, W)]);
        },
        Some((IOERR, 1)),
    );
    // A lone writable descriptor: it is the status byte, and there is no header.
    bad_case(false, |h| h.chain(&[(STATUS, 1, W)]), Some((IOERR, 1)));
}

#[test]
fn header_split_across_descriptors_is_rejected() {
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            h.chain(&[(HDR, 8, R), (HDR + 8, 8, R), (DATA, 512, R), (STATUS, 1, W)]);
        },
        Some((IOERR, 1)),
    );
}

#[test]
fn in_into_a_device_readable_descriptor() {
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W), (DATA + 512, 512, R)]),
        Some((IOERR, 1)),
    );
    // OUT from a device-writable descriptor is the mirror case.
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, W)]),
        Some((IOERR, 1)),
    );
}

#[test]
fn sectors_past_capacity() {
    let cap = (DISK_SIZE / 512) as u64;
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_OUT, cap - 1, &[(DATA, 1024, R)]),
        Some((IOERR, 1)),
    );
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_IN, cap, &[(DATA, 512, W)]),
        Some((IOERR, 1)),
    );
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, R)]),
        Some((IOERR, 1)),
    );
    // Not a multiple of 512.
    bad_case(
        false,
        |h| h.simple(VIRTIO_BLK_T_OUT, 0, &[(DATA, 100, R)]),
        Some((IOERR, 1)),
    );
}

#[test]
fn last_sector_is_reachable() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    mem.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
    h.simple(
        VIRTIO_BLK_T_OUT,
        (DISK_SIZE / 512 - 1) as u64,
        &[(DATA, 512, R)],
    );
    h.run(&mut disk);
    h.expect(OK, 1);
    let c = contents(disk.file());
    assert!(c[DISK_SIZE - 512..].iter().all(|&b| b == 0x42));
}

#[test]
fn unknown_request_types_are_unsupp() {
    for t in [2u32, 3, 10, 14, 15, 99, u32::MAX] {
        bad_case(
            false,
            |h| h.simple(t, 0, &[(DATA, 512, R)]),
            Some((UNSUPP, 1)),
        );
    }
}

#[test]
fn writes_to_a_readonly_disk_fail() {
    bad_case(
        true,
        |h| h.simple(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
        Some((IOERR, 1)),
    );
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        bad_case(
            true,
            |h| {
                h.mem
                    .write_slice(&segment(0, 8, 0), GuestAddress(DATA + 0x6000))
                    .unwrap();
                h.simple(t, 0, &[(DATA + 0x6000, 16, R)]);
            },
            Some((IOERR, 1)),
        );
    }
    // Reads, flush and GET_ID still work on a read-only disk.
    let mem = guest();
    let mut h = Harness::new(&mem, true);
    let mut disk = file_disk();
    h.simple(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.run(&mut disk);
    h.expect(OK, 1);
    h.still_serves(&mut disk);
}

#[test]
fn bad_discard_and_write_zeroes_segments() {
    let cap = (DISK_SIZE / 512) as u64;
    let cases: Vec<(u32, Vec<u8>, u8)> = vec![
        // UNMAP is only for write-zeroes.
        (VIRTIO_BLK_T_DISCARD, segment(0, 8, 1).to_vec(), UNSUPP),
        // Reserved flag bits.
        (VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 8, 2).to_vec(), UNSUPP),
        (
            VIRTIO_BLK_T_DISCARD,
            segment(0, 8, 0x8000_0000).to_vec(),
            UNSUPP,
        ),
        // Past capacity, overflowing.
        (VIRTIO_BLK_T_DISCARD, segment(cap - 1, 2, 0).to_vec(), IOERR),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(u64::MAX, 1, 0).to_vec(),
            IOERR,
        ),
        // Larger than max_*_sectors.
        (
            VIRTIO_BLK_T_DISCARD,
            segment(0, u32::MAX, 0).to_vec(),
            IOERR,
        ),
        // More segments than max_*_seg (1).
        (
            VIRTIO_BLK_T_DISCARD,
            [segment(0, 1, 0), segment(8, 1, 0)].concat(),
            IOERR,
        ),
        // Not a whole segment.
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(0, 8, 0)[..15].to_vec(),
            IOERR,
        ),
        // Empty payload.
        (VIRTIO_BLK_T_DISCARD, Vec::new(), IOERR),
    ];
    for (t, payload, status) in cases {
        bad_case(
            false,
            |h| {
                h.mem
                    .write_slice(&payload, GuestAddress(DATA + 0x6000))
                    .unwrap();
                let data: Vec<(u64, u32, u16)> = if payload.is_empty() {
                    vec![]
                } else {
                    vec![(DATA + 0x6000, payload.len() as u32, R)]
                };
                h.simple(t, 0, &data);
            },
            Some((status, 1)),
        );
    }
}

#[test]
fn segments_may_span_descriptors() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    let s = segment(2, 2, 0);
    mem.write_slice(&s[..5], GuestAddress(DATA)).unwrap();
    mem.write_slice(&s[5..], GuestAddress(DATA + 0x100))
        .unwrap();
    h.simple(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[(DATA, 5, R), (DATA + 0x100, 11, R)],
    );
    h.run(&mut disk);
    h.expect(OK, 1);
    let mut want = pattern(DISK_SIZE);
    want[1024..2048].fill(0);
    assert_eq!(contents(disk.file()), want);
}

#[test]
fn unusable_status_descriptor_gets_used_len_zero() {
    // Last descriptor device-readable.
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            h.chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]);
        },
        None,
    );
    // Empty status descriptor.
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            h.chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)]);
        },
        None,
    );
    // Status outside guest memory.
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            h.chain(&[(HDR, 16, R), (DATA, 512, R), (MEM_SIZE as u64, 1, W)]);
        },
        None,
    );
    // A lone readable descriptor.
    bad_case(
        false,
        |h| {
            h.header(HDR, VIRTIO_BLK_T_OUT, 0);
            h.chain(&[(HDR, 16, R)]);
        },
        None,
    );
}

#[test]
fn disk_errors_become_ioerr() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = mem_disk();
    disk.fail = true;
    mem.write_slice(&[0x33; 512], GuestAddress(DATA)).unwrap();
    h.simple(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    let out = h.run(&mut disk);
    assert_eq!(out.failed, 1);
    h.expect(IOERR, 1);
    h.simple(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.run(&mut disk);
    h.expect(IOERR, 1);
    disk.fail = false;
    h.still_serves(&mut disk);
}

#[test]
fn out_of_range_head_index_is_dropped_and_service_continues() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = file_disk();
    h.push_avail(QSIZE + 3);
    let out = h.run(&mut disk);
    assert_eq!(out.dropped, 1);
    assert_eq!(out.completed, 0);
    assert!(!out.signal);
    assert_eq!(h.used_idx(), 0);
    h.still_serves(&mut disk);
}

#[test]
fn avail_index_jump_is_a_queue_error() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = mem_disk();
    h.vq.avail().idx().store(QSIZE + 1);
    let err = process_queue(
        &mut h.q,
        3,
        &mem,
        &mut disk,
        &h.ctx,
        &mut NoInflight,
        &mut Default::default(),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        QueueError::AvailIndex {
            queue_index: 3,
            avail_idx: 17,
            next_avail: 0,
            size: QSIZE
        }
    ));
    assert!(err.to_string().contains("queue 3"));
    let mut q = Queue::new(QSIZE).unwrap();
    assert!(matches!(
        process_queue(
            &mut q,
            1,
            &mem,
            &mut disk,
            &h.ctx,
            &mut NoInflight,
            &mut Default::default()
        ),
        Err(QueueError::NotReady { queue_index: 1 })
    ));
}

// ---- notifications --------------------------------------------------------------------------

/// Offset of `used_event` in the avail ring.
fn used_event_addr(h: &Harness) -> GuestAddress {
    GuestAddress(h.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE))
}

/// Offset of `avail_event` in the used ring.
fn avail_event_addr() -> GuestAddress {
    GuestAddress(USED + 4 + 8 * u64::from(QSIZE))
}

#[test]
fn signalling_without_event_idx() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut disk = mem_disk();
    // Nothing pending: no signal.
    assert!(!h.run(&mut disk).signal);
    // A batch of three: one signal, all completed.
    for i in 0..3u16 {
        h.header(HDR + 0x100 * u64::from(i), VIRTIO_BLK_T_FLUSH, 0);
        h.chain_at(
            2 * i,
            &[
                (HDR + 0x100 * u64::from(i), 16, R),
                (STATUS + u64::from(i), 1, W),
            ],
        );
    }
    let out = h.run(&mut disk);
    assert!(out.signal);
    assert_eq!(out.completed, 3);
    assert_eq!(h.used_idx(), 3);
    // Notifications are re-enabled afterwards (NO_NOTIFY cleared).
    let flags: u16 = mem.read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(flags, 0);
}

#[test]
fn signalling_with_event_idx() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    h.q.set_event_idx(true);
    let mut disk = mem_disk();

    // used_event = 0: the driver wants a signal once entry 0 is used.
    mem.write_obj(0u16, used_event_addr(&h)).unwrap();
    h.simple(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let out = h.run(&mut disk);
    assert!(out.signal);
    // avail_event tells the driver to kick for the next entry.
    let avail_event: u16 = mem.read_obj(avail_event_addr()).unwrap();
    assert_eq!(avail_event, 1);

    // used_event = 5: completing entry 1 does not cross it, no signal.
    mem.write_obj(5u16, used_event_addr(&h)).unwrap();
    h.simple(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let out = h.run(&mut disk);
    assert_eq!(out.completed, 1);
    assert!(!out.signal);

    // A batch of four crossing used_event = 5 (used idx goes 2 -> 6): one signal.
    for i in 0..4u16 {
        h.header(HDR + 0x100 * u64::from(i), VIRTIO_BLK_T_FLUSH, 0);
        h.chain_at(
            2 * i,
            &[
                (HDR + 0x100 * u64::from(i), 16, R),
                (STATUS + u64::from(i), 1, W),
            ],
        );
    }
    let out = h.run(&mut disk);
    assert_eq!(out.completed, 4);
    assert!(out.signal);
    assert_eq!(h.used_idx(), 6);
}

// ---- fuzz-style -----------------------------------------------------------------------------

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_descriptor_tables_never_panic() {
    let mem = guest();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _round in 0..300 {
        let mut h = Harness::new(&mem, rng.next() % 4 == 0);
        let mut disk = mem_disk();
        // Random headers in a few places.
        for k in 0..4u64 {
            let t = [0u32, 1, 4, 8, 11, 13, 99][(rng.next() % 7) as usize];
            h.header(HDR + 0x100 * k, t, rng.next() % 200);
            mem.write_slice(
                &segment(
                    rng.next() % 200,
                    (rng.next() % 64) as u32,
                    (rng.next() % 4) as u32,
                ),
                GuestAddress(DATA + 0x100 * k),
            )
            .unwrap();
        }
        for i in 0..QSIZE {
            let addr = match rng.next() % 6 {
                0 => HDR + 0x100 * (rng.next() % 4),
                1 => DATA + 0x100 * (rng.next() % 4),
                2 => STATUS,
                3 => rng.next(),
                4 => MEM_SIZE as u64 - (rng.next() % 64),
                _ => DATA + (rng.next() % 0x8000),
            };
            let len = match rng.next() % 5 {
                0 => 16,
                1 => 1,
                2 => 512 * (rng.next() % 4) as u32,
                3 => rng.next() as u32,
                _ => (rng.next() % 64) as u32,
            };
            let flags = (rng.next() % 8) as u16; // NEXT | WRITE | INDIRECT
            let next = (rng.next() % (u64::from(QSIZE) + 2)) as u16;
            h.vq.desc_table()
                .store(
                    i,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        let n = rng.next() % u64::from(QSIZE + 1);
        for _ in 0..n {
            h.push_avail((rng.next() % (u64::from(QSIZE) + 4)) as u16);
        }
        let out = process_queue(
            &mut h.q,
            0,
            &mem,
            &mut disk,
            &h.ctx,
            &mut NoInflight,
            &mut Default::default(),
        )
        .unwrap();
        assert_eq!(u64::from(out.completed + out.dropped), n);
        assert_eq!(disk.data.len(), DISK_SIZE);
    }
}

/// A worker died after popping two writes: its successor, handed the same inflight
/// region, resubmits them in the order they were popped, then serves the next request;
/// every write lands once and the used ring lists all three heads.
#[test]
fn a_successor_resubmits_what_a_dead_worker_popped() {
    use crate::inflight::{InflightLog, InflightRegion};
    use vhost::vhost_user::message::VhostUserInflight;

    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let heads = [0u16, 3, 6];
    for (i, &head) in heads.iter().enumerate() {
        let i = i as u64;
        let (hdr, data, status) = (HDR + 0x100 * i, DATA + 0x1000 * i, STATUS + 0x10 * i);
        h.header(hdr, VIRTIO_BLK_T_OUT, 8 * i);
        mem.write_slice(&[0x10 + i as u8; 512], GuestAddress(data))
            .unwrap();
        h.status_slot(status);
        h.chain_at(head, &[(hdr, 16, R), (data, 512, R), (status, 1, W)]);
    }
    let mut region = InflightRegion::create(1, 1024).unwrap();
    region
        .hand_out(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .unwrap();
    {
        // The dead worker: popped heads 0 and 3, completed nothing.
        let mut dead = region.queue(0, QSIZE).unwrap();
        assert!(dead.recover(0).resubmit.is_empty());
        dead.popped(0);
        dead.popped(3);
    }
    let mut disk = MemBackend::new(DISK_SIZE);
    let mut successor = region.queue(0, QSIZE).unwrap();
    let recovery = successor.recover(h.used_idx());
    assert_eq!(recovery.resubmit, vec![0, 3]);
    h.q.set_next_avail(h.used_idx() + recovery.resubmit.len() as u16);
    let out = super::queue::process_resubmitted(
        &mut h.q,
        0,
        &mem,
        &mut disk,
        &h.ctx,
        &recovery.resubmit,
        &mut successor,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!((out.completed, out.failed), (2, 0));
    let out = process_queue(
        &mut h.q,
        0,
        &mem,
        &mut disk,
        &h.ctx,
        &mut successor,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!((out.completed, out.failed), (1, 0), "only head 6 was new");
    assert_eq!(h.used_idx(), 3);
    let used_ids: Vec<u32> = (0..3)
        .map(|i| mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap())
        .collect();
    assert_eq!(used_ids, [0, 3, 6]);
    for i in 0..3u64 {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + 0x10 * i)).unwrap();
        assert_eq!(status, OK, "request {i}");
        let at = (8 * i * 512) as usize;
        assert!(disk.data[at..at + 512].iter().all(|&b| b == 0x10 + i as u8));
    }
    // Everything is accounted for: a third worker would resubmit nothing.
    assert!(successor.recover(3).resubmit.is_empty());
}

// ---- one queue loop for every engine: executed, submitted, throttled --------------------

/// An engine that submits reads (to complete later, never here) and executes anything
/// else at once on an in-memory disk; full after `room` submissions if set.
#[derive(Debug)]
struct MockEngine {
    disk: MemBackend,
    room: Option<usize>,
    /// (queue, head) of every submitted request.
    submitted: Vec<(u16, u16)>,
    /// Submitted since the last `submit_pending`.
    pending: usize,
    /// `submit_pending` calls that had something to submit (io_uring_enter calls).
    enters: usize,
    /// After each submission, move the avail index at this address a ring's worth ahead
    /// (a guest corrupting its ring while the worker drains it).
    corrupt_avail: Option<GuestAddress>,
}

impl MockEngine {
    fn new(room: Option<usize>) -> Self {
        MockEngine {
            disk: mem_disk(),
            room,
            submitted: Vec::new(),
            pending: 0,
            enters: 0,
            corrupt_avail: None,
        }
    }
}

impl RequestEngine for MockEngine {
    fn name(&self) -> &'static str {
        "mock"
    }

    fn has_room(&self) -> bool {
        self.room.is_none_or(|room| self.submitted.len() < room)
    }

    fn process(
        &mut self,
        queue_index: u16,
        req: super::request::Request,
        mem: &GuestMemoryMmap,
        ctx: &BlkContext,
    ) -> super::engine::Processed {
        if matches!(req.kind, super::request::RequestKind::In { .. }) {
            self.submitted.push((queue_index, req.head_index));
            self.pending += 1;
            if let Some(at) = self.corrupt_avail {
                let idx: u16 = mem.read_obj(at).unwrap();
                mem.write_obj(idx.wrapping_add(2 * QSIZE), at).unwrap();
            }
            super::engine::Processed::Submitted
        } else {
            super::engine::Processed::Executed(super::execute::execute(
                &req,
                mem,
                &mut self.disk,
                ctx,
            ))
        }
    }

    fn submit_pending(&mut self) {
        if self.pending > 0 {
            self.enters += 1;
            self.pending = 0;
        }
    }

    fn sync_io(&mut self) -> &mut dyn super::backend::BlockIo {
        &mut self.disk
    }
}

/// Every call the queue loop makes to the inflight log, in order.
#[derive(Debug, Default)]
struct LogRecorder(Vec<String>);

impl crate::inflight::InflightLog for LogRecorder {
    fn popped(&mut self, head: u16) {
        self.0.push(format!("popped {head}"));
    }
    fn completing(&mut self, head: u16) {
        self.0.push(format!("completing {head}"));
    }
    fn completed(&mut self, head: u16, used_idx: u16) {
        self.0.push(format!("completed {head} at {used_idx}"));
    }
}

/// Chains at descriptors 0, 3, 6, ...: `kinds[i]` is a read (`IN`) or a flush, each with
/// its own header, buffer and status byte.
fn chains(h: &Harness, kinds: &[u32]) {
    for (i, &kind) in kinds.iter().enumerate() {
        let i16 = i as u16;
        let i = i as u64;
        let (hdr, data, status) = (HDR + 0x100 * i, DATA + 0x1000 * i, STATUS + 0x10 * i);
        h.header(hdr, kind, i);
        h.status_slot(status);
        if kind == VIRTIO_BLK_T_IN {
            h.chain_at(3 * i16, &[(hdr, 16, R), (data, 512, W), (status, 1, W)]);
        } else {
            h.chain_at(3 * i16, &[(hdr, 16, R), (status, 1, W)]);
        }
    }
}

fn used_flags(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED)).unwrap()
}

/// A ring error in the middle of a pass still hands what the engine took to the kernel:
/// requests popped before it must not wait for another pass, or for a reset.
#[test]
fn a_ring_error_mid_pass_still_submits_what_was_taken() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut engine = MockEngine::new(None);
    engine.corrupt_avail = Some(GuestAddress(h.q.avail_ring() + 2));
    chains(&h, &[VIRTIO_BLK_T_IN; 2]);
    let err = process_queue(
        &mut h.q,
        0,
        &mem,
        &mut engine,
        &h.ctx,
        &mut NoInflight,
        &mut Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, QueueError::AvailIndex { .. }), "{err}");
    assert_eq!(engine.submitted, [(0, 0)]);
    assert_eq!(
        (engine.pending, engine.enters),
        (0, 1),
        "the request taken before the error was submitted"
    );
}

#[test]
fn submitted_requests_are_counted_not_published() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut engine = MockEngine::new(None);
    let mut log = LogRecorder::default();
    chains(&h, &[VIRTIO_BLK_T_IN; 3]);
    let out = process_queue(
        &mut h.q,
        2,
        &mem,
        &mut engine,
        &h.ctx,
        &mut log,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(
        out,
        QueueOutcome {
            submitted: 3,
            ..QueueOutcome::default()
        },
        "nothing completed, so nothing to signal"
    );
    assert_eq!(engine.submitted, [(2, 0), (2, 3), (2, 6)]);
    assert_eq!(engine.enters, 1, "one submission for the drained batch");
    assert_eq!(h.used_idx(), 0);
    assert_eq!(log.0, ["popped 0", "popped 3", "popped 6"]);
    for i in 0..3 {
        let st: u8 = mem.read_obj(GuestAddress(STATUS + 0x10 * i)).unwrap();
        assert_eq!(
            st, UNTOUCHED,
            "the engine writes the status when it completes"
        );
    }
    assert_eq!(used_flags(&mem), 0, "notifications are on again");
}

#[test]
fn executed_requests_are_published_in_order_among_submitted_ones() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut engine = MockEngine::new(None);
    let mut log = LogRecorder::default();
    chains(
        &h,
        &[VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_FLUSH],
    );
    // And a chain the parser rejects (no status descriptor): completed, failed.
    h.header(HDR + 0x300, VIRTIO_BLK_T_FLUSH, 0);
    h.chain_at(9, &[(HDR + 0x300, 16, R)]);
    let out = process_queue(
        &mut h.q,
        0,
        &mem,
        &mut engine,
        &h.ctx,
        &mut log,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(
        out,
        QueueOutcome {
            signal: true,
            completed: 3,
            failed: 1,
            submitted: 1,
            ..QueueOutcome::default()
        }
    );
    assert_eq!(h.used_idx(), 3);
    let used_ids: Vec<u32> = (0..3)
        .map(|i| mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap())
        .collect();
    assert_eq!(used_ids, [0, 6, 9]);
    assert_eq!(
        log.0,
        [
            "popped 0",
            "completing 0",
            "completed 0 at 1",
            "popped 3",
            "popped 6",
            "completing 6",
            "completed 6 at 2",
            "popped 9",
            "completing 9",
            "completed 9 at 3",
        ]
    );
    assert_eq!(engine.disk.flushes, 2);
}

#[test]
fn a_full_engine_leaves_requests_in_the_avail_ring_with_notifications_off() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut engine = MockEngine::new(Some(2));
    chains(&h, &[VIRTIO_BLK_T_IN; 4]);
    let out = process_queue(
        &mut h.q,
        0,
        &mem,
        &mut engine,
        &h.ctx,
        &mut NoInflight,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(
        out,
        QueueOutcome {
            submitted: 2,
            throttled: true,
            ..QueueOutcome::default()
        }
    );
    assert_eq!(h.q.next_avail(), 2, "two requests wait in the avail ring");
    assert_eq!(
        engine.enters, 1,
        "what was taken is submitted before stopping"
    );
    // No kick wanted: the device drains the ring again once completions made room.
    assert_eq!(used_flags(&mem), 1, "VRING_USED_F_NO_NOTIFY stays set");

    // Room again (completions reaped): the rest is taken, notifications back on.
    engine.room = None;
    let out = process_queue(
        &mut h.q,
        0,
        &mem,
        &mut engine,
        &h.ctx,
        &mut NoInflight,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(
        out,
        QueueOutcome {
            submitted: 2,
            ..QueueOutcome::default()
        }
    );
    assert_eq!(engine.submitted, [(0, 0), (0, 3), (0, 6), (0, 9)]);
    assert_eq!(used_flags(&mem), 0);
}

#[test]
fn a_full_engine_still_signals_what_completed_before_it_filled() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut engine = MockEngine::new(Some(1));
    chains(&h, &[VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_IN]);
    let out = process_queue(
        &mut h.q,
        0,
        &mem,
        &mut engine,
        &h.ctx,
        &mut NoInflight,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(
        out,
        QueueOutcome {
            signal: true,
            completed: 1,
            submitted: 1,
            throttled: true,
            ..QueueOutcome::default()
        }
    );
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.q.next_avail(), 2);
}

#[test]
fn resubmitted_requests_run_at_once_even_on_an_asynchronous_engine() {
    let mem = guest();
    let mut h = Harness::new(&mem, false);
    let mut engine = MockEngine::new(None);
    chains(&h, &[VIRTIO_BLK_T_IN, VIRTIO_BLK_T_IN]);
    // A predecessor popped both and completed neither.
    h.q.set_next_avail(2);
    let out = super::queue::process_resubmitted(
        &mut h.q,
        0,
        &mem,
        &mut engine,
        &h.ctx,
        &[0, 3],
        &mut NoInflight,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!((out.completed, out.failed, out.submitted), (2, 0, 0));
    assert!(engine.submitted.is_empty());
    assert_eq!(h.used_idx(), 2);
    let p = pattern(DISK_SIZE);
    assert_eq!(h.read_guest(DATA + 0x1000, 512), &p[512..1024]);
}
