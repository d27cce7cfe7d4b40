//! `bulkhead run` from a configuration file: the same run as its flags (one schema, the
//! serde types of vmm-core/src/config.rs), `--print-config` in the file's own format, the
//! example in the repo, and refusals in one line.

use std::process::Command;
use std::time::Duration;

use tests::{
    check_blk_verify_image, require_kvm, run_bulkhead, run_with_deadline, scratch_dir, testguest,
    tg_lines, workspace_root,
};

fn printed(args: &[&str]) -> serde_json::Value {
    let r = run_bulkhead(args, Duration::from_secs(30));
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(r.stderr.is_empty(), "{t}");
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {t}"))
}

/// The flags' run printed, written to a file, read back: the same configuration; and the
/// VM that file describes runs and verifies its disk, as the flags' would.
#[test]
fn a_vm_runs_from_the_file_its_flags_print() {
    require_kvm();
    let dir = scratch_dir("config-roundtrip");
    let img = dir.join("d0.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let kernel = testguest();
    let flags = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "testguest.plan=blk-verify qd=8 seed=5 blocks=64",
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--timeout",
        "60",
        "--worker-bin",
    ];
    let worker = tests::worker_bin();
    let disk = format!("path={},id=data,engine=sync,spare=off", img.display());
    let mut args: Vec<&str> = flags.to_vec();
    args.extend([worker.to_str().unwrap(), "--disk", &disk, "--print-config"]);
    let from_flags = printed(&args);
    assert_eq!(from_flags["vm"]["mem"], "64M", "{from_flags}");
    assert_eq!(from_flags["vm"]["disks"][0]["id"], "data", "{from_flags}");
    assert_eq!(from_flags["timeout"], 60.0, "{from_flags}");

    let file = dir.join("vm.json");
    std::fs::write(&file, serde_json::to_string_pretty(&from_flags).unwrap()).unwrap();
    let from_file = printed(&["run", "--config", file.to_str().unwrap(), "--print-config"]);
    assert_eq!(from_file, from_flags);

    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.args(["run", "--config", file.to_str().unwrap()])
        .env_remove("BULKHEAD_LOG");
    let r = run_with_deadline(cmd, Duration::from_secs(90));
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(tg_lines(&r.stdout).iter().any(|l| l == "TG done"), "{t}");
    assert!(
        r.stderr.contains("worker data"),
        "the disk's id from the file: {t}"
    );
    check_blk_verify_image(&img, &r.stdout, 0, 5, 64).unwrap_or_else(|e| panic!("{e}: {t}"));
}

/// examples/vm.json, as the README shows it, run where its relative paths lead: a
/// directory with target/guest/testguest and target/demo/disk.img.
#[test]
fn the_example_file_runs() {
    require_kvm();
    let dir = scratch_dir("config-example");
    std::fs::create_dir_all(dir.join("target/guest")).unwrap();
    std::fs::create_dir_all(dir.join("target/demo")).unwrap();
    std::os::unix::fs::symlink(testguest(), dir.join("target/guest/testguest")).unwrap();
    std::fs::File::create(dir.join("target/demo/disk.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let example = workspace_root().join("examples/vm.json");
    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.current_dir(&dir)
        .args(["run", "--config"])
        .arg(&example)
        .env_remove("BULKHEAD_LOG");
    let r = run_with_deadline(cmd, Duration::from_secs(90));
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    assert!(tg_lines(&r.stdout).iter().any(|l| l == "TG done"), "{t}");
    assert!(r.stderr.contains("2 vCPU(s), 64 MiB"), "{t}");
    assert!(r.stderr.contains("worker demo"), "{t}");
}

/// A file and a flag together, a file that is not the schema, a size that is not whole
/// MiB: one error line each, nothing run.
#[test]
fn a_file_with_flags_or_a_bad_file_is_refused_in_one_line() {
    let dir = scratch_dir("config-refused");
    let kernel = testguest();
    let file = dir.join("vm.json");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    let refused = tests::assert_bulkhead_refused;
    let f = file.to_str().unwrap();
    write(&format!(
        r#"{{"vm": {{"kernel": "{}"}}}}"#,
        kernel.display()
    ));
    refused(
        &["run", "--config", f, "--vcpus", "2", "--mem", "1G"],
        "gives the whole run; --mem (and 1 more) cannot be given with it",
    );
    write(&format!(
        "{{\"vm\": {{\"kernel\": \"{}\",\n \"vcpu\": 2}}}}",
        kernel.display()
    ));
    refused(&["run", "--config", f], "unknown field `vcpu`");
    refused(&["run", "--config", f], "line 2 column");
    write(&format!(
        r#"{{"vm": {{"kernel": "{}", "mem": "1536K"}}}}"#,
        kernel.display()
    ));
    refused(&["run", "--config", f], "not a whole number of MiB");
    refused(
        &["run", "--config", dir.join("none.json").to_str().unwrap()],
        "cannot read --config",
    );
    refused(&["run"], "--kernel is required (or --config FILE)");
    // A timeout no Duration holds, a config that is not a regular file.
    refused(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--timeout",
            "1e300",
        ],
        "--timeout 1e300",
    );
    refused(&["run", "--config", "/dev/zero"], "is not a regular file");
    refused(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "1536K",
        ],
        "--mem \"1536K\" is not a whole number of MiB",
    );
}

/// Sizes with units on the command line: printed back with the largest whole unit.
#[test]
fn mem_takes_sizes_with_units() {
    let kernel = testguest();
    for (given, shown) in [
        ("512", "512M"),
        ("1G", "1G"),
        ("2GiB", "2G"),
        ("1536M", "1536M"),
    ] {
        let cfg = printed(&[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            given,
            "--print-config",
        ]);
        assert_eq!(cfg["vm"]["mem"], shown, "{given}");
    }
}
