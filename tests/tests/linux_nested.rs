//! Stock Linux under bulkhead, on a KVM that runs guest kernel code: the nested harness
//! (tests/nested/run.sh). L1 is the guest kit's Debian cloud kernel under QEMU TCG with
//! `-cpu max` (emulated SVM); its kvm-amd gives it a /dev/kvm and its root stays the
//! initramfs; bulkhead and its workers run there and boot L2, the same kernel, through PVH
//! (vmlinux) or the 64-bit boot protocol (bzImage), with the guest kit's initramfs.
//!
//! Each test is one L1 run of one scenario (tests/nested/scenarios/) that starts several
//! VMs one after the other; the scenario reports facts, and the assertions here judge them
//! together with L2's console and bulkhead's log. A failure prints the whole transcript.

use std::time::Duration;

use tests::nested::NestedRun;

/// Lines L2's console.sh prints before its action.
const CONSOLE_LINES: usize = 40;

fn seconds(run: &NestedRun, key: &str) -> f64 {
    run.fact(key)
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}: {}", run.transcript()))
}

/// Boot and console: 1, 2 and 4 vCPUs, through PVH and through the bzImage. L2 counts its
/// CPUs, its userspace writes 40 lines to /dev/console, and each must reach bulkhead's
/// stdout in order; a command typed into bulkhead's stdin reaches an L2 shell, whose
/// answer comes back; `poweroff` ends bulkhead with 0, and so does `reboot` (the README:
/// a guest reset ends the VM).
#[test]
fn linux_boots_to_its_userspace_and_console() {
    // 1, 2 and 4 vCPUs, both kernels, each ending; the disks test boots both kernels with
    // 2 vCPUs as well.
    let specs = [
        ("vmlinux", 1, "reboot"),
        ("vmlinux", 4, "shell"),
        ("vmlinuz", 2, "poweroff"),
        ("vmlinuz", 4, "reboot"),
    ];
    let args: Vec<String> = specs
        .iter()
        .map(|(k, n, a)| format!("{k}:{n}:{a}"))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = NestedRun::start("boot", &args, Duration::from_secs(600));
    let t = run.transcript();
    for (kernel, vcpus, action) in specs {
        let vm = format!("{kernel}-{vcpus}-{action}");
        assert_eq!(run.fact(&format!("{vm}.rc")), "0", "{vm}: {t}");
        let log = run.log(&vm);
        let protocol = if kernel == "vmlinux" {
            "via PVH"
        } else {
            "via 64-bit Linux boot protocol"
        };
        assert!(
            log.iter()
                .any(|l| l.contains(protocol) && l.contains(&format!("{vcpus} vCPU(s)"))),
            "{vm}: {t}"
        );
        let ending = match action {
            "reboot" => "guest reset the machine",
            _ => "guest powered off (ACPI S5)",
        };
        assert!(
            log.iter().any(|l| l.contains(ending)),
            "{vm}: {ending}: {t}"
        );
        assert!(!log.iter().any(|l| l.contains("ERROR")), "{vm}: {t}");

        let console = run.console(&vm);
        // The kernel found our ACPI tables, its CPUs and the serial port.
        for want in ["ACPI: DSDT", "ACPI: APIC", "ttyS0 at I/O 0x3f8"] {
            assert!(
                console.iter().any(|l| l.contains(want)),
                "{vm}: {want}: {t}"
            );
        }
        let online = if vcpus == 1 {
            "0".to_string()
        } else {
            format!("0-{}", vcpus - 1)
        };
        let cpus = format!("NESTL2 cpus online={online} count={vcpus}");
        assert!(console.contains(&cpus.as_str()), "{vm}: {cpus}: {t}");
        // Every line L2's userspace wrote, in order.
        let lines: Vec<&str> = console
            .iter()
            .copied()
            .filter(|l| l.starts_with("NESTL2 console line "))
            .collect();
        let want: Vec<String> = (1..=CONSOLE_LINES)
            .map(|i| format!("NESTL2 console line {i} of {CONSOLE_LINES}"))
            .collect();
        assert_eq!(lines, want, "{vm}: {t}");
        if action == "shell" {
            assert!(
                console.iter().any(|l| l.starts_with("typed 42 on 6.1.0-")),
                "{vm}: the typed command's answer: {t}"
            );
        }
        let took = seconds(&run, &format!("{vm}.seconds"));
        eprintln!("{vm}: bulkhead ran {took:.1} s in L1");
    }
}

/// Disks through Linux's own virtio_blk under our VMM: five disks, each with its own
/// worker (io_uring engine, sync engine under a 400 IOPS limit, readonly, a qcow2 image
/// over a raw backing file that L1's qemu-img made, converts back and checks, and an NBD
/// export qemu-nbd serves in L1), once through PVH and once
/// through the bzImage with guest RAM in huge pages. With 2 vCPUs Linux makes 2 hardware queues per
/// disk and the writes each CPU issued complete; data written with O_DIRECT, fsynced and
/// read back matches, and the host image holds the same bytes; a discard leaves zeros in
/// exactly its range on the host image; the readonly disk refuses a write and its image is
/// unchanged; vda grows under the running kernel, which sees the new size at once. Every
/// worker confined itself (L1's root is an initramfs).
#[test]
fn linux_drives_its_disks_through_our_workers() {
    let run = NestedRun::start(
        "disks",
        &["vmlinux", "vmlinuz:hugepages"],
        Duration::from_secs(600),
    );
    let t = run.transcript();
    for vm in ["disks-vmlinux", "disks-vmlinuz"] {
        assert_eq!(run.fact(&format!("{vm}.rc")), "0", "{vm}: {t}");
        let l2 = |key: &str| run.l2_fact(vm, key);
        assert_eq!(l2("cpus"), "0-1", "{t}");
        // vdd is a qcow2 image over a raw backing file, parsed by its worker (imago); vde
        // an NBD export (qemu-nbd in L1; its worker got the socket the VMM connected).
        for disk in ["vda", "vdb", "vdd", "vde"] {
            assert_eq!(l2(&format!("{disk}.hw_queues")), "2", "{vm} {disk}: {t}");
            assert_eq!(l2(&format!("{disk}.write_rc")), "0,0", "{vm} {disk}: {t}");
            assert_eq!(l2(&format!("{disk}.fsync_rc")), "0", "{vm} {disk}: {t}");
            assert_eq!(l2(&format!("{disk}.readback_ok")), "1", "{vm} {disk}: {t}");
            assert_eq!(l2(&format!("{disk}.discard_rc")), "0", "{vm} {disk}: {t}");
            assert_eq!(
                l2(&format!("{disk}.after_discard_ok")),
                "1",
                "{vm} {disk}: exactly the discarded range reads as zeros: {t}"
            );
            // Each hardware queue serves its own CPU, and ran for each of the 64 writes that
            // CPU issued.
            for (hctx, cpu) in [("hctx0", "0"), ("hctx1", "1")] {
                assert_eq!(l2(&format!("{disk}.{hctx}.cpus")), cpu, "{vm} {disk}: {t}");
                let runs: u64 = l2(&format!("{disk}.{hctx}.runs"))
                    .parse()
                    .unwrap_or_else(|e| panic!("{vm} {disk} {hctx}: {e}: {t}"));
                assert!(runs >= 64, "{vm} {disk} {hctx} ran {runs} times: {t}");
            }
        }
        assert_eq!(l2("vdc.ro"), "1", "{t}");
        assert_ne!(
            l2("vdc.write_rc"),
            "0",
            "the readonly disk took a write: {t}"
        );
        assert_eq!(
            run.fact(&format!("{vm}.ro_image_unchanged")),
            "1",
            "{vm}: {t}"
        );
        assert_eq!(l2("io_errors"), "0", "{vm}: {t}");
        // vda grew from 64 to 96 MiB under the running kernel (`bulkhead ctl resize`):
        // its driver took the config change, and the new end works.
        assert_eq!(run.fact(&format!("{vm}.resize_rc")), "0", "{vm}: {t}");
        assert_eq!(l2("vda.size_before"), "131072", "{vm}: {t}");
        assert_eq!(l2("vda.size_after"), "196608", "{vm}: {t}");
        assert_eq!(l2("vda.new_size_said"), "1", "{vm}: {t}");
        assert_eq!(l2("vda.new_end_ok"), "1", "{vm}: {t}");
        assert_eq!(
            run.fact(&format!("{vm}.d0_bytes")),
            "100663296",
            "{vm}: {t}"
        );
        assert_eq!(
            run.fact(&format!("{vm}.qcow2_check_rc")),
            "0",
            "{vm}: qemu-img check of the qcow2 image Linux wrote: {t}"
        );
        // What L2 read equals what the host image holds (checksums of the same ranges).
        let l2_sums: Vec<&str> = run
            .console(vm)
            .into_iter()
            .filter_map(|l| l.strip_prefix("NESTL2 sha "))
            .collect();
        // Two ranges per writable disk (written, and never written: zeros, or vdd's backing
        // file showing through), one of the readonly disk.
        assert_eq!(l2_sums.len(), 9, "{vm}: {t}");
        for sum in l2_sums {
            let host = format!("NEST sha {vm} {sum}");
            assert!(
                run.run.stdout.lines().any(|l| l == host),
                "{vm}: the host image differs from what L2 read ({sum}): {t}"
            );
        }
        // Every worker process (reapers, confined workers, spares) saw an empty root while
        // L2 ran, though L1's root is an initramfs.
        let roots = run.fact(&format!("{vm}.worker_root_entries"));
        let roots: Vec<&str> = roots.split_whitespace().collect();
        assert!(roots.len() >= 6, "{vm}: {roots:?}: {t}");
        assert!(roots.iter().all(|n| *n == "0"), "{vm}: {roots:?}: {t}");
        // Each worker process ran in its disk's leaf (L1 has cgroup v2), with memory.max
        // guest RAM (256 MiB) + 64 MiB, no swap and pids.max 64; bulkhead itself stayed
        // where it was; every cgroup was removed once the VM ended.
        let cgroups = run.fact(&format!("{vm}.worker_cgroups"));
        let cgroups: Vec<&str> = cgroups.split_whitespace().collect();
        assert_eq!(cgroups.len(), roots.len(), "{vm}: {cgroups:?}: {t}");
        let mut leaves = std::collections::BTreeMap::<&str, usize>::new();
        for cg in &cgroups {
            let (path, limits) = cg.split_once(':').unwrap_or((cg, ""));
            assert_eq!(limits, "335544320:0:64:", "{vm}: {cg}: {t}");
            let leaf = path.rsplit('/').next().unwrap_or("");
            let vm_dir = path.strip_suffix(leaf).unwrap_or("");
            // bulkhead/vm-NS-PID-START/: the VMM's pid namespace, pid and start time.
            let id: Vec<&str> = vm_dir
                .strip_prefix("/bulkhead/vm-")
                .and_then(|d| d.strip_suffix('/'))
                .unwrap_or("")
                .split('-')
                .collect();
            assert!(
                id.len() == 3 && id.iter().all(|n| n.parse::<u64>().is_ok()),
                "{vm}: {cg}: {t}"
            );
            let (disk, n) = leaf.split_once('.').unwrap_or(("", ""));
            assert!(
                ["blk0", "blk1", "blk2", "blk3", "blk4"].contains(&disk),
                "{vm}: {cg}: {t}"
            );
            assert!(n.parse::<u32>().is_ok(), "{vm}: {cg}: {t}");
            *leaves.entry(leaf).or_default() += 1;
        }
        // A worker is its reaper and its confined process: two tasks per leaf, and one leaf
        // per running worker (a disk's active one and its spare; a qcow2 disk and an NBD
        // disk have no spare), never shared.
        let names: Vec<&str> = leaves.keys().copied().collect();
        assert_eq!(
            names,
            ["blk0.0", "blk0.1", "blk1.0", "blk1.1", "blk2.0", "blk2.1", "blk3.0", "blk4.0"],
            "{vm}: {t}"
        );
        assert!(leaves.values().all(|n| *n == 2), "{vm}: {leaves:?}: {t}");
        assert_eq!(
            run.fact(&format!("{vm}.bulkhead_cgroup")),
            "/ /",
            "{vm}: bulkhead and its spawner: {t}"
        );
        assert_eq!(run.fact(&format!("{vm}.cgroups_left")), "0", "{vm}: {t}");
        // Five workers (io_uring, sync, io_uring, sync for qcow2, sync for NBD), each
        // confined, and no violation.
        let log = run.log(vm);
        let confined = log
            .iter()
            .filter(|l| {
                l.contains(" confined: pid ")
                    && l.contains("seccomp=filter")
                    && l.contains("own namespaces=[user,mnt,pid,net,ipc,uts]")
                    && l.contains("root entries=0")
            })
            .count();
        assert_eq!(confined, 5, "{vm}: {t}");
        for engine in ["io_uring", "sync"] {
            assert!(
                log.iter()
                    .any(|l| l.contains(&format!("(sandboxed, engine {engine})"))),
                "{vm}: {engine}: {t}"
            );
        }
        assert!(
            log.iter().any(|l| l.contains("stats violations total=0")),
            "{vm}: {t}"
        );
        assert!(!log.iter().any(|l| l.contains("ERROR")), "{vm}: {t}");
    }
    assert!(
        run.log("disks-vmlinuz")
            .iter()
            .any(|l| l.contains("in 2 MiB huge pages")),
        "{t}"
    );
}

/// Restarts under Linux on our own VMM. VM `chaos`: L2 writes and verifies from both CPUs
/// while the serving worker is SIGKILLed 22 times, then SIGSTOPped (found hung and
/// replaced), then restarted on purpose through `bulkhead ctl`: no bad round, no I/O
/// error in L2, no policy violation. VM `rebind`: disk 1's workers die as their first
/// ring starts until the crash-loop budget is spent; L2's reads and writes of it fail
/// with I/O errors instead of hanging, and rebinding its virtio driver (a device reset)
/// brings it back; then 20 unbind/bind cycles of the healthy disk 0 cost no worker.
#[test]
fn linux_survives_kills_hangs_restarts_and_rebinds_of_its_workers() {
    let run = NestedRun::start("restart", &["vmlinuz", "22"], Duration::from_secs(900));
    let t = run.transcript();

    // chaos
    assert_eq!(run.fact("chaos.rc"), "0", "{t}");
    assert_eq!(run.fact("chaos.kills"), "22", "{t}");
    // Every killed, hung or replaced worker's cgroup is gone, and so is each VM's.
    assert_eq!(run.fact("cgroups_left"), "0", "{t}");
    assert_eq!(run.fact("chaos.serving_after_kills"), "1", "{t}");
    assert_eq!(run.fact("chaos.hung_replaced"), "1", "{t}");
    assert_eq!(run.fact("chaos.planned_rc"), "0", "{t}");
    assert_eq!(run.fact("chaos.planned_new_worker"), "1", "{t}");
    let l2 = |key: &str| run.l2_fact("chaos", key);
    let rounds: u64 = l2("chaos.rounds").parse().expect("rounds");
    assert!(rounds >= 10, "{rounds} rounds: {t}");
    for key in [
        "chaos.bad",
        "chaos.write_failures",
        "chaos.read_failures",
        "io_errors",
    ] {
        assert_eq!(l2(key), "0", "{key}: {t}");
    }
    let log = run.log("chaos");
    let count = |needle: &str| log.iter().filter(|l| l.contains(needle)).count();
    // 22 kills and the hung one, each replaced; then the planned restart.
    assert!(count("worker blk0 (pid") >= 23, "{t}");
    assert!(count("made no progress for") >= 1, "{t}");
    assert!(count("worker restarted in") >= 24, "{t}");
    assert!(
        log.iter().any(|l| l.contains("stats violations total=0")),
        "{t}"
    );
    assert_eq!(count("violated policy"), 0, "{t}");

    // rebind
    assert_eq!(run.fact("rebind.rc"), "0", "{t}");
    let l2 = |key: &str| run.l2_fact("rebind", key);
    for op in ["read", "write"] {
        assert_ne!(l2(&format!("vdb.failing_{op}_rc")), "0", "{op}: {t}");
        assert!(
            l2(&format!("vdb.failing_{op}_error")).contains("Input/output error"),
            "{op}: {t}"
        );
    }
    let failing: f64 = l2("vdb.failing_seconds").parse().expect("seconds");
    assert!(
        failing < 60.0,
        "a failing disk must fail fast, not hang: {t}"
    );
    let log = run.log("rebind");
    assert!(
        log.iter()
            .any(|l| l.contains("disk blk1: ") && l.contains("the device needs a reset")),
        "{t}"
    );
    assert_eq!(l2("vdb.rebind_rc"), "0", "{t}");
    assert_eq!(
        l2("vdb.after_rebind_ok"),
        "1",
        "the rebound disk works: {t}"
    );
    assert_eq!(l2("vda.cycles"), "20", "{t}");
    assert_eq!(l2("vda.cycles_ok"), "20", "{t}");
    assert_eq!(l2("vda.io_errors"), "0", "{t}");
    let before = run.fact("rebind.blk0_pid_before");
    assert!(!before.is_empty(), "{t}");
    assert_eq!(
        run.fact("rebind.blk0_pid_after"),
        before,
        "20 unbind/bind cycles must keep disk 0's worker: {t}"
    );
    assert!(
        !log.iter()
            .any(|l| l.contains("worker blk0 (pid") && !l.ends_with("ended with the VM")),
        "disk 0's worker must only end with the VM: {t}"
    );
    assert_eq!(
        log.iter().filter(|l| l.contains("violated policy")).count(),
        0,
        "{t}"
    );
}

/// `bulkhead policy learn` over Linux under our VMM, in L1, which runs without a vDSO (as
/// hosts do whose clocksource the vDSO cannot read): the disks workload (both engines, fsync,
/// discard, two queues, a readonly disk) and the restart workload (kills, a hang, a
/// planned restart, 20 unbind/bind cycles). The shipped policy lacks nothing, the
/// vDSO-fallback clock read is among what the workers used, and every rule none of the
/// runs used is marked rare-path, but for write-zeroes, which no workload here issues
/// (its images live on L1's tmpfs; the learn test under QEMU covers it).
#[test]
fn policy_learn_over_linux_finds_nothing_missing() {
    let run = NestedRun::start("learn", &["vmlinux", "10"], Duration::from_secs(900));
    let t = run.transcript();
    let mut unused_everywhere: Option<Vec<String>> = None;
    for vm in ["disks-vmlinux", "chaos", "rebind"] {
        assert_eq!(
            run.fact(&format!("{vm}.rc")),
            "0",
            "{vm}: learn exits 0 only when nothing was missing: {t}"
        );
        let out = run.console(vm);
        let summary = out
            .iter()
            .find(|l| l.starts_with("learned ") && l.contains("(blk/main)"))
            .unwrap_or_else(|| panic!("{vm}: no learn summary: {t}"));
        assert!(summary.contains(" 0 missing"), "{vm}: {summary}: {t}");
        // The VMM's threads (2 vCPUs, the API, restarts, resets) learned too.
        assert!(
            out.iter()
                .any(|l| l.contains("VMM threads: 0 calls outside their policies (9 policies)")),
            "{vm}: {t}"
        );
        assert!(
            run.log(vm).iter().any(|l| l.contains("LEARN MODE")),
            "{vm}: {t}"
        );
        let unused: Vec<String> = out
            .iter()
            .filter_map(|l| l.trim_start().strip_prefix("unused:"))
            .map(|l| l.trim().to_string())
            .collect();
        // The rare-path rules (mremap, brk, ...) at least: an empty list means the report
        // was not understood.
        assert!(!unused.is_empty(), "{vm}: no `unused:` line parsed: {t}");
        unused_everywhere = Some(match unused_everywhere {
            None => unused,
            Some(before) => before.into_iter().filter(|r| unused.contains(r)).collect(),
        });
    }
    for rule in unused_everywhere.unwrap_or_default() {
        assert!(
            rule.contains("rare-path:")
                || rule.starts_with("fallocate arg1 == FALLOC_FL_ZERO_RANGE"),
            "no run used `{rule}`: {t}"
        );
        assert!(
            !rule.starts_with("clock_gettime"),
            "the workers in L1 must read the clock through the system call: {t}"
        );
    }
    // The workloads themselves ran as in the enforcing tests.
    assert_eq!(
        run.l2_fact("disks-vmlinux", "vda.after_discard_ok"),
        "1",
        "{t}"
    );
    assert_eq!(run.l2_fact("chaos", "chaos.bad"), "0", "{t}");
    assert_eq!(run.fact("chaos.kills"), "10", "{t}");
    assert_eq!(run.l2_fact("rebind", "vda.cycles_ok"), "20", "{t}");
}
