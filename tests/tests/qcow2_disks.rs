//! qcow2 disks under bulkhead: images made by `qemu-img`, written by the test guest
//! through a sandboxed worker that parses them with imago, then read back and checked by
//! QEMU's own tools (`qemu-img compare` against the expected raw content, `qemu-img
//! check`). What the configuration does not allow (a backing file it did not name, a
//! mismatched format, a deeper chain) is refused with one line, and corrupt images end in
//! one line or in guest I/O errors: never a hang, never a write outside the image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::{
    blk_pattern, make_qcow2, require_kvm, require_tool, run_bulkhead, scratch_dir, testguest,
    tg_lines, Qcow2Of, RunResult,
};

const DISK_MIB: u64 = 8;
const BLOCKS: u64 = 256;
const SEED: u64 = 11;

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new(require_tool("qemu-img", "qemu-utils"))
        .args(args)
        .output()
        .expect("run qemu-img");
    out
}

/// A raw file of `DISK_MIB` whose 4 KiB block `b` is filled with `fill(b)`.
fn raw_base(path: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; (DISK_MIB << 20) as usize];
    for (b, block) in bytes.chunks_mut(4096).enumerate() {
        block.fill((b % 251) as u8 + 1);
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// The guest's blk-verify on the disks given as `--disk` specs, in one VM.
fn blk_verify(specs: &[String], extra: &[&str]) -> RunResult {
    require_kvm();
    let kernel = testguest();
    let plan =
        format!("testguest.plan=blk-verify qd=16 completion=irq seed={SEED} blocks={BLOCKS}");
    let mut args: Vec<String> = [
        "run",
        "--kernel",
        &kernel.display().to_string(),
        "--cmdline",
        &plan,
        "--mem",
        "64",
        "--vcpus",
        "2",
        "--timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for spec in specs {
        args.push("--disk".into());
        args.push(spec.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_bulkhead(&args, Duration::from_secs(90))
}

/// `(first, count)` of `key=F+C` in the guest's `TG blk dev=N wz=.. discard=..` line.
fn guest_range(stdout: &str, dev: usize, key: &str) -> (u64, u64) {
    let prefix = format!("TG blk dev={dev} wz=");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line: {stdout}"));
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    let (f, c) = v.split_once('+').unwrap();
    (f.parse().unwrap(), c.parse().unwrap())
}

/// What disk `dev` must read after blk-verify, starting from `before`: the pattern in the
/// blocks it wrote, zeros where it wrote zeroes and where it discarded (a discard over a
/// backing file must not let the backing file's old bytes show through again).
fn expected_after(before: &[u8], stdout: &str, dev: usize) -> Vec<u8> {
    let mut want = before.to_vec();
    for b in 0..BLOCKS {
        let at = (b * 4096) as usize;
        want[at..at + 4096].copy_from_slice(&blk_pattern(SEED, b));
    }
    for key in ["wz=", "discard="] {
        let (first, count) = guest_range(stdout, dev, key);
        want[(first * 4096) as usize..((first + count) * 4096) as usize].fill(0);
    }
    want
}

/// `qemu-img compare` of the qcow2 image against `want` (raw), and `qemu-img check`.
fn assert_qemu_agrees(image: &Path, want: &[u8], t: &str) {
    let expected = image.with_extension("expected.raw");
    std::fs::write(&expected, want).unwrap();
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &image.display().to_string(),
        &expected.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}\n{t}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_check_clean(image, t);
}

/// `qemu-img check` finds no corruption (leaked clusters, exit 3, are allowed: a killed
/// worker may leave some, which wastes space and harms no data).
fn assert_check_clean(image: &Path, t: &str) {
    let out = qemu_img(&["check", "-f", "qcow2", &image.display().to_string()]);
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check {}: {code:?} {}{}\n{t}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_guest_verified(r: &RunResult, disks: usize) {
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    assert_eq!(r.code, Some(0), "{t}");
    for dev in 0..disks {
        let summary = format!(
            "TG blk dev={dev} wrote={BLOCKS} read={BLOCKS} verified={BLOCKS} flush=ok \
             discard=ok write_zeroes=ok"
        );
        assert!(lines.iter().any(|l| l.starts_with(&summary)), "{t}");
    }
    assert!(!r.stderr.contains("violated policy"), "{t}");
}

/// A qcow2 image over a raw backing file (through the page cache) and a plain qcow2
/// image (O_DIRECT) in one VM: the guest verifies what it wrote, the backing file shows
/// through where it did not write and is never written, and QEMU reads both images as
/// the guest left them.
#[test]
fn qcow2_images_with_and_without_a_backing_file_hold_what_the_guest_wrote() {
    let dir = scratch_dir("qcow2-blk-verify");
    let base = dir.join("base.raw");
    let base_bytes = raw_base(&base);
    let top = dir.join("top.qcow2");
    make_qcow2(&top, Qcow2Of::Backing("base.raw", "raw"));
    let plain = dir.join("plain.qcow2");
    make_qcow2(&plain, Qcow2Of::Size("8M"));
    let specs = [
        format!(
            "path={},format=qcow2,backing={}",
            top.display(),
            base.display()
        ),
        format!("path={},format=qcow2,direct=on", plain.display()),
    ];
    let r = blk_verify(&specs, &[]);
    let t = r.transcript();
    assert_guest_verified(&r, 2);
    assert!(
        r.stderr.matches("(sandboxed, engine sync)").count() >= 2,
        "qcow2 is served by the sync engine: {t}"
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "the backing file changed: {t}"
    );
    let want = expected_after(&base_bytes, &r.stdout, 0);
    assert_qemu_agrees(&top, &want, &t);
    // Past the blocks the guest wrote, the backing file shows through.
    assert_eq!(
        &want[(BLOCKS * 4096) as usize..],
        &base_bytes[(BLOCKS * 4096) as usize..]
    );
    let zeros = vec![0u8; base_bytes.len()];
    let want = expected_after(&zeros, &r.stdout, 1);
    assert_qemu_agrees(&plain, &want, &t);
}

/// `bulkhead run` refused before any guest ran: exactly one `bulkhead: error:` line, which
/// names `expected`.
fn assert_refused(r: &RunResult, expected: &str) {
    let t = r.transcript();
    assert!(!r.killed, "hung instead of refusing: {t}");
    assert_eq!(r.code, Some(1), "{t}");
    assert!(tg_lines(&r.stdout).is_empty(), "no guest may run: {t}");
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("bulkhead: error:") || l.contains("ERROR"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {t}");
    assert!(errors[0].contains(expected), "expected {expected:?}: {t}");
    assert!(!r.stderr.contains("violated policy"), "{t}");
}

/// What a qcow2 header names must be what the configuration allows, and the format is
/// the configuration's: each mismatch is refused with one line that says what to give.
#[test]
fn what_the_configuration_does_not_allow_is_refused_with_one_line() {
    let dir = scratch_dir("qcow2-refusals");
    let base = dir.join("base.raw");
    raw_base(&base);
    let other = dir.join("other.raw");
    raw_base(&other);
    let top = dir.join("top.qcow2");
    make_qcow2(&top, Qcow2Of::Backing("base.raw", "raw"));
    let plain = dir.join("plain.qcow2");
    make_qcow2(&plain, Qcow2Of::Size("8M"));
    // A two-level chain: top2 -> mid (qcow2) -> base.
    let mid = dir.join("mid.qcow2");
    make_qcow2(&mid, Qcow2Of::Backing("base.raw", "raw"));
    let top2 = dir.join("top2.qcow2");
    make_qcow2(&top2, Qcow2Of::Backing("mid.qcow2", "qcow2"));
    // A header that names a host file by absolute path.
    let secret = dir.join("host-secret.raw");
    raw_base(&secret);
    let grabby = dir.join("grabby.qcow2");
    make_qcow2(
        &grabby,
        Qcow2Of::Backing(&secret.display().to_string(), "raw"),
    );
    let p = |p: &PathBuf| p.display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("path={},format=qcow2", p(&top)),
            "names the backing file \"base.raw\", which the configuration did not allow",
        ),
        (
            format!("path={},format=qcow2,backing={}", p(&top), p(&other)),
            "but the configuration allows",
        ),
        (
            format!(
                "path={},format=qcow2,backing={},backing_format=qcow2",
                p(&top),
                p(&base)
            ),
            "names backing format \"raw\", but the configuration says qcow2",
        ),
        (
            format!("path={},format=qcow2,backing={}", p(&plain), p(&base)),
            "the image names no backing file",
        ),
        (
            format!(
                "path={},format=qcow2,backing={},backing_format=qcow2",
                p(&top2),
                p(&mid)
            ),
            "allows one backing file per image",
        ),
        (
            format!("path={},format=qcow2", p(&grabby)),
            "which the configuration did not allow",
        ),
        (
            format!("path={},format=qcow2,backing={}", p(&top), p(&top)),
            "is the image itself",
        ),
        (format!("path={}", p(&plain)), "give format=qcow2"),
        (
            format!("path={},format=qcow2", p(&base)),
            "is not a qcow2 image",
        ),
    ];
    for (spec, expected) in cases {
        let r = blk_verify(std::slice::from_ref(&spec), &[]);
        assert_refused(&r, expected);
        eprintln!("--disk {spec}: {}", r.stderr.lines().last().unwrap_or(""));
    }
}

/// Raw is never guessed away: a raw disk whose guest wrote a qcow2 header (naming a host
/// file as its backing file) is served as raw, with a warning, and the named file is
/// never opened.
#[test]
fn a_raw_disk_that_starts_with_a_qcow2_header_stays_raw() {
    let dir = scratch_dir("qcow2-header-in-raw");
    let secret = dir.join("host-secret.raw");
    raw_base(&secret);
    let made = dir.join("made.qcow2");
    make_qcow2(
        &made,
        Qcow2Of::Backing(&secret.display().to_string(), "raw"),
    );
    let raw = dir.join("guest.img");
    let mut bytes = std::fs::read(&made).unwrap();
    bytes.resize((DISK_MIB << 20) as usize, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let r = blk_verify(&[format!("path={}", raw.display())], &[]);
    let t = r.transcript();
    assert_guest_verified(&r, 1);
    // Said by its worker (the VMM reads no image), in the disk's log lines.
    assert!(
        r.stderr.lines().any(|l| l.contains("disk{id=blk0}")
            && l.contains("is served as raw (format=raw) but starts with a qcow2 header")),
        "{t}"
    );
    // Served as raw: the guest's pattern is in the file at its own offsets.
    let after = std::fs::read(&raw).unwrap();
    assert_eq!(&after[4096..8192], &blk_pattern(SEED, 1)[..], "{t}");
}

/// A copy of `good` with `edits` (big-endian values at byte offsets) applied.
fn corrupt(good: &[u8], path: &Path, edits: &[(usize, Value)], truncate: Option<usize>) {
    let mut b = good.to_vec();
    for &(at, v) in edits {
        match v {
            Value::U32(v) => b[at..at + 4].copy_from_slice(&v.to_be_bytes()),
            Value::U64(v) => b[at..at + 8].copy_from_slice(&v.to_be_bytes()),
            Value::U16(v) => b[at..at + 2].copy_from_slice(&v.to_be_bytes()),
        }
    }
    if let Some(len) = truncate {
        b.truncate(len);
    }
    std::fs::write(path, b).unwrap();
}

/// A corrupt image: its name, the values written into a good one, and its length.
type Corruption = (&'static str, Vec<(usize, Value)>, Option<usize>);

#[derive(Clone, Copy, Debug)]
enum Value {
    U16(u16),
    U32(u32),
    U64(u64),
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Corrupt images (tables outside the file, an L2 table that is the header, an L2 table
/// a terabyte out, a refcount at its maximum, oversized tables, a header longer than
/// the file, a file cut short) end in one error line or in guest I/O errors, within
/// seconds; the worker never breaks its policy; the image file never grows past what
/// the worker's file-size limit allows; nothing else in the directory changes.
#[test]
fn corrupt_qcow2_images_end_in_one_line_or_guest_errors_never_a_hang() {
    let dir = scratch_dir("qcow2-corrupt");
    let good = dir.join("good.qcow2");
    make_qcow2(&good, Qcow2Of::Size("8M"));
    let out = Command::new(require_tool("qemu-io", "qemu-utils"))
        .args(["-c", "write -P 0xaa 0 64k"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let g = std::fs::read(&good).unwrap();
    let l1 = be64(&g, 40) as usize;
    let refcount_table = be64(&g, 48) as usize;
    let refblock = be64(&g, refcount_table) as usize;
    let sentinel = dir.join("sentinel.raw");
    std::fs::write(&sentinel, b"untouched").unwrap();
    let cases: Vec<Corruption> = vec![
        (
            "unaligned-l1",
            vec![(40, Value::U64(0x7fff_0000_0000_0200))],
            None,
        ),
        (
            "l1-past-the-end",
            vec![(40, Value::U64(0x40_0000_0000))],
            None,
        ),
        ("l1-size-huge", vec![(36, Value::U32(0x0fff_ffff))], None),
        (
            "refcount-table-huge",
            vec![(56, Value::U32(u32::MAX))],
            None,
        ),
        (
            "header-longer-than-cluster",
            vec![(100, Value::U32(0x7fff_0000))],
            None,
        ),
        ("cut-short", vec![], Some(1024)),
        ("l2-is-the-header", vec![(l1, Value::U64(1 << 63))], None),
        (
            "l2-a-terabyte-out",
            vec![(l1, Value::U64((1 << 63) | 0x100_0000_0000))],
            None,
        ),
        (
            "refcount-at-max",
            vec![(refblock, Value::U16(u16::MAX))],
            None,
        ),
        // Without a refcount block for the file's clusters, imago's allocation recursed
        // until the worker's stack overflowed (found by the qcow2_image fuzz target).
        (
            "refcount-block-missing",
            vec![(refcount_table, Value::U64(0))],
            None,
        ),
        (
            "l2-is-the-refcount-table",
            vec![(l1, Value::U64((1 << 63) | refcount_table as u64))],
            None,
        ),
    ];
    for (name, edits, truncate) in cases {
        let image = dir.join(format!("{name}.qcow2"));
        corrupt(&g, &image, &edits, truncate);
        let before = std::fs::metadata(&image).unwrap().len();
        let r = blk_verify(&[format!("path={},format=qcow2", image.display())], &[]);
        let t = format!("{name}: {}", r.transcript());
        assert!(
            !r.killed && r.elapsed < Duration::from_secs(30),
            "no hang: {t}"
        );
        assert!(!r.stderr.contains("violated policy"), "{t}");
        let refused = r.code == Some(1)
            && tg_lines(&r.stdout).is_empty()
            && r.stderr
                .lines()
                .filter(|l| l.starts_with("bulkhead: error:"))
                .count()
                == 1;
        let guest_errors = tg_lines(&r.stdout).iter().any(|l| l.starts_with("TG fail"));
        let served =
            r.code == Some(0) && tg_lines(&r.stdout).last().is_some_and(|l| l == "TG done");
        assert!(
            refused || guest_errors || served,
            "a corrupt image ends in one error line, guest I/O errors, or is served: {t}"
        );
        // At most what a full 8 MiB disk plus its tables and the limit's slack take.
        let after = std::fs::metadata(&image).unwrap().len();
        assert!(after <= before + (DISK_MIB << 20) * 2 + (256 << 20), "{t}");
        assert_eq!(std::fs::read(&sentinel).unwrap(), b"untouched", "{t}");
        eprintln!(
            "{name}: {}",
            if refused {
                r.stderr.lines().last().unwrap_or("").to_string()
            } else if guest_errors {
                "guest I/O errors".into()
            } else {
                "served".into()
            }
        );
    }
}
