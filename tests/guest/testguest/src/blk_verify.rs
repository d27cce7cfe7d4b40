//! `blk-verify`: write a seeded pattern over the disk with up to `qd` requests in flight,
//! read it back and verify, then FLUSH, WRITE_ZEROES (read back as zero), DISCARD and
//! GET_ID.
//!
//! Options: `qd=N` (default 1), `completion=poll|irq` (default poll), `seed=S` (default
//! 1), `blocks=B` (4 KiB blocks from the start of the disk, default 256 or the whole
//! disk if smaller), `dev=N` (default: every device, one after another).
//!
//! Lines per device (`N` = device number):
//! - `TG blk dev=N cap=SECTORS blk_size=.. seg_max=.. feat=0x.. num=Q qd=.. mode=..`
//! - `TG blk dev=N wz=FIRST+COUNT discard=FIRST+COUNT` (block ranges; `-` if not offered)
//! - `TG blk dev=N wrote=B read=B verified=B flush=ok discard=ok write_zeroes=ok id=ID irqs=K`
//!   (`off` where the feature was not offered)
//! - `TG blk dev=N us write=.. read=.. reqs=R notifies=.. irqs=K late=L` (times in
//!   microseconds; `late`: waits the watchdog tick ended with completions waiting)
//!
//! After the run the disk holds [`pattern_word`] in every covered block except the
//! write-zeroes range (zeros) and the discard range (undefined).

use crate::cmdline::Cmdline;
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::{
    self, Blk, Completion, Done, Op, BLOCK, F_DISCARD, F_FLUSH, F_WRITE_ZEROES, ID_LEN, MAX_SLOTS,
    SECTOR, ST_OK,
};
use crate::virtio_mmio::Slot;
use crate::{fail, tg};

const DEFAULT_BLOCKS: u64 = 256;
/// Sectors per 4 KiB block.
pub(crate) const BLOCK_SECTORS: u64 = BLOCK as u64 / SECTOR;
/// No request may take longer than this.
pub(crate) const REQ_TIMEOUT_US: u64 = 10_000_000;

/// Word `i` (0..512) of block `block` for `seed`; a block is 512 little-endian u64s:
///
/// ```text
/// w[0] = block
/// w[1] = seed
/// x = (seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
/// for i in 2..512 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; w[i] = x }   // xorshift64
/// ```
pub fn fill_pattern(buf: &mut [u8; BLOCK], seed: u64, block: u64) {
    let mut x = (seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => block,
            1 => seed,
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            }
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// First word where `buf` differs from the pattern, if any.
fn check_pattern(buf: &[u8; BLOCK], seed: u64, block: u64) -> Option<(usize, u64, u64)> {
    let mut want = [0u8; BLOCK];
    fill_pattern(&mut want, seed, block);
    (0..BLOCK / 8).find_map(|i| {
        let r = i * 8..i * 8 + 8;
        let got = u64::from_le_bytes(buf[r.clone()].try_into().unwrap_or_default());
        let exp = u64::from_le_bytes(want[r].try_into().unwrap_or_default());
        (got != exp).then_some((i, got, exp))
    })
}

pub(crate) struct Opts {
    pub qd: usize,
    pub mode: Completion,
    pub seed: u64,
    pub blocks: Option<u64>,
    pub dev: Option<usize>,
    /// The virtqueue to use (`queue=Q`, default 0; above 0 needs VIRTIO_BLK_F_MQ).
    pub queue: u16,
}

pub(crate) fn num_opt(c: &Cmdline, key: &'static str) -> Option<u64> {
    c.number(key).unwrap_or_else(|v| fail!("bad {key}={v}"))
}

pub(crate) fn opts(c: &Cmdline) -> Opts {
    let mode = match c.get("completion") {
        None | Some("poll") => Completion::Poll,
        Some("irq") => Completion::Irq,
        Some(v) => fail!("bad completion={v}"),
    };
    let qd = num_opt(c, "qd").unwrap_or(1) as usize;
    if qd == 0 || qd > MAX_SLOTS {
        fail!("qd={qd} not in 1..={MAX_SLOTS}");
    }
    Opts {
        qd,
        mode,
        seed: num_opt(c, "seed").unwrap_or(1),
        blocks: num_opt(c, "blocks"),
        dev: num_opt(c, "dev").map(|d| d as usize),
        queue: num_opt(c, "queue").unwrap_or(0) as u16,
    }
}

/// The devices a plan works on: `dev=N` or all.
pub(crate) fn chosen(ctx: &Ctx, dev: Option<usize>) -> impl Iterator<Item = (usize, &Slot)> {
    if let Some(d) = dev {
        if d >= ctx.devices.iter().count() {
            fail!("dev={d}: no such device");
        }
    }
    ctx.devices
        .iter()
        .enumerate()
        .filter(move |(n, _)| dev.is_none_or(|d| d == *n))
}

pub fn run(ctx: &Ctx) {
    let o = opts(&ctx.cmdline);
    let mut any = false;
    for (n, slot) in chosen(ctx, o.dev) {
        any = true;
        device(ctx, n, slot, &o);
    }
    if !any {
        fail!("blk no devices");
    }
}

/// Runs `total` requests with up to `qd` in flight: `start(blk, slot, i)` submits
/// request `i` in `slot`, `finish(blk, done, i)` checks it.
fn pipeline(
    blk: &mut Blk,
    n: usize,
    qd: usize,
    total: u64,
    mut start: impl FnMut(&mut Blk, usize, u64),
    mut finish: impl FnMut(&mut Blk, Done, u64),
) {
    let mut owner = [u64::MAX; MAX_SLOTS];
    let mut free = [0usize; MAX_SLOTS];
    for (i, f) in free.iter_mut().take(qd).enumerate() {
        *f = i;
    }
    let mut nfree = qd;
    let (mut next, mut done) = (0u64, 0u64);
    while done < total {
        let mut started = false;
        while next < total && nfree > 0 {
            nfree -= 1;
            let s = free[nfree];
            start(blk, s, next);
            owner[s] = next;
            next += 1;
            started = true;
        }
        if started {
            blk.kick();
        }
        let inflight = (next - done) as u16;
        // Wake when half the queue drained while more remain to start, else when all did.
        let batch = if next < total {
            (inflight / 2).max(1)
        } else {
            inflight
        };
        let mut d = match blk.wait_done(batch, REQ_TIMEOUT_US) {
            Ok(d) => d,
            Err(e) => fail!("blk dev={n} {e} done={done} inflight={inflight}"),
        };
        loop {
            if d.slot >= qd || owner[d.slot] == u64::MAX {
                fail!("blk dev={n} used id for slot {} not in flight", d.slot);
            }
            let i = owner[d.slot];
            owner[d.slot] = u64::MAX;
            free[nfree] = d.slot;
            nfree += 1;
            done += 1;
            finish(blk, d, i);
            match blk.poll_done() {
                Some(x) => d = x,
                None => break,
            }
        }
    }
}

/// Writes the pattern of `seed` to blocks `0..blocks` with up to `qd` in flight; returns
/// the number of blocks written (all of them: any failure ends the run).
pub(crate) fn write_pattern(blk: &mut Blk, n: usize, qd: usize, blocks: u64, seed: u64) -> u64 {
    let mut wrote = 0u64;
    pipeline(
        blk,
        n,
        qd,
        blocks,
        |b, s, i| {
            fill_pattern(virtio_blk::data(s), seed, i);
            b.submit(
                s,
                Op::Out {
                    sector: i * BLOCK_SECTORS,
                    len: BLOCK as u32,
                },
            );
        },
        |_, d, i| {
            expect_ok(n, "write", i, d, 1);
            wrote += 1;
        },
    );
    wrote
}

/// Reads blocks `0..blocks` back with up to `qd` in flight and checks each holds the
/// pattern of `seed`; returns the number verified (all: a mismatch ends the run).
pub(crate) fn read_and_verify(blk: &mut Blk, n: usize, qd: usize, blocks: u64, seed: u64) -> u64 {
    let mut verified = 0u64;
    pipeline(
        blk,
        n,
        qd,
        blocks,
        |b, s, i| {
            virtio_blk::data(s).fill(0xa5);
            b.submit(
                s,
                Op::In {
                    sector: i * BLOCK_SECTORS,
                    len: BLOCK as u32,
                },
            );
        },
        |_, d, i| {
            expect_ok(n, "read", i, d, BLOCK as u32 + 1);
            if let Some((w, got, exp)) = check_pattern(virtio_blk::data(d.slot), seed, i) {
                fail!("blk dev={n} seed={seed} block={i} word={w} got={got:#x} want={exp:#x}");
            }
            verified += 1;
        },
    );
    verified
}

fn expect_ok(n: usize, what: &str, block: u64, d: Done, len: u32) {
    if d.status != ST_OK || d.len != len {
        fail!(
            "blk dev={n} block={block} {what} status={} used_len={} want 0/{len}",
            d.status,
            d.len
        );
    }
}

fn one(blk: &mut Blk, n: usize, what: &str, op: Op) -> Done {
    match blk.run_one(op, REQ_TIMEOUT_US) {
        Ok(d) => d,
        Err(e) => fail!("blk dev={n} {what} {e}"),
    }
}

/// A block range for a discard / write-zeroes test: `count` blocks from `first`, cut to
/// `max_sectors` (0: no limit) and moved up to `align` sectors.
fn range(first: u64, count: u64, max_sectors: u32, align: u32, end: u64) -> Option<(u64, u64)> {
    let align_blocks = (u64::from(align) / BLOCK_SECTORS).max(1);
    let first = first.div_ceil(align_blocks) * align_blocks;
    let mut count = count;
    if max_sectors != 0 {
        count = count.min(u64::from(max_sectors) / BLOCK_SECTORS);
    }
    (count > 0 && first + count <= end).then_some((first, count))
}

/// Initialises device `n` with a queue three times `o.qd` deep (the driver needs three
/// descriptors per request); returns it and the depth to use.
pub(crate) fn init(ctx: &Ctx, n: usize, slot: &Slot, o: &Opts) -> (Blk, usize) {
    let want_num = (3 * o.qd).next_power_of_two().max(4) as u16;
    let blk = match Blk::init(
        slot,
        o.queue,
        want_num,
        o.mode,
        (ctx.apic_base_msr, &ctx.ioapics),
        ctx.tsc_hz,
    ) {
        Ok(b) => b,
        Err(e) => fail!("blk dev={n} {e}"),
    };
    let qd = o.qd.min(usize::from(blk.num) / 3);
    if qd != o.qd {
        fail!("blk dev={n} queue of {} too small for qd={}", blk.num, o.qd);
    }
    (blk, qd)
}

pub(crate) fn device(ctx: &Ctx, n: usize, slot: &Slot, o: &Opts) {
    let (mut blk, qd) = init(ctx, n, slot, o);
    let cfg = blk.config;
    tg!(
        "blk dev={n} cap={} blk_size={} seg_max={} feat={:#x} num={} qd={qd} mode={} queue={}",
        cfg.capacity,
        cfg.blk_size,
        cfg.seg_max,
        blk.features,
        blk.num,
        if o.mode == Completion::Irq {
            "irq"
        } else {
            "poll"
        },
        blk.queue
    );
    let disk_blocks = cfg.capacity / BLOCK_SECTORS;
    let blocks = o.blocks.unwrap_or(DEFAULT_BLOCKS).min(disk_blocks);
    if blocks == 0 {
        fail!(
            "blk dev={n} disk of {} sectors holds no 4 KiB block",
            cfg.capacity
        );
    }
    let seed = o.seed;

    // Write the pattern, read it back and verify.
    let t0 = cpu::rdtsc();
    let wrote = write_pattern(&mut blk, n, qd, blocks, seed);
    let t1 = cpu::rdtsc();
    let verified = read_and_verify(&mut blk, n, qd, blocks, seed);
    let read = verified;
    let t2 = cpu::rdtsc();
    let mut reqs = 2 * blocks;

    let flush = if blk.has(F_FLUSH) {
        let d = one(&mut blk, n, "flush", Op::Flush);
        expect_ok(n, "flush", 0, d, 1);
        reqs += 1;
        "ok"
    } else {
        "off"
    };

    // Write zeroes over a quarter-way range, read back as zero, neighbours intact.
    let wz = if blk.has(F_WRITE_ZEROES) {
        range(
            blocks / 4,
            (blocks / 16).max(1),
            cfg.max_write_zeroes_sectors,
            1,
            blocks,
        )
    } else {
        None
    };
    if let Some((first, count)) = wz {
        let d = one(
            &mut blk,
            n,
            "write_zeroes",
            Op::WriteZeroes {
                sector: first * BLOCK_SECTORS,
                sectors: (count * BLOCK_SECTORS) as u32,
                unmap: false,
            },
        );
        expect_ok(n, "write_zeroes", first, d, 1);
        reqs += 1;
        for b in first.saturating_sub(1)..(first + count + 1).min(blocks) {
            virtio_blk::data(0).fill(0xa5);
            let d = one(
                &mut blk,
                n,
                "read",
                Op::In {
                    sector: b * BLOCK_SECTORS,
                    len: BLOCK as u32,
                },
            );
            expect_ok(n, "read", b, d, BLOCK as u32 + 1);
            reqs += 1;
            let buf = virtio_blk::data(0);
            if (first..first + count).contains(&b) {
                if let Some(w) = buf.iter().position(|&x| x != 0) {
                    fail!("blk dev={n} block={b} not zero at byte {w} after write_zeroes");
                }
            } else if let Some((w, got, exp)) = check_pattern(buf, seed, b) {
                fail!("blk dev={n} block={b} word={w} got={got:#x} want={exp:#x} next to write_zeroes");
            }
        }
    }

    // Discard a half-way range (its contents are undefined afterwards).
    let discard = if blk.has(F_DISCARD) && blocks >= 4 {
        range(
            blocks / 2,
            (blocks / 16).max(1),
            cfg.max_discard_sectors,
            cfg.discard_sector_alignment,
            blocks,
        )
        .filter(|&(f, _)| wz.is_none_or(|(wf, wc)| f >= wf + wc))
    } else {
        None
    };
    if let Some((first, count)) = discard {
        let d = one(
            &mut blk,
            n,
            "discard",
            Op::Discard {
                sector: first * BLOCK_SECTORS,
                sectors: (count * BLOCK_SECTORS) as u32,
            },
        );
        expect_ok(n, "discard", first, d, 1);
        reqs += 1;
    }

    let d = one(&mut blk, n, "get_id", Op::GetId);
    if d.status != ST_OK {
        fail!("blk dev={n} get_id status={}", d.status);
    }
    reqs += 1;
    let mut id = [b'-'; ID_LEN];
    let raw = &virtio_blk::data(0)[..ID_LEN];
    let len = raw.iter().position(|&c| c == 0).unwrap_or(ID_LEN).max(1);
    for (o, &c) in id.iter_mut().zip(raw.iter()).take(len) {
        *o = if c.is_ascii_graphic() { c } else { b'?' };
    }
    if raw[0] == 0 {
        id[0] = b'-';
    }
    let id = core::str::from_utf8(&id[..len]).unwrap_or("?");

    let show = |r: Option<(u64, u64)>, offered: bool| -> (&'static str, u64, u64) {
        match (r, offered) {
            (Some((f, c)), _) => ("ok", f, c),
            (None, true) => ("skip", 0, 0),
            (None, false) => ("off", 0, 0),
        }
    };
    let (wz_s, wz_f, wz_c) = show(wz, blk.has(F_WRITE_ZEROES));
    let (di_s, di_f, di_c) = show(discard, blk.has(F_DISCARD));
    tg!("blk dev={n} wz={wz_f}+{wz_c} discard={di_f}+{di_c}");
    let irqs = blk.irqs();
    tg!(
        "blk dev={n} wrote={wrote} read={read} verified={verified} flush={flush} discard={di_s} write_zeroes={wz_s} id={id} irqs={irqs}"
    );
    let us = |t: u64| t * 1_000_000 / ctx.tsc_hz.max(1);
    tg!(
        "blk dev={n} us write={} read={} reqs={reqs} notifies={} irqs={irqs} late={}",
        us(t1 - t0),
        us(t2 - t1),
        blk.notifies,
        blk.late
    );
    if o.mode == Completion::Irq && irqs == 0 {
        fail!("blk dev={n} no interrupt from gsi {}", slot.irq);
    }
}
