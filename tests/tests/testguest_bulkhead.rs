//! The test guest's `info` plan under bulkhead: every vCPU comes online through the guest's
//! own INIT/SIPI, the guest finishes, and its 0xf4 status becomes bulkhead's exit status.

use std::time::Duration;

use tests::{require_kvm, run_bulkhead, testguest, tg_lines};

fn run_info(vcpus: u32) {
    require_kvm();
    let kernel = testguest();
    let vcpus_arg = vcpus.to_string();
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "testguest.plan=info",
            "--vcpus",
            &vcpus_arg,
            "--mem",
            "64",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    for cpu in 0..vcpus {
        let want = format!("TG cpu {cpu} online");
        assert!(lines.contains(&want), "missing {want:?}: {t}");
    }
    let cpu_lines = lines.iter().filter(|l| l.starts_with("TG cpu ")).count();
    assert_eq!(cpu_lines, vcpus as usize, "one line per vCPU: {t}");
    assert!(
        !lines.iter().any(|l| l.starts_with("TG dev ")),
        "no device slots exist yet: {t}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    assert_eq!(r.code, Some(0), "guest wrote 0 to port 0xf4: {t}");
}

#[test]
fn info_plan_one_vcpu() {
    run_info(1);
}

#[test]
fn info_plan_two_vcpus() {
    run_info(2);
}

/// A guest that writes V to port 0xf4 makes bulkhead exit with V.
#[test]
fn debug_exit_status_is_passed_through() {
    require_kvm();
    let kernel = testguest();
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "testguest.plan=no-such-plan",
            "--mem",
            "64",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert!(
        lines.iter().any(|l| l.starts_with("TG fail")),
        "an unknown plan must fail: {t}"
    );
    assert_eq!(
        r.code,
        Some(1),
        "the guest reports failure with status 1: {t}"
    );
}
