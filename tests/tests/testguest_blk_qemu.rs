//! The test guest's virtio-blk driver under QEMU microvm with KVM: first against QEMU's
//! own virtio-blk-device (the reference that validates the driver), then against our
//! standalone `bulkhead-worker blk` through QEMU's vhost-user-blk (virtio-mmio), with
//! the `hostile` plan's malformed chains. The host image is checked afterwards against
//! the guest's pattern, recomputed here.
//!
//! Build the guest first with `tests/guest/build-testguest.sh` and the worker with
//! `cargo build -p device-workers`. Missing QEMU, KVM, guest or worker fails these
//! tests; they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::qemu;
use tests::worker::Worker;
use tests::{
    require_kvm, require_tool, run_with_deadline, scratch_dir, testguest, tg_lines, worker_bin,
    RunResult,
};

/// A whole run takes well under a second here; anything near this means a hang.
const DEADLINE: Duration = Duration::from_secs(60);
/// QEMU's isa-debug-exit turns the guest's status 0 into exit code 1.
const QEMU_STATUS_GUEST_OK: i32 = 1;
const DISK_SIZE: u64 = 8 << 20;
const BLOCK: usize = 4096;
/// The disk's 4 KiB blocks (the guest covers the whole disk when asked for more).
const DISK_BLOCKS: u64 = DISK_SIZE / BLOCK as u64;
const SERIAL: &str = "tg-blk-serial";

/// Block `block` of the guest's pattern for `seed` (blk_verify.rs, `fill_pattern`):
/// 512 little-endian u64s, `block`, `seed`, then xorshift64 from
/// `(seed ^ block * 0x9e3779b97f4a7c15) | 1`.
fn pattern(seed: u64, block: u64) -> Vec<u8> {
    let mut x = (seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&seed.to_le_bytes());
    for _ in 2..BLOCK / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn make_disk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(DISK_SIZE))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    path
}

/// QEMU microvm (ACPI off: QEMU appends the `virtio_mmio.device=` entries) booting the
/// test guest with `append`; `disk_args` attach the disk. With `memfd`, guest RAM is a
/// shared memfd (for a vhost-user backend).
fn microvm(append: &str, memfd: bool, disk_args: &[String]) -> Command {
    let qemu = require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_kvm();
    let mut cmd = Command::new(qemu);
    qemu::microvm_args(&mut cmd, "microvm,acpi=off", 1, &testguest(), append);
    if memfd {
        qemu::microvm_shared_ram(&mut cmd, false);
    }
    cmd.args(disk_args);
    cmd
}

fn qemu_disk_args(disk: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("id=d0,if=none,file={},format=raw", disk.display()),
        "-device".into(),
        format!("virtio-blk-device,drive=d0,serial={SERIAL}"),
    ]
}

/// The guest's lines, after checking it ended with `TG done` and exit status 0.
fn guest_ok(r: &RunResult, context: &str) -> Vec<String> {
    let lines = tg_lines(&r.stdout);
    assert!(
        !r.killed && lines.last().map(String::as_str) == Some("TG done"),
        "test guest did not finish with `TG done`{context}\n{}",
        r.transcript()
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("TG fail")),
        "test guest reported a failure{context}\n{}",
        r.transcript()
    );
    assert_eq!(
        r.code,
        Some(QEMU_STATUS_GUEST_OK),
        "QEMU exit status (guest exit 0 gives 1){context}\n{}",
        r.transcript()
    );
    lines
}

fn line_with<'a>(lines: &'a [String], prefix: &str, r: &RunResult) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{}", r.transcript()))
}

/// `key=value` out of a result line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// `FIRST+COUNT` as a block range.
fn block_range(v: &str) -> std::ops::Range<u64> {
    let (f, c) = v
        .split_once('+')
        .unwrap_or_else(|| panic!("bad range {v:?}"));
    let (f, c): (u64, u64) = (f.parse().unwrap(), c.parse().unwrap());
    f..f + c
}

/// Checks the blk-verify lines of device 0 and the image: the pattern everywhere but
/// in the write-zeroes range (zeros) and the discard range (undefined).
fn check_blk_verify(r: &RunResult, lines: &[String], disk: &Path, seed: u64, serial: &str) {
    let result = line_with(lines, "TG blk dev=0 wrote=", r);
    let blocks = DISK_BLOCKS.min(256);
    for key in ["wrote", "read", "verified"] {
        assert_eq!(
            field(result, key),
            blocks.to_string(),
            "{key} in {result:?}"
        );
    }
    for key in ["flush", "discard", "write_zeroes"] {
        assert_eq!(field(result, key), "ok", "{key} in {result:?}");
    }
    assert_eq!(field(result, "id"), serial, "GET_ID in {result:?}");
    let ranges = line_with(lines, "TG blk dev=0 wz=", r);
    let wz = block_range(field(ranges, "wz"));
    let discard = block_range(field(ranges, "discard"));
    assert!(!wz.is_empty() && !discard.is_empty(), "{ranges:?}");
    let image = std::fs::read(disk).expect("read the image back");
    for b in 0..blocks {
        let got = &image[b as usize * BLOCK..(b as usize + 1) * BLOCK];
        if wz.contains(&b) {
            assert!(
                got.iter().all(|&x| x == 0),
                "block {b} in the write-zeroes range is not zero on the host"
            );
        } else if !discard.contains(&b) {
            assert!(
                got == pattern(seed, b).as_slice(),
                "block {b} on the host does not hold the guest's pattern (seed {seed})"
            );
        }
    }
    let time = line_with(lines, "TG blk dev=0 us ", r);
    let reqs: u64 = field(time, "reqs").parse().unwrap();
    let irqs: u64 = field(time, "irqs").parse().unwrap();
    eprintln!(
        "{} ({:.3} s wall, {:.2} interrupts per request)",
        time,
        r.elapsed.as_secs_f64(),
        irqs as f64 / reqs as f64
    );
}

fn blk_verify_qemu(name: &str, opts: &str, seed: u64) {
    let dir = scratch_dir(name);
    let disk = make_disk(&dir, "d0.img");
    let append = format!("testguest.plan=blk-verify {opts} seed={seed}");
    let r = run_with_deadline(microvm(&append, false, &qemu_disk_args(&disk)), DEADLINE);
    let lines = guest_ok(&r, "");
    check_blk_verify(&r, &lines, &disk, seed, SERIAL);
    if opts.contains("completion=irq") {
        let result = line_with(&lines, "TG blk dev=0 wrote=", &r);
        assert_ne!(field(result, "irqs"), "0", "irq mode took no interrupt");
    }
}

#[test]
fn blk_verify_qd1_poll_against_qemu_virtio_blk() {
    blk_verify_qemu("tg-blk-qemu-qd1", "qd=1 completion=poll", 11);
}

#[test]
fn blk_verify_qd32_irq_against_qemu_virtio_blk() {
    blk_verify_qemu("tg-blk-qemu-qd32", "qd=32 completion=irq", 12);
}

/// Runs the guest with `append` against a fresh worker on `disk`; returns the run and
/// the worker's stderr (after it exits, as it does when QEMU disconnects).
fn with_worker(dir: &Path, disk: &Path, append: &str, extra: &[&str]) -> (RunResult, String) {
    let socket = dir.join("vhu.sock");
    let worker = Worker::start(&worker_bin(), &socket, disk, extra);
    let mut cmd = microvm(append, true, &[]);
    qemu::vhost_user_blk_mmio(&mut cmd, &socket);
    let r = run_with_deadline(cmd, DEADLINE);
    let (code, stderr) = worker.finish(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "worker must exit cleanly when QEMU disconnects:\n{stderr}\n{}",
        r.transcript()
    );
    (r, stderr)
}

#[test]
fn blk_verify_qd32_irq_through_our_worker() {
    let dir = scratch_dir("tg-blk-worker");
    let disk = make_disk(&dir, "d0.img");
    let seed = 21;
    let append = format!("testguest.plan=blk-verify qd=32 completion=irq seed={seed}");
    let (r, stderr) = with_worker(&dir, &disk, &append, &["--serial", SERIAL]);
    let lines = guest_ok(&r, &format!("\n--- worker ---\n{stderr}"));
    check_blk_verify(&r, &lines, &disk, seed, SERIAL);
}

/// What every hostile case must give with our worker (hostile.rs holds the same table).
const HOSTILE_RW: [&str; 9] = [
    "TG hostile addr_far status=1 used_len=1 ok",
    "TG hostile addr_ram_end status=1 used_len=1 ok",
    "TG hostile addr_overflow status=1 used_len=1 ok",
    "TG hostile loop status=none used_len=0 ok",
    "TG hostile too_long status=none used_len=0 ok",
    "TG hostile hdr_writable status=1 used_len=1 ok",
    "TG hostile in_readable status=1 used_len=1 ok",
    "TG hostile past_capacity status=1 used_len=1 ok",
    "TG hostile unknown_type status=2 used_len=1 ok",
];

fn hostile_lines(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("TG hostile ") && !l.starts_with("TG hostile dev="))
        .collect()
}

#[test]
fn hostile_chains_against_our_worker() {
    let dir = scratch_dir("tg-hostile-worker");
    let disk = make_disk(&dir, "d0.img");
    let (r, stderr) = with_worker(&dir, &disk, "testguest.plan=hostile", &[]);
    let lines = guest_ok(&r, &format!("\n--- worker ---\n{stderr}"));
    assert_eq!(
        hostile_lines(&lines),
        HOSTILE_RW,
        "hostile results differ:\n{}",
        r.transcript()
    );
}

#[test]
fn hostile_chains_against_our_readonly_worker() {
    let dir = scratch_dir("tg-hostile-worker-ro");
    let disk = make_disk(&dir, "d0.img");
    std::fs::write(&disk, vec![0x5a; DISK_SIZE as usize]).unwrap();
    let (r, stderr) = with_worker(
        &dir,
        &disk,
        "testguest.plan=hostile readonly=1",
        &["--readonly"],
    );
    let lines = guest_ok(&r, &format!("\n--- worker ---\n{stderr}"));
    let mut want = HOSTILE_RW.to_vec();
    want.push("TG hostile ro_out status=1 used_len=1 ok");
    assert_eq!(
        hostile_lines(&lines),
        want,
        "hostile results differ:\n{}",
        r.transcript()
    );
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x5a),
        "the read-only image changed"
    );
}
