//! Image locks that QEMU honours, both ways, checked with the real programs: qemu-io and
//! qemu-storage-daemon cannot write an image bulkhead serves read-write; bulkhead and its standalone worker refuse, in one line, an image QEMU holds
//! for writing; readonly users on both sides share.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tests::{
    require_kvm, require_tool, run_bulkhead, run_with_deadline, scratch_dir, testguest, worker_bin,
    RunResult,
};

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

fn qemu_io() -> PathBuf {
    require_tool("qemu-io", "qemu-utils")
}

/// One qemu-io command on `img` (`-r`: read-only); its output, and whether it worked.
fn qemu_io_once(img: &Path, readonly: bool, command: &str) -> (bool, String) {
    let mut cmd = Command::new(qemu_io());
    cmd.args(["-f", "raw", "-c", command]);
    if readonly {
        cmd.arg("-r");
    }
    cmd.arg(img);
    let r = run_with_deadline(cmd, Duration::from_secs(30));
    // qemu-io exits 0 even when a command fails; it cannot open a locked image at all.
    let ok = r.code == Some(0) && !r.stderr.contains("Failed to get");
    (ok, r.transcript())
}

/// qemu-io holding `img` open (read-write, or `-r`) until dropped: it reads commands from
/// a pipe, and has answered one read when this returns.
struct QemuIoHolder {
    child: Child,
    _stdin: ChildStdin,
}

impl QemuIoHolder {
    fn start(img: &Path, readonly: bool) -> Self {
        let mut cmd = Command::new(qemu_io());
        cmd.args(["-f", "raw"]);
        if readonly {
            cmd.arg("-r");
        }
        let mut child = cmd
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        stdin.flush().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(
                n > 0 && Instant::now() < deadline,
                "qemu-io never answered its read of {}",
                img.display()
            );
            if line.contains("read 512/512 bytes") {
                break;
            }
        }
        // Keep its stdout drained, so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        QemuIoHolder {
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A standalone worker serving `img` (it opens and locks the image at once, then waits
/// for its frontend); killed when dropped.
struct Worker {
    child: Child,
}

impl Worker {
    fn start(dir: &Path, img: &Path, readonly: bool) -> Self {
        let sock = dir.join(format!("w-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(worker_bin());
        cmd.args(["blk", "--socket"])
            .arg(&sock)
            .arg("--disk")
            .arg(img);
        if readonly {
            cmd.arg("--readonly");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // "listening on" comes after the image is open and locked; until a frontend
        // connects, the worker waits with its locks held.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = err.read_line(&mut line).unwrap();
            assert!(n > 0, "the worker ended before it listened");
            if line.contains("listening on") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Worker { child }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker_refused(dir: &Path, img: &Path, readonly: bool) -> RunResult {
    let mut cmd = Command::new(worker_bin());
    cmd.args(["blk", "--socket"])
        .arg(dir.join("refused.sock"))
        .arg("--disk")
        .arg(img);
    if readonly {
        cmd.arg("--readonly");
    }
    run_with_deadline(cmd, Duration::from_secs(30))
}

#[test]
fn qemu_cannot_write_an_image_bulkhead_writes() {
    let dir = scratch_dir("locks-ours-rw");
    let img = image(&dir, "d.img");
    let worker = Worker::start(&dir, &img, false);
    let (ok, out) = qemu_io_once(&img, false, "write 0 4k");
    assert!(!ok, "qemu-io wrote into an image bulkhead serves: {out}");
    assert!(out.contains("Failed to get \"write\" lock"), "{out}");
    // qemu-storage-daemon exporting it writable.
    let mut qsd = Command::new(require_tool("qemu-storage-daemon", "qemu-system-x86"));
    qsd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
            dir.join("qsd.sock").display()
        ))
        .stdin(Stdio::null());
    let r = run_with_deadline(qsd, Duration::from_secs(30));
    assert_ne!(r.code, Some(0), "{}", r.transcript());
    assert!(
        r.stderr.contains("Failed to get \"write\" lock"),
        "{}",
        r.transcript()
    );
    drop(worker);
    // Once the worker is gone, so are its locks.
    let (ok, out) = qemu_io_once(&img, false, "write 0 4k");
    assert!(ok, "{out}");
}

#[test]
fn bulkhead_refuses_an_image_qemu_writes() {
    let dir = scratch_dir("locks-theirs-rw");
    let img = image(&dir, "d.img");
    let holder = QemuIoHolder::start(&img, false);
    for readonly in [false, true] {
        worker_refused(&dir, &img, readonly).assert_one_error_line(
            "bulkhead-worker: error: ",
            &format!("disk image {} is in use by another process", img.display()),
        );
    }
    require_kvm();
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            testguest().to_str().unwrap(),
            "--disk",
            &format!("path={}", img.display()),
        ],
        Duration::from_secs(30),
    );
    assert!(r.stdout.is_empty(), "no guest may run: {}", r.transcript());
    r.assert_one_error_line(
        "bulkhead: error: ",
        &format!("disk image {} is in use by another process", img.display()),
    );
    drop(holder);
    let worker = Worker::start(&dir, &img, false);
    drop(worker);
}

#[test]
fn readonly_users_share_both_ways() {
    let dir = scratch_dir("locks-readonly");
    let img = image(&dir, "d.img");
    let worker = Worker::start(&dir, &img, true);
    let (ok, out) = qemu_io_once(&img, true, "read 0 4k");
    assert!(ok, "qemu-io -r beside a readonly bulkhead disk: {out}");
    let (ok, out) = qemu_io_once(&img, false, "write 0 4k");
    assert!(!ok, "qemu-io wrote under a readonly bulkhead disk: {out}");
    drop(worker);

    let holder = QemuIoHolder::start(&img, true);
    let both = Worker::start(&dir, &img, true);
    let r = worker_refused(&dir, &img, false);
    r.assert_one_error_line("bulkhead-worker: error: ", "is in use by another process");
    drop((both, holder));
}
