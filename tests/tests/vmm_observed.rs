//! Watching bulkhead while a guest does disk I/O: KVM's own per-vCPU exit statistics
//! (KVM_GET_STATS_FD, which the VMM reads and logs beside its own counters when sent
//! SIGUSR1 during the run, and again at the end) agree with the VMM's counters, no kick leaves the kernel (QueueNotify is an ioeventfd), the VMM holds
//! no descriptor on any image while the guest runs, and strace of the whole process tree
//! shows that only the workers ever touch the disk images.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{check_blk_verify_image, require_kvm, require_tool, scratch_dir, testguest, tg_lines};

const SEED: u64 = 11;
const BLOCKS: u64 = 256;

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn kvm_stats_agree_kicks_stay_in_the_kernel_and_only_workers_touch_the_disks() {
    require_kvm();
    let strace = require_tool("strace", "strace");
    let dir = scratch_dir("vmm-observed");
    let images: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.join(format!("d{i}.img"));
            std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
            p.canonicalize().unwrap()
        })
        .collect();
    let trace = dir.join("strace.txt");
    let mut cmd = Command::new(strace);
    cmd.args(["-f", "--seccomp-bpf", "-qq", "-yy", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=read,write,pread64,pwrite64,readv,writev,preadv,pwritev,preadv2,pwritev2,io_uring_enter",
        ])
        .arg(tests::bulkhead_bin())
        .arg("run")
        .arg("--kernel")
        .arg(testguest())
        .args([
            "--cmdline",
            &format!("testguest.plan=blk-verify qd=32 completion=irq seed={SEED} blocks={BLOCKS} hold_ms=3000"),
            "--vcpus",
            "2",
            "--mem",
            "64",
            "--timeout",
            "90",
        ]);
    // No spare workers: the pid accounting below expects one worker per disk. The sync
    // engine: strace sees its preadv/pwritev on the image, while io_uring's reads and
    // writes happen inside the ring.
    for image in &images {
        cmd.arg("--disk")
            .arg(format!("path={},spare=off,engine=sync", image.display()));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let strace_pid = child.id();
    let stderr_pipe = child.stderr.take().unwrap();
    let stderr_so_far = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = stderr_so_far.clone();
    let stderr_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let mut stdout = String::new();
    let mut at_hold = None;
    let started = Instant::now();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        stdout.push_str(&line);
        stdout.push('\n');
        if line.starts_with("TG hold") && at_hold.is_none() {
            // bulkhead is strace's child.
            let children =
                std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
                    .unwrap_or_default();
            let vmm: u32 = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .expect("bulkhead's pid");
            // The VMM holds two descriptors per image: the one it opened and locked and
            // duplicates for each worker it starts (successors included), and a lock-less
            // read-only one opened at setup, through which its confined main thread sees
            // the image released at the end (F_OFD_GETLK). It never reads or writes
            // through either (strace below).
            let mut held = vec![0; images.len()];
            for fd in std::fs::read_dir(format!("/proc/{vmm}/fd"))
                .unwrap()
                .filter_map(Result::ok)
            {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    if let Some(i) = images.iter().position(|p| *p == target) {
                        held[i] += 1;
                    }
                }
            }
            assert_eq!(held, vec![2; images.len()], "the VMM's image descriptors");
            // Each worker that served, read from outside while it still serves.
            let log = stderr_so_far.lock().unwrap().clone();
            for (i, image) in images.iter().enumerate() {
                let pid: u32 = log
                    .lines()
                    .find_map(|l| l.split(&format!("serving blk{i} as pid ")).nth(1))
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no pid for blk{i} in:\n{log}"));
                tests::sandbox_facts::SandboxFacts::read(pid).assert_confined_with_sockets(
                    image,
                    &["bulkhead-guest-ram", &format!("bulkhead-status-blk{i}")],
                    2,
                );
            }
            // Ask the running VMM for its counters and KVM's (SIGUSR1), and compare them
            // while the VM is still up.
            // SAFETY: kill sends a signal to a pid; no memory is involved.
            assert_eq!(unsafe { libc::kill(vmm as i32, libc::SIGUSR1) }, 0);
            let deadline = Instant::now() + Duration::from_secs(10);
            let live: Vec<String> = loop {
                let log = stderr_so_far.lock().unwrap().clone();
                let lines: Vec<String> = log
                    .lines()
                    .filter(|l| l.contains("stats vcpu"))
                    .map(str::to_string)
                    .collect();
                if lines.len() >= 2 {
                    break lines;
                }
                assert!(Instant::now() < deadline, "no stats after SIGUSR1:\n{log}");
                std::thread::sleep(Duration::from_millis(20));
            };
            for line in &live {
                assert_eq!(
                    field(line, "mmio_exits"),
                    field(line, "kvm_mmio_exits"),
                    "during the run, MMIO exits VMM vs KVM: {line}"
                );
            }
            at_hold = Some(vmm);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "bulkhead hangs"
        );
    }
    let status = child.wait().unwrap();
    stderr_reader.join().unwrap();
    let stderr = stderr_so_far.lock().unwrap().clone();
    let t = format!("exit {status:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(status.success(), "{t}");
    let lines = tg_lines(&stdout);
    assert_eq!(lines.last().map(String::as_str), Some("TG done"), "{t}");
    for (dev, image) in images.iter().enumerate() {
        if let Err(e) = check_blk_verify_image(image, &stdout, dev, SEED, BLOCKS) {
            panic!("disk {dev}: {e}: {t}");
        }
    }
    assert!(at_hold.is_some(), "the guest never held: {t}");

    // KVM's statistics against the VMM's own counters, per vCPU, at the end of the run
    // (the last report; the first came during the hold).
    let vcpu_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("stats vcpu"))
        .collect();
    assert_eq!(
        vcpu_lines.len(),
        4,
        "a report during the run and one at the end: {t}"
    );
    let vcpu_lines = &vcpu_lines[2..];
    for line in vcpu_lines.iter().copied() {
        assert_eq!(
            field(line, "mmio_exits"),
            field(line, "kvm_mmio_exits"),
            "MMIO exits, VMM vs KVM: {line}: {t}"
        );
        // kvm_pvm (this machine) does not count port I/O exits in io_exits at all (it
        // reports 0); where KVM counts them, the numbers must agree.
        let kvm_io = field(line, "kvm_io_exits");
        if kvm_io != 0 {
            assert_eq!(
                field(line, "io_exits"),
                kvm_io,
                "port exits, VMM vs KVM: {line}: {t}"
            );
        }
        eprintln!("{}", line.split("INFO ").nth(1).unwrap_or(line));
    }
    // The guest kicked many times; not one kick reached the VMM.
    for dev in 0..2 {
        let guest = lines
            .iter()
            .find(|l| l.starts_with(&format!("TG blk dev={dev} us ")))
            .unwrap_or_else(|| panic!("no timing line for dev {dev}: {t}"));
        let notifies = field(guest, "notifies");
        let reqs = field(guest, "reqs");
        assert!(notifies > 0, "{t}");
        let ours = stderr
            .lines()
            .find(|l| l.contains(&format!("stats blk{dev} ")))
            .unwrap_or_else(|| panic!("no stats line for blk{dev}: {t}"));
        assert_eq!(
            field(ours, "queue_notify"),
            0,
            "kicks must not exit to the VMM: {t}"
        );
        eprintln!(
            "blk{dev}: {reqs} requests, {notifies} kicks (0 reached the VMM), {:.3} InterruptStatus and {:.3} InterruptACK exits per request",
            field(ours, "interrupt_status") as f64 / reqs as f64,
            field(ours, "interrupt_ack") as f64 / reqs as f64
        );
    }

    // strace: every read/write-family call on an image came from a worker process.
    let workers: Vec<u32> = stderr
        .lines()
        .filter_map(|l| {
            l.split(" worker pid ")
                .nth(1)
                .or_else(|| l.split(" as pid ").nth(1))
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse().ok())
        })
        .collect();
    assert_eq!(
        workers.len(),
        4,
        "a reaper and a confined pid per worker: {t}"
    );
    let traced = std::fs::read_to_string(&trace).unwrap();
    let mut worker_io = 0;
    for line in traced.lines() {
        if !images
            .iter()
            .any(|i| line.contains(&i.display().to_string()))
        {
            continue;
        }
        let pid: u32 = line
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(
            workers.contains(&pid),
            "a non-worker process touched a disk image: {line}"
        );
        worker_io += 1;
    }
    assert!(
        worker_io > 0,
        "strace must see the workers' disk I/O (else this check proves nothing)"
    );
}
