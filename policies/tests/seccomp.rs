//! Installs the real blk filter in forked children and checks what the kernel does.
//!
//! `harness = false`: `main` runs on the process's only thread, so `fork` is safe and each
//! child is single-threaded like the worker. A child reports success through its exit code;
//! a trapped call has no SIGSYS handler here, so the child dies of SIGSYS.

use std::process::ExitCode;

use policies::PolicyId;

/// How a probe child is expected to end.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Exit(i32),
    Signal(i32),
}

/// Fork; the child installs the filter and runs `probe`, exiting with its return value.
fn run(probe: fn() -> i32) -> Outcome {
    // Decode the program before forking, so the child allocates nothing after the filter.
    let _ = policies::bpf(PolicyId::BLK);
    // SAFETY: this binary has a single thread (no test harness), so the child is a complete
    // copy; it only calls async-signal-safe functions and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on the child's own process state; no pointers kept.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        }
        let code = match policies::install(PolicyId::BLK) {
            Ok(()) => probe(),
            Err(_) => 99,
        };
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        Outcome::Signal(libc::WTERMSIG(status))
    } else {
        Outcome::Exit(libc::WEXITSTATUS(status))
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The one test name this binary reports to test runners.
const TEST_NAME: &str = "blk_filter_probes";

fn main() -> ExitCode {
    // Speak enough of libtest's protocol for cargo-nextest: `--list` names one test (none
    // when asked for ignored ones); any other invocation runs every probe.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            println!("{TEST_NAME}: test");
        }
        return ExitCode::SUCCESS;
    }
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-')) {
        if !TEST_NAME.contains(filter.as_str()) {
            return ExitCode::SUCCESS;
        }
    }
    let mut failures = 0;
    let mut check = |name: &str, got: Outcome, want: Outcome| {
        if got == want {
            println!("test {name} ... ok");
        } else {
            println!("test {name} ... FAILED: got {got:?}, want {want:?}");
            failures += 1;
        }
    };

    // (a) write to a pipe: the pipe is created before fork, the child writes after install.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    PIPE_WRITE_FD.store(fds[1], std::sync::atomic::Ordering::SeqCst);
    check("allowed_write_to_pipe", run(probe_write), Outcome::Exit(0));
    let mut buf = [0u8; 8];
    // SAFETY: reads into `buf`, which outlives the call.
    let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
    check(
        "allowed_write_reached_parent",
        if n == 5 && &buf[..5] == b"hello" {
            Outcome::Exit(0)
        } else {
            Outcome::Exit(1)
        },
        Outcome::Exit(0),
    );

    // (b) clone3 traps like clone: the worker never creates a thread.
    check(
        "clone3_traps",
        run(probe_clone3),
        Outcome::Signal(libc::SIGSYS),
    );
    // (c) openat traps.
    check(
        "openat_traps",
        run(probe_openat),
        Outcome::Signal(libc::SIGSYS),
    );
    // (d) mmap with PROT_EXEC traps; without it, it works.
    check(
        "mmap_exec_traps",
        run(probe_mmap_exec),
        Outcome::Signal(libc::SIGSYS),
    );
    check("mmap_rw_allowed", run(probe_mmap_rw), Outcome::Exit(0));
    // Argument filters.
    check(
        "fcntl_getfd_allowed",
        run(probe_fcntl_getfd),
        Outcome::Exit(0),
    );
    check(
        "fcntl_getfl_traps",
        run(probe_fcntl_getfl),
        Outcome::Signal(libc::SIGSYS),
    );
    check(
        "fcntl_setown_traps",
        run(probe_fcntl_setown),
        Outcome::Signal(libc::SIGSYS),
    );
    check(
        "ioctl_fionbio_traps",
        run(probe_ioctl_fionbio),
        Outcome::Signal(libc::SIGSYS),
    );
    check(
        "ioctl_tiocsti_traps",
        run(probe_ioctl_tiocsti),
        Outcome::Signal(libc::SIGSYS),
    );
    check(
        "fallocate_punch_hole_allowed",
        run(probe_fallocate_punch),
        Outcome::Exit(0),
    );
    check(
        "futex_wake_allowed",
        run(probe_futex_wake),
        Outcome::Exit(0),
    );
    check(
        "fallocate_plain_traps",
        run(probe_fallocate_mode0),
        Outcome::Signal(libc::SIGSYS),
    );
    check(
        "madvise_remove_traps",
        run(probe_madvise_remove),
        Outcome::Signal(libc::SIGSYS),
    );
    check(
        "clone_traps",
        run(probe_clone),
        Outcome::Signal(libc::SIGSYS),
    );

    // Learn mode: every call reaches the supervisor, runs, and is sorted against the policy.
    let (got, summary) = learn_probe();
    if got != Outcome::Exit(0) {
        println!("learn probe summary:\n{summary}");
    }
    check("learn_mode_records_and_continues", got, Outcome::Exit(0));

    if failures == 0 {
        println!("test result: ok");
        ExitCode::SUCCESS
    } else {
        println!("test result: FAILED ({failures} failed)");
        ExitCode::FAILURE
    }
}

static PIPE_WRITE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

fn probe_write() -> i32 {
    let fd = PIPE_WRITE_FD.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: writes 5 bytes from a static buffer to our pipe.
    let n = unsafe { libc::write(fd, b"hello".as_ptr().cast(), 5) };
    if n == 5 {
        0
    } else {
        10
    }
}

fn probe_clone3() -> i32 {
    // SAFETY: raw clone3 with a NULL args pointer; the filter traps first.
    unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    11
}

fn probe_openat() -> i32 {
    // SAFETY: raw openat of a NUL-terminated static path; the filter traps first.
    unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/etc/passwd".as_ptr(),
            libc::O_RDONLY,
        )
    };
    12
}

fn probe_mmap_exec() -> i32 {
    // SAFETY: anonymous private mapping; nothing is mapped over existing memory.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    13
}

fn probe_mmap_rw() -> i32 {
    // SAFETY: anonymous private mapping; nothing is mapped over existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        14
    } else {
        0
    }
}

fn probe_fcntl_getfd() -> i32 {
    // SAFETY: F_GETFD on stdin only reads flags.
    let rc = unsafe { libc::fcntl(0, libc::F_GETFD) };
    if rc >= 0 || errno() == libc::EBADF {
        0
    } else {
        15
    }
}

fn probe_fcntl_getfl() -> i32 {
    // SAFETY: F_GETFL on stdin; the filter traps first.
    unsafe { libc::fcntl(0, libc::F_GETFL) };
    15
}

fn probe_fcntl_setown() -> i32 {
    // SAFETY: F_SETOWN on stdin; the filter traps first.
    unsafe { libc::fcntl(0, libc::F_SETOWN, 1) };
    16
}

fn probe_ioctl_fionbio() -> i32 {
    let off: libc::c_int = 0;
    // SAFETY: FIONBIO reads an int from `off`; the filter traps first.
    unsafe { libc::ioctl(0, libc::FIONBIO, &off) };
    17
}

fn probe_ioctl_tiocsti() -> i32 {
    let c: u8 = b'x';
    // SAFETY: TIOCSTI on stdin; the filter traps first.
    unsafe { libc::ioctl(0, libc::TIOCSTI, &c) };
    18
}

fn probe_fallocate_mode0() -> i32 {
    // SAFETY: fallocate with mode 0 on stdin; the filter traps first.
    unsafe { libc::fallocate(0, 0, 0, 4096) };
    19
}

fn probe_madvise_remove() -> i32 {
    // SAFETY: MADV_REMOVE on a NULL range; the filter traps first.
    unsafe { libc::madvise(std::ptr::null_mut(), 4096, libc::MADV_REMOVE) };
    20
}

fn probe_clone() -> i32 {
    // SAFETY: raw clone with SIGCHLD only (fork-like); the filter traps first.
    unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
    21
}

fn probe_fallocate_punch() -> i32 {
    // SAFETY: DISCARD-style fallocate on stdin; whatever stdin is, the kernel answers with a
    // return value (often an error), which is fine: only a trap would fail the probe.
    unsafe {
        libc::fallocate(
            0,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    0
}

fn probe_futex_wake() -> i32 {
    let word = std::sync::atomic::AtomicU32::new(0);
    // SAFETY: FUTEX_WAKE on a live, aligned u32; wakes nobody.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
    if rc == 0 {
        0
    } else {
        22
    }
}

/// Forks a child that enters learn mode and makes calls the policy allows and calls it
/// forbids; this process is its supervisor. Every call must run (the child reports their
/// results through its exit code) and be recorded.
fn learn_probe() -> (Outcome, String) {
    use policies::learn::{enter_learn_mode, receive_listener, serve_listener, Recorder};
    use std::os::unix::net::UnixStream;
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let recorder = Recorder::new(policies::policy(PolicyId::BLK).clone());
    // SAFETY: this binary has a single thread (no test harness), so the child is a complete
    // copy; it only makes raw syscalls after entering learn mode and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: plain syscalls on the child's own state, then raw probes with valid
        // pointers; `_exit` ends the child without the parent's atexit handlers.
        unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            if enter_learn_mode(theirs_fd).is_err() {
                libc::_exit(30);
            }
            let mut uts: libc::utsname = std::mem::zeroed();
            let uname = libc::syscall(libc::SYS_uname, &mut uts);
            let open = libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/proc/self/status".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            let code = if uname != 0 {
                31
            } else if open < 0 {
                32
            } else if libc::close(open as i32) != 0 {
                33
            } else {
                0
            };
            libc::_exit(code);
        }
    }
    drop(theirs);
    let served = receive_listener(&ours, "probe", std::time::Duration::from_secs(10))
        .and_then(|listener| serve_listener(&listener, &recorder, "probe"));
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    let report = recorder.report();
    let summary = format!("served: {served:?}\n{}", report.summary());
    let outcome = if libc::WIFSIGNALED(status) {
        Outcome::Signal(libc::WTERMSIG(status))
    } else {
        Outcome::Exit(libc::WEXITSTATUS(status))
    };
    let missing: Vec<String> = report.missing.iter().map(|m| m.rule.identity()).collect();
    let used: Vec<String> = report.used.iter().map(|u| u.rule.identity()).collect();
    let recorded_right =
        served.is_ok() && missing == ["openat", "uname"] && used == ["close", "exit_group"];
    match (outcome, recorded_right) {
        (Outcome::Exit(0), false) => (Outcome::Exit(40), summary),
        (other, _) => (other, summary),
    }
}
