//! `bulkhead policy ...`: the audit tools over the shipped policy and over files.

use std::time::Duration;

use tests::{run_bulkhead, scratch_dir};

fn policy(args: &[&str]) -> tests::RunResult {
    let mut all = vec!["policy"];
    all.extend_from_slice(args);
    run_bulkhead(&all, Duration::from_secs(30))
}

#[test]
fn list_and_show() {
    let r = policy(&["list"]);
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    let shipped = policies::policy(policies::PolicyId::BLK);
    let hash = policies::bpf_hash(policies::PolicyId::BLK);
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with("blk "))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        row.contains(&shipped.rules.len().to_string()) && row.contains(&hash),
        "{row}"
    );
    // The VMM's thread policies beside the worker's: one row each, with its hash.
    for role in policies::VmmThread::ALL {
        let id = policies::PolicyId::Vmm(role);
        let row = r
            .stdout
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["vmm", role.name()]))
            .unwrap_or_else(|| panic!("no row for {id}: {t}"));
        assert!(row.contains(&policies::bpf_hash(id)), "{row}");
    }

    let r = policy(&["show", "vmm/vcpu"]);
    assert_eq!(r.code, Some(0), "{}", r.transcript());
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("ioctl ") && l.contains("KVM_RUN")),
        "{}",
        r.stdout
    );

    let r = policy(&["show", "blk"]);
    assert_eq!(r.code, Some(0), "{}", r.transcript());
    let fallocate: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("fallocate "))
        .collect();
    assert_eq!(fallocate.len(), 2, "{}", r.stdout);
    assert!(
        fallocate[0].contains("arg1 == FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE")
            && fallocate[0].contains("DISCARD")
    );
    assert!(r.stdout.contains("accepted-risk"), "{}", r.stdout);

    let r = policy(&["show", "blk", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&r.stdout).expect("valid JSON");
    assert_eq!(json["rules"].as_array().unwrap().len(), shipped.rules.len());
    assert_eq!(json["default"], "trap");

    let r = policy(&["show", "blk", "--bpf"]);
    assert!(r.stdout.contains(&hash), "{}", r.transcript());
    let n = policies::bpf(policies::PolicyId::BLK).len();
    assert!(
        r.stdout.contains(&format!("{n} BPF instructions")),
        "{}",
        r.stdout
    );
}

#[test]
fn diff_exits_1_on_changes_and_names_them() {
    let dir = scratch_dir("policy-diff");
    let shipped =
        std::fs::read_to_string(tests::workspace_root().join("policies/blk.policy")).unwrap();
    let same = dir.join("same.policy");
    std::fs::write(&same, &shipped).unwrap();
    let r = policy(&["diff", "blk", same.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.transcript());

    let changed = shipped
        .lines()
        .filter(|l| !l.starts_with("fdatasync "))
        .map(|l| {
            if l.starts_with("epoll_ctl ") {
                l.replace("=> allow", "=> errno EPERM")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\nuname => allow : test addition\n";
    let other = dir.join("changed.policy");
    std::fs::write(&other, changed).unwrap();
    let r = policy(&["diff", "blk", other.to_str().unwrap()]);
    let t = r.transcript();
    assert_eq!(r.code, Some(1), "{t}");
    assert!(
        r.stdout.lines().any(|l| l.starts_with("- fdatasync ")),
        "{t}"
    );
    assert!(r.stdout.lines().any(|l| l.starts_with("+ uname ")), "{t}");
    assert!(
        r.stdout.lines().any(|l| l.starts_with("~ epoll_ctl ")),
        "{t}"
    );
}

#[test]
fn lint_passes_the_shipped_policy_and_flags_dangerous_rules() {
    let r = policy(&["lint"]);
    assert_eq!(
        r.code,
        Some(0),
        "the shipped policies must lint clean: {}",
        r.transcript()
    );

    let dir = scratch_dir("policy-lint");
    let head = "process: blk\nthread: main\ndefault: trap\narch: x86_64\n";
    let bad = dir.join("bad.policy");
    std::fs::write(
        &bad,
        format!("{head}openat => allow : wants files\nmmap => allow : any mapping\nkill => allow : signals\n"),
    )
    .unwrap();
    let r = policy(&["lint", bad.to_str().unwrap()]);
    let t = r.transcript();
    assert_eq!(r.code, Some(1), "{t}");
    for (line, call) in [(5, "openat"), (6, "mmap"), (7, "kill")] {
        assert!(
            r.stdout.contains(&format!("bad.policy:{line}: {call}:")),
            "{t}"
        );
    }
    let accepted = dir.join("accepted.policy");
    std::fs::write(
        &accepted,
        format!("{head}openat => allow : wants files\n    accepted-risk: the root is empty and read-only\n"),
    )
    .unwrap();
    let r = policy(&["lint", accepted.to_str().unwrap()]);
    assert_eq!(
        r.code,
        Some(0),
        "an accepted risk is not a finding: {}",
        r.transcript()
    );
}

/// A policy file that does not parse is an error (exit status 2, not a finding or a
/// difference), named by file, line and column; unknown syscall names included.
#[test]
fn malformed_files_fail_with_line_and_column() {
    let dir = scratch_dir("policy-malformed");
    let head = "process: blk\nthread: main\ndefault: trap\narch: x86_64\n";
    let cases = [
        (
            "typo.policy",
            "read => allow : ok\nwirte => allow : typo\n",
            "typo.policy:6:1: unknown syscall `wirte` on x86_64",
        ),
        (
            "cond.policy",
            "fcntl arg1 == F_GETFLL => allow : x\n",
            "cond.policy:5:15: unknown constant `F_GETFLL`",
        ),
        (
            "op.policy",
            "mmap arg2 & PROT_EXEC $ 0 => allow : x\n",
            "op.policy:5:23: expected",
        ),
        (
            "noreason.policy",
            "read => allow\n",
            "noreason.policy:5:6: rule for `read` has no justification",
        ),
    ];
    for (name, body, want) in cases {
        let path = dir.join(name);
        std::fs::write(&path, format!("{head}{body}")).unwrap();
        for args in [
            vec!["diff", "blk", path.to_str().unwrap()],
            vec!["lint", path.to_str().unwrap()],
            vec!["show", path.to_str().unwrap()],
        ] {
            let r = policy(&args);
            let t = r.transcript();
            assert_eq!(r.code, Some(2), "{args:?}: {t}");
            assert!(r.stdout.is_empty(), "{args:?}: {t}");
            let line = r.stderr.trim();
            assert_eq!(line.lines().count(), 1, "{args:?}: one error line: {t}");
            assert!(
                line.starts_with("bulkhead: error: ") && line.contains(want),
                "{args:?}: want {want:?}: {t}"
            );
        }
    }
}

/// `--json` and `--bpf` are two outputs: asking for both is an error, not a silent choice.
#[test]
fn show_refuses_json_and_bpf_together() {
    let r = run_bulkhead(
        &["policy", "show", "blk", "--json", "--bpf"],
        Duration::from_secs(30),
    );
    let t = r.transcript();
    assert_eq!(r.code, Some(2), "{t}");
    assert!(r.stdout.is_empty(), "{t}");
    assert!(
        r.stderr
            .contains("the argument '--json' cannot be used with '--bpf'"),
        "{t}"
    );
}

/// Output piped into a reader that has gone (`bulkhead policy list | head -0`) ends the
/// command quietly by SIGPIPE, as other tools do, not with a panic on stderr.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(tests::bulkhead_bin())
        .args(["policy", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before bulkhead has started writing.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}
