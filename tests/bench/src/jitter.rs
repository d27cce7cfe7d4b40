//! The seed's experiment, scaled to two cores (DESIGN.md "Performance design"): a guest
//! with two vCPUs, a CPU-bound loop on vCPU 1 and an interrupt-driven 4 KiB read storm on
//! vCPU 0 (the test guest's `blk-jitter` plan), against the same plan without the storm.
//! Both vCPU threads are pinned to core 0, everything else (the VMM's other threads, the
//! worker, QEMU's main loop or IOThread) to core 1. For a window while the plan runs, each
//! vCPU thread is measured from outside: futex calls (`strace -c -e trace=futex -p TID`),
//! voluntary and involuntary context switches (/proc/PID/task/TID/status), and its run
//! slices (/proc/PID/task/TID/schedstat: time on the CPU, time waiting for it, slices).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::host::{children, find_thread, on_io_core, pin, qemu_virtio_blk, wait_unlocked};

/// Who runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum System {
    Bulkhead,
    Qemu,
    QemuIoThread,
}

impl System {
    pub const ALL: [System; 3] = [System::Bulkhead, System::Qemu, System::QemuIoThread];

    pub fn name(self) -> &'static str {
        match self {
            System::Bulkhead => "bulkhead io_uring",
            System::Qemu => "QEMU",
            System::QemuIoThread => "QEMU + IOThread",
        }
    }

    /// The kernel's name (comm) of vCPU thread `n`.
    fn vcpu_comm(self, n: usize) -> String {
        match self {
            System::Bulkhead => format!("vcpu{n}"),
            _ => format!("CPU {n}/KVM"),
        }
    }
}

/// One vCPU thread over the measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ThreadSample {
    pub futex_calls: u64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    pub run_ms: f64,
    pub wait_ms: f64,
    pub slices: u64,
    /// Mean time on the CPU per slice.
    pub mean_slice_us: f64,
}

/// One run: the storm vCPU (0) and the CPU-bound one (1).
#[derive(Clone, Debug, Serialize)]
pub struct JitterRun {
    pub system: System,
    pub storm: bool,
    pub vcpus: [ThreadSample; 2],
    pub ios: u64,
    pub ap_loops: u64,
    /// RssAnon + RssFile in KiB at the window's end: the VMM (or QEMU) process, and for
    /// bulkhead its disk worker (the confined process) and the worker's reaper.
    pub rss_kib: Rss,
}

/// Resident memory of the processes of a run, in KiB (RssAnon + RssFile).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rss {
    pub vmm: u64,
    pub worker: u64,
    pub reaper: u64,
}

/// RssAnon + RssFile of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    ["RssAnon:", "RssFile:"]
        .iter()
        .filter_map(|k| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

fn rss_of(pid: u32) -> Rss {
    // bulkhead's worker is its child (the reaper) and that one's child (confined).
    let reaper = children(pid).into_iter().next();
    let worker = reaper.and_then(|r| children(r).into_iter().next());
    Rss {
        vmm: rss_kib(pid),
        worker: worker.map_or(0, rss_kib),
        reaper: reaper.map_or(0, rss_kib),
    }
}

/// What the experiment needs.
#[derive(Debug)]
pub struct Jitter<'a> {
    pub bulkhead: &'a Path,
    pub qemu: &'a Path,
    pub strace: PathBuf,
    pub kernel: &'a Path,
    pub image: &'a Path,
    pub secs: u32,
}

/// Counters of one thread at one instant.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    voluntary: u64,
    involuntary: u64,
    run_ns: u64,
    wait_ns: u64,
    slices: u64,
}

fn counters(pid: u32, tid: u32) -> anyhow::Result<Counters> {
    let base = format!("/proc/{pid}/task/{tid}");
    let status = std::fs::read_to_string(format!("{base}/status"))
        .with_context(|| format!("read {base}/status"))?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let sched = std::fs::read_to_string(format!("{base}/schedstat"))
        .with_context(|| format!("read {base}/schedstat"))?;
    let mut s = sched
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    Ok(Counters {
        voluntary: field("voluntary_ctxt_switches:"),
        involuntary: field("nonvoluntary_ctxt_switches:"),
        run_ns: s.next().unwrap_or(0),
        wait_ns: s.next().unwrap_or(0),
        slices: s.next().unwrap_or(0),
    })
}

/// Kills the guest's process if a run is abandoned.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Jitter<'_> {
    fn command(&self, system: System, storm: bool) -> Command {
        let plan = format!(
            "testguest.plan=blk-jitter storm={} secs={}",
            u8::from(storm),
            self.secs
        );
        // Everything starts on core 1; the vCPU threads move to core 0 once they exist.
        let mut cmd = on_io_core();
        match system {
            System::Bulkhead => {
                cmd.arg(self.bulkhead)
                    .arg("run")
                    .arg("--kernel")
                    .arg(self.kernel)
                    .args(["--mem", "64", "--vcpus", "2", "--cmdline", &plan])
                    .arg("--disk")
                    .arg(format!("path={},direct=on,spare=off", self.image.display()));
            }
            System::Qemu | System::QemuIoThread => {
                // ACPI on for the MADT (two CPUs); with ioapic2 off the top slot sits at
                // 0xfeb00e00 on GSI 23, which QEMU then does not append.
                let append = format!("{plan} virtio_mmio.device=512@0xfeb00e00:23");
                let machine = "microvm,acpi=on,ioapic2=off";
                cmd.arg(self.qemu);
                ::tests::qemu::microvm_args(&mut cmd, machine, 2, self.kernel, &append);
                qemu_virtio_blk(&mut cmd, self.image, system == System::QemuIoThread);
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        match std::fs::File::create(self.log()) {
            Ok(f) => cmd.stderr(f),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        cmd
    }

    /// Where the current run's stderr goes (for errors).
    fn log(&self) -> PathBuf {
        self.image.with_file_name("jitter-run.log")
    }

    /// One run of `system`, with or without the storm.
    pub fn run(&self, system: System, storm: bool) -> anyhow::Result<JitterRun> {
        wait_unlocked(self.image)?;
        let mut child = Guard(
            self.command(system, storm)
                .spawn()
                .with_context(|| format!("start {}", system.name()))?,
        );
        let pid = child.0.id();
        let stdout = child.0.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(u64::from(self.secs) + 60);
        let mut next_line = |want: &str| -> anyhow::Result<String> {
            loop {
                anyhow::ensure!(Instant::now() < deadline, "no {want:?} in time");
                match lines.next() {
                    Some(Ok(l)) if l.starts_with(want) => return Ok(l),
                    Some(Ok(l)) if l.starts_with("TG fail") => anyhow::bail!("{l}"),
                    Some(Ok(_)) => {}
                    _ => anyhow::bail!(
                        "the guest ended before {want:?}; its log ({}):\n{}",
                        self.log().display(),
                        std::fs::read_to_string(self.log()).unwrap_or_default()
                    ),
                }
            }
        };
        next_line("TG cpu 1 online")?;
        let mut tids = [0u32; 2];
        for (n, tid) in tids.iter_mut().enumerate() {
            let comm = system.vcpu_comm(n);
            *tid = find_thread(pid, &comm)
                .with_context(|| format!("no thread {comm:?} in {}", system.name()))?;
            pin(*tid, 0)?;
        }
        next_line("TG jitter start")?;
        // Let the storm settle, then measure for most of the plan's run, ending well before
        // it (the guest times itself with its own idea of the TSC's rate).
        std::thread::sleep(Duration::from_millis(200));
        let window = Duration::from_millis(u64::from(self.secs) * 600);
        let before = [counters(pid, tids[0])?, counters(pid, tids[1])?];
        let straces: Vec<Child> = tids
            .iter()
            .map(|tid| {
                Command::new(&self.strace)
                    .args(["-c", "-e", "trace=futex", "-p", &tid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("start strace")
            })
            .collect::<anyhow::Result<_>>()?;
        std::thread::sleep(window);
        let after = [counters(pid, tids[0])?, counters(pid, tids[1])?];
        let rss = rss_of(pid);
        let mut futex = [0u64; 2];
        for (n, s) in straces.into_iter().enumerate() {
            // SAFETY: kill sends SIGINT to the strace we started; it then detaches and
            // prints its summary.
            unsafe { libc::kill(s.id() as libc::pid_t, libc::SIGINT) };
            let out = s.wait_with_output().context("wait for strace")?;
            futex[n] = futex_calls(&String::from_utf8_lossy(&out.stderr));
        }
        let done = next_line("TG jitter done")?;
        // Let it end by itself (its workers with it) rather than be killed.
        let _ = next_line("TG done");
        let _ = child.0.wait();
        let field = |k: &str| {
            done.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let sample = |n: usize| {
            let (b, a) = (before[n], after[n]);
            let slices = a.slices.saturating_sub(b.slices);
            let run_ns = a.run_ns.saturating_sub(b.run_ns);
            ThreadSample {
                futex_calls: futex[n],
                voluntary_switches: a.voluntary.saturating_sub(b.voluntary),
                involuntary_switches: a.involuntary.saturating_sub(b.involuntary),
                run_ms: run_ns as f64 / 1e6,
                wait_ms: a.wait_ns.saturating_sub(b.wait_ns) as f64 / 1e6,
                slices,
                mean_slice_us: run_ns as f64 / 1e3 / slices.max(1) as f64,
            }
        };
        Ok(JitterRun {
            system,
            storm,
            vcpus: [sample(0), sample(1)],
            ios: field("ios="),
            ap_loops: field("ap_loops="),
            rss_kib: rss,
        })
    }
}

/// The `calls` column of strace -c's futex row (0 without one).
fn futex_calls(summary: &str) -> u64 {
    summary
        .lines()
        .find(|l| l.split_whitespace().last() == Some("futex"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The report's table: per system, storm or not, and vCPU, the median of the repeats with
/// their range.
pub fn report(runs: &[JitterRun]) -> String {
    let mut md = String::from(
        "## vCPU jitter under a 4 KiB read storm\n\n\
         Two vCPUs pinned to core 0 (vCPU 0: interrupt-driven 4 KiB random reads, QD 4; \
         vCPU 1: a CPU-bound loop in ring 3), everything else on core 1. Per vCPU thread over \
         the window: futex calls (strace), context switches, time on and waiting for the \
         CPU, and the mean run slice; median of the repeats, range in brackets. `storm` \
         no is the no-I/O baseline.\n\n\
         | system | storm | vCPU | futex calls | voluntary cs | involuntary cs | run ms | wait ms | mean slice us | ios | guest loops (vCPU 1) |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for system in System::ALL {
        for storm in [true, false] {
            let set: Vec<&JitterRun> = runs
                .iter()
                .filter(|r| r.system == system && r.storm == storm)
                .collect();
            if set.is_empty() {
                continue;
            }
            for n in 0..2 {
                let col = |f: &dyn Fn(&JitterRun) -> f64| {
                    let mut v: Vec<f64> = set.iter().map(|r| f(r)).collect();
                    v.sort_by(f64::total_cmp);
                    let med = v[v.len() / 2];
                    if v.len() > 1 {
                        format!("{med:.0} [{:.0}-{:.0}]", v[0], v[v.len() - 1])
                    } else {
                        format!("{med:.0}")
                    }
                };
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    system.name(),
                    if storm { "yes" } else { "no" },
                    if n == 0 { "0 (storm)" } else { "1 (loop)" },
                    col(&|r| r.vcpus[n].futex_calls as f64),
                    col(&|r| r.vcpus[n].voluntary_switches as f64),
                    col(&|r| r.vcpus[n].involuntary_switches as f64),
                    col(&|r| r.vcpus[n].run_ms),
                    col(&|r| r.vcpus[n].wait_ms),
                    col(&|r| r.vcpus[n].mean_slice_us),
                    col(&|r| r.ios as f64),
                    col(&|r| r.ap_loops as f64),
                ));
            }
        }
    }
    md.push_str(
        "\n## Memory during the storm\n\n\
         RssAnon + RssFile (KiB) at the end of the window, median of the storm runs. Guest \
         RAM is shared memory (RssShmem) in every process that maps it, so it is not in \
         these figures; QEMU's include its own heap and libraries.\n\n\
         | system | VMM / QEMU KiB | worker KiB | worker's reaper KiB |\n|---|---:|---:|---:|\n",
    );
    for system in System::ALL {
        let mut set: Vec<Rss> = runs
            .iter()
            .filter(|r| r.system == system && r.storm)
            .map(|r| r.rss_kib)
            .collect();
        if set.is_empty() {
            continue;
        }
        set.sort_by_key(|r| r.vmm);
        let m = set[set.len() / 2];
        let dash = |v: u64| {
            if v == 0 {
                "-".to_string()
            } else {
                v.to_string()
            }
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            system.name(),
            m.vmm,
            dash(m.worker),
            dash(m.reaper)
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn futex_row_of_an_strace_summary() {
        let summary = "% time     seconds  usecs/call     calls    errors syscall\n\
                       ------ ----------- ----------- --------- --------- ----------------\n\
                       100.00    0.000021           2         9         3 futex\n\
                       ------ ----------- ----------- --------- --------- ----------------\n\
                       100.00    0.000021           2         9         3 total\n";
        assert_eq!(futex_calls(summary), 9);
        let no_errors = "100.00    0.000021           2        12           futex\n";
        assert_eq!(futex_calls(no_errors), 12);
        assert_eq!(futex_calls("% time     seconds\n"), 0);
    }
}
