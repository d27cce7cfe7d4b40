//! `blk-bench`: a fio-like load on one disk, measured in the guest with the TSC. Its
//! driver runs in ring 3, so an emulated guest kernel mode costs it nothing.
//!
//! Options: `rw=randread|randwrite|read` (default randread), `bs=BYTES` (multiple of 4096,
//! at most 131072; default 4096), `qd=N` (default 1), `completion=poll|irq` (default poll),
//! `secs=S` (default 5), `dev=N` (default 0), `span=MIB` (the region used from the start
//! of the disk; default the whole disk), `seed=S`.
//!
//! Data is not checked: every request of a run uses the same buffer region (slot 0's data
//! buffer and those after it), so large requests need no more memory than one of them.
//!
//! Line: `TG bench dev=N rw=.. bs=.. qd=.. mode=.. ios=N secs=S iops=I mibps=M p10_us=..
//! p25_us= p50_us= p75_us= p90_us= p95_us= p99_us= p999_us= max_us=D irqs=K notifies=K`
//! (latency percentiles in whole microseconds).

use crate::blk_verify;
use crate::cpu;
use crate::plans::Ctx;
use crate::virtio_blk::{self, Completion, BLOCK, DESC_NEXT, DESC_WRITE, MAX_SLOTS, SECTOR};
use crate::{fail, tg};

/// Latency histogram: 1 µs buckets up to this, then one overflow bucket.
const HIST_US: usize = 20_000;
static mut HIST: [u32; HIST_US + 1] = [0; HIST_US + 1];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rw {
    RandRead,
    RandWrite,
    SeqRead,
}

pub fn run(ctx: &Ctx) {
    let c = &ctx.cmdline;
    let o = blk_verify::opts(c);
    let num = |k: &'static str, d: u64| {
        c.number(k)
            .unwrap_or_else(|v| fail!("bad {k}={v}"))
            .unwrap_or(d)
    };
    let rw = match c.get("rw") {
        None | Some("randread") => Rw::RandRead,
        Some("randwrite") => Rw::RandWrite,
        Some("read") => Rw::SeqRead,
        Some(v) => fail!("bad rw={v}"),
    };
    let bs = num("bs", BLOCK as u64);
    let max_bs = (MAX_SLOTS * BLOCK) as u64;
    if bs == 0 || bs % BLOCK as u64 != 0 || bs > max_bs.min(131072) {
        fail!("bs={bs} must be a multiple of 4096 up to 131072");
    }
    let secs = num("secs", 5);
    let n = o.dev.unwrap_or(0);
    let Some((_, slot)) = blk_verify::chosen(ctx, Some(n)).next() else {
        fail!("blk-bench: no device {n}");
    };
    let (mut blk, qd) = blk_verify::init(ctx, n, slot, &o);
    let disk_bytes = blk.config.capacity * SECTOR;
    let span = c
        .number("span")
        .unwrap_or_else(|v| fail!("bad span={v}"))
        .map_or(disk_bytes, |m| (m << 20).min(disk_bytes));
    let units = span / bs;
    if units == 0 {
        fail!("blk-bench: span of {span} bytes holds no {bs}-byte request");
    }
    // SAFETY: the plan runs on the BSP only; nothing else touches the histogram.
    let hist = unsafe { &mut *(&raw mut HIST) };
    hist.fill(0);

    let (kind, write) = match rw {
        Rw::RandRead | Rw::SeqRead => (virtio_blk::T_IN, true),
        Rw::RandWrite => (virtio_blk::T_OUT, false),
    };
    let mut rng = o.seed | 1;
    let mut seq = 0u64;
    let mut next_unit = || match rw {
        Rw::SeqRead => {
            let u = seq % units;
            seq += 1;
            u
        }
        _ => {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % units
        }
    };
    let tsc_hz = ctx.tsc_hz.max(1);
    let mut started = [0u64; MAX_SLOTS];
    let submit = |blk: &mut virtio_blk::Blk, s: usize, unit: u64, started: &mut [u64]| {
        let sector = unit * bs / SECTOR;
        let (hdr, status) = blk.prepare(s, kind, sector);
        let d = 3 * s as u16;
        blk.set_desc(d, hdr, 16, DESC_NEXT, d + 1);
        let flags = if write { DESC_WRITE } else { 0 } | DESC_NEXT;
        blk.set_desc(d + 1, virtio_blk::data_addr(0), bs as u32, flags, d + 2);
        blk.set_desc(d + 2, status, 1, DESC_WRITE, 0);
        blk.push(d);
        started[s] = cpu::rdtsc();
    };
    for s in 0..qd {
        submit(&mut blk, s, next_unit(), &mut started);
    }
    blk.kick();
    let t0 = cpu::rdtsc();
    let end = t0 + secs * tsc_hz;
    let mut inflight = qd;
    let mut ios = 0u64;
    let mut max_us = 0u64;
    let mut stopping = false;
    while inflight > 0 {
        let batch = if stopping { inflight as u16 } else { 1 };
        let d = match blk.wait_done(batch, blk_verify::REQ_TIMEOUT_US) {
            Ok(d) => d,
            Err(e) => fail!("blk-bench dev={n} {e} after {ios} ios"),
        };
        let mut next = Some(d);
        let mut resubmitted = false;
        while let Some(d) = next {
            let now = cpu::rdtsc();
            if d.slot >= qd || d.status != virtio_blk::ST_OK {
                fail!(
                    "blk-bench dev={n} slot {} status {} after {ios} ios",
                    d.slot,
                    d.status
                );
            }
            let us = (now - started[d.slot]) * 1_000_000 / tsc_hz;
            hist[(us as usize).min(HIST_US)] += 1;
            max_us = max_us.max(us);
            ios += 1;
            if now < end {
                submit(&mut blk, d.slot, next_unit(), &mut started);
                resubmitted = true;
            } else {
                stopping = true;
                inflight -= 1;
            }
            next = blk.poll_done();
        }
        if resubmitted {
            blk.kick();
        }
    }
    let elapsed = cpu::rdtsc() - t0;
    let secs_x1000 = elapsed * 1000 / tsc_hz;
    let iops = ios * tsc_hz / elapsed.max(1);
    let kib_s = ios * (bs / 1024) * tsc_hz / elapsed.max(1);
    // Per mille, so p99.9 fits.
    let pct = |pm: u64| {
        let want = (ios * pm).div_ceil(1000).max(1);
        let mut seen = 0u64;
        for (us, &count) in hist.iter().enumerate() {
            seen += u64::from(count);
            if seen >= want {
                return us as u64;
            }
        }
        HIST_US as u64
    };
    let mode = if o.mode == Completion::Irq {
        "irq"
    } else {
        "poll"
    };
    let name = match rw {
        Rw::RandRead => "randread",
        Rw::RandWrite => "randwrite",
        Rw::SeqRead => "read",
    };
    tg!(
        "bench dev={n} rw={name} bs={bs} qd={qd} mode={mode} ios={ios} secs={}.{:03} iops={iops} mibps={}.{:02} p10_us={} p25_us={} p50_us={} p75_us={} p90_us={} p95_us={} p99_us={} p999_us={} max_us={max_us} irqs={} notifies={}",
        secs_x1000 / 1000,
        secs_x1000 % 1000,
        kib_s / 1024,
        (kib_s % 1024) * 100 / 1024,
        pct(100),
        pct(250),
        pct(500),
        pct(750),
        pct(900),
        pct(950),
        pct(990),
        pct(999),
        blk.irqs(),
        blk.notifies
    );
}
