//! `blk-resize`: a driver whose disk the host resizes while it runs. It writes a pattern
//! to the disk's first and last 4 KiB blocks, says `before`, then reads the first block
//! again and again (each read checked) until the device's config generation changes,
//! as a resize changes it; then it reads the capacity again and checks the disk at its
//! new size: the old last block (if still inside) holds its pattern, and the new last
//! block can be written and read back.
//!
//! Options: those of `blk-verify` (`dev=`, `completion=`, `seed=`); `secs=S` (default
//! 60): the longest wait for the change.
//!
//! Lines (device `N`):
//! - `TG resize dev=N before cap=SECTORS gen=G`
//! - `TG resize dev=N after cap=SECTORS gen=G reads=R config_irq=0|1 waited_ms=MS`
//! - `TG resize dev=N checked old_last=ok|gone new_last=ok`

use crate::blk_verify::{self, BLOCK_SECTORS, REQ_TIMEOUT_US};
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::{self, Blk, Op, BLOCK, ST_OK};
use crate::{fail, tg};

pub fn run(ctx: &Ctx) {
    let o = blk_verify::opts(&ctx.cmdline);
    let secs = blk_verify::num_opt(&ctx.cmdline, "secs").unwrap_or(60);
    let n = o.dev.unwrap_or(0);
    let Some((_, slot)) = blk_verify::chosen(ctx, Some(n)).next() else {
        fail!("blk-resize: no device {n}");
    };
    let (mut blk, _) = blk_verify::init(ctx, n, slot, &o);
    let blocks = blk.config.capacity / BLOCK_SECTORS;
    if blocks < 2 {
        fail!("blk-resize dev={n}: the disk needs two 4 KiB blocks");
    }
    let old_last = blocks - 1;
    for block in [0, old_last] {
        write_block(&mut blk, n, block, o.seed);
        check_block(&mut blk, n, block, o.seed);
    }
    let generation = blk.config_generation();
    tg!(
        "resize dev={n} before cap={} gen={generation}",
        blk.config.capacity
    );
    // I/O goes on while the host resizes: every read must succeed and hold the pattern.
    let started = cpu::rdtsc();
    let deadline = started + secs * ctx.tsc_hz;
    let mut reads = 0u64;
    while blk.config_generation() == generation {
        if cpu::rdtsc() > deadline {
            fail!("blk-resize dev={n}: no config change in {secs} s ({reads} reads)");
        }
        check_block(&mut blk, n, 0, o.seed);
        reads += 1;
    }
    let waited_ms = (cpu::rdtsc() - started) * 1000 / ctx.tsc_hz;
    // The interrupt follows the new generation: wait briefly for it.
    let irq_deadline = cpu::rdtsc() + ctx.tsc_hz;
    while !blk.take_config_interrupt() && cpu::rdtsc() < irq_deadline {
        core::hint::spin_loop();
    }
    blk.reread_config();
    let capacity = blk.config.capacity;
    tg!(
        "resize dev={n} after cap={capacity} gen={} reads={reads} config_irq={} waited_ms={waited_ms}",
        blk.config_generation(),
        u8::from(blk.config_interrupts > 0)
    );
    let blocks = capacity / BLOCK_SECTORS;
    if blocks == 0 {
        fail!("blk-resize dev={n}: no 4 KiB block left");
    }
    let old = if old_last < blocks {
        check_block(&mut blk, n, old_last, o.seed);
        "ok"
    } else {
        "gone"
    };
    let new_last = blocks - 1;
    write_block(&mut blk, n, new_last, o.seed.wrapping_add(1));
    check_block(&mut blk, n, new_last, o.seed.wrapping_add(1));
    tg!("resize dev={n} checked old_last={old} new_last=ok");
}

fn write_block(blk: &mut Blk, n: usize, block: u64, seed: u64) {
    blk_verify::fill_pattern(virtio_blk::data(0), seed, block);
    let op = Op::Out {
        sector: block * BLOCK_SECTORS,
        len: BLOCK as u32,
    };
    match blk.run_one(op, REQ_TIMEOUT_US) {
        Ok(d) if d.status == ST_OK => {}
        Ok(d) => fail!("blk-resize dev={n}: write of block {block}: status {}", d.status),
        Err(e) => fail!("blk-resize dev={n}: write of block {block}: {e}"),
    }
}

fn check_block(blk: &mut Blk, n: usize, block: u64, seed: u64) {
    let op = Op::In {
        sector: block * BLOCK_SECTORS,
        len: BLOCK as u32,
    };
    match blk.run_one(op, REQ_TIMEOUT_US) {
        Ok(d) if d.status == ST_OK => {}
        Ok(d) => fail!("blk-resize dev={n}: read of block {block}: status {}", d.status),
        Err(e) => fail!("blk-resize dev={n}: read of block {block}: {e}"),
    }
    let mut want = [0u8; BLOCK];
    blk_verify::fill_pattern(&mut want, seed, block);
    if virtio_blk::data(0)[..] != want[..] {
        fail!("blk-resize dev={n}: block {block} does not hold its pattern");
    }
}
