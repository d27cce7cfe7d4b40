//! The standalone worker's own checks and its seccomp trap, without a guest: bad
//! configuration is one clear error line; a confined worker that issues a forbidden
//! syscall dies by its real filter and says which call it was.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{run_with_deadline, scratch_dir, worker_bin, worker_hooks_bin, RunResult};

/// Exit status of a worker killed by its seccomp policy (ipc::status::EXIT_POLICY_VIOLATION).
const EXIT_POLICY_VIOLATION: i32 = 159;

fn worker(bin: &Path, args: &[&str]) -> RunResult {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    run_with_deadline(cmd, Duration::from_secs(30))
}

fn assert_refused(args: &[&str], expected: &str) {
    worker(&worker_bin(), args).assert_one_error_line("bulkhead-worker: error: ", expected);
}

fn image(dir: &Path, name: &str, len: u64) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p.display().to_string()
}

#[test]
fn missing_image() {
    let dir = scratch_dir("wcli-missing");
    let sock = dir.join("s.sock");
    assert_refused(
        &[
            "blk",
            "--socket",
            sock.to_str().unwrap(),
            "--disk",
            "/nonexistent/disk.img",
        ],
        "cannot open disk image /nonexistent/disk.img",
    );
}

#[test]
fn image_that_is_a_directory() {
    let dir = scratch_dir("wcli-dir");
    let sock = dir.join("s.sock");
    assert_refused(
        &[
            "blk",
            "--socket",
            sock.to_str().unwrap(),
            "--disk",
            dir.to_str().unwrap(),
        ],
        "Is a directory",
    );
}

#[test]
fn image_size_not_a_multiple_of_512() {
    let dir = scratch_dir("wcli-size");
    let sock = dir.join("s.sock");
    let img = image(&dir, "odd.img", 1000);
    assert_refused(
        &["blk", "--socket", sock.to_str().unwrap(), "--disk", &img],
        "1000 bytes, not a multiple of 512",
    );
}

#[test]
fn socket_path_with_a_live_listener() {
    let dir = scratch_dir("wcli-live");
    let img = image(&dir, "d.img", 1 << 20);
    let sock = dir.join("s.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    assert_refused(
        &["blk", "--socket", sock.to_str().unwrap(), "--disk", &img],
        "something is listening there",
    );
}

#[test]
fn serial_longer_than_20_bytes() {
    let dir = scratch_dir("wcli-serial");
    let img = image(&dir, "d.img", 1 << 20);
    let sock = dir.join("s.sock");
    assert_refused(
        &[
            "blk",
            "--socket",
            sock.to_str().unwrap(),
            "--disk",
            &img,
            "--serial",
            "x".repeat(21).as_str(),
        ],
        "longer than virtio-blk's 20",
    );
}

/// A stale socket file nobody listens on (a dead worker's) is taken over.
#[test]
fn stale_socket_is_reused() {
    let dir = scratch_dir("wcli-stale");
    let img = image(&dir, "d.img", 1 << 20);
    let sock = dir.join("s.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut child = Command::new(worker_bin())
        .args(["blk", "--socket", sock.to_str().unwrap(), "--disk", &img])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "worker never listened on the stale path"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The release worker has no fault hooks and no sandbox-off switch.
#[test]
fn release_worker_has_no_test_switches() {
    let r = worker(&worker_bin(), &["blk", "--help"]);
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(r.stdout.contains("--socket"), "{t}");
    for switch in ["--fault-hook", "--no-sandbox"] {
        assert!(
            !r.stdout.contains(switch),
            "release worker offers {switch}: {t}"
        );
    }
    let r = worker(
        &worker_bin(),
        &["blk", "--socket", "/x", "--disk", "/y", "--no-sandbox"],
    );
    assert_ne!(r.code, Some(0), "{}", r.transcript());
    // The hook-enabled build does have them (so the check above can fail).
    let r = worker(&worker_hooks_bin(), &["blk", "--help"]);
    assert!(r.stdout.contains("--fault-hook"), "{}", r.transcript());
}

/// A confined worker that issues a raw openat dies by its real filter: the dedicated exit
/// status, the status page records syscall 257 with its arguments, and the log names it.
#[test]
fn confined_worker_dies_on_openat() {
    let dir = scratch_dir("wcli-openat");
    let img = image(&dir, "d.img", 1 << 20);
    let sock = dir.join("s.sock");
    let mut cmd = Command::new(worker_hooks_bin());
    cmd.args([
        "blk",
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        &img,
        "--fault-hook",
        "openat",
        "--print-status",
    ]);
    let sock2 = sock.clone();
    // Connect as the frontend once the worker listens: it sandboxes after accepting.
    let connector = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(&sock2) {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let r = run_with_deadline(cmd, Duration::from_secs(30));
    let _conn = connector.join().unwrap();
    let t = r.transcript();
    assert_eq!(r.code, Some(EXIT_POLICY_VIOLATION), "{t}");
    assert!(
        r.stderr
            .contains("violated policy blk: openat(AT_FDCWD, 0x"),
        "the log must name the call: {t}"
    );
    assert!(
        r.stderr.contains("O_RDONLY|O_CLOEXEC"),
        "decoded flags: {t}"
    );
    assert!(
        r.stderr.contains("violation nr=257 "),
        "status page record: {t}"
    );
}

/// True when no process holds any of QEMU's lock bytes on `image` (what bulkhead and QEMU
/// take for a disk): an OFD lock probe from a descriptor that holds none.
fn image_unlocked(image: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(image).unwrap();
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 100,
        l_len: 104,
        l_pid: 0,
    };
    // SAFETY: fcntl on a descriptor this test owns, into a live flock.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    assert_eq!(ret, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    probe.l_type == libc::F_UNLCK as libc::c_short
}

/// A standalone worker serving a connected frontend: (worker, confined pid, image, frontend
/// connection).
fn serving_worker(name: &str) -> (tests::worker::Worker, u32, std::path::PathBuf, UnixStream) {
    let dir = scratch_dir(name);
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.join("s.sock");
    let mut w = tests::worker::Worker::start(&worker_bin(), &sock, &img, &[]);
    let conn = UnixStream::connect(&sock).unwrap();
    let confined = w.sandboxed_pid();
    assert!(!image_unlocked(&img), "the serving worker holds its image");
    (w, confined, img, conn)
}

/// Whether `pid` is gone (or a zombie: it holds nothing any more).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits up to `limit` for `what` to hold; the time it took.
fn within(limit: Duration, mut what: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    loop {
        if what() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Killing the pid that was started (the reaper), by any signal that ends it, ends the
/// confined worker too and frees the image; SIGTERM, SIGINT and SIGHUP to the confined
/// worker itself (pid 1 of its pid namespace, which ignores signals it has no handler
/// for) end it as well.
#[test]
fn the_started_pid_and_stop_signals_end_the_worker() {
    for (target, sig) in [
        ("started", libc::SIGKILL),
        ("started", libc::SIGTERM),
        ("started", libc::SIGINT),
        ("confined", libc::SIGTERM),
        ("confined", libc::SIGINT),
        ("confined", libc::SIGHUP),
    ] {
        let (w, confined, img, _conn) = serving_worker(&format!("wcli-signal-{target}-{sig}"));
        let pid = if target == "started" {
            w.child.id()
        } else {
            confined
        };
        // SAFETY: kill(2) of a process this test started (or its confined child).
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
        let freed = within(Duration::from_secs(2), || image_unlocked(&img));
        let (code, text) = w.finish(Duration::from_secs(10));
        let gone = within(Duration::from_secs(2), || ended(confined));
        assert!(
            gone.is_some(),
            "{target} pid, signal {sig}: the confined worker {confined} still runs:\n{text}"
        );
        let freed = freed.unwrap_or_else(|| {
            panic!("{target} pid, signal {sig}: the image stays locked:\n{text}")
        });
        eprintln!("{target} pid, signal {sig}: exit {code:?}, image free {freed:?} after the kill");
        if target == "confined" {
            assert_eq!(
                code,
                Some(128 + sig),
                "the reaper reports the worker's end:\n{text}"
            );
        }
    }
}
