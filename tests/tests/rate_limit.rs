//! Per-disk I/O limits under bulkhead: token buckets in the disk's worker, set with
//! `--disk ...,iops=N` / `bw=B`, changed while the VM runs through `bulkhead ctl limit`
//! (the API's `PATCH /v1/disks/{id}`), and kept across worker restarts. The test guest's
//! blk-bench drives the disk at QD 32; its request count must stay within what the
//! buckets allow (a bound that holds however busy the host is), and reach well past what
//! an older, lower limit would allow where that is the point.
//!
//! Rates here are checked as bounds, not goals: that a limit of N holds within 5% over
//! 10 s is `bulkhead-bench`'s to measure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{bulkhead_bin, ctl, require_kvm, run_bulkhead, scratch_dir, testguest, tg_lines};

const SECS: u64 = 3;

/// `(ios, iops)` of the guest's `TG bench` line.
fn bench_result(stdout: &str, t: &str) -> (u64, f64) {
    let line = tg_lines(stdout)
        .into_iter()
        .find(|l| l.starts_with("TG bench "))
        .unwrap_or_else(|| panic!("no TG bench line: {t}"));
    let field = |key: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            .to_string()
    };
    (
        field("ios=").parse().unwrap(),
        field("iops=").parse().unwrap(),
    )
}

fn plan(secs: u64) -> String {
    format!("testguest.plan=blk-bench rw=randread qd=32 completion=poll secs={secs}")
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("d0.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    p
}

/// blk-bench for [`SECS`] on one disk with `limits` appended to its `--disk`.
fn bench(image: &Path, limits: &str) -> (u64, f64, String) {
    require_kvm();
    let kernel = testguest().display().to_string();
    let disk = format!("path={}{limits}", image.display());
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
            &plan(SECS),
            "--disk",
            &disk,
        ],
        Duration::from_secs(90),
    );
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(!r.stderr.contains("violated policy"), "{t}");
    let (ios, iops) = bench_result(&r.stdout, &t);
    (ios, iops, t)
}

/// The most requests a bucket of `rate` a second (a tenth of a second's worth, the
/// default) lets through in `secs`: the rate, the full bucket at the start, and one
/// request of debt.
fn most(rate: u64, secs: f64) -> u64 {
    (rate as f64 * secs) as u64 + rate / 10 + 1
}

/// An IOPS limit and a bandwidth limit each hold the guest to their rate; without one the
/// same load runs far faster (so the limits are what held it).
#[test]
fn an_iops_limit_and_a_bandwidth_limit_hold_the_guest_to_their_rate() {
    let dir = scratch_dir("rate-limit-hold");
    let d0 = image(&dir);
    let (_, free, t) = bench(&d0, "");
    assert!(
        free > 3000.0,
        "the unlimited disk must outrun the limits below: {t}"
    );
    // The guest's time starts with its first request, a little after the worker's
    // buckets were filled: allow 10 % for that and the last completions.
    let secs = SECS as f64 * 1.1;
    let (ios, iops, t) = bench(&d0, ",iops=800");
    assert!(ios <= most(800, secs), "{ios} requests at iops=800: {t}");
    assert!(iops >= 800.0 * 0.8, "{iops} IOPS at iops=800: {t}");
    // 3.2 MB/s of 4 KiB reads is 800 a second too.
    let (ios, iops, t) = bench(&d0, ",bw=3276800");
    assert!(ios <= most(800, secs), "{ios} requests at bw=3276800: {t}");
    assert!(iops >= 800.0 * 0.8, "{iops} IOPS at bw=3276800: {t}");
    // Both: the lower one holds.
    let (ios, _, t) = bench(&d0, ",bw=3276800,iops=400");
    assert!(ios <= most(400, secs), "{ios} requests at iops=400: {t}");
}

/// The confined pid of disk blk0's worker, from the API.
fn worker_pid(api: &Path) -> Option<i32> {
    let (code, body) = vmm_core::api::request(api, "GET", "/v1/disks/blk0").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (code == 200)
        .then(|| v["worker_pid"].as_i64())?
        .map(|p| p as i32)
}

/// A limit raised through `bulkhead ctl limit` is in force at once and stays through a
/// planned restart and a SIGKILL of the worker: the guest gets well past what the
/// configured limit would have let through, and never past the raised one. Bad specs are
/// refused in one line, and the disk's status shows the limit in force.
#[test]
fn a_limit_changed_at_run_time_holds_and_survives_restarts() {
    require_kvm();
    let dir = scratch_dir("rate-limit-change");
    let d0 = image(&dir);
    let api = dir.join("api.sock");
    let secs = 6;
    let child = Command::new(bulkhead_bin())
        .arg("run")
        .arg("--api-socket")
        .arg(&api)
        .arg("--kernel")
        .arg(testguest())
        .args(["--mem", "64", "--timeout", "60", "--cmdline", &plan(secs)])
        .arg("--disk")
        .arg(format!("path={},iops=300", d0.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulkhead");
    let started = Instant::now();
    while worker_pid(&api).is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "no API");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    for (bad, says) in [
        ("iops=0", "iops=0 must be"),
        ("speed=9", "unknown field"),
        ("iops=off,iops=5", "iops=off and iops= values together"),
        ("", "name a limit"),
    ] {
        let (ok, text) = ctl(&api, &["limit", "blk0", bad]);
        assert!(!ok && text.contains(says), "limit {bad:?}: {text}");
        assert_eq!(text.lines().count(), 1, "one line: {text}");
    }
    let (ok, text) = ctl(&api, &["limit", "blk0", "iops=600"]);
    assert!(ok, "{text}");
    assert_eq!(
        text,
        "blk0: rate limit now 600 requests/s, unlimited bytes\n"
    );
    let (ok, text) = ctl(&api, &["restart", "blk0"]);
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(800));
    let pid = worker_pid(&api).expect("a worker after the restart");
    // SAFETY: kill(2) of the worker pid the VMM reported.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, text) = ctl(&api, &["status", "blk0"]);
    assert!(
        ok && text.contains("rate limit: 600 requests/s, unlimited bytes"),
        "{text}"
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let t = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{t}");
    let (ios, _) = bench_result(&stdout, &t);
    let secs = secs as f64;
    assert!(
        ios > most(300, secs),
        "{ios} requests: no more than the configured 300 a second allow, so the raised \
         limit did not last: {t}"
    );
    assert!(
        ios <= most(600, secs * 1.1),
        "{ios} requests: more than 600 a second allow: {t}"
    );
    assert!(t.contains("disk blk0: worker restarted in"), "{t}");
}
