//! `blk-pair`: 4 KiB random reads on devices 0 and 1 at once, polled from one loop, so
//! a slow (rate-limited) disk holds back neither the other nor the loop: each keeps `qd`
//! requests in flight for `secs`. Device 1 runs on the second ring set and the slots
//! after device 0's.
//!
//! Options: `qd=N` per device (default 16, at most 40), `secs=S` (default 5), `span=MIB`,
//! `seed=S`. Lines: `TG pair dev=N ios=I secs=S iops=R`, one per device.

use crate::blk_verify;
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::{self, Blk, BLOCK, DESC_NEXT, DESC_WRITE, MAX_SLOTS, SECTOR};
use crate::{fail, tg};

struct Side {
    n: usize,
    blk: Blk,
    first_slot: usize,
    units: u64,
    rng: u64,
    inflight: usize,
    ios: u64,
    last: u64,
}

pub fn run(ctx: &Ctx) {
    let c = &ctx.cmdline;
    let num = |k: &'static str, d: u64| blk_verify::num_opt(c, k).unwrap_or(d);
    let o = blk_verify::opts(c);
    let qd = num("qd", 16) as usize;
    if qd == 0 || 2 * qd > MAX_SLOTS || qd > 40 {
        fail!("blk-pair: qd={qd} must be 1..=40");
    }
    let secs = num("secs", 5);
    let span_mib = blk_verify::num_opt(c, "span");
    let mut sides: [Option<Side>; 2] = [None, None];
    for (n, side) in sides.iter_mut().enumerate() {
        let Some((_, slot)) = blk_verify::chosen(ctx, Some(n)).next() else {
            fail!("blk-pair: no device {n}");
        };
        virtio_blk::use_ring_set(n);
        let blk = match Blk::init(
            slot,
            0,
            virtio_blk::MAX_QUEUE,
            o.mode,
            (ctx.apic_base_msr, &ctx.ioapics),
            ctx.tsc_hz,
        ) {
            Ok(b) => b,
            Err(e) => fail!("blk-pair dev={n} {e}"),
        };
        if 3 * 2 * qd > usize::from(blk.num) {
            fail!("blk-pair dev={n}: a queue of {} is too small for qd={qd}", blk.num);
        }
        let disk = blk.config.capacity * SECTOR;
        let span = span_mib.map_or(disk, |m| (m << 20).min(disk));
        let units = span / BLOCK as u64;
        if units == 0 {
            fail!("blk-pair dev={n}: no 4 KiB block");
        }
        *side = Some(Side {
            n,
            blk,
            first_slot: n * qd,
            units,
            rng: (o.seed ^ (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
            inflight: 0,
            ios: 0,
            last: 0,
        });
    }
    virtio_blk::use_ring_set(0);
    let mut sides = sides.map(|s| s.unwrap_or_else(|| fail!("blk-pair: two devices")));
    let submit = |side: &mut Side, s: usize| {
        side.rng ^= side.rng << 13;
        side.rng ^= side.rng >> 7;
        side.rng ^= side.rng << 17;
        let sector = (side.rng % side.units) * BLOCK as u64 / SECTOR;
        let (hdr, status) = side.blk.prepare(s, virtio_blk::T_IN, sector);
        let d = 3 * s as u16;
        side.blk.set_desc(d, hdr, 16, DESC_NEXT, d + 1);
        side.blk
            .set_desc(d + 1, virtio_blk::data_addr(0), BLOCK as u32, DESC_WRITE | DESC_NEXT, d + 2);
        side.blk.set_desc(d + 2, status, 1, DESC_WRITE, 0);
        side.blk.push(d);
    };
    let tsc_hz = ctx.tsc_hz.max(1);
    let t0 = cpu::rdtsc();
    let end = t0 + secs * tsc_hz;
    for side in sides.iter_mut() {
        for s in side.first_slot..side.first_slot + qd {
            submit(side, s);
        }
        side.inflight = qd;
        side.blk.kick();
    }
    let timeout = blk_verify::REQ_TIMEOUT_US * tsc_hz / 1_000_000;
    let mut quiet_since = t0;
    while sides.iter().any(|s| s.inflight > 0) {
        let mut any = false;
        for side in sides.iter_mut() {
            let mut resubmitted = false;
            while let Some(d) = side.blk.poll_done() {
                any = true;
                let now = cpu::rdtsc();
                let mine = side.first_slot..side.first_slot + qd;
                if !mine.contains(&d.slot) || d.status != virtio_blk::ST_OK {
                    fail!(
                        "blk-pair dev={} slot {} status {} after {} ios",
                        side.n,
                        d.slot,
                        d.status,
                        side.ios
                    );
                }
                side.ios += 1;
                side.last = now;
                if now < end {
                    submit(side, d.slot);
                    resubmitted = true;
                } else {
                    side.inflight -= 1;
                }
            }
            if resubmitted {
                side.blk.kick();
            }
        }
        let now = cpu::rdtsc();
        if any {
            quiet_since = now;
        } else if now - quiet_since > timeout {
            fail!("blk-pair: no completion for {} s", blk_verify::REQ_TIMEOUT_US / 1_000_000);
        } else {
            core::hint::spin_loop();
        }
    }
    for side in &sides {
        let elapsed = (side.last - t0).max(1);
        let secs_x1000 = elapsed * 1000 / tsc_hz;
        tg!(
            "pair dev={} ios={} secs={}.{:03} iops={}",
            side.n,
            side.ios,
            secs_x1000 / 1000,
            secs_x1000 % 1000,
            side.ios * tsc_hz / elapsed
        );
    }
}
