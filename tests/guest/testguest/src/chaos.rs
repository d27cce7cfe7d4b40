//! `blk-chaos`: rounds of write-then-verify on one disk for `secs` seconds, with up to `qd`
//! requests in flight, while the host kills and restarts the disk's worker. Any request
//! that fails, times out or reads back wrong ends the run (`TG fail ...`).
//!
//! Options: those of `blk-verify` (`qd`, `completion`, `seed`, `blocks`, `dev`, default
//! device 0) and `secs=S` (default 60). Round `r` writes the blk-verify pattern of seed
//! `seed + r` to blocks `0..blocks`, then reads every block back and checks it.
//!
//! Lines: `TG chaos dev=N num=Q qd=D blocks=B` at the start, and at the end
//! `TG chaos dev=N rounds=R writes=W reads=V errors=0 last_seed=S` (the disk then holds
//! the pattern of `last_seed` in every block).

use crate::blk_verify::{self, BLOCK_SECTORS};
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::Blk;
use crate::{fail, tg};

pub fn run(ctx: &Ctx) {
    let o = blk_verify::opts(&ctx.cmdline);
    let secs = ctx
        .cmdline
        .number("secs")
        .unwrap_or_else(|v| fail!("bad secs={v}"))
        .unwrap_or(60);
    let n = o.dev.unwrap_or(0);
    let Some((_, slot)) = blk_verify::chosen(ctx, Some(n)).next() else {
        fail!("blk-chaos: no device {n}");
    };
    let (mut blk, qd) = blk_verify::init(ctx, n, slot, &o);
    let disk_blocks = blk.config.capacity / BLOCK_SECTORS;
    let blocks = o.blocks.unwrap_or(256).min(disk_blocks);
    if blocks == 0 {
        fail!("blk dev={n} too small");
    }
    tg!("chaos dev={n} num={} qd={qd} blocks={blocks}", blk.num);
    let end = cpu::rdtsc() + secs * ctx.tsc_hz;
    let (mut rounds, mut writes, mut reads) = (0u64, 0u64, 0u64);
    let mut seed = o.seed;
    while cpu::rdtsc() < end {
        rounds += 1;
        seed = o.seed.wrapping_add(rounds);
        round(&mut blk, n, qd, blocks, seed, &mut writes, &mut reads);
    }
    tg!("chaos dev={n} rounds={rounds} writes={writes} reads={reads} errors=0 last_seed={seed}");
}

fn round(
    blk: &mut Blk,
    n: usize,
    qd: usize,
    blocks: u64,
    seed: u64,
    writes: &mut u64,
    reads: &mut u64,
) {
    *writes += blk_verify::write_pattern(blk, n, qd, blocks, seed);
    *reads += blk_verify::read_and_verify(blk, n, qd, blocks, seed);
}
