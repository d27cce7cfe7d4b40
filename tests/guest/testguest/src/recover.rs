//! `blk-recover`: the driver's side of a device whose host workers keep crashing. The
//! host gives up on the device (DEVICE_NEEDS_RESET) and answers its requests with IOERR;
//! the driver must see errors, never a hang, and a reset must bring the device back.
//!
//! Options: those of `blk-verify`; `dev=N` (default 0) is the device that fails.
//! 1. Submits `qd` writes to device N and waits (polling, 10 s at most) for every one;
//!    each must complete with OK or IOERR. Then waits for DEVICE_NEEDS_RESET.
//! 2. Submits one more write, which must fail with IOERR (the device is failing).
//! 3. Resets the device, initialises it again, and writes then verifies `blocks`.
//! 4. Runs `blk-verify` on every other device.
//!
//! Lines: `TG recover dev=N pending=Q ok=A ioerr=E needs_reset=1 new=ioerr`, then
//! `TG recover dev=N reset wrote=B verified=B`.

use crate::blk_verify::{self, BLOCK_SECTORS, REQ_TIMEOUT_US};
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::{self, Blk, Op, BLOCK, ST_IOERR, ST_OK};
use crate::{fail, tg};

pub fn run(ctx: &Ctx) {
    let o = blk_verify::opts(&ctx.cmdline);
    let n = o.dev.unwrap_or(0);
    let Some((_, slot)) = blk_verify::chosen(ctx, Some(n)).next() else {
        fail!("blk-recover: no device {n}");
    };
    let (mut blk, qd) = blk_verify::init(ctx, n, slot, &o);
    let blocks = o
        .blocks
        .unwrap_or(64)
        .min(blk.config.capacity / BLOCK_SECTORS);
    if blocks < qd as u64 {
        fail!("blk-recover: dev={n} holds {blocks} blocks, fewer than qd={qd}");
    }

    // 1. Requests in flight while the host's workers die.
    for s in 0..qd {
        blk_verify::fill_pattern(virtio_blk::data(s), o.seed, s as u64);
        blk.submit(s, write(s as u64));
    }
    blk.kick();
    let (mut ok, mut ioerr) = (0usize, 0usize);
    for done in 0..qd {
        let d = poll(ctx, &mut blk, n, "pending write", done);
        match d.status {
            ST_OK => ok += 1,
            ST_IOERR => ioerr += 1,
            st => fail!(
                "blk dev={n} pending write in slot {} ended with status {st}",
                d.slot
            ),
        }
    }
    let deadline = cpu::rdtsc() + ctx.tsc_hz * REQ_TIMEOUT_US / 1_000_000;
    while !blk.needs_reset() {
        if cpu::rdtsc() > deadline {
            fail!("blk dev={n} ok={ok} ioerr={ioerr} but no DEVICE_NEEDS_RESET");
        }
        core::hint::spin_loop();
    }

    // 2. A new request on the failing device.
    blk.submit(0, write(0));
    blk.kick();
    let d = poll(ctx, &mut blk, n, "new write", 0);
    if d.status != ST_IOERR {
        fail!(
            "blk dev={n} new write on a failing device: status {}",
            d.status
        );
    }
    tg!("recover dev={n} pending={qd} ok={ok} ioerr={ioerr} needs_reset=1 new=ioerr");

    // 3. Reset, and the device works again.
    drop(blk);
    let (mut blk, qd) = blk_verify::init(ctx, n, slot, &o);
    let seed = o.seed.wrapping_add(1);
    let wrote = blk_verify::write_pattern(&mut blk, n, qd, blocks, seed);
    let verified = blk_verify::read_and_verify(&mut blk, n, qd, blocks, seed);
    tg!("recover dev={n} reset wrote={wrote} verified={verified}");
    drop(blk);

    // 4. The other devices were never affected.
    for (other, slot) in blk_verify::chosen(ctx, None).filter(|(d, _)| *d != n) {
        blk_verify::device(ctx, other, slot, &o);
    }
}

fn write(block: u64) -> Op {
    Op::Out {
        sector: block * BLOCK_SECTORS,
        len: BLOCK as u32,
    }
}

/// The next completion, polling for at most the request timeout.
fn poll(ctx: &Ctx, blk: &mut Blk, n: usize, what: &str, done: usize) -> virtio_blk::Done {
    let deadline = cpu::rdtsc() + ctx.tsc_hz * REQ_TIMEOUT_US / 1_000_000;
    loop {
        if let Some(d) = blk.poll_done() {
            return d;
        }
        if cpu::rdtsc() > deadline {
            fail!("blk dev={n} {what}: no completion after {done} (a hang)");
        }
        core::hint::spin_loop();
    }
}
