//! `bulkhead policy learn` over the integration workloads: the test guest's `blk-verify`
//! under bulkhead (three disks: page cache, O_DIRECT, qcow2), and a real Linux driver under
//! QEMU TCG against the standalone worker (dd write and read-back with fsync, discard,
//! sync). The shipped policy must be what they need: nothing missing, and nothing more
//! than rules flagged rare-path. Learn must also see what it is not told: a rule deleted
//! from a fixture shows up as missing, and a fault hook's extra syscall shows up learned.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use policies::{Policy, PolicyId};
use tests::qemu::{qemu_with_vhost_user, GUEST_RAM_MEMFD};
use tests::sandbox_facts::SandboxFacts;
use tests::worker::Worker;
use tests::{
    bulkhead_bin, check_blk_verify_image, require_kvm, run_with_deadline, scratch_dir, testguest,
    tg_lines, worker_bin, worker_hooks_bin, RunResult,
};

const SEED: u64 = 11;
const BLOCKS: u64 = 128;
const BANNER: &str = "LEARN MODE: seccomp records and allows every syscall";

fn image(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    path
}

fn embedded() -> &'static Policy {
    policies::policy(PolicyId::BLK)
}

fn parse_learned(path: &Path, t: &str) -> Policy {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("learned policy {}: {e}: {t}", path.display()));
    policies::format::parse(&path.display().to_string(), &text)
        .unwrap_or_else(|e| panic!("the learned policy must parse: {e}\n{text}"))
}

/// `bulkhead policy learn LEARN_ARGS -- RUN_ARGS --kernel testguest ...` running blk-verify
/// on `disks` (`--disk` specs).
fn learn_command(learn_args: &[&OsStr], run_args: &[&OsStr], disks: &[String]) -> Command {
    let mut cmd = Command::new(bulkhead_bin());
    cmd.args(["policy", "learn"])
        .args(learn_args)
        .arg("--")
        .args(run_args)
        .arg("--kernel")
        .arg(testguest())
        .args(["--mem", "64", "--timeout", "60", "--cmdline"])
        .arg(format!(
            "testguest.plan=blk-verify qd=32 completion=irq seed={SEED} blocks={BLOCKS}"
        ));
    for disk in disks {
        cmd.arg("--disk").arg(disk);
    }
    cmd
}

/// `bulkhead policy learn [learn_args] -- <run args>` over blk-verify on three disks: one
/// per I/O engine, and a qcow2 image (imago, through the sync engine; without a backing
/// file its partial-cluster writes zero the rest of a new cluster, which grows the file
/// with ftruncate; a backing file's reads are preadv, as the raw disks').
fn learn_blk_verify(dir: &Path, learn_args: &[&str]) -> RunResult {
    require_kvm();
    let d0 = image(dir, "d0.img", 8 << 20);
    let d1 = image(dir, "d1.img", 8 << 20);
    let d2 = dir.join("d2.qcow2");
    tests::make_qcow2(&d2, tests::Qcow2Of::Size("8M"));
    let learn_args: Vec<&OsStr> = learn_args.iter().map(OsStr::new).collect();
    let cmd = learn_command(
        &learn_args,
        &[],
        &[
            // Both engines: the sync one's syscalls and the io_uring one's.
            format!("path={},engine=sync", d0.display()),
            format!("path={},direct=on,engine=io_uring", d1.display()),
            format!("path={},format=qcow2", d2.display()),
        ],
    );
    let r = run_with_deadline(cmd, Duration::from_secs(120));
    let t = r.transcript();
    assert!(!r.killed, "{t}");
    let lines = tg_lines(&r.stdout);
    assert!(lines.iter().any(|l| l == "TG done"), "{t}");
    for dev in 0..3 {
        let summary = format!("TG blk dev={dev} wrote={BLOCKS} read={BLOCKS} verified={BLOCKS}");
        assert!(
            lines.iter().any(|l| l.starts_with(&summary)),
            "{summary}: {t}"
        );
    }
    for (dev, img) in [(0, &d0), (1, &d1)] {
        if let Err(e) = check_blk_verify_image(img, &r.stdout, dev, SEED, BLOCKS) {
            panic!("disk {dev} on the host after learn mode: {e}: {t}");
        }
    }
    // Said loudly by bulkhead and by each worker, with the sandbox it keeps.
    assert!(r.stderr.matches(BANNER).count() >= 3, "{t}");
    assert_eq!(
        r.stderr.matches("confined: pid").count(),
        3,
        "each learning worker reports its confinement: {t}"
    );
    r
}

/// Polls until the worker's seccomp filter is on (learn mode says so just before it
/// installs the filter), then checks the whole sandbox.
fn assert_learning_worker_confined(pid: u32, disk: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let facts = SandboxFacts::read(pid);
        if facts.field("Seccomp") == "2" || Instant::now() > deadline {
            facts.assert_confined(disk, &[GUEST_RAM_MEMFD, "bulkhead-worker-status"]);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Linux guest kit's driver against `bulkhead policy learn --worker`.
fn learn_linux_dd(dir: &Path) -> (Policy, String) {
    let disk = image(dir, "linux.img", 32 << 20);
    let socket = dir.join("vhu.sock");
    let out = dir.join("linux.policy");
    let mut cmd = Command::new(bulkhead_bin());
    cmd.args(["policy", "learn", "--worker", "--worker-bin"])
        .arg(worker_bin())
        .arg("--out")
        .arg(&out)
        .args(["--", "blk", "--num-queues", "2", "--socket"])
        .arg(&socket)
        .arg("--disk")
        .arg(&disk);
    let mut worker = Worker::start_command(cmd);
    let guest_cmd = "set -e; \
        for i in 5 900 4000; do yes learn-$i | head -c 4096 | dd of=/dev/vda bs=4096 seek=$i conv=notrunc,fsync oflag=direct 2>/dev/null; done; \
        sync; echo 3 > /proc/sys/vm/drop_caches; \
        for i in 5 900 4000; do echo sum $i $(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | md5sum); done; \
        dd if=/dev/vda of=/dev/null bs=64k count=64 2>/dev/null; \
        blkdiscard -o 8388608 -l 1048576 /dev/vda; echo discard ok; sync";
    let qemu = qemu_with_vhost_user(&socket, 2, guest_cmd);
    let qemu_thread = std::thread::spawn(move || run_with_deadline(qemu, Duration::from_secs(150)));
    let pid = worker.sandboxed_pid();
    assert_learning_worker_confined(pid, &disk);
    let r = qemu_thread.join().expect("QEMU thread");
    let (code, text) = worker.finish(Duration::from_secs(30));
    let t = format!(
        "{}\n--- bulkhead policy learn --worker ---\n{text}",
        r.transcript()
    );
    assert!(r.stdout.contains("GUESTKIT done rc=0"), "guest: {t}");
    assert!(r.stdout.contains("discard ok"), "{t}");
    let block = |i: u64| {
        let mut b = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&disk).unwrap(),
            &mut b,
            i * 4096,
        )
        .unwrap();
        b
    };
    for i in [5u64, 900, 4000] {
        let want: Vec<u8> = format!("learn-{i}\n").bytes().cycle().take(4096).collect();
        assert!(block(i) == want, "block {i} on the host: {t}");
    }
    assert!(text.matches(BANNER).count() >= 2, "{t}");
    assert!(text.contains("0 missing"), "{t}");
    assert_eq!(code, Some(0), "nothing missing, worker ended cleanly: {t}");
    (parse_learned(&out, &t), t)
}

#[test]
fn the_policy_is_exactly_what_the_workloads_need() {
    let dir = scratch_dir("learn-minimal");
    let out = dir.join("verify.policy");
    let json = dir.join("verify.json");
    let args = [
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    let r = learn_blk_verify(&dir, &args);
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "nothing missing: {t}");
    assert!(r.stdout.contains(", 0 missing,"), "{t}");
    let verify = parse_learned(&out, &t);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["calls"].as_u64().unwrap() > 100, "{report}");
    assert_eq!(report["missing"].as_array().unwrap().len(), 0, "{report}");
    // The VMM's own threads learned over the same workload (API-less, one vCPU).
    assert!(
        r.stdout
            .contains("VMM threads: 0 calls outside their policies (9 policies)"),
        "{t}"
    );
    assert_eq!(
        report["vmm_outside_policies"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );

    let (linux, linux_t) = learn_linux_dd(&dir);

    let mut needed: BTreeSet<String> = BTreeSet::new();
    for p in [&verify, &linux] {
        for rule in &p.rules {
            // Every learned rule is a rule of the shipped policy, verbatim.
            assert!(
                embedded()
                    .rules
                    .iter()
                    .any(|e| e.identity() == rule.identity()
                        && e.justification == rule.justification),
                "learned rule {rule} is not in the shipped policy"
            );
            needed.insert(rule.identity());
        }
    }
    let surplus: Vec<String> = embedded()
        .rules
        .iter()
        .filter(|r| !needed.contains(&r.identity()) && r.rare_path().is_none())
        .map(|r| r.identity())
        .collect();
    assert!(
        surplus.is_empty(),
        "rules no workload needed and not flagged rare-path: {surplus:?}\n\
         blk-verify learned: {:?}\nLinux learned: {:?}\n{linux_t}",
        verify
            .rules
            .iter()
            .map(|r| r.identity())
            .collect::<Vec<_>>(),
        linux.rules.iter().map(|r| r.identity()).collect::<Vec<_>>()
    );
    // Both workloads move data: the I/O calls must be among what was learned.
    // Both are recorded to a normal exit (bulkhead disconnects its workers when the guest
    // is done, QEMU when it powers off).
    // The io_uring engine (both workloads) submits with io_uring_enter; the sync engine
    // (one blk-verify disk) calls preadv, pwritev and fdatasync.
    for io in ["io_uring_enter", "epoll_wait", "recvmsg", "exit_group"] {
        assert!(
            verify.rules.iter().any(|r| r.syscall == io),
            "blk-verify: {io}"
        );
        assert!(linux.rules.iter().any(|r| r.syscall == io), "Linux: {io}");
    }
    for io in ["preadv", "pwritev", "fdatasync"] {
        assert!(
            verify.rules.iter().any(|r| r.syscall == io),
            "blk-verify: {io}"
        );
    }
}

#[test]
fn a_rule_deleted_from_the_policy_is_reported_missing() {
    let dir = scratch_dir("learn-deleted-rule");
    let text =
        std::fs::read_to_string(tests::workspace_root().join("policies/blk.policy")).unwrap();
    let fixture: String = text
        .lines()
        .filter(|l| !l.starts_with("pwritev "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        fixture.len() < text.len(),
        "the fixture lost its pwritev rule"
    );
    let against = dir.join("no-pwritev.policy");
    std::fs::write(&against, fixture).unwrap();
    let out = dir.join("learned.policy");
    let r = learn_blk_verify(
        &dir,
        &[
            "--against",
            against.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let t = r.transcript();
    assert_eq!(r.code, Some(1), "a missing rule is exit status 1: {t}");
    let missing = missing_lines(&r.stdout);
    assert_eq!(missing.len(), 1, "{t}");
    assert!(missing[0].contains("missing: pwritev "), "{t}");
    assert!(
        r.stdout.contains("+ pwritev => allow: LEARNED, REVIEW:"),
        "{t}"
    );
    let learned = parse_learned(&out, &t);
    assert!(learned.rules.iter().any(|r| r.syscall == "pwritev"), "{t}");
}

#[test]
fn an_extra_syscall_from_a_fault_hook_is_learned() {
    let dir = scratch_dir("learn-extra-syscall");
    let out = dir.join("learned.policy");
    let hooks = worker_hooks_bin();
    let r = learn_blk_verify_with_bin(&dir, &out, &hooks);
    let t = r.transcript();
    assert_eq!(r.code, Some(1), "{t}");
    let missing = missing_lines(&r.stdout);
    assert_eq!(missing.len(), 1, "only the hook's call is new: {t}");
    assert!(missing[0].contains("missing: uname "), "{t}");
    assert!(missing[0].contains(" 1 calls, e.g. uname("), "{t}");
    let learned = parse_learned(&out, &t);
    assert!(learned.rules.iter().any(|r| r.syscall == "uname"), "{t}");
}

/// The summary's `missing:` lines.
fn missing_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("missing:"))
        .collect()
}

fn learn_blk_verify_with_bin(dir: &Path, out: &Path, bin: &Path) -> RunResult {
    // The run arguments take --worker-bin; the hook goes to disk blk0 only.
    require_kvm();
    let d0 = image(dir, "d0.img", 8 << 20);
    let mut cmd = learn_command(
        &[OsStr::new("--out"), out.as_os_str()],
        &[OsStr::new("--worker-bin"), bin.as_os_str()],
        &[format!("path={}", d0.display())],
    );
    cmd.env("BULKHEAD_WORKER_FAULT_HOOK", "blk0:extra-syscall");
    let r = run_with_deadline(cmd, Duration::from_secs(120));
    let t = r.transcript();
    assert!(tg_lines(&r.stdout).iter().any(|l| l == "TG done"), "{t}");
    if let Err(e) = check_blk_verify_image(&d0, &r.stdout, 0, SEED, BLOCKS) {
        panic!("disk 0 on the host: {e}: {t}");
    }
    r
}
