//! The control API's socket: bound before anything of the VM starts, mode 0600, removed
//! when bulkhead exits; a socket in use, or a path that is not a socket, refuses the run
//! in one line and is left as it was.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{require_kvm, run_bulkhead, run_with_deadline, scratch_dir, testguest};

fn refused(socket: &std::path::Path, expected: &str) {
    let kernel = testguest();
    tests::assert_bulkhead_refused(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            socket.to_str().unwrap(),
        ],
        expected,
    );
}

/// A file, a directory and a symlink at the socket's path: refused, and each left exactly
/// as it was (an earlier bulkhead deleted whatever file it was given).
#[test]
fn a_path_that_is_not_a_socket_is_refused_and_left_alone() {
    require_kvm();
    let dir = scratch_dir("api-not-a-socket");
    let file = dir.join("file");
    std::fs::write(&file, "keep me").unwrap();
    refused(
        &file,
        "exists and is not a socket (bulkhead never removes it)",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let sub = dir.join("dir");
    std::fs::create_dir(&sub).unwrap();
    refused(&sub, "exists and is not a socket");
    assert!(sub.is_dir());
    let link = dir.join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    refused(&link, "exists and is not a socket");
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    // A directory the socket cannot be made in.
    refused(
        &dir.join("no-such-dir/api.sock"),
        "cannot listen on the API socket",
    );
}

/// A socket something answers on is refused before any vCPU runs, and stays; a stale one
/// (its listener gone) is replaced.
#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    require_kvm();
    let dir = scratch_dir("api-in-use");
    let path = dir.join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    refused(&path, "exists and something answers on it");
    assert!(path.symlink_metadata().unwrap().file_type().is_socket());
    drop(listener);
    let kernel = testguest();
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "testguest.plan=info",
            "--api-socket",
            path.to_str().unwrap(),
            "--timeout",
            "30",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{}", r.transcript());
}

/// While the VM runs the socket is 0600 and answers `bulkhead ctl`; once bulkhead has
/// exited it is gone.
#[test]
fn the_socket_is_private_while_the_vm_runs_and_gone_after() {
    require_kvm();
    let dir = scratch_dir("api-lifetime");
    let path = dir.join("api.sock");
    let img = dir.join("d0.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.args(["run", "--kernel"])
        .arg(testguest())
        .args([
            "--cmdline",
            "testguest.plan=blk-verify qd=8 blocks=64 hold_ms=4000",
            "--mem",
            "64M",
            "--timeout",
            "60",
            "--worker-bin",
        ])
        .arg(tests::worker_bin())
        .arg("--disk")
        .arg(format!("path={},spare=off", img.display()))
        .arg("--api-socket")
        .arg(&path);
    let watcher = {
        let path = path.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(meta) = path.symlink_metadata() {
                    let status = run_bulkhead(
                        &[
                            "ctl",
                            "--api-socket",
                            path.to_str().unwrap(),
                            "--json",
                            "status",
                            "blk0",
                        ],
                        Duration::from_secs(10),
                    );
                    return Some((meta.permissions().mode() & 0o777, status));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
    };
    let r = run_with_deadline(cmd, Duration::from_secs(90));
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    let (mode, status) = watcher
        .join()
        .unwrap()
        .unwrap_or_else(|| panic!("the socket never appeared: {t}"));
    assert_eq!(mode, 0o600, "{t}");
    assert_eq!(status.code, Some(0), "{}", status.transcript());
    assert!(
        status.stdout.contains("worker_pid"),
        "{}",
        status.transcript()
    );
    assert!(!path.exists(), "the socket outlived bulkhead: {t}");
}
