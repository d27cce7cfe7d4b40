//! `blk-reinit`: a driver that resets and re-initialises its device again and again, as
//! Linux does on every unbind/bind, kexec or reboot that keeps the VM. Each round must
//! cost the host nothing but the reset: the same worker serves the device again.
//!
//! Options: those of `blk-verify`; `rounds=R` (default 20). Each round initialises the
//! device (which resets it first), writes `blocks` (default 8) with the round's seed,
//! reads them back, verifies them and resets the device.
//!
//! Line: `TG reinit dev=N rounds=R verified=B` (B: blocks verified over all rounds).

use crate::blk_verify;
use crate::plans::Ctx;
use crate::{fail, tg};

pub fn run(ctx: &Ctx) {
    let o = blk_verify::opts(&ctx.cmdline);
    let rounds = ctx
        .cmdline
        .number("rounds")
        .unwrap_or_else(|v| fail!("bad rounds={v}"))
        .unwrap_or(20);
    let n = o.dev.unwrap_or(0);
    let Some((_, slot)) = blk_verify::chosen(ctx, Some(n)).next() else {
        fail!("blk-reinit: no device {n}");
    };
    let mut verified = 0u64;
    for round in 0..rounds {
        let (mut blk, qd) = blk_verify::init(ctx, n, slot, &o);
        let blocks = o
            .blocks
            .unwrap_or(8)
            .min(blk.config.capacity / blk_verify::BLOCK_SECTORS);
        let seed = o.seed.wrapping_add(round);
        blk_verify::write_pattern(&mut blk, n, qd, blocks, seed);
        verified += blk_verify::read_and_verify(&mut blk, n, qd, blocks, seed);
        // Dropping the driver resets the device.
        drop(blk);
    }
    tg!("reinit dev={n} rounds={rounds} verified={verified}");
}
