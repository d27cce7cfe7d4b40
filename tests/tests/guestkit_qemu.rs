//! The Linux guest kit (`tests/guest/guestkit.sh`) booted under QEMU TCG: Debian's cloud
//! kernel with the kit's initramfs runs the command given as `guestkit.run=` and reports
//! `GUESTKIT done rc=N`. The disk is a virtio-blk-pci device backed by a raw image with a
//! known pattern, read by the guest's own virtio_blk driver.
//!
//! These tests fail (never skip) when QEMU, the kit or a host tool is missing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// QEMU is killed (and the test fails) when the guest has not powered off by then.
const TIMEOUT: Duration = Duration::from_secs(90);
const BUILD_KIT: &str = "tests/guest/guestkit.sh";
/// RECIPES.md: a real Linux guest through QEMU TCG (software CPU).
const QEMU_ARGS: [&str; 16] = [
    "-accel", "tcg", "-M", "q35", "-cpu", "max", "-smp", "1", "-m", "512", "-display", "none",
    "-serial", "stdio", "-monitor", "none",
];
/// Disk image: this many 4 KiB blocks.
const DISK_BLOCKS: usize = 256;

struct Kit {
    vmlinuz: PathBuf,
    initramfs: PathBuf,
}

fn kit() -> Kit {
    let dir = tests::guest_dir();
    Kit {
        vmlinuz: tests::require_file(dir.join("vmlinuz"), BUILD_KIT),
        initramfs: tests::require_file(dir.join("initramfs.cpio.gz"), BUILD_KIT),
    }
}

/// What one guest run printed, and how it ended.
struct Run {
    output: String,
    status: ExitStatus,
    /// Time from spawning QEMU to the `GUESTKIT done` line.
    done_after: Option<Duration>,
    log: PathBuf,
}

impl Run {
    /// The N of the `GUESTKIT done rc=N` line; panics with the output when it is missing.
    fn rc(&self) -> i32 {
        let rc = self
            .lines()
            .find_map(|l| l.strip_prefix("GUESTKIT done rc="))
            .map(|n| n.trim().parse::<i32>());
        match rc {
            Some(Ok(rc)) => rc,
            _ => panic!(
                "the guest printed no valid `GUESTKIT done rc=N` line (log: {}):\n{}",
                self.log.display(),
                self.output
            ),
        }
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.output.lines().map(|l| l.trim_end_matches('\r'))
    }

    fn has_line(&self, line: &str) -> bool {
        self.lines().any(|l| l == line)
    }

    fn assert_line(&self, line: &str) {
        assert!(
            self.has_line(line),
            "the guest output has no line `{line}` (log: {}):\n{}",
            self.log.display(),
            self.output
        );
    }

    fn assert_clean_exit(&self) {
        assert!(
            self.status.success(),
            "QEMU exited with {} (log: {}):\n{}",
            self.status,
            self.log.display(),
            self.output
        );
        if let Some(t) = self.done_after {
            eprintln!(
                "guestkit: QEMU start to `GUESTKIT done`: {:.2} s",
                t.as_secs_f64()
            );
        }
    }
}

/// Appends everything `src` yields to `out`; notes the time the `GUESTKIT done` line arrived.
fn collect(
    mut src: impl Read + Send + 'static,
    out: Arc<Mutex<String>>,
    start: Instant,
    done_at: Arc<Mutex<Option<Duration>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut out = out.lock().unwrap();
                    out.push_str(&String::from_utf8_lossy(&buf[..n]));
                    let mut done = done_at.lock().unwrap();
                    if done.is_none() && out.contains("GUESTKIT done rc=") {
                        *done = Some(start.elapsed());
                    }
                }
            }
        }
    })
}

/// Boots the kit under QEMU TCG with `guestkit_args` appended to the kernel command line
/// and, if given, `disk` as a virtio-blk-pci device. Fails the test on timeout.
fn boot(name: &str, disk: Option<&Path>, guestkit_args: &str) -> Run {
    let qemu = tests::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let kit = kit();
    let scratch = tests::scratch_dir(name);
    let log = scratch.join("qemu.log");

    let mut cmd = Command::new(qemu);
    cmd.args(QEMU_ARGS)
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&kit.vmlinuz)
        .arg("-initrd")
        .arg(&kit.initramfs);
    if let Some(disk) = disk {
        cmd.arg("-drive")
            .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
            .args(["-device", "virtio-blk-pci,drive=d0"]);
    }
    cmd.arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {guestkit_args}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU ({cmd:?}): {e}"));
    let output = Arc::new(Mutex::new(String::new()));
    let done_at = Arc::new(Mutex::new(None));
    let readers = [
        collect(
            child.stdout.take().unwrap(),
            output.clone(),
            start,
            done_at.clone(),
        ),
        collect(
            child.stderr.take().unwrap(),
            output.clone(),
            start,
            done_at.clone(),
        ),
    ];

    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for QEMU") {
            break Some(status);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        r.join().expect("output reader");
    }
    let output = output.lock().unwrap().clone();
    std::fs::write(&log, &output).expect("write QEMU log");
    let Some(status) = status else {
        panic!(
            "QEMU did not finish within {} s and was killed (log: {}):\n{output}",
            TIMEOUT.as_secs(),
            log.display()
        );
    };
    let done_after = *done_at.lock().unwrap();
    Run {
        output,
        status,
        done_after,
        log,
    }
}

/// Writes the test disk: each 4 KiB block starts with `bulkhead-guestkit block NNNNN\n`
/// and continues with a block-dependent byte pattern.
fn make_disk(dir: &Path) -> PathBuf {
    let mut data = Vec::with_capacity(DISK_BLOCKS * 4096);
    for block in 0..DISK_BLOCKS {
        let header = format!("bulkhead-guestkit block {block:05}\n");
        data.extend_from_slice(header.as_bytes());
        for j in header.len()..4096 {
            data.push(((block * 31 + j * 7) % 251) as u8);
        }
    }
    let path = dir.join("disk.img");
    std::fs::write(&path, data).expect("write disk image");
    path
}

/// MD5 of a file, computed by the host's md5sum.
fn md5_of(path: &Path) -> String {
    let md5sum = tests::require_tool("md5sum", "coreutils");
    let out = Command::new(md5sum).arg(path).output().expect("run md5sum");
    assert!(out.status.success(), "md5sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_string()
}

/// Standard base64 with padding (for `guestkit.run64=`).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_encoder_matches_rfc4648() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[test]
fn guest_reads_virtio_blk_pci_disk() {
    let dir = tests::scratch_dir("guestkit-disk");
    let disk = make_disk(&dir);
    let md5 = md5_of(&disk);
    let run = boot(
        "guestkit-disk-qemu",
        Some(&disk),
        &format!(
            "guestkit.run=\"dd if=/dev/vda bs=4096 count={DISK_BLOCKS} 2>/dev/null | md5sum \
             && dd if=/dev/vda bs=4096 skip=200 count=1 2>/dev/null | head -n 1 \
             && dd if=/dev/vda of=/dev/null bs=4096 count=8 && echo ok\""
        ),
    );
    assert_eq!(
        run.rc(),
        0,
        "the disk command failed in the guest (log: {}):\n{}",
        run.log.display(),
        run.output
    );
    run.assert_line(&format!("{md5}  -"));
    run.assert_line("bulkhead-guestkit block 00200");
    run.assert_line("ok");
    run.assert_clean_exit();
}

#[test]
fn failing_command_exit_status_propagates() {
    let run = boot("guestkit-exit3-qemu", None, "guestkit.run=\"exit 3\"");
    assert_eq!(
        run.rc(),
        3,
        "expected `GUESTKIT done rc=3` (log: {}):\n{}",
        run.log.display(),
        run.output
    );
    run.assert_clean_exit();
}

#[test]
fn base64_command_may_contain_quotes_and_no_command_is_rc0() {
    let cmd = r#"printf '%s\n' "quoted \"words\" 'and' $((6 * 7))""#;
    let run = boot(
        "guestkit-run64-qemu",
        None,
        &format!("guestkit.run64={}", base64(cmd.as_bytes())),
    );
    assert_eq!(run.rc(), 0, "log: {}\n{}", run.log.display(), run.output);
    run.assert_line(r#"quoted "words" 'and' 42"#);
    run.assert_clean_exit();

    let run = boot("guestkit-nocmd-qemu", None, "");
    assert_eq!(run.rc(), 0, "log: {}\n{}", run.log.display(), run.output);
    run.assert_clean_exit();
}
