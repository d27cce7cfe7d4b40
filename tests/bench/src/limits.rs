//! Rate limits: two disks of one VM read at once (the test guest's `blk-pair`, 4 KiB
//! random reads at QD 16 on each, polled), first both unlimited, then disk 0 limited to
//! N IOPS (`--disk ...,iops=N`; N a quarter of its unlimited rate): disk 0 must see N
//! within 5% over the run, and disk 1, unlimited, must keep its own rate.

use std::path::Path;

use anyhow::Context;

use crate::host::{tg_field, wait_unlocked};
use crate::io::IoBench;

/// One run: each disk's IOPS.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Pair {
    pub limit: Option<u64>,
    pub iops: [f64; 2],
}

/// The runs, unlimited and limited alternating, `repeats` of each; and N.
pub fn measure(b: &IoBench, image: &Path) -> anyhow::Result<(Vec<Pair>, u64)> {
    let second = b.out.join("bench-second.img");
    crate::io::prepare_image(&second, 256)?;
    let mut runs = Vec::new();
    let free = run(b, image, &second, None).context("both disks unlimited")?;
    // A quarter of what disk 0 does unlimited, two significant digits.
    let quarter = (free.iops[0] / 4.0).max(100.0);
    let scale = 10f64.powi(quarter.log10().floor() as i32 - 1);
    let limit = ((quarter / scale).round() * scale) as u64;
    runs.push(free);
    for repeat in 0..b.repeats.max(1) {
        if repeat > 0 {
            runs.push(run(b, image, &second, None).context("both disks unlimited")?);
        }
        runs.push(run(b, image, &second, Some(limit)).context("disk 0 limited")?);
    }
    Ok((runs, limit))
}

fn run(b: &IoBench, d0: &Path, d1: &Path, limit: Option<u64>) -> anyhow::Result<Pair> {
    eprintln!(
        "bench: rate limits: disk 0 {}, disk 1 unlimited ({} s)",
        limit.map_or("unlimited".to_string(), |n| format!("iops={n}")),
        b.secs
    );
    wait_unlocked(d0)?;
    wait_unlocked(d1)?;
    // Unpinned: the vCPU and the two workers share both cores as the scheduler likes.
    let mut cmd = std::process::Command::new(&b.bulkhead);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&b.kernel)
        .args(["--mem", "64", "--timeout"])
        .arg((b.secs + 60).to_string())
        .args(["--cmdline"])
        .arg(format!("testguest.plan=blk-pair qd=16 secs={}", b.secs))
        .arg("--disk")
        .arg(format!(
            "path={},direct=on,spare=off{}",
            d0.display(),
            limit.map_or(String::new(), |n| format!(",iops={n}"))
        ))
        .arg("--disk")
        .arg(format!("path={},direct=on,spare=off", d1.display()))
        .arg("--worker-bin")
        .arg(&b.worker_bin);
    if b.huge_pages {
        cmd.arg("--hugepages");
    }
    let out = cmd.output().context("run bulkhead")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "bulkhead failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut iops = [0.0; 2];
    for (dev, slot) in iops.iter_mut().enumerate() {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("TG pair dev={dev} ")))
            .with_context(|| format!("no TG pair line for disk {dev}: {stdout}"))?;
        *slot = tg_field(line, "iops").with_context(|| format!("no iops in {line}"))?;
    }
    Ok(Pair { limit, iops })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The report's section.
pub fn report(runs: &[Pair], limit: u64, secs: u32) -> String {
    let pick = |limited: bool, dev: usize| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r.limit.is_some() == limited)
            .map(|r| r.iops[dev])
            .collect();
        median(&mut v)
    };
    let (free0, free1) = (pick(false, 0), pick(false, 1));
    let (lim0, lim1) = (pick(true, 0), pick(true, 1));
    let mut md = format!(
        "## Rate limits\n\n\
         Two disks of one VM read at once (test guest `blk-pair`: 4 KiB random reads, QD 16 \
         on each, polled, {secs} s), both unlimited, then disk 0 with `iops={limit}` (a \
         quarter of its unlimited rate). Medians of {} run(s) each. Goals: disk 0 within 5% \
         of {limit}; disk 1 keeps its rate.\n\n\
         | run | disk 0 IOPS | disk 1 IOPS | disk 0 / limit | disk 1 / its unlimited rate |\n\
         |---|---:|---:|---:|---:|\n",
        runs.iter().filter(|r| r.limit.is_some()).count()
    );
    md.push_str(&format!(
        "| both unlimited | {free0:.0} | {free1:.0} | | |\n\
         | disk 0 iops={limit} | {lim0:.0} | {lim1:.0} | {:.3} | {:.2} |\n\n",
        lim0 / limit as f64,
        lim1 / free1
    ));
    md
}
