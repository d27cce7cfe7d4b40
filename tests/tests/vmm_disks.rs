//! The test guest's virtio-blk driver against bulkhead's own virtio-mmio transport and
//! vhost-user frontend, with each disk served by a spawned, sandboxed worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{
    check_blk_verify_image, require_kvm, run_bulkhead, scratch_dir, testguest, tg_lines, RunResult,
};

const DISK_MIB: u64 = 8;
const BLOCKS: u64 = 256;
const SEED: u64 = 7;

fn disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    p
}

fn run(plan: &str, disks: &[&Path], extra: &[&str]) -> RunResult {
    let specs: Vec<String> = disks
        .iter()
        .map(|d| format!("path={}", d.display()))
        .collect();
    run_specs(plan, &specs, extra)
}

/// Runs the test guest with `--disk` specs as given.
fn run_specs(plan: &str, disks: &[String], extra: &[&str]) -> RunResult {
    require_kvm();
    let kernel = testguest();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--cmdline".into(),
        plan.into(),
        "--mem".into(),
        "64".into(),
        "--vcpus".into(),
        "2".into(),
        "--timeout".into(),
        "60".into(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_bulkhead(&args, Duration::from_secs(90))
}

/// The VMM's own report of each worker's confinement, checked like the worker tests do.
fn assert_workers_were_confined(r: &RunResult, count: usize) {
    let t = r.transcript();
    let confined: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains(" confined: pid "))
        .collect();
    assert_eq!(
        confined.len(),
        count,
        "one confinement report per worker: {t}"
    );
    for line in confined {
        for fact in [
            "seccomp=filter",
            "no_new_privs=1",
            "CapEff=0000000000000000",
            "CapBnd=0000000000000000",
            "own namespaces=[user,mnt,pid,net,ipc,uts]",
            "root entries=0",
        ] {
            assert!(line.contains(fact), "{fact} missing in {line:?}: {t}");
        }
        assert!(!line.contains("uid=0 "), "{line}");
    }
}

/// Each worker says which engine it serves with; `engine` is what `engine=` asked for
/// (`auto` is io_uring on this kernel, which these tests need).
fn assert_engine(r: &RunResult, engine: &str, workers: usize) {
    let want = if engine == "auto" { "io_uring" } else { engine };
    let serving: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("(sandboxed, engine "))
        .collect();
    assert!(serving.len() >= workers, "{}", r.transcript());
    for line in serving {
        assert!(
            line.contains(&format!("(sandboxed, engine {want})")),
            "engine={engine}: {line}"
        );
    }
}

fn blk_verify(qd: u32, completion: &str, engine: &str, poll_us: u32) {
    let dir = scratch_dir(&format!(
        "vmm-disks-qd{qd}-{completion}-{engine}-poll{poll_us}"
    ));
    let d0 = disk(&dir, "d0.img");
    let d1 = disk(&dir, "d1.img");
    let plan = format!(
        "testguest.plan=blk-verify qd={qd} completion={completion} seed={SEED} blocks={BLOCKS}"
    );
    // One disk through the page cache, one with O_DIRECT.
    let specs = [
        format!("path={},engine={engine},poll_us={poll_us}", d0.display()),
        format!(
            "path={},engine={engine},poll_us={poll_us},direct=on",
            d1.display()
        ),
    ];
    let r = run_specs(&plan, &specs, &[]);
    assert_engine(&r, engine, 2);
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    assert_eq!(r.code, Some(0), "{t}");
    for dev in 0..2 {
        let summary = format!("TG blk dev={dev} wrote={BLOCKS} read={BLOCKS} verified={BLOCKS} flush=ok discard=ok write_zeroes=ok");
        assert!(
            lines.iter().any(|l| l.starts_with(&summary)),
            "missing {summary:?}: {t}"
        );
    }
    for (dev, image) in [(0, &d0), (1, &d1)] {
        if let Err(e) = check_blk_verify_image(image, &r.stdout, dev, SEED, BLOCKS) {
            panic!("disk {dev} on the host: {e}: {t}");
        }
    }
    assert_workers_were_confined(&r, 2);
}

#[test]
fn blk_verify_two_disks_qd1_poll() {
    blk_verify(1, "poll", "auto", 0);
}

/// The worker busy-polls its rings and the ring's completions before sleeping.
#[test]
fn blk_verify_two_disks_qd32_irq_polling_worker() {
    blk_verify(32, "irq", "io_uring", 200);
}

#[test]
fn blk_verify_two_disks_qd32_poll_sync_engine() {
    blk_verify(32, "poll", "sync", 0);
}

#[test]
fn blk_verify_two_disks_qd1_irq_sync_engine() {
    blk_verify(1, "irq", "sync", 0);
}

#[test]
fn blk_verify_two_disks_qd32_irq_io_uring_engine() {
    blk_verify(32, "irq", "io_uring", 0);
}

/// Multiqueue under bulkhead: with 2 vCPUs a worker-served disk gets 2 queues (one per
/// vCPU) and VIRTIO_BLK_F_MQ; the guest verifies both disks through queue 1, whose kick is
/// the ioeventfd with datamatch 1 (none reaches the VMM either).
/// Images on tmpfs (/dev/shm), which cannot FALLOC_FL_ZERO_RANGE: write-zeroes falls back
/// to writing zeroes, through the write call the policy allows, with both engines. Without
/// that, every write-zeroes killed its worker for a policy violation.
#[test]
fn write_zeroes_and_discard_on_a_tmpfs_image() {
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "this test needs /dev/shm (a tmpfs) for its images"
    );
    let dir = shm.join(format!("bulkhead-vmm-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let images = [disk(&dir, "d0.img"), disk(&dir, "d1.img")];
    let plan = format!("testguest.plan=blk-verify qd=8 completion=irq seed={SEED} blocks={BLOCKS}");
    let specs = [
        format!("path={},engine=sync", images[0].display()),
        format!("path={},engine=io_uring", images[1].display()),
    ];
    let r = run_specs(&plan, &specs, &[]);
    let t = r.transcript();
    let checked: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(dev, image)| check_blk_verify_image(image, &r.stdout, dev, SEED, BLOCKS))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let lines = tg_lines(&r.stdout);
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    assert_eq!(r.code, Some(0), "{t}");
    for dev in 0..2 {
        let summary = format!(
            "TG blk dev={dev} wrote={BLOCKS} read={BLOCKS} verified={BLOCKS} flush=ok discard=ok write_zeroes=ok"
        );
        assert!(
            lines.iter().any(|l| l.starts_with(&summary)),
            "missing {summary:?}: {t}"
        );
    }
    for (dev, result) in checked.into_iter().enumerate() {
        if let Err(e) = result {
            panic!("disk {dev} on the host: {e}: {t}");
        }
    }
    assert!(!r.stderr.contains("violated policy"), "{t}");
    assert!(r.stderr.contains("violations total=0"), "{t}");
    assert_workers_were_confined(&r, 2);
}

#[test]
fn blk_verify_through_the_second_queue() {
    let dir = scratch_dir("vmm-disks-queue1");
    let d0 = disk(&dir, "d0.img");
    let d1 = disk(&dir, "d1.img");
    let plan = format!(
        "testguest.plan=blk-verify qd=16 completion=irq queue=1 seed={SEED} blocks={BLOCKS}"
    );
    let r = run(&plan, &[&d0, &d1], &[]);
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    for dev in 0..2 {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("TG blk dev={dev} ")) && l.ends_with(" queue=1")),
            "dev {dev} on queue 1: {t}"
        );
        let summary = format!("TG blk dev={dev} wrote={BLOCKS} read={BLOCKS} verified={BLOCKS}");
        assert!(lines.iter().any(|l| l.starts_with(&summary)), "{t}");
    }
    for (dev, image) in [(0, &d0), (1, &d1)] {
        if let Err(e) = check_blk_verify_image(image, &r.stdout, dev, SEED, BLOCKS) {
            panic!("disk {dev} on the host: {e}: {t}");
        }
    }
    for disk in ["blk0", "blk1"] {
        assert_eq!(queue_notify_exits(&r, disk), 0, "{disk}: {t}");
    }
}

/// One queue kicked through a zero-length ioeventfd (`ioeventfd=any`): the guest's writes
/// and reads go through the worker, and no QueueNotify reaches the VMM.
#[test]
fn blk_verify_with_a_zero_length_ioeventfd() {
    // Two vCPUs (run_specs), which would mean two queues but for ioeventfd=any.
    let r = blk_verify_one_disk("vmm-disks-ioeventfd-any", "ioeventfd=any", &[]);
    assert_eq!(queue_notify_exits(&r, "blk0"), 0, "{}", r.transcript());
    // A QueueNotify value no queue has: the zero-length ioeventfd takes it too, where a
    // datamatch one lets it through to the VMM.
    let dir = scratch_dir("vmm-disks-ioeventfd-value");
    let d0 = disk(&dir, "d0.img");
    let plan = "testguest.plan=notify-cost writes=20 value=7";
    for (options, exits) in [
        ("ioeventfd=any", 0),
        ("num_queues=1,ioeventfd=datamatch", 21),
    ] {
        let spec = format!("path={},{options}", d0.display());
        let r = run_specs(plan, &[spec], &[]);
        let t = r.transcript();
        assert_eq!(
            tg_lines(&r.stdout).last().map(String::as_str),
            Some("TG done"),
            "{t}"
        );
        assert_eq!(queue_notify_exits(&r, "blk0"), exits, "{options}: {t}");
    }
}

/// QueueNotify writes `disk`'s registers saw in the VMM (its exit statistics).
fn queue_notify_exits(r: &RunResult, disk: &str) -> u64 {
    r.stderr
        .lines()
        .find(|l| l.contains(&format!("stats {disk} ")))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("queue_notify="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no QueueNotify count for {disk}: {}", r.transcript()))
}

/// blk-verify (QD 16, interrupts) on one disk with `path=IMG,{options}` and `extra`
/// arguments: the guest verifies, and so does the image on the host.
fn blk_verify_one_disk(name: &str, options: &str, extra: &[&str]) -> RunResult {
    let dir = scratch_dir(name);
    let d0 = disk(&dir, "d0.img");
    let plan =
        format!("testguest.plan=blk-verify qd=16 completion=irq seed={SEED} blocks={BLOCKS}");
    let spec = format!("path={},{options}", d0.display());
    let r = run_specs(&plan, &[spec], extra);
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    let summary = format!("TG blk dev=0 wrote={BLOCKS} read={BLOCKS} verified={BLOCKS}");
    assert!(lines.iter().any(|l| l.starts_with(&summary)), "{t}");
    if let Err(e) = check_blk_verify_image(&d0, &r.stdout, 0, SEED, BLOCKS) {
        panic!("disk 0 on the host: {e}: {t}");
    }
    r
}

/// A driver that resets and re-initialises its device (Linux on unbind/bind, kexec, a
/// reboot that keeps the VM) gets the same worker back each time: bulkhead re-sends the
/// same kick eventfd after every reset, and the worker must register it again rather
/// than die on its stale epoll entry. Both engines, one and two queues.
#[test]
fn twenty_device_resets_cost_no_worker() {
    const ROUNDS: u32 = 20;
    for (engine, queues) in [("io_uring", 1), ("sync", 2)] {
        let dir = scratch_dir(&format!("vmm-reinit-{engine}"));
        let d0 = disk(&dir, "d0.img");
        let plan = format!(
            "testguest.plan=blk-reinit rounds={ROUNDS} qd=4 completion=irq seed={SEED} blocks=8"
        );
        let spec = format!("path={},engine={engine},num_queues={queues}", d0.display());
        let r = run_specs(&plan, &[spec], &[]);
        let t = r.transcript();
        let lines = tg_lines(&r.stdout);
        assert!(
            lines
                .iter()
                .any(|l| l == &format!("TG reinit dev=0 rounds={ROUNDS} verified={}", ROUNDS * 8)),
            "{engine}: {t}"
        );
        assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
        assert_eq!(r.code, Some(0), "{t}");
        // The only end of a worker is its expected one, and nothing was restarted.
        let ends: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.contains("worker blk0 (pid"))
            .collect();
        assert!(
            ends.len() == 1 && ends[0].ends_with("ended with the VM"),
            "{engine}: a device reset must not cost the worker: {t}"
        );
        for sign in ["restarted", "ERROR", "WARN"] {
            assert!(!r.stderr.contains(sign), "{engine} ({sign:?}): {t}");
        }
    }
}

/// Each bad chain the guest can build gets the status the virtio spec asks for, and the
/// worker keeps serving (the plan reads after every case, and ends with TG done).
#[test]
fn hostile_chains_under_bulkhead_io_uring_engine() {
    hostile_chains("io_uring");
}

#[test]
fn hostile_chains_under_bulkhead_sync_engine() {
    hostile_chains("sync");
}

/// The same chains against a qcow2 image (imago behind the sync engine).
#[test]
fn hostile_chains_under_bulkhead_qcow2() {
    hostile_chains("qcow2");
}

/// The same chains against an NBD export (qemu-nbd serving a raw file).
#[test]
fn hostile_chains_under_bulkhead_nbd() {
    hostile_chains("nbd");
}

fn hostile_chains(engine: &str) {
    let dir = scratch_dir(&format!("vmm-hostile-{engine}"));
    let mut server = None;
    let spec = match engine {
        "qcow2" => {
            let d0 = dir.join("d0.qcow2");
            tests::make_qcow2(&d0, tests::Qcow2Of::Size(&format!("{DISK_MIB}M")));
            format!("path={},format=qcow2", d0.display())
        }
        "nbd" => {
            let d0 = disk(&dir, "d0.img");
            let nbd = tests::qemu_nbd(&d0, &dir.join("nbd.sock"), &[]);
            let spec = nbd.spec.clone();
            server = Some(nbd);
            spec
        }
        _ => {
            let d0 = disk(&dir, "d0.img");
            format!("path={},engine={engine}", d0.display())
        }
    };
    let r = run_specs("testguest.plan=hostile", &[spec], &[]);
    drop(server);
    assert_engine(
        &r,
        if matches!(engine, "qcow2" | "nbd") {
            "sync"
        } else {
            engine
        },
        1,
    );
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    for case in [
        "addr_far",
        "addr_ram_end",
        "addr_overflow",
        "loop",
        "too_long",
        "hdr_writable",
        "in_readable",
        "past_capacity",
        "unknown_type",
    ] {
        let prefix = format!("TG hostile {case} ");
        let line = lines.iter().find(|l| l.starts_with(&prefix));
        assert!(
            line.is_some_and(|l| l.ends_with(" ok")),
            "case {case}: {line:?}: {t}"
        );
    }
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    assert_eq!(r.code, Some(0), "{t}");
    assert!(
        !r.stderr.contains(" ERROR "),
        "the worker must survive (no supervisor error): {t}"
    );
    assert_workers_were_confined(&r, 1);
}

/// A readonly disk: the guest's OUT gets IOERR and the image does not change.
#[test]
fn hostile_readonly_out_under_bulkhead() {
    let dir = scratch_dir("vmm-hostile-ro");
    let d0 = disk(&dir, "d0.img");
    std::fs::write(&d0, vec![0x33u8; (DISK_MIB << 20) as usize]).unwrap();
    let kernel = testguest();
    require_kvm();
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "testguest.plan=hostile readonly=1",
            "--mem",
            "64",
            "--timeout",
            "60",
            "--disk",
            &format!("path={},readonly=on", d0.display()),
        ],
        Duration::from_secs(90),
    );
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("TG hostile ro_out status=1 ") && l.ends_with(" ok")),
        "{t}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    assert!(
        std::fs::read(&d0).unwrap().iter().all(|&b| b == 0x33),
        "a readonly image must not change"
    );
}

/// bulkhead's frontend against a backend nobody here wrote: qemu-storage-daemon's
/// vhost-user-blk export, next to one of our workers.
#[test]
fn blk_verify_with_qemu_storage_daemon_as_backend() {
    require_kvm();
    let dir = scratch_dir("vmm-qsd");
    let ours = disk(&dir, "ours.img");
    let theirs = disk(&dir, "qsd.img");
    let socket = dir.join("qsd.sock");
    let mut qsd = tests::storage_daemon(&theirs, &socket, "");
    let plan =
        format!("testguest.plan=blk-verify qd=32 completion=irq seed={SEED} blocks={BLOCKS}");
    let r = run(
        &plan,
        &[&ours],
        &["--disk", &format!("vhost_user={},id=qsd", socket.display())],
    );
    let _ = qsd.kill();
    let _ = qsd.wait();
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    for (dev, image) in [(0, &ours), (1, &theirs)] {
        if let Err(e) = check_blk_verify_image(image, &r.stdout, dev, SEED, BLOCKS) {
            panic!("disk {dev} on the host: {e}: {t}");
        }
    }
    assert_workers_were_confined(&r, 1);
}

/// Runs `plan` on two disks while the hook-enabled worker of disk 1 misbehaves as `hook`
/// says (test-only fault hooks, selected per disk id through the environment); returns
/// the run and disk 0's image.
fn run_with_faulty_blk1(hook: &str, plan: &str, name: &str) -> (RunResult, PathBuf) {
    require_kvm();
    let dir = scratch_dir(name);
    let d0 = disk(&dir, "d0.img");
    let d1 = disk(&dir, "d1.img");
    let mut cmd = std::process::Command::new(tests::bulkhead_bin());
    cmd.env("BULKHEAD_WORKER_FAULT_HOOK", format!("blk1:{hook}"))
        .arg("run")
        .arg("--kernel")
        .arg(testguest())
        .args(["--cmdline", plan])
        .args(["--mem", "64", "--timeout", "60", "--worker-bin"])
        .arg(tests::worker_hooks_bin())
        .arg("--disk")
        .arg(format!("path={}", d0.display()))
        .arg("--disk")
        .arg(format!("path={}", d1.display()));
    (tests::run_with_deadline(cmd, Duration::from_secs(90)), d0)
}

/// blk-verify on disk 0 beside a faulty disk 1: the guest's other disk works and the VM
/// runs to its own exit; returns the run for the hook-specific checks.
fn blk_verify_beside_a_faulty_worker(hook: &str, name: &str) -> RunResult {
    let plan =
        format!("testguest.plan=blk-verify dev=0 qd=32 completion=irq seed={SEED} blocks={BLOCKS}");
    let (r, d0) = run_with_faulty_blk1(hook, &plan, name);
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    assert_eq!(
        lines.last().map(String::as_str),
        Some("TG done"),
        "the other disk works: {t}"
    );
    assert_eq!(r.code, Some(0), "the VM runs to the guest's own exit: {t}");
    if let Err(e) = check_blk_verify_image(&d0, &r.stdout, 0, SEED, BLOCKS) {
        panic!("disk 0 on the host: {e}: {t}");
    }
    r
}

/// True once qemu-io can open `image` for writing (no lock of anyone's left on it), tried
/// for up to `within`.
fn unlocked_within(image: &Path, within: Duration) -> bool {
    let qemu_io = tests::require_tool("qemu-io", "qemu-utils");
    let deadline = std::time::Instant::now() + within;
    loop {
        let probe = std::process::Command::new(&qemu_io)
            .args(["-f", "raw", "-c", "flush"])
            .arg(image)
            .output()
            .unwrap();
        if probe.status.success() && !String::from_utf8_lossy(&probe.stderr).contains("Failed") {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker that misbehaves while the VM starts fails the start: bulkhead exits 1 with
/// one error line, runs no vCPU, and ends the worker it had started for disk 0 (both
/// images are free at once).
fn misbehaving_second_worker(hook: &str, expected: &str) {
    let plan = format!("testguest.plan=blk-verify dev=0 qd=8 seed={SEED} blocks={BLOCKS}");
    let (r, d0) = run_with_faulty_blk1(hook, &plan, &format!("vmm-hook-{hook}"));
    assert_failed_start(&r, &[d0.clone(), d0.with_file_name("d1.img")], expected);
}

fn assert_failed_start(r: &RunResult, images: &[PathBuf], expected: &str) {
    let t = r.transcript();
    assert_eq!(r.code, Some(1), "{t}");
    assert!(tg_lines(&r.stdout).is_empty(), "no vCPU may run: {t}");
    assert!(!r.stderr.contains("booting"), "no vCPU may run: {t}");
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("bulkhead: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {t}");
    assert!(errors[0].contains(expected), "expected {expected:?}: {t}");
    for image in images {
        assert!(
            unlocked_within(image, Duration::from_millis(500)),
            "{} is still locked after bulkhead exited: {t}",
            image.display()
        );
    }
}

/// A worker executable that is no worker at all (it exits at once): the start fails.
#[test]
fn a_worker_that_cannot_start_fails_the_start() {
    require_kvm();
    let dir = scratch_dir("vmm-worker-bin-true");
    let d0 = disk(&dir, "d0.img");
    let r = tests::run_bulkhead(
        &[
            "run",
            "--kernel",
            testguest().to_str().unwrap(),
            "--worker-bin",
            "/bin/true",
            "--disk",
            &format!("path={}", d0.display()),
        ],
        Duration::from_secs(30),
    );
    assert_failed_start(&r, &[d0], "disk blk0");
}

#[test]
fn worker_dying_mid_handshake() {
    misbehaving_second_worker("die-in-handshake", "failed the handshake");
}

#[test]
fn worker_sending_a_malformed_control_message() {
    misbehaving_second_worker("garbage-control", "sent a bad control message");
}

#[test]
fn worker_sending_a_malformed_vhost_user_reply() {
    misbehaving_second_worker("bad-vhost-config", "GET_CONFIG failed");
}

/// Where the vDSO cannot read the host's clocksource (an L1 guest under QEMU TCG, hpet or
/// acpi_pm hosts), glibc falls back to the clock_gettime system call, and the worker makes
/// one for every log line. A worker making that call (test hook `clock-syscall`, right
/// after its sandbox is complete) serves disk 1 like any other: no violation, no restart.
#[test]
fn clock_reads_without_a_vdso_are_allowed() {
    let plan = format!("testguest.plan=blk-verify qd=8 completion=irq seed={SEED} blocks={BLOCKS}");
    let (r, d0) = run_with_faulty_blk1("clock-syscall", &plan, "vmm-clock-syscall");
    let t = r.transcript();
    assert_eq!(
        tg_lines(&r.stdout).last().map(String::as_str),
        Some("TG done"),
        "{t}"
    );
    assert_eq!(r.code, Some(0), "{t}");
    assert!(!r.stderr.contains("violated policy"), "{t}");
    assert!(
        r.stderr.contains("stats violations total=0"),
        "no violation may be recorded: {t}"
    );
    assert!(!r.stderr.contains("restarted"), "{t}");
    if let Err(e) = check_blk_verify_image(&d0, &r.stdout, 0, SEED, BLOCKS) {
        panic!("disk 0 on the host: {e}: {t}");
    }
}

/// A worker killed by its seccomp filter: the VMM names the syscall from the status page,
/// and the other disk and the VM carry on.
#[test]
fn worker_killed_by_its_policy_is_reported_by_name() {
    let r = blk_verify_beside_a_faulty_worker("openat", "vmm-violation");
    let t = r.transcript();
    let report = r
        .stderr
        .lines()
        .find(|l| {
            l.contains("worker blk1 (pid") && l.contains("violated policy blk: openat(AT_FDCWD, 0x")
        })
        .unwrap_or_else(|| panic!("the violation must be logged by name: {t}"));
    assert!(report.contains("O_RDONLY|O_CLOEXEC"), "{report}");
    assert!(report.contains("seccomp violation"), "{report}");
    // Kept for metrics: the VM's closing statistics list it with its raw record. (Each
    // successor runs the same hook, so there may be more than one before the budget ends
    // the restarts.)
    let total: u64 = r
        .stderr
        .lines()
        .find_map(|l| l.split("stats violations total=").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no violation total: {t}"));
    assert!(total >= 1, "{t}");
    let kept = r
        .stderr
        .lines()
        .find(|l| l.contains("violation blk1 pid="))
        .unwrap_or_else(|| panic!("the violation must be kept: {t}"));
    assert!(
        kept.contains("policy=blk/main nr=257 ") && kept.contains("call=openat(AT_FDCWD, 0x"),
        "{kept}"
    );
}

/// A worker that crashes once the VM runs (test hooks: a fault, a bus error, abort(), a
/// panic) is reported as a crash with its signal (and the faulting address), never as a
/// policy violation, and no violation is counted; the other disk and the VM carry on.
#[test]
fn crashes_are_reported_as_crashes_not_violations() {
    for (hook, expected) in [
        ("segv", "crashed: SIGSEGV at address 0x10"),
        ("sigbus", "crashed: SIGBUS at address 0x"),
        ("abort", "crashed: aborted (SIGABRT)"),
        ("panic", "crashed: panicked"),
    ] {
        let r = blk_verify_beside_a_faulty_worker(hook, &format!("vmm-crash-{hook}"));
        let t = r.transcript();
        assert!(
            r.stderr
                .lines()
                .any(|l| l.contains("worker blk1 (pid") && l.contains(expected)),
            "{hook}: want {expected:?}: {t}"
        );
        assert!(!r.stderr.contains("violated policy"), "{hook}: {t}");
        assert!(r.stderr.contains("stats violations total=0"), "{hook}: {t}");
        if hook == "panic" {
            assert!(
                r.stderr
                    .contains("panicked: panicked at device-workers/src/hooks.rs"),
                "the panic's message and place: {t}"
            );
        }
    }
}

/// A crash loop: every worker of disk 1 exits as soon as its first ring starts, before it
/// can complete a request (test hook `crash-loop`, for budget + 1 workers). The supervisor
/// restarts with backoff until the budget is spent, then the device goes
/// DEVICE_NEEDS_RESET and a worker in fail mode answers the guest's pending and new
/// requests with IOERR (errors, not a hang). The guest resets the device, which brings a
/// normal worker back: its writes verify. Disk 0 is untouched and the VM runs to the
/// guest's own exit.
#[test]
fn crash_loop_fails_requests_then_a_reset_recovers() {
    let budget = vmm_core::supervisor::policy::CRASH_LOOP_BUDGET;
    let dir = scratch_dir("vmm-crash-loop-turns");
    let turns = dir.join("crash-loop-turns");
    std::fs::write(&turns, format!("{}\n", budget + 1)).expect("write the turn count");
    let plan = format!(
        "testguest.plan=blk-recover dev=1 qd=16 completion=irq seed={SEED} blocks={BLOCKS}"
    );
    let hook = format!("crash-loop={}", turns.display());
    let (r, d0) = run_with_faulty_blk1(&hook, &plan, "vmm-crash-loop");
    let t = r.transcript();
    let lines = tg_lines(&r.stdout);
    // Every pending write failed (no worker ever served one) and so did a new one.
    assert!(
        lines
            .iter()
            .any(|l| l == "TG recover dev=1 pending=16 ok=0 ioerr=16 needs_reset=1 new=ioerr"),
        "{t}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("TG recover dev=1 reset wrote={BLOCKS} verified={BLOCKS}")),
        "a reset brings the disk back: {t}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("TG done"),
        "disk 0 works and the guest ends by itself: {t}"
    );
    assert_eq!(r.code, Some(0), "{t}");
    if let Err(e) = check_blk_verify_image(&d0, &r.stdout, 0, SEED, BLOCKS) {
        panic!("disk 0 on the host: {e}: {t}");
    }
    let log = |needle: &str| r.stderr.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        log("fault hook: exiting as the first ring starts"),
        budget as usize + 1,
        "{t}"
    );
    // The crash loop's restarts, and the normal worker after the guest's reset.
    assert_eq!(
        log("disk blk1: worker restarted in "),
        budget as usize + 1,
        "{t}"
    );
    // Backoff doubles from the second restart of the loop.
    for n in 2..=budget {
        assert_eq!(
            log(&format!("; {n} in a row died before serving")),
            1,
            "restart {n}: {t}"
        );
    }
    assert_eq!(
        log(&format!(
            "disk blk1: {} workers in a row ended before serving a request: giving up",
            budget + 1
        )),
        1,
        "{t}"
    );
    assert_eq!(log("disk blk1: fail-mode worker started in "), 1, "{t}");
    assert_eq!(
        log("in FAIL MODE: every request completes with IOERR"),
        1,
        "{t}"
    );
    assert_eq!(
        log("disk blk1: the guest reset the device: starting a normal worker"),
        1,
        "{t}"
    );
    assert_eq!(log("stopped after the guest reset its device"), 1, "{t}");
    assert!(!r.stderr.contains("disk blk0: worker restarted"), "{t}");
    assert_eq!(
        std::fs::read_to_string(&turns)
            .expect("read the turn count")
            .trim(),
        "0",
        "{t}"
    );
}

/// Every forbidden class, issued as a real raw syscall by a confined worker (test-only
/// hook): the dedicated exit, the status-page record (number and arguments from siginfo),
/// the call decoded by name in the VMM's log, and the VM and the other disk carry on.
#[test]
fn each_forbidden_syscall_class_kills_only_its_worker() {
    for (hook, nr, decoded) in [
        ("open", 2, "open(0x"),
        ("openat", 257, "openat(AT_FDCWD, 0x"),
        ("socket", 41, "socket(AF_INET, SOCK_STREAM, 0)"),
        ("execve", 59, "execve(0x"),
        ("ptrace", 101, "ptrace(PTRACE_TRACEME, 0, NULL, NULL)"),
        ("mprotect-exec", 10, "PROT_READ|PROT_EXEC)"),
        ("kill", 62, "kill(1234, SIGKILL)"),
        ("unshare", 272, "unshare(CLONE_NEWNET)"),
        ("mount", 165, "mount(0x"),
        ("bpf", 321, "bpf(BPF_PROG_LOAD, NULL, 0)"),
        ("io_uring_setup", 425, "io_uring_setup(8, NULL)"),
        (
            "io_uring_register",
            427,
            "io_uring_register(3, 11, NULL, 0)",
        ),
        ("clone", 56, "clone(0|SIGCHLD"),
    ] {
        let r = blk_verify_beside_a_faulty_worker(hook, &format!("vmm-class-{hook}"));
        let t = r.transcript();
        let report = r
            .stderr
            .lines()
            .find(|l| l.contains("worker blk1 (pid") && l.contains("violated policy blk: "))
            .unwrap_or_else(|| panic!("{hook}: no violation report: {t}"));
        assert!(
            report.contains(decoded),
            "{hook}: want {decoded:?} in {report:?}"
        );
        assert!(
            report.contains("exited on a seccomp violation"),
            "{hook}: {report}"
        );
        assert!(
            r.stderr.contains(&format!("violation nr={nr} args=[")),
            "{hook}: the status page must hold syscall {nr}: {t}"
        );
    }
}

/// When bulkhead exits its workers are gone and the image is unlocked, so the next run
/// (or any other writer) can take it at once: the io_uring engine's registered image
/// outlives the worker process by a moment, and bulkhead waits for that too. Several runs
/// back to back, since the window is short.
#[test]
fn the_image_is_unlocked_when_bulkhead_exits() {
    let dir = scratch_dir("vmm-disks-unlocked-at-exit");
    let d0 = disk(&dir, "d0.img");
    for round in 0..5 {
        let spec = format!("path={},engine=io_uring,direct=on", d0.display());
        let r = run_specs(
            &format!("testguest.plan=blk-verify qd=8 seed={SEED} blocks=32"),
            &[spec],
            &[],
        );
        assert_eq!(r.code, Some(0), "round {round}: {}", r.transcript());
        // qemu-io opens the image for writing only when no lock of QEMU's kind is left.
        let probe = std::process::Command::new(tests::require_tool("qemu-io", "qemu-utils"))
            .args(["-f", "raw", "-c", "flush"])
            .arg(&d0)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&probe.stderr);
        assert!(
            probe.status.success() && !said.contains("Failed to get"),
            "round {round}: the image is still locked after bulkhead exited: {said}\n{}",
            r.transcript()
        );
    }
}

/// Guest RAM in 2 MiB huge pages (`--hugepages`): the worker maps the same hugetlbfs
/// memfd, and the guest's writes and reads go through it. scripts/test.sh reserves the
/// pages (`vm.nr_hugepages`).
#[test]
fn blk_verify_with_huge_page_guest_memory() {
    let free = vmm_core::memory::free_huge_pages();
    assert!(
        free >= 32,
        "this test needs 32 free 2 MiB huge pages for 64 MiB of guest RAM, the host has \
         {free}: reserve them with `sysctl vm.nr_hugepages=64` (scripts/test.sh does)"
    );
    let r = blk_verify_one_disk("vmm-disks-hugepages", "direct=on", &["--hugepages"]);
    assert!(
        r.stderr.contains("in 2 MiB huge pages"),
        "{}",
        r.transcript()
    );
    assert_workers_were_confined(&r, 1);
}
