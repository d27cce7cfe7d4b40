//! Linux (the guest kit's Debian kernel) under bulkhead.
//!
//! This machine's KVM (kvm_pvm, no VMX/SVM) emulates guest kernel code instruction by
//! instruction, so a full boot is out of reach here: the bounded early-boot test checks
//! that Linux parses our boot structures and ACPI tables; the full boot runs on real hosts
//! (`cargo test -p tests --test linux_boot -- --ignored`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{bulkhead_bin, guest_dir, require_file, require_kvm};

const KIT: &str = "tests/guest/guestkit.sh";

/// The lines Linux prints about what we gave it, in the order we look for them.
const EARLY_BOOT_LINES: &[&str] = &[
    "Linux version",
    "ACPI: RSDP",
    "ACPI: XSDT",
    "ACPI: FACP",
    "ACPI: DSDT",
    "ACPI: APIC",
    "smpboot: Allowing 2 CPUs",
];

/// Seconds bulkhead lets the kernel run before `--timeout` stops it. Measured here
/// (kvm_pvm, 256 MiB): the ACPI lines after ~35 s, the CPU count after ~46 s on a quiet
/// machine, ~110 s with both cores busy compiling; the bound leaves margin for that.
const EARLY_BOOT_TIMEOUT_S: u64 = 120;

#[test]
fn linux_early_boot_parses_our_tables() {
    require_kvm();
    let vmlinux = require_file(guest_dir().join("vmlinux"), KIT);
    let mut child = Command::new(bulkhead_bin())
        .args([
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--vcpus",
            "2",
            "--mem",
            "256",
            // clearcpuid/noxsave: this machine's KVM emulator cannot run CMPXCHG16B/XSAVE.
            "--cmdline",
            "console=ttyS0 earlyprintk=ttyS0 clearcpuid=cx16 noxsave",
            "--timeout",
            &EARLY_BOOT_TIMEOUT_S.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulkhead");
    let started = Instant::now();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen: Vec<(String, Duration)> = Vec::new();
    let mut transcript = String::new();
    for line in stdout.lines() {
        let Ok(line) = line else { break };
        transcript.push_str(&line);
        transcript.push('\n');
        for want in EARLY_BOOT_LINES {
            if line.contains(want) && !seen.iter().any(|(w, _)| w == want) {
                seen.push((want.to_string(), started.elapsed()));
                eprintln!("{:6.1} s  {}", started.elapsed().as_secs_f64(), line.trim());
            }
        }
    }
    let status = child.wait().expect("wait for bulkhead");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let elapsed = started.elapsed();
    let context = format!("after {elapsed:?}, exit {status:?}\n--- serial ---\n{transcript}\n--- stderr ---\n{stderr}");
    for want in EARLY_BOOT_LINES {
        assert!(
            seen.iter().any(|(w, _)| w == want),
            "Linux never printed {want:?} within {EARLY_BOOT_TIMEOUT_S} s: {context}"
        );
    }
    assert_eq!(
        status.code(),
        Some(124),
        "--timeout must stop the VM: {context}"
    );
    assert!(
        elapsed < Duration::from_secs(EARLY_BOOT_TIMEOUT_S + 20),
        "bulkhead did not stop at its timeout: {context}"
    );
}

/// The bzImage path: the kernel's decompressor runs in long mode from our page tables and
/// GDT, finds the command line through our `boot_params`, and prints on COM1. (The whole
/// decompression is emulated here and takes minutes, so the test stops at its first line.)
#[test]
fn linux_bzimage_enters_through_the_64bit_protocol() {
    require_kvm();
    let vmlinuz = require_file(guest_dir().join("vmlinuz"), KIT);
    let r = tests::run_bulkhead(
        &[
            "run",
            "--kernel",
            vmlinuz.to_str().unwrap(),
            "--mem",
            "256",
            "--cmdline",
            "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr",
            "--timeout",
            "20",
        ],
        Duration::from_secs(60),
    );
    let t = r.transcript();
    assert!(
        r.stderr.contains("via 64-bit Linux boot protocol"),
        "a bzImage boots through the 64-bit protocol: {t}"
    );
    assert!(
        r.stdout.contains("KASLR disabled: 'nokaslr' on cmdline."),
        "the decompressor must read our command line and print: {t}"
    );
    assert_eq!(r.code, Some(124), "--timeout must stop the VM: {t}");
}

#[test]
#[ignore = "needs VMX/SVM: this machine's KVM (kvm_pvm) emulates guest kernel code, a full Linux boot takes hours"]
fn linux_full_boot_runs_a_command() {
    require_kvm();
    let dir = guest_dir();
    let vmlinux = require_file(dir.join("vmlinux"), KIT);
    let initrd = require_file(dir.join("initramfs.cpio.gz"), KIT);
    let r = tests::run_bulkhead(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--vcpus",
            "2",
            "--mem",
            "512",
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 guestkit.run=\"cat /proc/cpuinfo | grep -c processor\"",
            "--timeout",
            "120",
        ],
        Duration::from_secs(150),
    );
    let t = r.transcript();
    assert!(r.stdout.contains("GUESTKIT done rc=0"), "{t}");
    assert_eq!(r.code, Some(0), "{t}");
}
