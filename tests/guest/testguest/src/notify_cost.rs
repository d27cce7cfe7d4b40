//! `notify-cost`: what one QueueNotify write costs the guest, measured with the TSC. The
//! ring stays empty, so the device only sees kicks with nothing to do; the number is the
//! exit and the VMM's (or KVM's) handling of it, the part a real request pays per kick.
//!
//! Options: `writes=N` (default 100000), `dev=N`, `queue=Q`, `value=V` (what is written;
//! default the queue's index; another value tells a zero-length ioeventfd, which takes
//! any write, from a datamatch one, which lets it through to the VMM).
//! Line: `TG notify-cost dev=N queue=Q value=V writes=N cycles_per_write=C ns_per_write=X`.

use crate::blk_verify;
use crate::cpu;
use crate::plans::Ctx;
use crate::{fail, tg};

pub fn run(ctx: &Ctx) {
    let c = &ctx.cmdline;
    let o = blk_verify::opts(c);
    let writes = c
        .number("writes")
        .unwrap_or_else(|v| fail!("bad writes={v}"))
        .unwrap_or(100_000)
        .max(1);
    let n = o.dev.unwrap_or(0);
    let Some((_, slot)) = blk_verify::chosen(ctx, Some(n)).next() else {
        fail!("notify-cost: no device {n}");
    };
    let value = c
        .number("value")
        .unwrap_or_else(|v| fail!("bad value={v}"))
        .map_or(u32::from(o.queue), |v| v as u32);
    let (blk, _) = blk_verify::init(ctx, n, slot, &o);
    // One write first, so a lazily set-up path is not in the timing.
    blk.notify_value(value);
    let t0 = cpu::rdtsc();
    for _ in 0..writes {
        blk.notify_value(value);
    }
    let cycles = (cpu::rdtsc() - t0) / writes;
    let ns = cycles * 1_000_000_000 / ctx.tsc_hz.max(1);
    tg!(
        "notify-cost dev={n} queue={} value={value} writes={writes} cycles_per_write={cycles} ns_per_write={ns}",
        o.queue
    );
}
