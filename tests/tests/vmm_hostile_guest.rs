//! A guest that breaks the virtio rules on purpose, for 30 s each way, cannot make bulkhead
//! kill its healthy worker, flood the log, or stop serving the disk: rings outside guest
//! RAM and a QueueNum of 3 are answered with DEVICE_NEEDS_RESET by the transport (no
//! worker sees them); a request published without a kick (also after a kick for a queue
//! never set up) is the driver's to announce, not a hung worker; a corrupt avail index is
//! answered with DEVICE_NEEDS_RESET; a reset/re-init loop costs nothing. After each, the
//! same worker serves a proper read.

use std::path::Path;
use std::time::Duration;

use tests::{require_kvm, run_with_deadline, scratch_dir, testguest, tg_lines};

/// Log lines a 30 s abuse run may print at most: about 15 for any run (the worker's
/// start and sandbox, the VM's statistics), and the rate-limited guest errors (5 per 10 s
/// window and the count of the rest).
const MAX_LOG_LINES: usize = 60;

fn abuse(mode: &str) {
    abuse_with(mode, "")
}

fn abuse_with(mode: &str, disk_options: &str) {
    require_kvm();
    let dir = scratch_dir(&format!("vmm-abuse-{mode}"));
    let image = dir.join("d0.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut cmd = std::process::Command::new(tests::bulkhead_bin());
    cmd.arg("run")
        .arg("--kernel")
        .arg(testguest())
        .args([
            "--cmdline",
            &format!("testguest.plan=blk-abuse mode={mode} secs=30 dev=0"),
        ])
        .args(["--mem", "64", "--timeout", "120", "--disk"])
        .arg(format!(
            "path={}{disk_options}",
            Path::new(&image).display()
        ));
    let r = run_with_deadline(cmd, Duration::from_secs(150));
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    let lines = tg_lines(&r.stdout);
    let result = lines
        .iter()
        .find(|l| l.starts_with("TG abuse dev=0"))
        .unwrap_or_else(|| panic!("no result line: {t}"));
    assert!(result.ends_with("then_ok=1"), "{result}: {t}");
    if ["badring", "num3", "badidx"].contains(&mode) {
        let field = |k: &str| -> u64 {
            result
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {result}"))
        };
        assert!(field("rounds=") >= 10, "{result}");
        assert_eq!(
            field("rounds="),
            field("refused="),
            "every bad ring is answered with DEVICE_NEEDS_RESET: {result}"
        );
    }
    // One worker, the whole time.
    assert_eq!(r.stderr.matches("served by worker pid").count(), 1, "{t}");
    for sign in [
        "restarted",
        "killed",
        "hung",
        "violated",
        "crashed",
        "ended before",
    ] {
        assert!(!r.stderr.contains(sign), "{sign:?}: {t}");
    }
    let log_lines = r.stderr.lines().count();
    assert!(
        log_lines <= MAX_LOG_LINES,
        "{log_lines} log lines, more than {MAX_LOG_LINES}: {t}"
    );
    eprintln!("{mode}: {result}; {log_lines} log lines");
}

#[test]
fn rings_outside_guest_ram() {
    abuse("badring");
}

#[test]
fn a_queue_size_that_is_not_a_power_of_two() {
    abuse("num3");
}

#[test]
fn requests_published_without_a_kick() {
    abuse("nokick");
}

/// A QueueNotify for a queue the driver never set up leaves a kick no worker reads; with
/// a request then published without a kick, that is still no hung worker.
#[test]
fn a_stray_kick_for_a_queue_never_set_up() {
    abuse_with("strayq", ",num_queues=2");
}

/// An avail index a ring's worth ahead: the worker stops serving the ring and the device
/// says it needs a reset, every time, without a worker death.
#[test]
fn a_corrupt_avail_index() {
    abuse("badidx");
}

#[test]
fn a_reset_and_reinit_loop() {
    abuse("reinit");
}
