//! The VMM confines itself: each of its threads runs the seccomp filter of its role
//! (`policies/vmm*.policy`), read back here from the kernel of a running bulkhead with
//! PTRACE_SECCOMP_GET_FILTER and compared, instruction for instruction, with the program
//! `bulkhead policy list` shows. A forbidden call in a confined thread ends the VMM by
//! SIGSYS with a line that names the thread's policy and the call.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use policies::{PolicyId, VmmThread};
use tests::{require_kvm, scratch_dir, testguest};

/// `PTRACE_SECCOMP_GET_FILTER` (linux/ptrace.h).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;

/// The policy a VMM thread must run, by its name.
fn expected_policy(comm: &str) -> PolicyId {
    let role = match comm {
        "bulkhead" => VmmThread::Main,
        "signals" => VmmThread::Signals,
        "serial-in" => VmmThread::Serial,
        "api" | "api-req" => VmmThread::Api,
        "vhost-deadline" => VmmThread::Deadline,
        c if c.starts_with("vcpu") => VmmThread::Vcpu,
        c if c.ends_with("-frontend") => VmmThread::Frontend,
        c if c.ends_with("-out") => VmmThread::Output,
        c if c.ends_with("-sup") => VmmThread::Supervisor,
        c => panic!("a VMM thread no test expects: {c:?}"),
    };
    PolicyId::Vmm(role)
}

/// The roles whose threads start threads named `comm`: their filter runs beneath the new
/// thread's own (threads the main thread starts during setup have none beneath).
fn creators(comm: &str) -> &'static [VmmThread] {
    match comm {
        "api-req" => &[VmmThread::Api],
        "vhost-deadline" => &[VmmThread::Frontend, VmmThread::Supervisor],
        c if c.ends_with("-out") => &[VmmThread::Supervisor],
        _ => &[],
    }
}

/// The filters the kernel runs for thread `tid`, as raw program bytes, in the order they
/// were installed (the kernel's index 0 is the oldest): the thread is stopped
/// (PTRACE_SEIZE + PTRACE_INTERRUPT), read, and let go.
fn filters_of(tid: libc::pid_t) -> Result<Vec<Vec<u8>>, String> {
    // SAFETY: plain ptrace requests on a thread id; the buffers passed are sized from the
    // kernel's own count (8 bytes per instruction) and live across the call.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
            return Err(format!(
                "PTRACE_SEIZE {tid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let detach = |result| {
            libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
            result
        };
        if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
            let e = std::io::Error::last_os_error();
            return detach(Err(format!("PTRACE_INTERRUPT {tid}: {e}")));
        }
        let mut status = 0;
        if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
            let e = std::io::Error::last_os_error();
            return detach(Err(format!("waitpid {tid}: {e}")));
        }
        let mut programs = Vec::new();
        for index in 0.. {
            let n = libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                std::ptr::null_mut::<libc::c_void>(),
            );
            if n < 0 {
                // ENOENT past the last filter; EINVAL for a thread without any.
                break;
            }
            let mut program = vec![0u8; n as usize * 8];
            let got = libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                program.as_mut_ptr().cast::<libc::c_void>(),
            );
            if got != n {
                let e = std::io::Error::last_os_error();
                return detach(Err(format!("PTRACE_SECCOMP_GET_FILTER {tid}/{index}: {e}")));
            }
            programs.push(program);
        }
        detach(Ok(programs))
    }
}

/// The parent of process `pid`.
fn ppid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PPid in {status}"))
}

/// Every thread of a running bulkhead (two vCPUs, one disk, the control API, a live stdin)
/// runs the filter of its role (and only that, but a thread a confined thread started, which
/// runs its creator's beneath it); its workers are forked by the spawner process; the VM then ends
/// normally, so stopping and reading every thread disturbed nothing.
#[test]
fn every_vmm_thread_runs_the_filter_of_its_role() {
    require_kvm();
    let dir = scratch_dir("confinement-readback");
    let img = dir.join("d0.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let api = dir.join("api.sock");
    let mut cmd = Command::new(tests::bulkhead_bin());
    cmd.args(["run", "--kernel"])
        .arg(testguest())
        .args([
            "--cmdline",
            "testguest.plan=blk-verify qd=8 completion=irq seed=5 blocks=64 hold_ms=3000",
            "--mem",
            "64",
            "--vcpus",
            "2",
            "--timeout",
            "60",
            "--api-socket",
        ])
        .arg(&api)
        .arg("--disk")
        .arg(format!("path={}", img.display()));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let (status, log) = tests::run_until_hold(cmd, |pid, log| {
        // Workers are forked by the spawner, bulkhead's child, not by bulkhead.
        let confined: u32 = log
            .lines()
            .find_map(|l| l.split("serving blk0 as pid ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no worker pid in:\n{log}"));
        let reaper = ppid(confined);
        let spawner = ppid(reaper);
        assert_eq!(
            ppid(spawner),
            pid,
            "the worker's reaper's parent is not bulkhead's child"
        );
        let cmdline = std::fs::read(format!("/proc/{spawner}/cmdline")).unwrap();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        assert_eq!(args.get(1).copied(), Some(&b"spawner"[..]), "{args:?}");
        // The paths that run rarely run first, under their filters: an API request, a
        // planned restart (the supervisor has the spawner start a successor and starts
        // its output thread; the old worker is killed through its pidfd), SIGUSR1 (the
        // signal thread logs the counters, KVM's read through their stats descriptors).
        let (code, body) = vmm_core::api::request(&api, "GET", "/v1/disks/blk0").unwrap();
        assert_eq!(code, 200, "{body}");
        let (code, body) = vmm_core::api::request(&api, "POST", "/v1/disks/blk0/restart").unwrap();
        assert_eq!(code, 200, "{body}");
        // SAFETY: kill with bulkhead's pid (our unreaped child) and SIGUSR1, which it takes.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) }, 0);
        std::thread::sleep(Duration::from_millis(200));
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap().path();
            let tid: libc::pid_t = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            let comm = comm.trim_end().to_string();
            // KVM's own worker thread (NX huge page recovery) is a kernel thread in the
            // VMM's thread group; it makes no system calls.
            if comm.starts_with("kvm-") {
                continue;
            }
            let filters = filters_of(tid).unwrap_or_else(|e| panic!("{comm} ({tid}): {e}"));
            let id = expected_policy(&comm);
            // A thread runs its role's filter, installed last; a thread started by a
            // confined thread (a request thread, a deadline watchdog, the output
            // reader of a successor) also runs its creator's beneath it.
            let own = filters.last().map(Vec::as_slice);
            assert!(
                own == Some(policies::bpf_bytes(id)),
                "{comm} ({tid}) does not run {id}'s filter: {} filters, the last of {} bytes ({} expected)",
                filters.len(),
                own.map_or(0, <[u8]>::len),
                policies::bpf_bytes(id).len()
            );
            let beneath = &filters[..filters.len() - 1];
            assert!(
                beneath.is_empty()
                    || (beneath.len() == 1
                        && creators(&comm)
                            .iter()
                            .any(|&c| { beneath[0] == policies::bpf_bytes(PolicyId::Vmm(c)) })),
                "{comm} ({tid}) runs {} filters beneath {id}'s",
                beneath.len()
            );
            *seen.entry(comm).or_default() += 1;
        }
    });
    assert_eq!(status.code(), Some(0), "{log}");
    // Once on SIGUSR1, once at the end.
    assert_eq!(
        log.matches("INFO stats vcpu0 ").count(),
        2,
        "SIGUSR1 logged no counters: {log}"
    );
    assert!(log.contains("stopped for a planned restart"), "{log}");
    for comm in [
        "bulkhead",
        "signals",
        "serial-in",
        "api",
        "vcpu0",
        "vcpu1",
        "blk0-frontend",
        "blk0-out",
        "blk0-sup",
    ] {
        assert!(
            seen.contains_key(comm),
            "no thread {comm} was read: {seen:?}"
        );
    }
}

/// A confined VMM thread that makes a call its policy forbids ends the VMM by SIGSYS,
/// with one line naming the policy and the call. The probe is a small program of the test
/// crate that turns confinement on as `bulkhead run` does and enters the vCPU role.
#[test]
fn a_forbidden_call_ends_the_vmm_by_sigsys_with_one_line() {
    for (role, call) in [("vcpu", "socket"), ("output", "execve"), ("main", "ptrace")] {
        let r = tests::run_with_deadline(
            {
                let mut c = Command::new(env!("CARGO_BIN_EXE_vmm-trap-probe"));
                c.args([role, call]);
                c
            },
            Duration::from_secs(30),
        );
        let t = r.transcript();
        assert_eq!(r.signal, Some(libc::SIGSYS), "{role} {call}: {t}");
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{role} {call}: {t}");
        assert!(
            lines[0].starts_with("bulkhead: seccomp: VMM thread ")
                && lines[0].contains(&format!("(policy vmm/{role})"))
                && lines[0].contains(&format!("forbids: {call} (nr ")),
            "{role} {call}: {t}"
        );
        assert!(!r.stdout.contains("survived"), "{role} {call}: {t}");
    }
}

/// Learn mode (`policy learn`): the same filters, and a call outside the policy is
/// recorded with the thread's policy and made on its behalf, so the workload runs on; a call
/// the policy allows (the probe's own output) is not recorded.
#[test]
fn learn_mode_records_a_forbidden_call_and_makes_it() {
    let r = tests::run_with_deadline(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_vmm-trap-probe"));
            c.args(["--learn", "vcpu", "socket"]);
            c
        },
        Duration::from_secs(30),
    );
    let t = r.transcript();
    assert_eq!(r.code, Some(0), "{t}");
    let fd: i64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("survived: socket returned "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no survived line: {t}"));
    assert!(fd >= 0, "socket was not made on the thread's behalf: {t}");
    let learned: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("learned: "))
        .collect();
    assert_eq!(
        learned,
        [format!(
            "learned: vmm/vcpu {} {:#x}",
            libc::SYS_socket,
            libc::AF_INET
        )
        .as_str()],
        "{t}"
    );
    assert!(!r.stderr.contains("seccomp"), "{t}");
}
