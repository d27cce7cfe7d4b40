//! bulkhead's log: `--log-format json`, `--log-file`, `--log-level` and `BULKHEAD_LOG`. One
//! log for the VMM, its spawner and its workers, in one format, where every line about a
//! disk carries the disk's id.

use std::process::Command;
use std::time::Duration;

use tests::{require_kvm, run_bulkhead, run_with_deadline, scratch_dir, testguest, tg_lines};

/// A two-disk blk-verify run with `extra` arguments and environment.
fn two_disk_run(name: &str, extra: &[&str], env: &[(&str, &str)]) -> (tests::RunResult, String) {
    require_kvm();
    let dir = scratch_dir(name);
    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.args(["run", "--kernel"]).arg(testguest()).args([
        "--cmdline",
        "testguest.plan=blk-verify qd=8 blocks=64",
        "--mem",
        "64M",
        "--timeout",
        "60",
    ]);
    for disk in ["a", "b"] {
        let img = dir.join(format!("{disk}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        cmd.arg("--disk")
            .arg(format!("path={},engine=sync", img.display()));
    }
    let log = dir.join("bulkhead.log");
    cmd.arg("--log-file").arg(&log).args(extra);
    // Only what the test gives: the caller's BULKHEAD_LOG would change what is logged.
    cmd.env_remove("BULKHEAD_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let r = run_with_deadline(cmd, Duration::from_secs(90));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    (r, text)
}

/// JSON lines in the file, none on stderr: each parses; each that names a disk (the VMM's
/// lines, the worker's own re-emitted lines, the end-of-run counters) carries that disk's
/// span, and both disks' workers' own lines are there.
#[test]
fn json_lines_name_the_disk_of_every_line_about_one() {
    let (r, log) = two_disk_run("logs-json", &["--log-format", "json"], &[]);
    let t = format!("{}\n--- log ---\n{log}", r.transcript());
    assert_eq!(r.code, Some(0), "{t}");
    assert!(tg_lines(&r.stdout).iter().any(|l| l == "TG done"), "{t}");
    assert!(r.stderr.is_empty(), "every line goes to --log-file: {t}");
    let mut worker_lines = [0, 0];
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}: {t}"));
        let message = v["message"].as_str().unwrap_or_else(|| panic!("{line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        for (i, id) in ["blk0", "blk1"].into_iter().enumerate() {
            let mentions = message
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == id);
            if mentions {
                assert_eq!(v["span"]["name"], "disk", "{line}");
                assert_eq!(v["span"]["id"], id, "{line}");
            }
            if message.starts_with(&format!("worker {id}: bulkhead-worker: ")) {
                worker_lines[i] += 1;
            }
        }
    }
    assert!(
        worker_lines.iter().all(|n| *n >= 2),
        "{worker_lines:?}: {t}"
    );
    assert!(log.contains(r#""message":"stats blk1 "#), "{t}");
}

/// `--log-level warn` holds for the VMM and for its workers (which log at its level): a
/// clean run logs nothing at all.
#[test]
fn the_log_level_holds_for_the_vmm_and_its_workers() {
    let (r, log) = two_disk_run("logs-level", &["--log-level", "warn"], &[]);
    let t = format!("{}\n--- log ---\n{log}", r.transcript());
    assert_eq!(r.code, Some(0), "{t}");
    assert!(log.trim().is_empty(), "{t}");
    // The same through BULKHEAD_LOG, in text.
    let (r, log) = two_disk_run("logs-env", &[], &[("BULKHEAD_LOG", "warn")]);
    let t = format!("{}\n--- log ---\n{log}", r.transcript());
    assert_eq!(r.code, Some(0), "{t}");
    assert!(log.trim().is_empty(), "{t}");
    // And the default: info, text, the disk's span in front of its lines.
    let (r, log) = two_disk_run("logs-text", &[], &[]);
    let t = format!("{}\n--- log ---\n{log}", r.transcript());
    assert_eq!(r.code, Some(0), "{t}");
    assert!(
        log.lines()
            .any(|l| l.contains(" INFO disk{id=blk1}: worker blk1: bulkhead-worker: ")),
        "{t}"
    );
}

/// A level that is not one, `BULKHEAD_LOG=json` (which once hid every line), and a log
/// file that cannot be opened: one error line each, nothing run.
#[test]
fn bad_log_settings_are_refused_in_one_line() {
    let kernel = testguest();
    let k = kernel.to_str().unwrap();
    let r = run_bulkhead(
        &["run", "--kernel", k, "--log-level", "loud"],
        Duration::from_secs(30),
    );
    r.assert_one_error_line("bulkhead: error: --log-level \"loud\"", "is not a level");
    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.args(["run", "--kernel", k]).env("BULKHEAD_LOG", "json");
    let r = run_with_deadline(cmd, Duration::from_secs(30));
    r.assert_one_error_line(
        "bulkhead: error: BULKHEAD_LOG \"json\"",
        "JSON lines are --log-format json",
    );
    let dir = scratch_dir("logs-nofile");
    let bad = dir.join("no-such-dir/bulkhead.log");
    let r = run_bulkhead(
        &["run", "--kernel", k, "--log-file", bad.to_str().unwrap()],
        Duration::from_secs(30),
    );
    r.assert_one_error_line("bulkhead: error: cannot open --log-file", "no-such-dir");
    assert!(r.stdout.is_empty());
}
