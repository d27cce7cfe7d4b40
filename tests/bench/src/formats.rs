//! Image formats at 4k randread QD32: the bench image served raw and as a qcow2 copy of it
//! (`qemu-img convert`, every cluster allocated, so every read goes through the tables),
//! by bulkhead (the sync engine, which serves qcow2) and by QEMU with an IOThread and its
//! own qcow2 driver, and the raw image through qemu-nbd (`--cache=none`) to bulkhead's NBD
//! worker, in one run. Ratios: qcow2 and NBD to raw on each system, and bulkhead's qcow2
//! to QEMU's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::host::which;
use crate::io::{IoBench, Qemu, Sample, PROFILES};

/// The profile measured: 4k randread QD32 (polled).
const PROFILE: usize = 1;

/// The systems, in report order.
pub const SYSTEMS: [&str; 5] = [
    "bulkhead raw (sync)",
    "bulkhead qcow2",
    "QEMU + IOThread raw",
    "QEMU + IOThread qcow2",
    "bulkhead NBD (qemu-nbd, Unix socket)",
];

/// Every run of each system (index into [`SYSTEMS`]), runs alternating.
pub fn measure(b: &IoBench, raw: &Path, qemu: &Path) -> anyhow::Result<Vec<Vec<Sample>>> {
    let qcow2 = qcow2_copy(b, raw)?;
    let profile = &PROFILES[PROFILE];
    let mut runs = vec![Vec::new(); SYSTEMS.len()];
    for repeat in 0..b.repeats.max(1) {
        for (s, system) in SYSTEMS.iter().enumerate() {
            eprintln!(
                "bench: formats: {} on {system} (run {} of {})",
                profile.name,
                repeat + 1,
                b.repeats.max(1)
            );
            let sample = match s {
                0 => b.bulkhead_disk(
                    profile,
                    raw,
                    &format!("path={},direct=on,engine=sync,spare=off", raw.display()),
                ),
                1 => b.bulkhead_disk(
                    profile,
                    &qcow2,
                    &format!("path={},format=qcow2,direct=on", qcow2.display()),
                ),
                2 => b.qemu(qemu, profile, raw, Qemu::IoThread),
                3 => b.qemu(qemu, profile, &qcow2, Qemu::IoThreadQcow2),
                _ => nbd_sample(b, profile, raw),
            }
            .with_context(|| format!("{} on {system}", profile.name))?;
            runs[s].push(sample);
        }
    }
    Ok(runs)
}

/// The raw image through qemu-nbd (started for this sample only: it holds the image's
/// lock) to bulkhead's NBD worker.
fn nbd_sample(b: &IoBench, profile: &crate::io::Profile, raw: &Path) -> anyhow::Result<Sample> {
    let qemu_nbd = which("qemu-nbd")
        .context("qemu-nbd is missing: install it (apt-get install qemu-utils)")?;
    // qemu-nbd takes only an absolute socket path.
    let socket = std::path::absolute(b.out.join("bench-nbd.sock"))
        .context("the NBD socket's absolute path")?;
    let _ = std::fs::remove_file(&socket);
    let mut server = Command::new(qemu_nbd)
        .args([
            "--format=raw",
            "--cache=none",
            "--persistent",
            "--shared=4",
            "--socket",
        ])
        .arg(&socket)
        .arg(raw)
        .spawn()
        .context("start qemu-nbd")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < deadline {
        if let Some(status) = server.try_wait().context("wait for qemu-nbd")? {
            anyhow::bail!("qemu-nbd ended at its start ({status})");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sample = b.bulkhead_disk_served(profile, &format!("nbd=unix:{}", socket.display()));
    let _ = server.kill();
    let _ = server.wait();
    sample
}

/// A qcow2 copy of `raw` beside it (made once; kept while `raw` is unchanged).
fn qcow2_copy(b: &IoBench, raw: &Path) -> anyhow::Result<PathBuf> {
    let qcow2 = b.out.join("bench.qcow2");
    let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if fresh(&qcow2).is_some() && fresh(&qcow2) >= fresh(raw) {
        return Ok(qcow2);
    }
    let qemu_img = which("qemu-img")
        .context("qemu-img is missing: install it (apt-get install qemu-utils)")?;
    eprintln!(
        "bench: converting the image to qcow2 at {}",
        qcow2.display()
    );
    let out = Command::new(qemu_img)
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(&qcow2)
        .output()
        .context("run qemu-img convert")?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(qcow2)
}

fn median(samples: &[Sample]) -> Option<&Sample> {
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    sorted.get(sorted.len() / 2).copied()
}

/// The report's section.
pub fn report(runs: &[Vec<Sample>]) -> String {
    let profile = &PROFILES[PROFILE];
    let mut md = format!(
        "## Image formats: {} ({}, bs {}, QD {}, {})\n\n\
         The bench image raw and as a qcow2 copy (`qemu-img convert`, every cluster \
         allocated), both with O_DIRECT; bulkhead serves qcow2 with imago inside its \
         sandboxed worker (sync engine), QEMU with its own qcow2 driver; the raw image also \
         through qemu-nbd (`--cache=none`, a Unix socket) to bulkhead's NBD worker (one \
         request at a time). The median run by IOPS; ratios of medians.\n\n\
         | system | IOPS | p50 us | p99 us | / raw | / QEMU + IOThread qcow2 |\n\
         |---|---:|---:|---:|---:|---:|\n",
        profile.name, profile.rw, profile.bs, profile.qd, profile.mode
    );
    let iops = |s: usize| median(&runs[s]).map_or(f64::NAN, |r| r.iops);
    for (s, system) in SYSTEMS.iter().enumerate() {
        let Some(r) = median(&runs[s]) else { continue };
        let to_raw = match s {
            1 | 4 => format!("{:.2}", r.iops / iops(0)),
            3 => format!("{:.2}", r.iops / iops(2)),
            _ => String::new(),
        };
        let to_qemu = if s == 1 {
            format!("{:.2}", r.iops / iops(3))
        } else {
            String::new()
        };
        md.push_str(&format!(
            "| {system} | {:.0} | {:.0} | {:.0} | {to_raw} | {to_qemu} |\n",
            r.iops, r.p50_us, r.p99_us
        ));
    }
    md.push('\n');
    md
}
