//! The I/O profiles of DESIGN.md "Performance design", run by the test guest's
//! `blk-bench` plan (its driver runs in ring 3) under each system, on one raw image opened
//! with O_DIRECT on the host, with host fio on the same file as the limit. One invocation,
//! same guest binary, same image; results as ratios to fio.
//!
//! Systems: bulkhead with the sync and the io_uring engine; QEMU microvm with KVM and its
//! own virtio-blk-device (`cache=none,aio=io_uring`) without and with an IOThread; QEMU
//! microvm with our worker as its vhost-user-blk backend; host fio.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::host::{
    children, find_thread, on_io_core, pin, qemu_virtio_blk, qemu_virtio_blk_format, tg_field,
    wait_unlocked,
};

/// One load, as fio would name it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Profile {
    pub name: &'static str,
    /// fio's and the plan's rw= value.
    pub rw: &'static str,
    pub bs: u32,
    pub qd: u32,
    /// Completions: `poll` for throughput, `irq` for latency (the same for every system).
    pub mode: &'static str,
}

pub const PROFILES: [Profile; 4] = [
    Profile {
        name: "4k randread QD1",
        rw: "randread",
        bs: 4096,
        qd: 1,
        mode: "irq",
    },
    Profile {
        name: "4k randread QD32",
        rw: "randread",
        bs: 4096,
        qd: 32,
        mode: "poll",
    },
    Profile {
        name: "4k randwrite QD32",
        rw: "randwrite",
        bs: 4096,
        qd: 32,
        mode: "poll",
    },
    Profile {
        name: "128k read QD8",
        rw: "read",
        bs: 131072,
        qd: 8,
        mode: "poll",
    },
];

/// What one system did on one profile.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub iops: f64,
    pub mibps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Latency distribution points: (percentile, microseconds), ascending.
    pub cdf: Vec<(f64, f64)>,
    /// CPU spent serving the I/O, in percent of one core: every thread of the system's
    /// processes but the guest's vCPU (for fio: fio's own usr + sys).
    pub io_cpu_pct: f64,
}

impl Sample {
    /// Microseconds of I/O-side CPU per request.
    pub fn io_cpu_us_per_io(&self) -> f64 {
        self.io_cpu_pct / 100.0 * 1e6 / self.iops
    }
}

/// The percentiles every system reports (the guest's plan and fio's defaults share them).
const CDF_POINTS: [(f64, &str, &str); 8] = [
    (10.0, "p10_us", "10.000000"),
    (25.0, "p25_us", "25.000000"),
    (50.0, "p50_us", "50.000000"),
    (75.0, "p75_us", "75.000000"),
    (90.0, "p90_us", "90.000000"),
    (95.0, "p95_us", "95.000000"),
    (99.0, "p99_us", "99.000000"),
    (99.9, "p999_us", "99.900000"),
];

/// Settings of one bench invocation.
#[derive(Debug)]
pub struct IoBench {
    /// The `bulkhead` binary measured.
    pub bulkhead: PathBuf,
    /// The worker bulkhead runs, and QEMU's vhost-user backend.
    pub worker_bin: PathBuf,
    pub kernel: PathBuf,
    pub out: PathBuf,
    pub secs: u32,
    pub image_mib: u64,
    /// Runs of each profile on each system, and of the jitter experiment per system and
    /// load.
    pub repeats: u32,
    /// Guest RAM of bulkhead and of QEMU with our worker in 2 MiB huge pages (QEMU's own
    /// RAM is anonymous memory it asks transparent huge pages for).
    pub huge_pages: bool,
}

/// Huge pages for the 64 MiB guests if the host has them free; says so either way.
pub fn huge_pages_for_bench() -> bool {
    let free = vmm_core::memory::free_huge_pages();
    let enough = free >= 32;
    if enough {
        eprintln!("bench: guest RAM in 2 MiB huge pages ({free} free)");
    } else {
        eprintln!(
            "bench: guest RAM in 4 KiB pages: only {free} 2 MiB huge pages are free; reserve 32 \
             (sysctl vm.nr_hugepages=32) to measure bulkhead like QEMU, whose RAM gets \
             transparent huge pages"
        );
    }
    enough
}

/// The systems measured, in report order; fio last (the limit).
pub const SYSTEMS: [&str; 6] = [
    "bulkhead sync",
    "bulkhead io_uring",
    "QEMU",
    "QEMU + IOThread",
    "QEMU + bulkhead-worker",
    "host fio io_uring",
];
/// The reference the goals name.
const QEMU_IOTHREAD: usize = 3;

/// The median run of each (profile, system), by index into [`PROFILES`] and [`SYSTEMS`].
pub type Results = BTreeMap<(usize, usize), Sample>;
/// Every run of each (profile, system).
pub type Runs = BTreeMap<(usize, usize), Vec<Sample>>;

impl IoBench {
    /// Every profile on every system, `repeats` times over, on `image`: the median runs
    /// and all of them.
    pub fn profiles(
        &self,
        image: &Path,
        qemu: &Path,
        fio: &Path,
    ) -> anyhow::Result<(Results, Runs)> {
        // Every (profile, system) run `repeats` times, the rounds one after another so a
        // drift of the host's disk reaches every system alike.
        let mut all = Runs::new();
        for round in 0..self.repeats.max(1) {
            for (p, profile) in PROFILES.iter().enumerate() {
                for (s, system) in SYSTEMS.iter().enumerate() {
                    eprintln!(
                        "bench: {} on {system} ({} s, run {} of {})",
                        profile.name,
                        self.secs,
                        round + 1,
                        self.repeats.max(1)
                    );
                    let sample = self
                        .sample(system, profile, image, qemu, fio)
                        .with_context(|| format!("{} on {system}", profile.name))?;
                    all.entry((p, s)).or_default().push(sample);
                }
            }
        }
        let results = all
            .iter()
            .map(|(&key, samples)| (key, median_run(samples)))
            .collect();
        Ok((results, all))
    }

    /// One run of `profile` on `system`.
    fn sample(
        &self,
        system: &str,
        profile: &Profile,
        image: &Path,
        qemu: &Path,
        fio: &Path,
    ) -> anyhow::Result<Sample> {
        match system {
            "bulkhead sync" => self.bulkhead(profile, image, "sync"),
            "bulkhead io_uring" => self.bulkhead(profile, image, "io_uring"),
            "QEMU" => self.qemu(qemu, profile, image, Qemu::Plain),
            "QEMU + IOThread" => self.qemu(qemu, profile, image, Qemu::IoThread),
            "QEMU + bulkhead-worker" => self.qemu(qemu, profile, image, Qemu::OurWorker),
            _ => self.fio(fio, profile, image),
        }
    }

    /// One profile under bulkhead: the test guest's `blk-bench` line.
    fn bulkhead(&self, profile: &Profile, image: &Path, engine: &str) -> anyhow::Result<Sample> {
        self.bulkhead_disk(
            profile,
            image,
            &format!(
                "path={},direct=on,engine={engine},spare=off",
                image.display()
            ),
        )
    }

    /// One profile under bulkhead with the `--disk` spec `disk` (its image `image`).
    pub fn bulkhead_disk(
        &self,
        profile: &Profile,
        image: &Path,
        disk: &str,
    ) -> anyhow::Result<Sample> {
        wait_unlocked(image)?;
        self.bulkhead_disk_served(profile, disk)
    }

    /// [`IoBench::bulkhead_disk`] for a disk whose image another process holds (an NBD
    /// server's).
    pub fn bulkhead_disk_served(&self, profile: &Profile, disk: &str) -> anyhow::Result<Sample> {
        let mut cmd = on_io_core();
        cmd.arg(&self.bulkhead);
        self.bulkhead_run(&mut cmd, &plan(profile, self.secs), disk, self.secs + 60);
        if self.huge_pages {
            cmd.arg("--hugepages");
        }
        let (out, cpu) = output_pinned(cmd, "vcpu0", self.secs, &[]).context("run bulkhead")?;
        Ok(Sample {
            io_cpu_pct: cpu,
            ..guest_sample(&out)?
        })
    }

    /// Appends the arguments of `bulkhead run` for the test guest with `plan` and one
    /// `--disk` to `cmd` (bulkhead, or a wrapper whose next argument is bulkhead).
    pub fn bulkhead_run(&self, cmd: &mut Command, plan: &str, disk: &str, timeout: u32) {
        cmd.arg("run")
            .arg("--kernel")
            .arg(&self.kernel)
            .args(["--mem", "64", "--timeout"])
            .arg(timeout.to_string())
            .args(["--cmdline", plan, "--disk", disk]);
        cmd.arg("--worker-bin").arg(&self.worker_bin);
    }

    /// One profile under QEMU microvm with KVM, the same guest and image.
    pub fn qemu(
        &self,
        qemu: &Path,
        profile: &Profile,
        image: &Path,
        how: Qemu,
    ) -> anyhow::Result<Sample> {
        let dir = self.out.join("vhu");
        let socket = dir.join("vhu.sock");
        let mut worker = None;
        let mut worker_pid = None;
        let mut cmd = on_io_core();
        cmd.arg("timeout").arg((self.secs + 60).to_string());
        let append = plan(profile, self.secs);
        cmd.arg(qemu);
        // `::tests` is the tests crate (in unit tests, `tests` alone is this file's module).
        ::tests::qemu::microvm_args(&mut cmd, "microvm,acpi=off", 1, &self.kernel, &append);
        match how {
            Qemu::Plain => qemu_virtio_blk(&mut cmd, image, false),
            Qemu::IoThread => qemu_virtio_blk(&mut cmd, image, true),
            Qemu::IoThreadQcow2 => qemu_virtio_blk_format(&mut cmd, image, "qcow2", true),
            Qemu::OurWorker => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                let child = on_io_core()
                    .arg(&self.worker_bin)
                    .args(["blk", "--direct", "--engine", "io_uring", "--socket"])
                    .arg(&socket)
                    .arg("--disk")
                    .arg(image)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .context("start bulkhead-worker")?;
                worker_pid = Some(child.id());
                let w = WorkerGuard(child);
                wait_for_socket(&socket)?;
                worker = Some(w);
                ::tests::qemu::microvm_shared_ram(&mut cmd, self.huge_pages);
                ::tests::qemu::vhost_user_blk_mmio(&mut cmd, &socket);
            }
        }
        let extra: Vec<u32> = worker_pid.into_iter().collect();
        let (out, cpu) = output_pinned(cmd, "CPU 0/KVM", self.secs, &extra).context("run QEMU")?;
        drop(worker);
        Ok(Sample {
            io_cpu_pct: cpu,
            ..guest_sample(&out)?
        })
    }

    /// One profile with fio on the host, on the same file (the limit).
    fn fio(&self, fio: &Path, profile: &Profile, image: &Path) -> anyhow::Result<Sample> {
        let out = on_io_core()
            .arg(fio)
            .args([
                "--name=bench",
                "--direct=1",
                "--ioengine=io_uring",
                "--time_based",
            ])
            .arg(format!("--filename={}", image.display()))
            .arg(format!("--rw={}", profile.rw))
            .arg(format!("--bs={}", profile.bs))
            .arg(format!("--iodepth={}", profile.qd))
            .arg(format!("--runtime={}", self.secs))
            // Its buffers in huge pages too when the guests' RAM is.
            .arg(if self.huge_pages {
                "--mem=shmhuge"
            } else {
                "--mem=malloc"
            })
            .arg("--output-format=json")
            .output()
            .context("run fio")?;
        anyhow::ensure!(
            out.status.success(),
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parse fio's JSON")?;
        let job = &v["jobs"][0];
        let dir = if profile.rw.contains("write") {
            &job["write"]
        } else {
            &job["read"]
        };
        let pct = |p: &str| dir["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1e3;
        Ok(Sample {
            iops: dir["iops"].as_f64().context("fio reported no iops")?,
            mibps: dir["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            p50_us: pct("50.000000"),
            p99_us: pct("99.000000"),
            cdf: CDF_POINTS
                .iter()
                .map(|&(p, _, key)| (p, pct(key)))
                .filter(|(_, v)| v.is_finite())
                .collect(),
            io_cpu_pct: job["usr_cpu"].as_f64().unwrap_or(f64::NAN)
                + job["sys_cpu"].as_f64().unwrap_or(f64::NAN),
        })
    }
}

/// How QEMU serves the disk.
#[derive(Clone, Copy, Debug)]
pub enum Qemu {
    Plain,
    IoThread,
    /// With an IOThread, the image being qcow2 (QEMU's own qcow2 driver).
    IoThreadQcow2,
    OurWorker,
}

/// A standalone worker, killed when the run is over.
struct WorkerGuard(std::process::Child);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(socket: &Path) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "bulkhead-worker did not listen on {} within 10 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Runs `cmd` (a guest run of `secs` seconds) to its end, moving its vCPU thread (named
/// `vcpu_comm`, in it or a child of it) to core 0 as soon as that exists. Also returns the
/// CPU its processes and `extra` spent outside that thread over the middle half of the
/// run, in percent of one core.
fn output_pinned(
    mut cmd: Command,
    vcpu_comm: &str,
    secs: u32,
    extra: &[u32],
) -> anyhow::Result<(std::process::Output, f64)> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start")?;
    let started = std::time::Instant::now();
    // The processes and every descendant (a worker's reaper and confined child).
    let tree = |root: u32| {
        let mut pids = vec![root];
        pids.extend_from_slice(extra);
        let mut i = 0;
        while i < pids.len() {
            pids.extend(children(pids[i]));
            i += 1;
        }
        pids
    };
    let mut vcpu = None;
    while vcpu.is_none() {
        vcpu = tree(child.id())
            .into_iter()
            .find_map(|pid| find_thread(pid, vcpu_comm).map(|tid| (pid, tid)));
        let failed = match vcpu {
            Some((_, tid)) => pin(tid, 0).err(),
            None if child.try_wait()?.is_some() => {
                // Ended before its vCPU ran: its output says why.
                return Ok((child.wait_with_output()?, f64::NAN));
            }
            None if started.elapsed() > Duration::from_secs(30) => {
                Some(anyhow::anyhow!("no thread {vcpu_comm:?} after 30 s"))
            }
            None => {
                std::thread::sleep(Duration::from_millis(2));
                None
            }
        };
        if let Some(e) = failed {
            // Not left running: the next run needs the image.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    }
    let run = Duration::from_secs(u64::from(secs));
    std::thread::sleep((run / 4).saturating_sub(started.elapsed()));
    let before = cpu_ticks(&tree(child.id()), vcpu);
    let t0 = std::time::Instant::now();
    std::thread::sleep(run / 2);
    let after = cpu_ticks(&tree(child.id()), vcpu);
    let ticks = after.saturating_sub(before) as f64;
    // SAFETY: sysconf takes an integer name and reads no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let pct = ticks / hz / t0.elapsed().as_secs_f64() * 100.0;
    Ok((child.wait_with_output()?, pct))
}

/// utime + stime, in clock ticks, of the processes `pids` (their threads that exited
/// included) but for the thread `vcpu` (pid, tid).
fn cpu_ticks(pids: &[u32], vcpu: Option<(u32, u32)>) -> u64 {
    let total: u64 = pids
        .iter()
        .map(|pid| stat_ticks(&format!("/proc/{pid}/stat")))
        .sum();
    let skipped = vcpu.map_or(0, |(pid, tid)| {
        stat_ticks(&format!("/proc/{pid}/task/{tid}/stat"))
    });
    total.saturating_sub(skipped)
}

/// utime + stime from a `stat` file of /proc, 0 if it is gone.
fn stat_ticks(path: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces): utime is the 12th and stime
    // the 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

fn plan(profile: &Profile, secs: u32) -> String {
    format!(
        "testguest.plan=blk-bench rw={} bs={} qd={} completion={} secs={secs}",
        profile.rw, profile.bs, profile.qd, profile.mode
    )
}

/// The test guest's `TG bench` line from a finished run.
fn guest_sample(out: &std::process::Output) -> anyhow::Result<Sample> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    {
        let line = stdout
            .lines()
            .find(|l| l.starts_with("TG bench "))
            .with_context(|| {
                format!(
                    "no result from the guest (exit {:?}):\n{stdout}\n{}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let field = |k: &str| tg_field(line, k).with_context(|| format!("no {k}= in {line:?}"));
        Ok(Sample {
            iops: field("iops")?,
            mibps: field("mibps")?,
            p50_us: field("p50_us")?,
            p99_us: field("p99_us")?,
            cdf: CDF_POINTS
                .iter()
                .filter_map(|&(p, key, _)| tg_field(line, key).map(|v| (p, v)))
                .collect(),
            io_cpu_pct: f64::NAN,
        })
    }
}

/// Creates `image` (`mib` MiB of random data, so no read hits a hole) unless it already is.
pub fn prepare_image(image: &Path, mib: u64) -> anyhow::Result<()> {
    if std::fs::metadata(image).is_ok_and(|m| m.len() == mib << 20) {
        return Ok(());
    }
    eprintln!("bench: writing a {mib} MiB image at {}", image.display());
    let mut file = std::fs::File::create(image)
        .with_context(|| format!("create the image {}", image.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&chunk)
            .with_context(|| format!("write the image {}", image.display()))?;
    }
    file.sync_all().context("sync the image")?;
    // Let the page cache go: the first reads must not be cache hits for anyone (the
    // systems use O_DIRECT, but the host cache still holds what was just written).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// The run with the median IOPS (its latencies and CPU come with it, from one run).
fn median_run(samples: &[Sample]) -> Sample {
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    sorted
        .get(sorted.len() / 2)
        .map_or_else(Sample::default, |s| (*s).clone())
}

/// `median [min-max]` of the runs' IOPS; the median alone for one run.
fn iops_cell(median: f64, samples: &[Sample]) -> String {
    if samples.len() < 2 {
        return format!("{median:.0}");
    }
    let lo = samples.iter().map(|s| s.iops).fold(f64::INFINITY, f64::min);
    let hi = samples
        .iter()
        .map(|s| s.iops)
        .fold(f64::NEG_INFINITY, f64::max);
    format!("{median:.0} [{lo:.0}-{hi:.0}]")
}

pub fn report(
    results: &BTreeMap<(usize, usize), Sample>,
    all: &BTreeMap<(usize, usize), Vec<Sample>>,
    b: &IoBench,
) -> String {
    let fio = SYSTEMS.len() - 1;
    let mut md = format!(
        "# bulkhead-bench\n\n\
         Test guest `blk-bench` plan, {} s per run, {} run(s) of each profile on each system \
         (rounds one after another; the median run by IOPS is shown, with the IOPS range in \
         brackets), on a {} MiB raw image opened with \
         O_DIRECT on the host (bulkhead: `--disk ...,direct=on`; fio: `--direct=1 \
         --ioengine=io_uring`). Throughput profiles poll for completions, the QD1 latency \
         profile takes interrupts. Each system runs with its vCPU thread on core 0 and \
         everything else on core 1 (fio on core 1). Latencies are measured in the guest with the TSC (fio: \
         completion latency). Ratios are to QEMU with an IOThread and to host fio on the same file. \
         I/O CPU: what the system's threads other than the vCPU used over the middle half of \
         the run, in percent of one core (fio: its own usr + sys), and per request. \
         Guest RAM: {}.\n\n",
        b.secs,
        b.repeats.max(1),
        b.image_mib,
        if b.huge_pages {
            "2 MiB huge pages for bulkhead and for QEMU with bulkhead-worker (`--hugepages`, \
             `memory-backend-memfd,hugetlb=on`) and for fio's buffers (`--mem=shmhuge`); \
             QEMU's own RAM gets transparent huge pages"
        } else {
            "4 KiB pages for bulkhead and QEMU with bulkhead-worker (no huge pages were \
             free); QEMU's own RAM gets transparent huge pages"
        }
    );
    for (p, profile) in PROFILES.iter().enumerate() {
        md.push_str(&format!(
            "## {} ({}, bs {}, QD {}, {})\n\n\
             | system | IOPS | MiB/s | p50 us | p99 us | IOPS / QEMU+IOThread | IOPS / fio | I/O CPU % | I/O CPU us per request |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            profile.name, profile.rw, profile.bs, profile.qd, profile.mode
        ));
        let limit = results.get(&(p, fio)).map_or(f64::NAN, |s| s.iops);
        let reference = results
            .get(&(p, QEMU_IOTHREAD))
            .map_or(f64::NAN, |s| s.iops);
        for (s, system) in SYSTEMS.iter().enumerate() {
            if let Some(r) = results.get(&(p, s)) {
                md.push_str(&format!(
                    "| {system} | {} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} |\n",
                    iops_cell(r.iops, all.get(&(p, s)).map_or(&[], Vec::as_slice)),
                    r.mibps,
                    r.p50_us,
                    r.p99_us,
                    r.iops / reference,
                    r.iops / limit,
                    r.io_cpu_pct,
                    r.io_cpu_us_per_io()
                ));
            }
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_run_and_the_iops_range() {
        let runs: Vec<Sample> = [300.0, 100.0, 200.0]
            .iter()
            .map(|&iops| Sample {
                iops,
                p50_us: iops / 10.0,
                ..Sample::default()
            })
            .collect();
        let m = median_run(&runs);
        assert_eq!(
            (m.iops, m.p50_us),
            (200.0, 20.0),
            "one run's figures together"
        );
        assert_eq!(iops_cell(m.iops, &runs), "200 [100-300]");
        assert_eq!(iops_cell(m.iops, &runs[..1]), "200");
    }

    #[test]
    fn cpu_ticks_come_from_utime_and_stime_after_the_command_name() {
        let dir = std::env::temp_dir().join(format!("bench-stat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stat");
        // A command name with spaces and a ')' of its own; utime 700, stime 42.
        std::fs::write(
            &path,
            "4242 (CPU 0/KVM) x) S 1 2 3 0 -1 4194560 10 0 0 0 700 42 0 0 20 0 1 0 5 6 7\n",
        )
        .unwrap();
        assert_eq!(stat_ticks(path.to_str().unwrap()), 742);
        assert_eq!(stat_ticks("/nonexistent/stat"), 0);
        std::fs::remove_dir_all(&dir).unwrap();
        // This process against itself as its own "vCPU" thread: nothing left over.
        let me = std::process::id();
        assert_eq!(cpu_ticks(&[], Some((me, me))), 0);
    }
}
