//! Disks an NBD server serves (`--disk nbd=unix:PATH` or `nbd=HOST:PORT`): the VMM
//! connects and negotiates, the worker gets the connected socket and speaks the
//! transmission phase. Real servers from Debian's packages: qemu-nbd (a raw file, over a
//! Unix socket) and nbdkit's memory plugin (over TCP). A worker killed under load is
//! replaced by one with a new connection and the guest sees nothing (the chaos test in
//! restart_bulkhead.rs); a server that goes away gives the guest I/O errors and the log
//! a line that says why, never a hang.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{
    assert_bulkhead_refused, bulkhead_bin, check_blk_verify_image, nbdkit, nbdkit_memory, qemu_nbd,
    require_kvm, run_bulkhead, scratch_dir, testguest, tg_lines,
};

const SEED: u64 = 11;
const BLOCKS: u64 = 256;

fn image(path: &std::path::Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// blk-verify on two disks at once, one from each server (QD 8 with interrupts); the
/// qemu-nbd disk's file then holds what the guest wrote.
#[test]
fn blk_verify_through_qemu_nbd_and_nbdkit() {
    require_kvm();
    let dir = scratch_dir("nbd-verify");
    let file = dir.join("d0.img");
    image(&file, 64 << 20);
    let qnbd = qemu_nbd(&file, &dir.join("nbd.sock"), &[]);
    let kit = nbdkit_memory("64M");
    let kernel = testguest().display().to_string();
    let plan = format!("testguest.plan=blk-verify qd=8 completion=irq seed={SEED} blocks={BLOCKS}");
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            &kernel,
            "--mem",
            "64",
            "--timeout",
            "60",
            "--cmdline",
            &plan,
            "--disk",
            &qnbd.spec,
            "--disk",
            &kit.spec,
        ],
        Duration::from_secs(90),
    );
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    let lines = tg_lines(&r.stdout);
    for dev in 0..2 {
        let done = format!("TG blk dev={dev} wrote={BLOCKS} read={BLOCKS} verified={BLOCKS} flush=ok discard=ok write_zeroes=ok");
        assert!(lines.iter().any(|l| l.starts_with(&done)), "dev {dev}: {t}");
    }
    assert!(r.stderr.contains("served by worker pid"), "{t}");
    assert!(r.stderr.contains("(sandboxed, engine sync)"), "{t}");
    assert!(!r.stderr.contains("violated policy"), "{t}");
    drop(qnbd);
    check_blk_verify_image(&file, &r.stdout, 0, SEED, BLOCKS)
        .unwrap_or_else(|e| panic!("{e}: {t}"));
}

/// What cannot work is refused in one line before any guest runs: no server, a
/// read-only export given as writable, NBD with image-file keys.
#[test]
fn nbd_disks_that_cannot_work_are_refused_in_one_line() {
    require_kvm();
    let dir = scratch_dir("nbd-refused");
    let kernel = testguest().display().to_string();
    let run = |disk: &str| {
        vec![
            "run".to_string(),
            "--kernel".into(),
            kernel.clone(),
            "--mem".into(),
            "64".into(),
            "--disk".into(),
            disk.to_string(),
        ]
    };
    let refused = |disk: &str, says: &str| {
        let args = run(disk);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_bulkhead_refused(&args, says);
    };
    let missing = dir.join("nobody.sock");
    refused(&format!("nbd=unix:{}", missing.display()), "cannot connect");
    refused("nbd=127.0.0.1:0", "the port must be 1..=65535");
    refused(
        "nbd=unix:/x,format=qcow2",
        "format= applies to an image file",
    );
    refused("nbd=unix:/x,engine=io_uring", "served by the sync engine");
    refused("nbd=unix:/x,path=/y", "nbd= excludes path=");
    refused("path=/y,export=e", "export= needs nbd=");
    let file = dir.join("ro.img");
    image(&file, 1 << 20);
    let ro = qemu_nbd(&file, &dir.join("ro.sock"), &["--read-only"]);
    refused(&ro.spec, "the export is read-only; give readonly=on");
    // readonly=on over an export the server lets write: the worker's connection could.
    let rw_file = dir.join("rw.img");
    image(&rw_file, 1 << 20);
    let rw = qemu_nbd(&rw_file, &dir.join("rw.sock"), &[]);
    refused(
        &format!("{},readonly=on", rw.spec),
        "readonly=on needs an export the server itself serves read-only",
    );
    // One export as two disks.
    let args = vec![
        "run", "--kernel", &kernel, "--mem", "64", "--disk", &rw.spec, "--disk", &rw.spec,
    ];
    assert_bulkhead_refused(&args, "are the same NBD export");
    // A name the server does not export: its own words say so.
    let named = qemu_nbd(&file, &dir.join("named.sock"), &["--export-name=disk"]);
    refused(
        &format!("{},export=other", named.spec),
        "refused export \"other\"",
    );
}

/// bulkhead running blk-chaos for `secs` on the disk `spec` (with the API at `api`),
/// once the guest has started its rounds: the process, its stdout's further lines, and
/// the lines so far.
fn chaos_started(
    spec: &str,
    api: Option<&std::path::Path>,
    secs: u64,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    String,
) {
    let mut cmd = Command::new(bulkhead_bin());
    cmd.arg("run");
    if let Some(api) = api {
        cmd.arg("--api-socket").arg(api);
    }
    let mut child = cmd
        .arg("--kernel")
        .arg(testguest())
        .args(["--mem", "64", "--timeout", "60", "--cmdline"])
        .arg(format!(
            "testguest.plan=blk-chaos secs={secs} qd=8 completion=irq seed={SEED} blocks=64"
        ))
        .arg("--disk")
        .arg(spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulkhead");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the guest did not start its rounds: {out}");
        };
        out.push_str(&line);
        out.push('\n');
        if line.starts_with("TG chaos dev=0 num=") {
            return (child, rx, out);
        }
    }
}

/// The server goes away while the guest writes and reads: the worker says its connection
/// is lost and exits without completing the request; its successors cannot connect, so
/// the disk goes to fail mode (DEVICE_NEEDS_RESET, requests answered with IOERR), and the
/// guest's driver sees it well within a second, long before any timeout (the test guest
/// then fails its run).
#[test]
fn a_server_that_goes_away_gives_the_guest_errors_not_a_hang() {
    require_kvm();
    let dir = scratch_dir("nbd-gone");
    let file = dir.join("d0.img");
    image(&file, 64 << 20);
    let mut server = qemu_nbd(&file, &dir.join("nbd.sock"), &[]);
    let (mut child, rx, mut out) = chaos_started(&server.spec, None, 40);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    server.kill();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(25),
            "bulkhead still runs 25 s after the server went away: a hang"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let ended = killed.elapsed();
    let output = child.wait_with_output().unwrap();
    while let Ok(line) = rx.try_recv() {
        out.push_str(&line);
        out.push('\n');
    }
    let err = String::from_utf8_lossy(&output.stderr);
    let t = format!("{status:?} after {ended:?}\n{out}\n--- stderr ---\n{err}");
    // The test guest ends its run with status 1 on a failed request; bulkhead exits
    // with the guest's status.
    assert_eq!(status.code(), Some(1), "the guest's run fails: {t}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("TG fail") && (l.contains("status 1") || l.contains("reset"))),
        "the guest saw an I/O error (or the device's request for a reset): {t}"
    );
    assert!(err.contains("the NBD connection is lost"), "{t}");
    assert!(err.contains("cannot connect"), "{t}");
    assert!(err.contains("giving up"), "fail mode: {t}");
    assert!(ended < Duration::from_secs(10), "{t}");
}

/// Planned restarts of a worker on nbdkit over TCP: the spawner connects to the server
/// again for each successor (a bounded TCP connect, TCP_NODELAY, the negotiation; no
/// confined VMM thread may connect) and the guest's rounds see no error.
#[test]
fn a_restarted_worker_reconnects_over_tcp() {
    require_kvm();
    let dir = scratch_dir("nbd-tcp-restart");
    let kit = nbdkit_memory("64M");
    let api = dir.join("api.sock");
    let (child, rx, mut out) = chaos_started(&kit.spec, Some(&api), 4);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(500));
        let restart = Command::new(bulkhead_bin())
            .args(["ctl", "--api-socket"])
            .arg(&api)
            .args(["restart", "blk0"])
            .output()
            .unwrap();
        assert!(
            restart.status.success(),
            "{}",
            String::from_utf8_lossy(&restart.stderr)
        );
    }
    let output = child.wait_with_output().unwrap();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
        out.push_str(&line);
        out.push('\n');
    }
    let err = String::from_utf8_lossy(&output.stderr);
    let t = format!("{:?}\n{out}\n--- stderr ---\n{err}", output.status);
    assert!(output.status.success(), "{t}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("TG chaos dev=0 rounds=") && l.contains(" errors=0 ")),
        "{t}"
    );
    assert_eq!(
        err.matches("disk blk0: worker restarted in").count(),
        2,
        "{t}"
    );
    assert!(
        !err.contains("violated policy") && !err.contains("SIGSYS"),
        "{t}"
    );
}

/// A server that takes 1.5 s for each read (nbdkit's delay filter): the worker waits in a
/// socket read, neither idle nor in a disk's uninterruptible sleep, for longer than a
/// local disk's hang timeout; the supervisor waits for it (a disk over a network gets 20
/// s), so no worker is killed and the guest's requests all complete.
#[test]
fn a_slow_server_is_waited_for_not_taken_for_a_hang() {
    require_kvm();
    let slow = nbdkit(&["--filter=delay", "memory", "16M", "rdelay=1500ms"]);
    let kernel = testguest().display().to_string();
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            &kernel,
            "--mem",
            "64",
            "--timeout",
            "90",
            "--cmdline",
            "testguest.plan=blk-verify qd=1 completion=irq blocks=2",
            "--disk",
            &slow.spec,
        ],
        Duration::from_secs(120),
    );
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(
        tg_lines(&r.stdout)
            .iter()
            .any(|l| l.starts_with("TG blk dev=0 wrote=2 read=2 verified=2")),
        "{t}"
    );
    assert!(!r.stderr.contains("made no progress"), "{t}");
    assert!(!r.stderr.contains("worker restarted"), "{t}");
}
