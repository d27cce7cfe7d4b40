//! Chaos under bulkhead: the test guest writes and verifies its first disk with 32
//! requests in flight for a minute while the test SIGKILLs that disk's worker every
//! 50-200 ms. The VMM restarts each worker and hands it the inflight region; the guest
//! must see no error, every verify must pass, the host image must hold the last round's
//! pattern, and some restarts must have resubmitted in-flight requests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::{bench_bin, blk_pattern, bulkhead_bin, require_kvm, scratch_dir, testguest};

const SECS: u64 = 60;
const BLOCKS: u64 = 64;
const SEED: u64 = 5;

/// The confined pid of the worker serving `blk0` now, from the control API (the log
/// also names spare workers, started ahead of need).
fn serving_worker_pid(api: &Path) -> Option<i32> {
    let (code, body) = vmm_core::api::request(api, "GET", "/v1/disks/blk0").ok()?;
    if code != 200 {
        return None;
    }
    let state: serde_json::Value = serde_json::from_str(&body).ok()?;
    state["worker_pid"].as_i64().map(|p| p as i32)
}

fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    p
}

/// `bulkhead run` with the API on `api`: blk-chaos for `secs` on disk 0 of `disks`, with
/// `worker_bin` if given; output piped.
fn chaos_command(api: &Path, secs: u64, disks: &[&Path], worker_bin: Option<&Path>) -> Command {
    let specs: Vec<String> = disks
        .iter()
        .map(|d| format!("path={}", d.display()))
        .collect();
    chaos_command_specs(api, secs, &specs, worker_bin)
}

/// [`chaos_command`] with `--disk` specs as given.
fn chaos_command_specs(
    api: &Path,
    secs: u64,
    specs: &[String],
    worker_bin: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(bulkhead_bin());
    cmd.arg("run")
        .arg("--api-socket")
        .arg(api)
        .arg("--kernel")
        .arg(testguest())
        .args(["--mem", "64", "--timeout", &(secs + 60).to_string(), "--cmdline"])
        .arg(format!(
            "testguest.plan=blk-chaos dev=0 secs={secs} qd=32 completion=irq seed={SEED} blocks={BLOCKS}"
        ));
    if let Some(bin) = worker_bin {
        cmd.arg("--worker-bin").arg(bin);
    }
    for spec in specs {
        cmd.arg("--disk").arg(spec);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `bulkhead ctl --api-socket API restart blk0`: its output and its stdout as text.
fn ctl_restart(api: &Path) -> (std::process::Output, String) {
    let out = Command::new(bulkhead_bin())
        .args(["ctl", "--api-socket"])
        .arg(api)
        .args(["--json", "restart", "blk0"])
        .output()
        .expect("run bulkhead ctl");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, body)
}

/// What a chaos run left behind.
struct Chaos {
    /// Everything bulkhead and the guest printed, with the seed and action count.
    text: String,
    transcript: String,
    summary: String,
    actions: u32,
}

/// What the test does to disk 0's worker while the guest runs.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// kill(2) the newest worker with this signal.
    Signal(i32),
    /// `bulkhead ctl --api-socket .. restart blk0` (a planned restart).
    CtlRestart,
}

/// Runs `blk-chaos` for `secs` on disk 0 (disk 1 idle beside it) and, every `interval()`
/// while the guest's rounds run, applies `action` to disk 0's worker. Checks the guest's
/// verdict, the exit status and the host image.
fn chaos(name: &str, secs: u64, action: Action, interval: impl FnMut() -> Duration) -> Chaos {
    chaos_with_hook(name, secs, action, interval, None)
}

/// Disk 0's image: a raw file, a qcow2 image (made by qemu-img, over a raw backing
/// file of zeros) that is read back through `qemu-img convert`, or a raw file qemu-nbd
/// serves (each worker connects anew).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
    Nbd,
}

/// [`chaos`] with the hook-enabled worker, its fault hook `hook` on disk 0's workers.
fn chaos_with_hook(
    name: &str,
    secs: u64,
    action: Action,
    interval: impl FnMut() -> Duration,
    hook: Option<&str>,
) -> Chaos {
    chaos_on(name, secs, action, interval, hook, Format::Raw)
}

fn chaos_on(
    name: &str,
    secs: u64,
    action: Action,
    mut interval: impl FnMut() -> Duration,
    hook: Option<&str>,
    format: Format,
) -> Chaos {
    require_kvm();
    let dir = scratch_dir(name);
    let api = dir.join("api.sock");
    let mut ctl_output = String::new();
    let d1 = image(&dir, "d1.img");
    let mut server = None;
    let (d0, d0_spec) = match format {
        Format::Nbd => {
            let d0 = image(&dir, "d0.img");
            let nbd = tests::qemu_nbd(&d0, &dir.join("nbd.sock"), &[]);
            let spec = nbd.spec.clone();
            server = Some(nbd);
            (d0, spec)
        }
        Format::Raw => {
            let d0 = image(&dir, "d0.img");
            let spec = format!("path={}", d0.display());
            (d0, spec)
        }
        Format::Qcow2 => {
            let base = image(&dir, "base.raw");
            let d0 = dir.join("d0.qcow2");
            tests::make_qcow2(&d0, tests::Qcow2Of::Backing("base.raw", "raw"));
            let spec = format!(
                "path={},format=qcow2,backing={}",
                d0.display(),
                base.display()
            );
            (d0, spec)
        }
    };
    let hooks_bin = hook.map(|_| tests::worker_hooks_bin());
    let specs = [d0_spec, format!("path={}", d1.display())];
    let mut cmd = chaos_command_specs(&api, secs, &specs, hooks_bin.as_deref());
    if let Some(hook) = hook {
        cmd.env("BULKHEAD_WORKER_FAULT_HOOK", format!("blk0:{hook}"));
    }
    let mut child = cmd.spawn().expect("start bulkhead");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let sink = lines.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        }));
    }
    let mut actions = 0u32;
    let mut last_signalled = 0;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs + 90),
            "bulkhead did not finish"
        );
        std::thread::sleep(interval());
        let text = lines.lock().unwrap().clone();
        let running = text.iter().any(|l| l.starts_with("TG chaos dev=0 num="))
            && !text.iter().any(|l| l.contains(" rounds="));
        match (action, running, serving_worker_pid(&api)) {
            (Action::Signal(signal), true, Some(pid)) if pid != last_signalled => {
                // SAFETY: kill(2) on the pid the VMM reported; ESRCH if it is already gone, which is fine (it is not signalled again either way).
                let rc = unsafe { libc::kill(pid, signal) };
                actions += u32::from(rc == 0);
                last_signalled = pid;
            }
            (Action::CtlRestart, true, _) => {
                let (out, body) = ctl_restart(&api);
                assert!(
                    out.status.success() && body.contains("\"worker_pid\":"),
                    "ctl restart: {:?} {body} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                ctl_output.push_str(&body);
                actions += 1;
            }
            _ => {}
        }
    };
    for r in readers {
        let _ = r.join();
    }
    let text = lines.lock().unwrap().join("\n");
    let t = format!("{action:?}, {actions} times, {status:?}\n{ctl_output}\n{text}");
    let summary = text
        .lines()
        .find(|l| l.starts_with("TG chaos dev=0 rounds="))
        .unwrap_or_else(|| panic!("no chaos summary: {t}"));
    assert!(summary.contains(" errors=0 "), "{summary}");
    assert!(text.contains("TG done"), "{t}");
    assert_eq!(status.code(), Some(0), "{t}");
    let last_seed: u64 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("last_seed="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    // qemu-nbd's writes are in the file once it has ended.
    drop(server);
    let bytes = match format {
        Format::Raw | Format::Nbd => std::fs::read(&d0).unwrap(),
        Format::Qcow2 => {
            // No corruption after all those kills (leaked clusters, exit 3, harm no data).
            let check = Command::new(tests::require_tool("qemu-img", "qemu-utils"))
                .args(["check", "-f", "qcow2"])
                .arg(&d0)
                .output()
                .unwrap();
            assert!(
                matches!(check.status.code(), Some(0) | Some(3)),
                "qemu-img check: {check:?}\n{t}"
            );
            let raw = dir.join("d0.converted.raw");
            tests::qemu_img(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                &d0.display().to_string(),
                &raw.display().to_string(),
            ]);
            std::fs::read(&raw).unwrap()
        }
    };
    for block in 0..BLOCKS {
        let at = (block * 4096) as usize;
        assert!(
            bytes[at..at + 4096] == blk_pattern(last_seed, block)[..],
            "host image block {block} does not hold round {last_seed}'s pattern: {summary}"
        );
    }
    assert!(!text.contains("giving up"), "{t}");
    assert!(
        !text.contains("disk blk1: worker restarted"),
        "the other disk's worker was not touched: {t}"
    );
    Chaos {
        transcript: t,
        summary: summary.to_string(),
        text,
        actions,
    }
}

/// [`chaos_on`] with the worker SIGKILLed every 50 to 200 ms for `secs` on a `format`
/// disk: at least `min_kills` kills, each followed by a restart.
fn kills_every_50_to_200_ms(name: &str, secs: u64, format: Format, min_kills: u32) {
    let (mut rng, seed) = tests::XorShift::from_clock();
    let c = chaos_on(
        name,
        secs,
        Action::Signal(libc::SIGKILL),
        || Duration::from_millis(50 + rng.next_u64() % 151),
        None,
        format,
    );
    let restarts = c.text.matches("disk blk0: worker restarted in").count();
    assert!(
        c.actions >= min_kills && restarts as u32 + 1 >= c.actions,
        "{} kills, {restarts} restarts (seed {seed:#x}): {}",
        c.actions,
        c.transcript
    );
    eprintln!(
        "{}; {} kills, {restarts} restarts (seed {seed:#x})",
        c.summary, c.actions
    );
}

/// The chaos on a qcow2 image over a backing file: each successor reopens the image its
/// predecessor died in the middle of changing, resubmits what was in flight, and the
/// guest sees nothing; `qemu-img check` then finds no corruption, and the image holds the
/// last round's pattern.
#[test]
fn a_qcow2_disk_survives_its_worker_killed_every_50_to_200_ms() {
    kills_every_50_to_200_ms("restart-bulkhead-qcow2", 30, Format::Qcow2, 40);
}

/// The chaos on a disk qemu-nbd serves: each successor gets a new connection (made by the
/// spawner) and resubmits, over it, what its predecessor had in flight; the guest sees
/// nothing and the file holds the last round's pattern.
#[test]
fn an_nbd_disk_survives_its_worker_killed_every_50_to_200_ms() {
    kills_every_50_to_200_ms("restart-bulkhead-nbd", 20, Format::Nbd, 30);
}

/// A compromised worker answers GET_INFLIGHT_FD with the guest-RAM memfd, from 1 MiB on
/// (where the test guest's code is). Were that region kept and handed to the workers
/// (this one and its successors), they would write their inflight entries into the
/// guest's code; the VMM makes the region itself and never asks a worker for one, so the
/// guest sees nothing of it through its workers' kills.
#[test]
fn a_workers_inflight_region_never_reaches_the_guest() {
    let c = chaos_with_hook(
        "restart-inflight-guest-ram",
        10,
        Action::Signal(libc::SIGKILL),
        || Duration::from_millis(300),
        Some("inflight-guest-ram"),
    );
    assert!(c.actions >= 5, "only {} kills: {}", c.actions, c.transcript);
}

#[test]
fn guest_sees_nothing_while_its_worker_is_killed_every_50_to_200_ms() {
    let (mut rng, seed) = tests::XorShift::from_clock();
    let c = chaos(
        "restart-bulkhead",
        SECS,
        Action::Signal(libc::SIGKILL),
        || Duration::from_millis(50 + rng.next_u64() % 151),
    );
    let (text, t, kills) = (&c.text, &c.transcript, c.actions);
    let restarts = text.matches("disk blk0: worker restarted in").count();
    // The VMM's restart line says what the successor resubmitted; the worker's own line
    // says it too, per queue.
    let resubmitted: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("disk blk0: worker restarted in"))
        .filter_map(|l| {
            let (head, _) = l.split_once(" request(s) resubmitted")?;
            head.rsplit(' ').next()?.parse().ok()
        })
        .filter(|&k| k > 0)
        .collect();
    let worker_lines = text
        .lines()
        .filter(|l| l.contains("queue 0: resuming at used idx") && !l.contains(": 0 request(s)"))
        .count();
    // (A successor killed while resubmitting has said so itself but never reported it
    // to the VMM.)
    assert!(
        resubmitted.len() <= worker_lines,
        "the VMM reports more resubmitting restarts than the workers: {t}"
    );
    let requests: u64 = resubmitted.iter().sum();
    let resubmitted = resubmitted.len();
    assert!(
        kills >= 100,
        "only {kills} kills in {SECS} s (seed {seed:#x}): {t}"
    );
    assert!(
        restarts as u32 + 1 >= kills,
        "{restarts} restarts for {kills} kills: {t}"
    );
    assert!(
        resubmitted > 0,
        "no restart found a request in flight to resubmit ({restarts} restarts): {t}"
    );
    eprintln!(
        "{}; {kills} kills, {restarts} restarts, {resubmitted} resubmitting {requests} \
         requests (seed {seed:#x})",
        c.summary
    );
}

/// A stopped worker (SIGSTOP) still exists, so only its stalled progress with requests
/// pending gives it away: the supervisor kills and replaces it within the hang timeout,
/// long before the guest's own request timeout (10 s).
#[test]
fn a_hung_worker_is_detected_killed_and_replaced() {
    let c = chaos("restart-hung", 12, Action::Signal(libc::SIGSTOP), || {
        Duration::from_millis(2500)
    });
    let hung = c
        .text
        .matches("disk blk0: worker (pid ")
        .count()
        .min(c.text.matches("with requests pending: killing it").count());
    assert!(c.actions >= 3, "{}", c.transcript);
    assert!(
        hung as u32 >= c.actions.saturating_sub(1),
        "{hung} hangs detected for {} stops: {}",
        c.actions,
        c.transcript
    );
    assert!(
        c.text.contains("hung (no progress for "),
        "{}",
        c.transcript
    );
    eprintln!("{}; {} stops, {hung} hangs detected", c.summary, c.actions);
}

/// `bulkhead ctl restart blk0` during guest I/O: each call answers with the successor's
/// pid once it serves, the end is logged as planned (not as a failure), and the guest
/// sees nothing.
#[test]
fn planned_restarts_through_the_api_are_invisible_to_the_guest() {
    let c = chaos("restart-planned", 8, Action::CtlRestart, || {
        Duration::from_millis(700)
    });
    assert!(c.actions >= 4, "{}", c.transcript);
    let planned = c.text.matches("stopped for a planned restart").count() as u32;
    assert_eq!(planned, c.actions, "{}", c.transcript);
    assert!(!c.text.contains("was killed by signal"), "{}", c.transcript);
    eprintln!("{}; {} planned restarts", c.summary, c.actions);
}

/// Waits for the API to name disk 0's serving worker.
fn wait_for_worker(api: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = serving_worker_pid(api) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no worker for blk0 after 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exe_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| panic!("/proc/{pid}/exe: {e}"))
}

/// The point of a planned restart: replace the worker binary on disk, then restart. The
/// successor must run the new file, not the spare worker started from the old one; the
/// guest sees nothing.
#[test]
fn a_planned_restart_runs_the_replaced_worker_binary() {
    require_kvm();
    let dir = scratch_dir("restart-upgrade");
    let api = dir.join("api.sock");
    let bin = dir.join("bulkhead-worker");
    std::fs::copy(tests::worker_bin(), &bin).expect("copy the worker");
    let d0 = image(&dir, "d0.img");
    let child = chaos_command(&api, 5, &[&d0], Some(&bin))
        .spawn()
        .expect("start bulkhead");
    let old = wait_for_worker(&api);
    // Time for the spare to start from the old file.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(exe_of(old), bin.display().to_string());
    let new_file = dir.join("bulkhead-worker.new");
    std::fs::copy(tests::worker_bin(), &new_file).expect("copy the new worker");
    std::fs::rename(&new_file, &bin).expect("replace the worker binary");
    assert!(exe_of(old).ends_with(" (deleted)"), "{}", exe_of(old));
    let (out, body) = ctl_restart(&api);
    assert!(out.status.success(), "ctl restart: {body}");
    let reply: serde_json::Value = serde_json::from_str(&body).expect("a JSON reply");
    let new = reply["worker_pid"].as_i64().expect("worker_pid") as i32;
    assert_ne!(new, old);
    assert_eq!(
        exe_of(new),
        bin.display().to_string(),
        "the successor runs the replaced binary"
    );
    let out = child.wait_with_output().expect("wait for bulkhead");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.contains(" errors=0 ")),
        "{stdout}\n{stderr}"
    );
}

/// `bulkhead-bench restart` keeps working (its numbers belong in notes, not in a test):
/// a few kills, each followed by a completion the guest saw, reported as JSON.
#[test]
fn bench_restart_runs_and_reports() {
    require_kvm();
    let dir = scratch_dir("bench-restart");
    let out = Command::new(bench_bin())
        .args(["restart", "--kills", "5", "--kernel"])
        .arg(testguest())
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("run bulkhead-bench restart");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("| kill -> next completion | 5 | 0 |"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("restart.json")).unwrap()).unwrap();
    let samples = report["restarts"]["samples_ms"].as_array().unwrap();
    assert_eq!(samples.len(), 5, "{report}");
    assert!(
        samples.iter().all(|s| s.as_f64().unwrap() > 0.0),
        "{report}"
    );
    // Each kill was seen as a death (the last restart's own line may be cut off by the
    // VM's stop).
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("worker blk0 (pid") && l.contains("status 137"))
            .count(),
        5,
        "{stderr}"
    );
}
