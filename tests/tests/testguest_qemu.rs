//! The test guest under QEMU microvm with KVM: QEMU's own virtio-mmio devices and
//! CPU bring-up are the reference the guest is checked against before it meets
//! bulkhead. Build the guest first with `tests/guest/build-testguest.sh`.
//!
//! Missing QEMU, KVM or guest binary fails these tests; they never skip.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A whole run takes ~0.2 s here; anything near this means the guest hung.
const TIMEOUT: Duration = Duration::from_secs(60);

/// QEMU's isa-debug-exit turns the guest's status v into (v << 1) | 1.
const QEMU_STATUS_GUEST_OK: i32 = 1;

/// What QEMU microvm (ioapic2 off: 8 transports from 0xfeb00000, GSI 5 + slot)
/// assigns to two virtio-blk devices: the highest slots first.
const EXPECTED_DEVS: [&str; 2] = [
    "TG dev 0 addr=0xfeb00e00 irq=12 magic=ok version=2 id=2",
    "TG dev 1 addr=0xfeb00c00 irq=11 magic=ok version=2 id=2",
];

/// With ACPI on, QEMU does not append the devices to the command line: name them.
const DEVICE_ARGS: &str =
    "virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11";

#[derive(Debug)]
struct Run {
    status: ExitStatus,
    output: String,
}

impl Run {
    /// The guest's result lines (`TG ...`), trimmed.
    fn tg_lines(&self) -> Vec<&str> {
        self.output
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("TG "))
            .collect()
    }

    fn assert_line(&self, line: &str) {
        assert!(
            self.tg_lines().contains(&line),
            "expected `{line}` from the test guest; output:\n{}",
            self.output
        );
    }

    fn assert_success(&self) {
        self.assert_line("TG done");
        assert!(
            !self.tg_lines().iter().any(|l| l.starts_with("TG fail")),
            "test guest reported a failure; output:\n{}",
            self.output
        );
        assert_eq!(
            self.status.code(),
            Some(QEMU_STATUS_GUEST_OK),
            "QEMU exit status {} (guest exit 0 gives 1); output:\n{}",
            self.status,
            self.output
        );
    }

    fn assert_devs(&self) {
        let devs: Vec<&str> = self
            .tg_lines()
            .into_iter()
            .filter(|l| l.starts_with("TG dev "))
            .collect();
        assert_eq!(
            devs, EXPECTED_DEVS,
            "device lines differ; output:\n{}",
            self.output
        );
    }
}

fn disk(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    path.display().to_string()
}

/// Boots the test guest in QEMU microvm with two virtio-blk devices; kills QEMU and
/// fails with its output if it runs longer than [`TIMEOUT`].
fn run_microvm(name: &str, machine: &str, smp: u32, append: &str) -> Run {
    let qemu = tests::require_tool("qemu-system-x86_64", "qemu-system-x86");
    tests::require_kvm();
    let guest = tests::testguest();
    let dir = tests::scratch_dir(name);
    let (d0, d1) = (disk(&dir, "d0.img"), disk(&dir, "d1.img"));

    let mut cmd = Command::new(&qemu);
    tests::qemu::microvm_args(&mut cmd, machine, smp, &guest, append)
        .args(["-drive", &format!("id=d0,if=none,file={d0},format=raw")])
        .args(["-device", "virtio-blk-device,drive=d0"])
        .args(["-drive", &format!("id=d1,if=none,file={d1},format=raw")])
        .args(["-device", "virtio-blk-device,drive=d1"]);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", qemu.display()));

    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));

    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for QEMU") {
            break Some(status);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = format!(
        "{}{}",
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader")
    );
    match status {
        Some(status) => Run { status, output },
        None => panic!("QEMU did not exit within {TIMEOUT:?}, killed it; output:\n{output}"),
    }
}

#[test]
fn info_one_cpu_two_virtio_blk() {
    // With ACPI off QEMU appends the virtio_mmio.device= entries itself.
    let run = run_microvm(
        "testguest-info-1cpu",
        "microvm,acpi=off",
        1,
        "testguest.plan=info",
    );
    run.assert_success();
    run.assert_line("TG cpu 0 online");
    run.assert_devs();
}

#[test]
fn info_two_cpus_acpi() {
    // ACPI on for the MADT; ioapic2 off keeps QEMU's 8-slot layout (GSI 5 + slot).
    let run = run_microvm(
        "testguest-info-2cpu",
        "microvm,acpi=on,ioapic2=off",
        2,
        &format!("testguest.plan=info {DEVICE_ARGS}"),
    );
    run.assert_success();
    run.assert_line("TG cpu 0 online");
    run.assert_line("TG cpu 1 online");
    run.assert_devs();
}
