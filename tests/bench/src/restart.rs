//! `bulkhead-bench restart`: SIGKILLs a disk's worker N times while the guest runs
//! write-then-verify rounds with 32 requests in flight (polling for completions), and
//! measures the time from each kill to the next request the guest sees completed (its used
//! idx moving). The baseline is the same measurement without a kill: the time from a random
//! instant to the next completion, the floor of the method.
//!
//! The VM runs in this process, built with vmm-core as a library (the `bulkhead` binary has
//! no bench in it): the watcher reads the guest's used ring in guest memory and kills the
//! disk's current worker through the supervisor.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use vmm_core::config::VmConfig;
use vmm_core::devices::virtio_mmio::VirtioMmioDevice;
use vmm_core::memory::GuestRam;
use vmm_core::supervisor::DiskHandle;
use vmm_core::vm::Vm;

/// Settings of `bulkhead-bench restart`.
#[derive(Debug)]
pub struct Restart {
    /// Kills to measure.
    pub kills: u32,
    /// The test guest.
    pub kernel: PathBuf,
    /// The worker executable (`None`: bulkhead-worker beside this executable).
    pub worker_bin: Option<PathBuf>,
    /// Directory for the disk image and the report (`restart.md`, `restart.json`).
    pub out: PathBuf,
}

/// Serial output kept for the report (and to see whether the guest failed).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// How often the watcher looks at the used idx (the timer slack adds ~50 µs).
const POLL: Duration = Duration::from_micros(20);

/// What the restart bench's watcher thread sees.
struct Watch {
    device: Arc<VirtioMmioDevice>,
    ram: Arc<GuestRam>,
    control: Arc<DiskHandle>,
}

impl Watch {
    fn used(&self) -> Option<u16> {
        self.device.used_idx(self.ram.memory(), 0)
    }

    /// Waits until the used idx moves past `from`; the instant it did.
    fn next_completion(&self, from: u16, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if self.used().is_some_and(|u| u != from) {
                return Some(Instant::now());
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Sleep, not spin: with the vCPU polling on one core, a spinning watcher would
            // take the other from the worker it is timing.
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the guest's rings run and a worker serves them.
    fn ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.used().is_none_or(|u| u < 64) || self.control.current_worker().is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the guest did not start its I/O within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// One series of samples, in milliseconds.
#[derive(Debug, Default, serde::Serialize)]
struct Series {
    samples_ms: Vec<f64>,
    lost: u32,
}

impl Series {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples_ms.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    fn pct(&self, p: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    }

    fn mean(&self) -> f64 {
        self.samples_ms.iter().sum::<f64>() / self.samples_ms.len().max(1) as f64
    }
}

pub fn restart(a: Restart) -> anyhow::Result<()> {
    let kernel = a.kernel;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("create the output directory {}", a.out.display()))?;
    let image = a.out.join("restart-disk.img");
    let file = std::fs::File::create(&image)
        .with_context(|| format!("create the disk image {}", image.display()))?;
    file.set_len(64 << 20)
        .with_context(|| format!("size the disk image {}", image.display()))?;
    drop(file);

    let cmdline = "testguest.plan=blk-chaos secs=100000 qd=32 completion=poll blocks=1024";
    let cfg = VmConfig {
        disks: vec![vmm_core::disk::config::DiskConfig::parse(
            &format!("path={}", image.display()),
            0,
        )?],
        worker_bin: a.worker_bin,
        cmdline: cmdline.into(),
        mem_mib: 64,
        ..VmConfig::new(kernel.clone())
    };
    let serial = Captured::default();
    let mut vm = Vm::build(&cfg, None, Box::new(serial.clone()))?;
    let (_, control) = vm
        .disk_handles()
        .into_iter()
        .next()
        .context("the disk has no supervised worker")?;
    let watch = Watch {
        device: vm.disks()[0].device.clone(),
        ram: vm.shared_ram(),
        control,
    };
    let stopper = vm.stopper();
    let kills = a.kills;
    let bench = vmm_core::thread::spawn_unconfined(
        "bench-restart",
        "the benchmark drives the VM from inside",
        move || {
            let result = measure(&watch, kills);
            stopper.signal(libc::SIGTERM);
            result
        },
    )
    .context("start the bench thread")?;
    let outcome = vm.run(Some(Duration::from_secs(600)))?;
    let measured = bench
        .join()
        .map_err(|_| anyhow::anyhow!("the bench thread panicked"));
    vm.shutdown();
    let (baseline, restarts) = measured??;
    let guest = serial.text();
    if let Some(fail) = guest.lines().find(|l| l.starts_with("TG fail")) {
        anyhow::bail!("the guest failed during the bench: {fail}");
    }
    anyhow::ensure!(
        matches!(outcome, vmm_core::vm::VmOutcome::Signal(_)),
        "the VM ended before the bench did: {outcome:?}"
    );
    report(&a.out, &kernel, cmdline, &baseline, &restarts)
}

/// Alternates no-kill baseline samples and kills, a random 20-60 ms of guest I/O apart.
fn measure(watch: &Watch, kills: u32) -> anyhow::Result<(Series, Series)> {
    const LIMIT: Duration = Duration::from_secs(5);
    watch.ready(Duration::from_secs(30))?;
    let mut rng = Rng::from_clock();
    let (mut baseline, mut restarts) = (Series::default(), Series::default());
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(20 + rng.below(41)));
        let t0 = Instant::now();
        let from = watch.used().context("the ring went away")?;
        match watch.next_completion(from, LIMIT) {
            Some(t) => baseline.samples_ms.push(ms(t - t0)),
            None => baseline.lost += 1,
        }

        std::thread::sleep(Duration::from_millis(20 + rng.below(41)));
        let (_, worker) = watch
            .control
            .current_worker()
            .with_context(|| format!("kill {i}: the disk has no worker"))?;
        let t0 = Instant::now();
        vmm_core::pids::kill(&worker);
        // Completions the dying worker published before the signal landed do not count.
        vmm_core::pids::wait_exit(&worker, LIMIT);
        let from = watch.used().context("the ring went away")?;
        match watch.next_completion(from, LIMIT) {
            Some(t) => restarts.samples_ms.push(ms(t - t0)),
            None => restarts.lost += 1,
        }
    }
    Ok((baseline, restarts))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// xorshift64 for the pauses between kills.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn report(
    out: &Path,
    kernel: &Path,
    cmdline: &str,
    baseline: &Series,
    restarts: &Series,
) -> anyhow::Result<()> {
    let row = |name: &str, s: &Series| {
        format!(
            "| {name} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.samples_ms.len(),
            s.lost,
            s.pct(50.0),
            s.pct(90.0),
            s.pct(99.0),
            s.pct(100.0),
            s.mean()
        )
    };
    let goal = if restarts.lost == 0 && restarts.pct(99.0) < 20.0 {
        "met"
    } else {
        "MISSED"
    };
    let md = format!(
        "# bulkhead-bench restart\n\n\
         Guest: `{}` with `{cmdline}` (1 vCPU, 64 MiB, one 64 MiB raw disk in the host page \
         cache). Each kill is a SIGKILL of the confined worker; the time runs from the kill \
         to the guest's next completed request (its used idx moving), and includes the \
         supervisor noticing the death, a new worker's exec, sandbox and vhost-user setup, \
         inflight recovery and the first completion. The baseline is the same wait from a \
         random instant with no kill.\n\n\
         | series | samples | lost | p50 ms | p90 ms | p99 ms | max ms | mean ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n{}\n{}\n\n\
         p99 of kill to next completion: {:.2} ms, {:.0}x the baseline p99; goal p99 < 20 ms: \
         {goal}.\n",
        kernel.display(),
        row("kill -> next completion", restarts),
        row("baseline (no kill)", baseline),
        restarts.pct(99.0),
        restarts.pct(99.0) / baseline.pct(99.0),
    );
    print!("{md}");
    std::fs::write(out.join("restart.md"), &md)
        .with_context(|| format!("write {}", out.join("restart.md").display()))?;
    let json = serde_json::json!({
        "restarts": restarts,
        "baseline": baseline,
        "p50_ms": restarts.pct(50.0),
        "p99_ms": restarts.pct(99.0),
        "baseline_p99_ms": baseline.pct(99.0),
        "goal_p99_ms": 20.0,
        "goal_met": goal == "met",
    });
    std::fs::write(
        out.join("restart.json"),
        serde_json::to_string_pretty(&json)?,
    )
    .with_context(|| format!("write {}", out.join("restart.json").display()))?;
    eprintln!("bench: report in {}", out.join("restart.md").display());
    Ok(())
}
