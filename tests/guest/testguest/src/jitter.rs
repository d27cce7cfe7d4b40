//! `blk-jitter`: the seed experiment, scaled to two vCPUs. Every AP runs a CPU-bound loop
//! in ring 3 from the moment it is online (it never exits to the VMM); the BSP runs an
//! interrupt-driven 4 KiB random-read storm on device 0 (`storm=1`, the default) or just
//! waits without exits (`storm=0`, the no-I/O baseline), for `secs`. The host measures the
//! vCPU threads from outside between the two lines.
//!
//! Options: `storm=0|1`, `secs=S` (default 5), `qd=N` (default 4), `span=MIB`.
//! Lines: `TG jitter start storm=S secs=N` and `TG jitter done storm=S ios=N ap_loops=L`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::blk_verify;
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::{self, DESC_NEXT, DESC_WRITE, MAX_SLOTS, SECTOR};
use crate::{fail, tg};

/// Set by the BSP before it starts the APs when the plan is `blk-jitter`.
pub static SPIN_APS: AtomicBool = AtomicBool::new(false);
static STOP_APS: AtomicBool = AtomicBool::new(false);
static AP_LOOPS: AtomicU64 = AtomicU64::new(0);

/// An AP's work under this plan: spin until told to stop.
pub fn ap_spin() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut loops = 0u64;
    while !STOP_APS.load(Ordering::Relaxed) {
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        loops += 1;
        core::hint::black_box(x);
    }
    AP_LOOPS.fetch_add(loops, Ordering::Relaxed);
}

pub fn run(ctx: &Ctx) {
    let c = &ctx.cmdline;
    let num = |k: &'static str, d: u64| {
        c.number(k)
            .unwrap_or_else(|v| fail!("bad {k}={v}"))
            .unwrap_or(d)
    };
    if ctx.cpus < 2 {
        fail!("blk-jitter needs 2 vCPUs, has {}", ctx.cpus);
    }
    let storm = num("storm", 1) != 0;
    let secs = num("secs", 5);
    let mut o = blk_verify::opts(c);
    o.mode = virtio_blk::Completion::Irq;
    o.qd = num("qd", 4) as usize;
    let tsc_hz = ctx.tsc_hz.max(1);
    let mut ios = 0u64;
    if storm {
        let Some((_, slot)) = blk_verify::chosen(ctx, Some(0)).next() else {
            fail!("blk-jitter: no device 0");
        };
        let (mut blk, qd) = blk_verify::init(ctx, 0, slot, &o);
        let disk = blk.config.capacity * SECTOR;
        let span = c
            .number("span")
            .unwrap_or_else(|v| fail!("bad span={v}"))
            .map_or(disk, |m| (m << 20).min(disk));
        let blocks = (span / 4096).max(1);
        let mut x = o.seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * 8
        };
        let submit = |blk: &mut virtio_blk::Blk, s: usize, sector: u64| {
            let (hdr, status) = blk.prepare(s, virtio_blk::T_IN, sector);
            let d = 3 * s as u16;
            blk.set_desc(d, hdr, 16, DESC_NEXT, d + 1);
            blk.set_desc(
                d + 1,
                virtio_blk::data_addr(s),
                4096,
                DESC_WRITE | DESC_NEXT,
                d + 2,
            );
            blk.set_desc(d + 2, status, 1, DESC_WRITE, 0);
            blk.push(d);
        };
        tg!("jitter start storm=1 secs={secs}");
        let end = cpu::rdtsc() + secs * tsc_hz;
        for s in 0..qd.min(MAX_SLOTS) {
            submit(&mut blk, s, next());
        }
        blk.kick();
        let mut inflight = qd;
        while inflight > 0 {
            let d = match blk.wait_done(1, blk_verify::REQ_TIMEOUT_US) {
                Ok(d) => d,
                Err(e) => fail!("blk-jitter: {e} after {ios} ios"),
            };
            let mut next_done = Some(d);
            let mut again = false;
            while let Some(d) = next_done {
                if d.status != virtio_blk::ST_OK {
                    fail!("blk-jitter: status {} after {ios} ios", d.status);
                }
                ios += 1;
                if cpu::rdtsc() < end {
                    submit(&mut blk, d.slot, next());
                    again = true;
                } else {
                    inflight -= 1;
                }
                next_done = blk.poll_done();
            }
            if again {
                blk.kick();
            }
        }
    } else {
        tg!("jitter start storm=0 secs={secs}");
        cpu::delay_us(tsc_hz, secs * 1_000_000);
    }
    STOP_APS.store(true, Ordering::Relaxed);
    cpu::delay_us(tsc_hz, 10_000);
    tg!(
        "jitter done storm={} ios={ios} ap_loops={}",
        u8::from(storm),
        AP_LOOPS.load(Ordering::Relaxed)
    );
}
