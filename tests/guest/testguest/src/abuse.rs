//! `blk-abuse`: a driver that breaks the rules for `secs=S` seconds (default 30), then
//! proves the device still serves: a proper init and a read of block 0. `mode=`:
//! - `badring`: rings at guest addresses far outside RAM, over and over (re-init each time);
//! - `num3`: QueueNum 3, not a power of two, over and over;
//! - `nokick`: one read published in the avail ring without a QueueNotify, left so;
//! - `strayq`: the same, after a QueueNotify for queue 1, which the driver never set up
//!   (the device needs 2 queues);
//! - `badidx`: an avail index more than a ring's worth ahead, kicked, over and over (each
//!   time the device must say it needs a reset);
//! - `reinit`: init, one read, reset, as fast as it goes.
//!
//! Result: `TG abuse dev=N mode=M rounds=R refused=F then_ok=1` (refused: inits that ended
//! with DEVICE_NEEDS_RESET), or a `TG fail` line.

use crate::blk_verify::{chosen, opts};
use crate::cpu::Deadline;
use crate::plans::Ctx;
use crate::virtio_blk::{Blk, BlkError, Op, Sabotage, ST_OK};
use crate::{fail, tg};

pub fn run(ctx: &Ctx) {
    let o = opts(&ctx.cmdline);
    let secs = ctx
        .cmdline
        .number("secs")
        .unwrap_or_else(|v| fail!("bad secs={v}"))
        .unwrap_or(30);
    let mode = ctx.cmdline.get("mode").unwrap_or("badring");
    let n = o.dev.unwrap_or(0);
    let Some((_, slot)) = chosen(ctx, Some(n)).next() else {
        fail!("blk-abuse: no device {n}");
    };
    let init = |sabotage| {
        Blk::init_sabotaged(
            slot,
            0,
            8,
            o.mode,
            (ctx.apic_base_msr, &ctx.ioapics),
            ctx.tsc_hz,
            sabotage,
        )
    };
    let read = |blk: &mut Blk| match blk.run_one(Op::In { sector: 0, len: 4096 }, 10_000_000) {
        Ok(d) if d.status == ST_OK => {}
        Ok(d) => fail!("blk-abuse dev={n} mode={mode}: read status {}", d.status),
        Err(e) => fail!("blk-abuse dev={n} mode={mode}: read: {e}"),
    };
    let end = Deadline::after_us(ctx.tsc_hz, secs * 1_000_000);
    let (mut rounds, mut refused) = (0u64, 0u64);
    match mode {
        "badring" | "num3" => {
            let sabotage = if mode == "badring" {
                Sabotage::RingsOutsideRam
            } else {
                Sabotage::QueueNum(3)
            };
            while !end.passed() {
                rounds += 1;
                match init(Some(sabotage)) {
                    Err(BlkError::NeedsReset) => refused += 1,
                    // Dropped: reset.
                    Ok(blk) => {
                        // Give the device a moment to say so (its control thread).
                        let soon = Deadline::after_us(ctx.tsc_hz, 1000);
                        while !soon.passed() && !blk.needs_reset() {
                            core::hint::spin_loop();
                        }
                        if blk.needs_reset() {
                            refused += 1;
                        }
                    }
                    Err(e) => fail!("blk-abuse dev={n} mode={mode}: init: {e}"),
                }
            }
        }
        "badidx" => {
            while !end.passed() {
                rounds += 1;
                let mut blk =
                    init(None).unwrap_or_else(|e| fail!("blk-abuse dev={n}: init: {e}"));
                read(&mut blk);
                blk.corrupt_avail_idx();
                let soon = Deadline::after_us(ctx.tsc_hz, 3_000_000);
                while !soon.passed() && !blk.needs_reset() {
                    core::hint::spin_loop();
                }
                if blk.needs_reset() {
                    refused += 1;
                }
            }
        }
        "nokick" | "strayq" => {
            let mut blk = init(None).unwrap_or_else(|e| fail!("blk-abuse dev={n}: init: {e}"));
            // One proper read first: the rings are up and the worker sleeps, waiting for a
            // kick, when the next one is published without.
            read(&mut blk);
            let settle = Deadline::after_us(ctx.tsc_hz, 200_000);
            while !settle.passed() {
                core::hint::spin_loop();
            }
            if mode == "strayq" {
                // A kick for a queue nobody set up: no worker ever reads it.
                blk.notify_value(1);
            }
            blk.submit(0, Op::In { sector: 0, len: 4096 });
            blk.publish_without_kick();
            while !end.passed() {
                core::hint::spin_loop();
            }
            rounds = 1;
            // Whether or not the device found it on its own, a kick now must complete it.
            blk.kick();
            match blk.wait_done(1, 10_000_000) {
                Ok(d) if d.status == ST_OK => {}
                other => fail!("blk-abuse dev={n} mode={mode}: the published read: {other:?}"),
            }
        }
        "reinit" => {
            while !end.passed() {
                rounds += 1;
                let mut blk = init(None).unwrap_or_else(|e| fail!("blk-abuse dev={n}: init: {e}"));
                read(&mut blk);
            }
        }
        other => fail!("blk-abuse: unknown mode={other}"),
    }
    let mut blk = init(None).unwrap_or_else(|e| fail!("blk-abuse dev={n} mode={mode}: init after: {e}"));
    read(&mut blk);
    tg!("abuse dev={n} mode={mode} rounds={rounds} refused={refused} then_ok=1");
}
