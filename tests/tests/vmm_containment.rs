//! What a compromised worker can do to the VMM through what it shares with it: its
//! output and its environment. A worker's stdout and stderr are a pipe the VMM reads and
//! re-emits line by line under the disk's name (escaped, cut, rate-limited); a worker
//! starts with an empty environment; and a VMM whose own stderr is gone keeps running.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{
    check_blk_verify_image, require_kvm, run_with_deadline, scratch_dir, testguest, tg_lines,
    worker_bin, worker_hooks_bin,
};

const SEED: u64 = 23;
const BLOCKS: u64 = 128;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("d0.img");
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    p
}

fn bulkhead(image: &std::path::Path, worker: &std::path::Path, hold_ms: u32) -> Command {
    let hold = if hold_ms > 0 {
        format!(" hold_ms={hold_ms}")
    } else {
        String::new()
    };
    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.args(["run", "--kernel"])
        .arg(testguest())
        .args([
            "--cmdline",
            &format!(
                "testguest.plan=blk-verify qd=8 completion=irq seed={SEED} blocks={BLOCKS}{hold}"
            ),
            "--mem",
            "64",
            "--timeout",
            "60",
            "--worker-bin",
        ])
        .arg(worker)
        .arg("--disk")
        .arg(format!("path={},spare=off", image.display()));
    cmd
}

/// The confined pid of the worker serving `blk0`, from its line in a bulkhead log.
fn serving_pid(log: &str) -> u32 {
    log.lines()
        .find_map(|l| l.split("serving blk0 as pid ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no worker pid in:\n{log}"))
}

/// The first number of field `key` (`PPid:`, `Uid:`, ...) in /proc/PID/status.
fn proc_status_field(pid: u32, key: &str) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// bulkhead with the hook-enabled worker, fault hook `hook` on blk0, the guest's
/// blk-verify run to its end: exit 0 and the image as the guest wrote it.
fn run_with_hook(name: &str, hook: &str) -> tests::RunResult {
    require_kvm();
    let dir = scratch_dir(name);
    let img = image(&dir);
    let mut cmd = bulkhead(&img, &worker_hooks_bin(), 0);
    cmd.env("BULKHEAD_WORKER_FAULT_HOOK", format!("blk0:{hook}"));
    let r = run_with_deadline(cmd, Duration::from_secs(120));
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(
        tg_lines(&r.stdout).iter().any(|l| l == "TG done"),
        "the guest did not finish: {t}"
    );
    check_blk_verify_image(&img, &r.stdout, 0, SEED, BLOCKS).unwrap_or_else(|e| panic!("{e}: {t}"));
    r
}

/// The hook writes a forged VMM line, terminal escapes, a 100,000-byte line and 5,000
/// more lines to its stderr, then serves on.
#[test]
fn a_worker_cannot_forge_vmm_log_lines_or_reach_the_terminal() {
    let r = run_with_hook("containment-forge", "forge-log");
    let t = r.transcript();
    // The hook ran (its first line came through, as the worker's).
    assert!(r.stderr.contains("worker blk0: FORGE-LOG start"), "{t}");
    assert!(
        !r.stderr.contains('\u{1b}'),
        "a raw ESC reached the VMM's log: {t}"
    );
    assert!(
        !r.stderr.contains('\r'),
        "a raw CR reached the VMM's log: {t}"
    );
    for line in r.stderr.lines() {
        if line.contains("(pid 1) ended with the VM") || line.contains("FORGED") {
            let (before, _) = line
                .split_once("2026-01-01T00:00:00Z")
                .or_else(|| line.split_once("\\x1b[2J"))
                .unwrap_or_else(|| panic!("a forged line lost its shape: {line}"));
            assert!(
                before.ends_with("worker blk0: "),
                "a worker's line not marked as the worker's: {line}"
            );
        }
        assert!(
            line.len() <= 1024,
            "a line of {} bytes: {}",
            line.len(),
            &line[..200]
        );
    }
    assert!(r.stderr.contains("more bytes cut]"), "{t}");
    let flood = r.stderr.matches("worker blk0: flood").count();
    assert!(
        (1..100).contains(&flood),
        "{flood} flood lines came through, not a bounded few"
    );
}

/// Nothing of the VMM's environment reaches a worker: read from /proc of the live
/// confined worker and its reaper, while the guest holds.
#[test]
fn a_worker_gets_none_of_the_vmms_environment() {
    require_kvm();
    let dir = scratch_dir("containment-env");
    let img = image(&dir);
    let mut cmd = bulkhead(&img, &worker_bin(), 3000);
    cmd.env("MY_CLOUD_TOKEN", "s3cret-token")
        .env("BULKHEAD_LOG", "info");
    let mut environs = Vec::new();
    let (status, text) = tests::run_until_hold(cmd, |_, log| {
        let pid = serving_pid(log);
        let reaper = proc_status_field(pid, "PPid:");
        for p in [pid, reaper] {
            let environ = std::fs::read(format!("/proc/{p}/environ")).unwrap();
            environs.push((p, String::from_utf8_lossy(&environ).replace('\0', " ")));
        }
    });
    assert!(status.success(), "{status:?}: {text}");
    assert_eq!(environs.len(), 2, "{text}");
    for (pid, environ) in &environs {
        assert!(
            !environ.contains("MY_CLOUD_TOKEN") && !environ.contains("s3cret"),
            "pid {pid} has the VMM's secret: {environ}"
        );
        // Only what a worker reads, by name.
        for var in environ.split_whitespace() {
            let name = var.split('=').next().unwrap();
            assert!(
                ["BULKHEAD_LOG", "BULKHEAD_WORKER_FAULT_HOOK"].contains(&name),
                "pid {pid} has {name}: {environ}"
            );
        }
    }
}

/// bulkhead's own stderr reader goes away before the guest even boots: the VM still runs
/// its disk I/O to the end, and bulkhead exits with the guest's status (it panicked, exit
/// 101, when a log line could not be written, and its workers, which shared that stderr,
/// died on their first log line).
#[test]
fn a_closed_stderr_ends_neither_the_vmm_nor_its_workers() {
    require_kvm();
    let dir = scratch_dir("containment-stderr");
    let img = image(&dir);
    let mut cmd = bulkhead(&img, &worker_bin(), 0);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let mut stdout = String::new();
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stdout}");
    assert!(stdout.contains("TG done"), "{stdout}");
    check_blk_verify_image(&img, &stdout, 0, SEED, BLOCKS).unwrap_or_else(|e| panic!("{e}"));
}

/// A worker writes pid 1 into its status page as its own. The VMM shows (in the API and
/// its log), watches and signals only a pid it checked is its worker's reaper's child.
#[test]
fn a_worker_cannot_name_another_process_as_itself() {
    require_kvm();
    let dir = scratch_dir("containment-pid");
    let img = image(&dir);
    let api = dir.join("api.sock");
    let mut cmd = bulkhead(&img, &worker_hooks_bin(), 3000);
    cmd.arg("--api-socket")
        .arg(&api)
        .env("BULKHEAD_WORKER_FAULT_HOOK", "blk0:forge-pid");
    let mut shown = None;
    let (status, log) = tests::run_until_hold(cmd, |_, _| {
        let (code, body) = vmm_core::api::request(&api, "GET", "/v1/disks/blk0").unwrap();
        assert_eq!(code, 200, "{body}");
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        shown = Some(state["worker_pid"].as_u64().unwrap_or(0) as u32);
    });
    assert!(status.success(), "{status:?}: {log}");
    let pid = shown.unwrap_or_else(|| panic!("the guest never held: {log}"));
    assert_ne!(pid, 1, "the API shows the pid the worker claimed: {log}");
    assert_ne!(pid, 0, "no worker shown: {log}");
    assert!(
        !log.contains("(pid 1)"),
        "the log names the pid the worker claimed: {log}"
    );
    // The log names the same, checked pid.
    let ended = log
        .lines()
        .find(|l| l.contains("worker blk0 (pid ") && l.contains("ended with the VM"))
        .unwrap_or_else(|| panic!("no end line: {log}"));
    assert!(ended.contains(&format!("(pid {pid})")), "{ended}");
}

/// A worker writes a violation record (execve of 0x41414141...) into its status page and
/// exits with the status a trap's end has. The VMM logs that as the worker's claim and
/// counts no violation: only a worker the kernel killed by SIGSYS made one.
#[test]
fn a_forged_violation_record_is_a_claim_not_a_violation() {
    require_kvm();
    let dir = scratch_dir("containment-violation");
    let img = image(&dir);
    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.args(["run", "--kernel"])
        .arg(testguest())
        .args([
            "--cmdline",
            "testguest.plan=info hold_ms=1000",
            "--mem",
            "64",
            "--timeout",
            "30",
            "--worker-bin",
        ])
        .arg(worker_hooks_bin())
        .arg("--disk")
        .arg(format!("path={},spare=off", img.display()))
        .env("BULKHEAD_WORKER_FAULT_HOOK", "blk0:forge-violation");
    let r = run_with_deadline(cmd, Duration::from_secs(60));
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(r.stderr.contains("the worker's claim, not counted"), "{t}");
    assert!(!r.stderr.contains("violated policy"), "{t}");
    assert!(r.stderr.contains("stats violations total=0"), "{t}");
}

/// A worker maps 2 GiB with MAP_POPULATE (it once took 2 GB of the host's memory that
/// way): its address-space limit (twice its 64 MiB of guest RAM plus a margin) refuses
/// it, and it serves on.
#[test]
fn a_worker_cannot_take_the_hosts_memory() {
    let r = run_with_hook("containment-memory", "mmap-populate");
    let t = r.transcript();
    assert!(
        r.stderr.contains("worker blk0: MMAP-POPULATE refused"),
        "the mapping was not refused: {t}"
    );
}

/// The uid (and gid) of the confined worker serving `blk0` in a bulkhead log.
fn worker_uid(log: &str) -> (u32, u32) {
    let pid = serving_pid(log);
    (
        proc_status_field(pid, "Uid:"),
        proc_status_field(pid, "Gid:"),
    )
}

/// With `--worker-uids`, each running VM leases a uid of its own for its workers (they
/// cannot signal or read each other across VMs), and a VM finding none free is refused
/// before it runs.
#[test]
fn each_vm_runs_its_workers_as_a_uid_of_its_own() {
    require_kvm();
    let dir = scratch_dir("containment-uids");
    // A range no other test uses.
    let range = "231000-231001";
    let spawn_vm = |name: &str| {
        let img = dir.join(format!("{name}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let mut cmd = bulkhead(&img, &worker_bin(), 4000);
        cmd.args(["--worker-uids", range]);
        cmd
    };
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let first = spawn_vm("a");
    let a = std::thread::spawn(move || {
        tests::run_until_hold(first, |_, log| first_tx.send(worker_uid(log)).unwrap())
    });
    let uid_a = first_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let (status_b, log_b) = tests::run_until_hold(spawn_vm("b"), |_, log| {
        let uid_b = worker_uid(log);
        assert_ne!(uid_a, uid_b, "two running VMs share a worker uid");
        for (uid, gid) in [uid_a, uid_b] {
            assert!((231_000..=231_001).contains(&uid), "{uid}");
            assert_eq!(uid, gid);
        }
        // Both uids are leased now: a third VM is refused before any vCPU runs.
        let img = dir.join("c.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let mut third = bulkhead(&img, &worker_bin(), 0);
        third.args(["--worker-uids", range]);
        let r = run_with_deadline(third, Duration::from_secs(30));
        r.assert_one_error_line("bulkhead: error: ", "no free worker uid in 231000-231001");
    });
    assert!(status_b.success(), "{log_b}");
    let (status_a, log_a) = a.join().unwrap();
    assert!(status_a.success(), "{log_a}");
}

/// Whether this host's cgroup v2 hierarchy (the first cgroup2 mount) offers the memory and
/// pids controllers: read the way an operator would, to know which outcome to expect.
fn host_cgroup2_with_memory_and_pids() -> (bool, String) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let Some(mount) = info.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        (after.split(' ').next()? == "cgroup2")
            .then(|| before.split(' ').nth(4).map(String::from))?
    }) else {
        return (false, "no cgroup2 mount".into());
    };
    let offered =
        std::fs::read_to_string(format!("{mount}/cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| offered.split_whitespace().any(|o| o == c);
    (
        has("memory") && has("pids"),
        format!("{mount} offers {offered:?}"),
    )
}

/// `--worker-cgroups` on this host, whichever kind it is: where the cgroup v2 hierarchy has
/// memory and pids, `required` runs the VM with its worker in a leaf; where it has not
/// (this development host is hybrid: v1 holds both), `required` is refused with one line
/// before any vCPU runs, `auto` runs the VM and says in one line why it has no cgroups,
/// and `off` says nothing of the sort. (The L1 of tests/tests/linux_nested.rs is the host
/// with cgroups for certain.)
#[test]
fn worker_cgroups_are_used_where_the_host_has_them_and_required_means_it() {
    require_kvm();
    let (usable, why) = host_cgroup2_with_memory_and_pids();
    let dir = scratch_dir("containment-cgroups");
    let img = image(&dir);
    let run = |mode: &str| {
        let mut cmd = bulkhead(&img, &worker_bin(), 0);
        cmd.args(["--worker-cgroups", mode]);
        run_with_deadline(cmd, Duration::from_secs(60))
    };
    let required = run("required");
    if usable {
        let t = required.transcript();
        assert_eq!(required.code, Some(0), "{why}: {t}");
        assert!(
            required.stderr.contains("workers run in cgroups under "),
            "{t}"
        );
    } else {
        required
            .assert_one_error_line("bulkhead: error: --worker-cgroups required: ", "controller");
        assert!(!required.stdout.contains("TG "), "the guest ran: {why}");
    }
    let auto = run("auto");
    let t = auto.transcript();
    assert_eq!(auto.code, Some(0), "{t}");
    let line = if usable {
        "workers run in cgroups under "
    } else {
        "workers run without cgroups of their own (RLIMIT_AS and seccomp still hold): "
    };
    assert_eq!(auto.stderr.matches(line).count(), 1, "{why}: {t}");
    let off = run("off");
    let t = off.transcript();
    assert_eq!(off.code, Some(0), "{t}");
    assert!(off.stderr.contains("--worker-cgroups off"), "{t}");
    assert!(!off.stderr.contains("workers run in cgroups"), "{t}");
}
