//! Bad configuration is refused with one clear error line and a non-zero exit, before any
//! vCPU runs (so no guest output, and quickly).

use std::time::Duration;

use tests::{require_kvm, run_bulkhead, scratch_dir, testguest};

use tests::assert_bulkhead_refused as assert_refused;

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

fn image(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

/// `bulkhead run` on the test guest with these `--disk` specs.
fn refused_disks(specs: &[String], expected: &str) {
    require_kvm();
    let kernel = testguest();
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
    ];
    for spec in specs {
        args.push("--disk".into());
        args.push(spec.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(&args, expected);
}

#[test]
fn two_disks_with_one_id() {
    let dir = scratch_dir("args-dup-id");
    let (a, b) = (image(&dir, "a.img"), image(&dir, "b.img"));
    refused_disks(
        &[
            format!("path={},id=root", a.display()),
            format!("path={},id=root", b.display()),
        ],
        "two disks have the id \"root\"",
    );
    // An explicit id equal to another disk's default one.
    refused_disks(
        &[
            format!("path={}", a.display()),
            format!("path={}", b.display()),
            format!("path={},id=blk1", image(&dir, "c.img").display()),
        ],
        "two disks have the id \"blk1\"",
    );
}

#[test]
fn one_image_given_twice_under_any_name() {
    let dir = scratch_dir("args-dup-image");
    let a = image(&dir, "a.img");
    let link = dir.join("a.link");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let hard = dir.join("a.hard");
    std::fs::hard_link(&a, &hard).unwrap();
    for other in [&a, &link, &hard] {
        refused_disks(
            &[
                format!("path={},readonly=on", a.display()),
                format!("path={},readonly=on", other.display()),
            ],
            "disks blk0 and blk1 are the same image",
        );
    }
}

#[test]
fn empty_and_repeated_disk_options() {
    let dir = scratch_dir("args-empty");
    let a = image(&dir, "a.img");
    refused_disks(&["path=".into()], "path= needs a value");
    refused_disks(
        &[format!("path={},serial=", a.display())],
        "serial= needs a value",
    );
    refused_disks(
        &[format!("path={},path={}", a.display(), a.display())],
        "duplicate field `path`",
    );
}

/// A FIFO as an image must be refused, not waited on (open() of a FIFO blocks until a
/// writer comes, and --timeout does not run yet).
#[test]
fn a_fifo_or_a_directory_as_an_image() {
    let dir = scratch_dir("args-fifo");
    let fifo = dir.join("disk.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    for ro in ["off", "on"] {
        refused_disks(
            &[format!("path={},readonly={ro}", fifo.display())],
            &format!("disk image {} is a FIFO", fifo.display()),
        );
    }
    refused_disks(
        &[format!("path={}", dir.display())],
        &format!("disk image {} is a directory", dir.display()),
    );
}

/// Image keys mean nothing to an external vhost-user backend: refused, not ignored; and
/// a key the disk does not have is named.
#[test]
fn image_keys_for_a_vhost_user_disk() {
    refused_disks(
        &["vhost_user=/nonexistent.sock,engine=sync".into()],
        "engine= applies to an image bulkhead serves",
    );
    refused_disks(
        &["vhost_user=/nonexistent.sock,spare=off".into()],
        "spare= applies to an image bulkhead serves",
    );
    refused_disks(
        &["path=/nonexistent.img,colour=blue".into()],
        "unknown field `colour`",
    );
}

/// The trusted binary has no bench (that is `bulkhead-bench`, which runs QEMU, fio and
/// strace): `bulkhead bench` is an unknown subcommand and `--help` does not offer it.
#[test]
fn no_bench_subcommand_in_the_trusted_binary() {
    let r = run_bulkhead(&["bench", "--quick"], Duration::from_secs(30));
    assert_eq!(r.code, Some(2), "a usage error: {}", r.transcript());
    assert!(
        r.stderr.contains("unrecognized subcommand 'bench'"),
        "{}",
        r.transcript()
    );
    let help = run_bulkhead(&["--help"], Duration::from_secs(30));
    assert_eq!(help.code, Some(0), "{}", help.transcript());
    assert!(
        help.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("run ")),
        "the subcommands are listed: {}",
        help.transcript()
    );
    assert!(
        !help
            .stdout
            .lines()
            .any(|l| l.trim_start().starts_with("bench")),
        "{}",
        help.transcript()
    );
}

/// Every option of every `bulkhead` command says its default in its help (or that it is
/// required).
#[test]
fn every_option_says_its_default() {
    for command in [
        &["run"][..],
        &["ctl"],
        &["policy", "list"],
        &["policy", "show"],
        &["policy", "diff"],
        &["policy", "lint"],
        &["policy", "learn"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let r = run_bulkhead(&args, Duration::from_secs(30));
        assert_eq!(r.code, Some(0), "{}", r.transcript());
        let options = r.stdout.split("Options:").nth(1).unwrap_or("");
        // Each option's text runs from its line to the next option's.
        let mut texts: Vec<String> = Vec::new();
        for line in options.lines() {
            let starts = line.starts_with("  -") || line.starts_with("      --");
            match texts.last_mut() {
                Some(t) if !starts => {
                    t.push(' ');
                    t.push_str(line.trim());
                }
                _ => texts.push(line.trim().to_string()),
            }
        }
        for text in texts {
            if text.starts_with("-h, --help") || text.is_empty() {
                continue;
            }
            assert!(
                text.contains("[default: ")
                    || text.contains("(required)")
                    || text.contains("Required unless"),
                "bulkhead {}: {text}",
                command.join(" ")
            );
        }
    }
}
