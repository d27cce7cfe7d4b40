//! Live resize: `bulkhead ctl resize DISK SIZE [--shrink]` (the API's
//! `POST /v1/disks/{id}/resize`) while the test guest's blk-resize reads its disk. The
//! worker is replaced by one that resizes the image inside its sandbox; the guest must see
//! no I/O error, a new config generation, a config-change interrupt and the new capacity,
//! and must then read and write at the new end. On the host the image has the new size
//! (a qcow2 image passes `qemu-img check`, and its grown range reads as zeros even where
//! a longer backing file lies below). A resize the image cannot take fails in one line and
//! leaves the disk as it was, serving.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::{blk_pattern, bulkhead_bin, qemu_img, require_kvm, scratch_dir, testguest};

const SEED: u64 = 7;

/// A running VM whose stdout is read line by line.
struct Vm {
    child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    api: PathBuf,
}

impl Vm {
    fn start(dir: &Path, disks: &[String]) -> Vm {
        require_kvm();
        let api = dir.join("api.sock");
        let mut cmd = Command::new(bulkhead_bin());
        cmd.arg("run")
            .arg("--api-socket")
            .arg(&api)
            .arg("--kernel")
            .arg(testguest())
            .args(["--mem", "64", "--timeout", "90", "--cmdline"])
            .arg(format!("testguest.plan=blk-resize dev=0 seed={SEED}"));
        for d in disks {
            cmd.arg("--disk").arg(d);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bulkhead");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let all = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let line = line.trim_end_matches('\r').to_string();
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        Vm {
            child,
            lines,
            stdout,
            api,
        }
    }

    /// The next stdout line that starts with `prefix` (within 60 s).
    fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "no line {prefix:?}; stdout so far:\n{}",
                    self.stdout.lock().unwrap()
                ),
            }
        }
    }

    fn ctl(&self, args: &[&str]) -> (bool, String) {
        tests::ctl(&self.api, args)
    }

    /// Waits for the VM's end; its whole output.
    fn finish(self) -> String {
        let out = self.child.wait_with_output().expect("wait for bulkhead");
        std::thread::sleep(Duration::from_millis(100));
        let t = format!(
            "{}\n--- stderr ---\n{}",
            self.stdout.lock().unwrap(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{t}");
        assert!(!t.contains("violated policy"), "{t}");
        t
    }
}

/// `key=` of a `TG` line, as a number.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {line}"))
}

fn raw_image(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// 4 KiB block `block` of the raw file `path`.
fn block_of(path: &Path, block: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, block * 4096)
        .unwrap();
    buf
}

/// A size this filesystem refuses for a file (ext4 holds at most 16 TiB): a resize the
/// worker cannot do, which the VMM still allows (it is below the 64 TiB limit).
fn size_the_filesystem_refuses(dir: &Path) -> u64 {
    let probe = dir.join("probe");
    let file = std::fs::File::create(&probe).unwrap();
    let size = 32u64 << 40;
    let refused = file.set_len(size).is_err();
    drop(file);
    std::fs::remove_file(&probe).unwrap();
    assert!(
        refused,
        "the filesystem under {} holds a 32 TiB file; this test needs one that refuses \
         it (ext4: 16 TiB at most) to make a resize fail",
        dir.display()
    );
    size
}

/// A raw disk grows under the running guest: a resize the filesystem refuses fails in one
/// line and changes nothing, then a real one is seen by the guest (new generation,
/// config interrupt, capacity) with every read of its loop correct, and the host file has
/// the new length and the guest's block at the new end. Bad sizes and a read-only disk
/// are refused before any worker is touched.
#[test]
fn a_raw_disk_grows_under_a_running_guest() {
    let dir = scratch_dir("resize-raw");
    let d0 = dir.join("d0.img");
    let ro = dir.join("ro.img");
    raw_image(&d0, 4 << 20);
    raw_image(&ro, 1 << 20);
    let too_big = size_the_filesystem_refuses(&dir);
    let vm = Vm::start(
        &dir,
        &[
            format!("path={}", d0.display()),
            format!("path={},readonly=on", ro.display()),
        ],
    );
    let before = vm.line("TG resize dev=0 before ");
    assert_eq!(field(&before, "cap="), 8192, "{before}");
    for (args, says) in [
        (
            vec!["resize", "blk0", "3M"],
            "must be asked for as a shrink",
        ),
        (
            vec!["resize", "blk0", "1000"],
            "not a whole number of 512-byte sectors",
        ),
        (vec!["resize", "blk0", "4X"], "has an unknown unit"),
        (vec!["resize", "blk1", "2M"], "is read-only"),
        (vec!["resize", "blk9", "2M"], "no disk \"blk9\""),
    ] {
        let (ok, text) = vm.ctl(&args);
        assert!(!ok && text.contains(says), "{args:?}: {text}");
        assert_eq!(text.lines().count(), 1, "one line: {text}");
    }
    let (ok, text) = vm.ctl(&["status", "blk0"]);
    assert!(ok && text.contains("size: 4194304 bytes"), "{text}");
    let (ok, text) = vm.ctl(&["resize", "blk0", &too_big.to_string()]);
    assert!(
        !ok && text.contains("the image was not resized")
            && text.contains("File too large")
            && text.contains("keeps its size"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert_eq!(std::fs::metadata(&d0).unwrap().len(), 4 << 20);
    // At once: the failed resize answered as its worker refused, while the disk's next
    // worker was still starting (it started without this resize, and must make way for
    // one that does it).
    let (ok, text) = vm.ctl(&["resize", "blk0", "8M"]);
    assert!(ok, "{text}");
    assert!(
        text.starts_with("blk0: 4194304 -> 8388608 bytes in "),
        "{text}"
    );
    let after = vm.line("TG resize dev=0 after ");
    assert_eq!(field(&after, "cap="), 16384, "{after}");
    assert_eq!(field(&after, "config_irq="), 1, "{after}");
    assert!(field(&after, "reads=") > 0, "{after}");
    let checked = vm.line("TG resize dev=0 checked ");
    assert_eq!(checked, "TG resize dev=0 checked old_last=ok new_last=ok");
    let t = vm.finish();
    assert!(t.contains("TG done"), "{t}");
    assert!(
        t.contains("disk blk0: resized from 4194304 to 8388608 bytes"),
        "{t}"
    );
    assert_eq!(std::fs::metadata(&d0).unwrap().len(), 8 << 20);
    assert_eq!(block_of(&d0, 0), blk_pattern(SEED, 0));
    assert_eq!(
        block_of(&d0, 1023),
        blk_pattern(SEED, 1023),
        "the old last block"
    );
    assert_eq!(
        block_of(&d0, 2047),
        blk_pattern(SEED + 1, 2047),
        "the new last block"
    );
    assert_eq!(block_of(&d0, 1024), vec![0u8; 4096], "grown: zeros");
}

/// `--shrink` cuts a raw disk (sync engine) under the guest: its old last block is gone,
/// the new last one works, the file is shorter.
#[test]
fn a_raw_disk_shrinks_only_when_asked_to() {
    let dir = scratch_dir("resize-shrink");
    let d0 = dir.join("d0.img");
    raw_image(&d0, 8 << 20);
    let vm = Vm::start(&dir, &[format!("path={},engine=sync", d0.display())]);
    let before = vm.line("TG resize dev=0 before ");
    assert_eq!(field(&before, "cap="), 16384, "{before}");
    let (ok, text) = vm.ctl(&["resize", "blk0", "4M", "--shrink"]);
    assert!(ok, "{text}");
    assert!(
        text.starts_with("blk0: 8388608 -> 4194304 bytes in "),
        "{text}"
    );
    let after = vm.line("TG resize dev=0 after ");
    assert_eq!(field(&after, "cap="), 8192, "{after}");
    assert_eq!(
        vm.line("TG resize dev=0 checked "),
        "TG resize dev=0 checked old_last=gone new_last=ok"
    );
    vm.finish();
    assert_eq!(std::fs::metadata(&d0).unwrap().len(), 4 << 20);
    assert_eq!(block_of(&d0, 1023), blk_pattern(SEED + 1, 1023));
}

/// A qcow2 image over a backing file twice its virtual size grows under the guest: imago
/// resizes it inside the sandbox, `qemu-img check` finds it clean, and the grown range
/// reads as zeros (not the backing file's bytes below it) except the guest's new block.
#[test]
fn a_qcow2_disk_over_a_longer_backing_file_grows_with_zeros() {
    let dir = scratch_dir("resize-qcow2");
    let base = dir.join("base.raw");
    let base_bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let image = dir.join("d0.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        image.to_str().unwrap(),
        "4M",
    ]);
    let vm = Vm::start(
        &dir,
        &[format!(
            "path={},format=qcow2,backing={}",
            image.display(),
            base.display()
        )],
    );
    let before = vm.line("TG resize dev=0 before ");
    assert_eq!(field(&before, "cap="), 8192, "{before}");
    let (ok, text) = vm.ctl(&["resize", "blk0", "8M"]);
    assert!(ok, "{text}");
    let after = vm.line("TG resize dev=0 after ");
    assert_eq!(field(&after, "cap="), 16384, "{after}");
    assert_eq!(
        vm.line("TG resize dev=0 checked "),
        "TG resize dev=0 checked old_last=ok new_last=ok"
    );
    vm.finish();
    let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 8 << 20, "{info}");
    qemu_img(&["check", "-q", image.to_str().unwrap()]);
    let flat = dir.join("flat.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        image.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    for block in 0..2048u64 {
        let got = block_of(&flat, block);
        let want = match block {
            0 | 1023 => blk_pattern(SEED, block),
            2047 => blk_pattern(SEED + 1, block),
            b if b < 1024 => base_bytes[b as usize * 4096..][..4096].to_vec(),
            _ => vec![0u8; 4096],
        };
        assert!(got == want, "block {block} of the resized image is wrong");
    }
}
