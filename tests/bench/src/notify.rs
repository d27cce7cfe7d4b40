//! What one QueueNotify costs the guest, with the kick ioeventfd matching the queue index
//! (the default) and with a zero-length ioeventfd (`ioeventfd=any`, one queue), which KVM
//! can take on its fast MMIO path without decoding the guest's instruction where the
//! hardware reports MMIO exits that way (VMX). Measured by the test guest's `notify-cost`
//! plan with an empty ring.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::host::{tg_field, wait_unlocked};
use crate::io::IoBench;

/// The two registrations compared, as `--disk` options.
pub const VARIANTS: [(&str, &str); 2] = [
    ("datamatch", "num_queues=1,ioeventfd=datamatch"),
    ("zero-length", "ioeventfd=any"),
];

/// Nanoseconds per QueueNotify write of every run, per variant, runs alternating.
pub fn measure(b: &IoBench, image: &Path) -> anyhow::Result<Vec<Vec<f64>>> {
    let writes = 50_000 * u64::from(b.secs.max(1));
    let mut runs = vec![Vec::new(); VARIANTS.len()];
    for repeat in 0..b.repeats.max(1) {
        for (v, (name, options)) in VARIANTS.iter().enumerate() {
            eprintln!(
                "bench: QueueNotify cost, {name} ioeventfd (run {} of {})",
                repeat + 1,
                b.repeats.max(1)
            );
            runs[v].push(
                run(b, image, options, writes)
                    .with_context(|| format!("QueueNotify cost with a {name} ioeventfd"))?,
            );
        }
    }
    Ok(runs)
}

fn run(b: &IoBench, image: &Path, options: &str, writes: u64) -> anyhow::Result<f64> {
    wait_unlocked(image)?;
    let mut cmd = Command::new(&b.bulkhead);
    b.bulkhead_run(
        &mut cmd,
        &format!("testguest.plan=notify-cost writes={writes}"),
        &format!("path={},spare=off,{options}", image.display()),
        120,
    );
    let out = cmd.output().context("run bulkhead")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find(|l| l.starts_with("TG notify-cost "))
        .and_then(|l| tg_field(l, "ns_per_write"))
        .with_context(|| {
            format!(
                "no notify-cost result from the guest (exit {:?}):\n{stdout}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The report's section: median [range] per variant, and the ratio of the medians.
pub fn report(runs: &[Vec<f64>]) -> String {
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut md = String::from(
        "## QueueNotify cost (one queue, empty ring)\n\n\
         Guest TSC time per QueueNotify write under bulkhead, median [range] of the runs.\n\n\
         | kick ioeventfd | ns per write | / datamatch |\n|---|---:|---:|\n",
    );
    let base = runs.first().map_or(f64::NAN, |r| median(r));
    for ((name, _), r) in VARIANTS.iter().zip(runs) {
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let m = median(r);
        md.push_str(&format!(
            "| {name} | {m:.0} [{lo:.0}-{hi:.0}] | {:.2} |\n",
            m / base
        ));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_gives_medians_ranges_and_the_ratio() {
        let md = report(&[vec![200.0, 100.0, 300.0], vec![100.0, 50.0, 150.0]]);
        assert!(md.contains("| datamatch | 200 [100-300] | 1.00 |"), "{md}");
        assert!(md.contains("| zero-length | 100 [50-150] | 0.50 |"), "{md}");
    }
}
