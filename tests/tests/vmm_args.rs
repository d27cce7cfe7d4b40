//! Bad configuration is refused with one clear error line and a non-zero exit, before any
//! vCPU runs (so no guest output, and quickly).

use std::time::Duration;

use tests::{require_kvm, run_bulkhead, scratch_dir, testguest};

fn assert_refused(args: &[&str], expected: &str) {
    let r = run_bulkhead(args, Duration::from_secs(30));
    assert!(
        r.stdout.is_empty(),
        "no guest may have run: {}",
        r.transcript()
    );
    r.assert_one_error_line("bulkhead: error: ", expected);
}

#[test]
fn missing_kernel() {
    require_kvm();
    let dir = scratch_dir("args-missing");
    let path = dir.join("no-such-kernel");
    assert_refused(
        &["run", "--kernel", path.to_str().unwrap()],
        &format!("cannot open kernel {}", path.display()),
    );
}

#[test]
fn not_a_kernel() {
    require_kvm();
    let dir = scratch_dir("args-notkernel");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "this is not a kernel\n".repeat(500)).unwrap();
    assert_refused(
        &["run", "--kernel", path.to_str().unwrap()],
        "is not a kernel",
    );
}

#[test]
fn zero_memory() {
    require_kvm();
    let kernel = testguest();
    assert_refused(
        &["run", "--kernel", kernel.to_str().unwrap(), "--mem", "0"],
        "--mem",
    );
}

#[test]
fn zero_vcpus() {
    require_kvm();
    let kernel = testguest();
    assert_refused(
        &["run", "--kernel", kernel.to_str().unwrap(), "--vcpus", "0"],
        "--vcpus 0 is out of range",
    );
}

#[test]
fn vcpus_above_the_kvm_limit() {
    require_kvm();
    let kernel = testguest();
    assert_refused(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vcpus",
            "100000",
        ],
        "--vcpus 100000 is out of range",
    );
}

#[test]
fn unreadable_initrd() {
    require_kvm();
    let kernel = testguest();
    let dir = scratch_dir("args-initrd");
    let initrd = dir.join("missing.cpio.gz");
    assert_refused(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        &format!("cannot read initrd {}", initrd.display()),
    );
}

#[test]
fn bad_timeout() {
    require_kvm();
    let kernel = testguest();
    assert_refused(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--timeout",
            "0",
        ],
        "--timeout",
    );
}
