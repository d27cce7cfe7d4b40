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

use tests::{blk_pattern, bulkhead_bin, require_kvm, scratch_dir, testguest};

const SECS: u64 = 60;
const BLOCKS: u64 = 64;
const SEED: u64 = 5;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The confined pid of the newest `blk0` worker, from the reapers' "serving blk0 as pid N"
/// lines.
fn newest_worker_pid(lines: &[String]) -> Option<i32> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.split("serving blk0 as pid ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
}

fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    p
}

#[test]
fn guest_sees_nothing_while_its_worker_is_killed_every_50_to_200_ms() {
    require_kvm();
    let dir = scratch_dir("restart-bulkhead");
    let d0 = image(&dir, "d0.img");
    let d1 = image(&dir, "d1.img");
    let mut child = Command::new(bulkhead_bin())
        .arg("run")
        .arg("--kernel")
        .arg(testguest())
        .args(["--mem", "64", "--timeout", &(SECS + 60).to_string(), "--cmdline"])
        .arg(format!(
            "testguest.plan=blk-chaos dev=0 secs={SECS} qd=32 completion=irq seed={SEED} blocks={BLOCKS}"
        ))
        .arg("--disk")
        .arg(format!("path={}", d0.display()))
        .arg("--disk")
        .arg(format!("path={}", d1.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulkhead");
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
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let mut kills = 0u32;
    let mut last_killed = 0;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(SECS + 90),
            "bulkhead did not finish"
        );
        std::thread::sleep(Duration::from_millis(50 + rng.next() % 151));
        let text = lines.lock().unwrap().clone();
        let running = text.iter().any(|l| l.starts_with("TG chaos dev=0 num="))
            && !text.iter().any(|l| l.contains(" rounds="));
        if let (true, Some(pid)) = (running, newest_worker_pid(&text)) {
            if pid != last_killed {
                // SAFETY: kill(2) on the pid the worker's reaper reported; ESRCH if it is
                // already gone, which is fine.
                if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                    kills += 1;
                    last_killed = pid;
                }
            }
        }
    };
    for r in readers {
        let _ = r.join();
    }
    let text = lines.lock().unwrap().join("\n");
    let t = format!("seed {seed:#x}, {kills} kills, {status:?}\n{text}");
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
    let bytes = std::fs::read(&d0).unwrap();
    for block in 0..BLOCKS {
        let at = (block * 4096) as usize;
        assert!(
            bytes[at..at + 4096] == blk_pattern(last_seed, block)[..],
            "host image block {block} does not hold round {last_seed}'s pattern: {summary}"
        );
    }
    let restarts = text.matches("disk blk0: worker restarted in").count();
    let resubmitted = text.matches("request(s) resubmitted").count();
    assert!(kills >= 100, "only {kills} kills in {SECS} s: {t}");
    assert!(
        restarts as u32 + 1 >= kills,
        "{restarts} restarts for {kills} kills: {t}"
    );
    assert!(
        resubmitted > 0,
        "no restart found a request in flight to resubmit ({restarts} restarts): {t}"
    );
    assert!(!text.contains("giving up"), "{t}");
    assert!(
        !text.contains("disk blk1: worker restarted"),
        "the other disk's worker was not touched: {t}"
    );
    eprintln!(
        "{summary}; {kills} kills, {restarts} restarts, {resubmitted} resubmitting (seed {seed:#x})"
    );
}
