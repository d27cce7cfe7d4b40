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

use crate::blk_verify::{self, check_pattern, expect_ok, fill_pattern, pipeline, BLOCK_SECTORS};
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::{self, Blk, Op, BLOCK};
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
    let want_num = (3 * o.qd).next_power_of_two().max(4) as u16;
    let mut blk = match Blk::init(
        slot,
        want_num,
        o.mode,
        (ctx.apic_base_msr, &ctx.ioapics),
        ctx.tsc_hz,
    ) {
        Ok(b) => b,
        Err(e) => fail!("blk dev={n} {e}"),
    };
    let qd = o.qd.min(usize::from(blk.num) / 3);
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
            *writes += 1;
        },
    );
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
            *reads += 1;
        },
    );
}
