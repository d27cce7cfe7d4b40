//! Test-only fault hooks (feature `test-hooks`): make a confined worker misbehave on
//! purpose, so tests can watch the real seccomp filter kill it. Absent from release
//! builds; a test checks the release binary has none.

/// Runs the named hook once the VMM's setup is answered (GET_CONFIG), for a spawned
/// worker: the hooks of [`run_after_sandbox`], and those that need the status page.
pub fn run_after_config(name: &str, status: &ipc::status::StatusMapping) -> Result<(), String> {
    match name {
        // A compromised worker naming another process (pid 1) as itself, hoping the VMM
        // shows, watches or signals that one.
        "forge-pid" => {
            status.set_pid(1);
            Ok(())
        }
        // A compromised worker writing a violation record (execve of 0x41414141...) and
        // exiting with the code a trap's end once had, to have the VMM count and log it.
        "forge-violation" => {
            status.record_violation(59, [0x4141_4141; 6], 0xc000_003e, 0x4141);
            // SAFETY: _exit ends the process at once; nothing is left to run.
            unsafe { libc::_exit(ipc::status::EXIT_POLICY_VIOLATION) }
        }
        name => run_after_sandbox(name),
    }
}

/// Runs the named hook right after the sandbox is complete. Hooks that change how the
/// worker serves (rather than trap) return Ok and act through [`serving_hook`].
pub fn run_after_sandbox(name: &str) -> Result<(), String> {
    match name {
        "bad-vhost-config" | "inflight-guest-ram" | "forge-pid" | "forge-violation" => Ok(()),
        // A compromised worker taking the host's memory: 2 GiB, populated at once.
        "mmap-populate" => {
            let len = 2usize << 30;
            // SAFETY: a new private anonymous mapping; nothing refers to it, and it is
            // left in place (the point is to hold the memory).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                    -1,
                    0,
                )
            };
            let line = if p == libc::MAP_FAILED {
                format!(
                    "MMAP-POPULATE refused: {}\n",
                    std::io::Error::last_os_error()
                )
            } else {
                "MMAP-POPULATE mapped 2 GiB\n".to_string()
            };
            write_all(libc::STDERR_FILENO, line.as_bytes())
        }
        // A compromised worker writing to its stderr: a line shaped like one of the VMM's,
        // terminal escape sequences, a line far past any sane length, and a flood. The VMM
        // must keep every byte of it inside this worker's own, marked lines.
        "forge-log" => {
            let mut text = b"FORGE-LOG start\n".to_vec();
            text.extend_from_slice(
                b"2026-01-01T00:00:00Z  INFO worker blk0 (pid 1) ended with the VM\n",
            );
            text.extend_from_slice(b"\x1b[2J\x1b[31mFORGED\x1b[0m\r\n");
            text.extend(std::iter::repeat_n(b'x', 100_000));
            text.push(b'\n');
            for i in 0..5000 {
                text.extend_from_slice(format!("flood {i}\n").as_bytes());
            }
            write_all(libc::STDERR_FILENO, &text)
        }
        name if name.starts_with(CRASH_LOOP) => Ok(()),
        // One harmless call outside the policy, then serve on: under the enforcing filter
        // it kills the worker; in learn mode it must show up in the learned set.
        "extra-syscall" => {
            // SAFETY: utsname is plain data; uname fills the buffer it is given.
            let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
            // SAFETY: a raw uname(2) into a live, writable buffer.
            let ret = unsafe { libc::syscall(libc::SYS_uname, &mut uts) };
            if ret == 0 {
                Ok(())
            } else {
                Err(format!("uname failed: {}", std::io::Error::last_os_error()))
            }
        }
        // The clock reads a worker makes where the vDSO cannot serve them (a clocksource
        // it cannot read, as in an L1 guest under QEMU TCG or on hpet/acpi_pm hosts):
        // every log line reads the wall clock, every request the monotonic one (its
        // latency). The policy must let both through.
        "clock-syscall" => {
            for clock in [libc::CLOCK_REALTIME, libc::CLOCK_MONOTONIC] {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: a raw clock_gettime(2) into a live, writable timespec.
                let ret = unsafe { libc::syscall(libc::SYS_clock_gettime, clock, &mut ts) };
                if ret != 0 {
                    return Err(format!(
                        "clock_gettime({clock}) failed: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            Ok(())
        }
        // Crashes: each must be reported as what it is, never as a policy violation.
        "segv" => {
            // SAFETY: none: reading address 0x10 faults, which is the point.
            unsafe { std::ptr::read_volatile(0x10 as *const u8) };
            Err("reading address 0x10 did not fault".into())
        }
        "sigbus" => {
            let page = SIGBUS_PAGE.load(std::sync::atomic::Ordering::Relaxed);
            if page.is_null() {
                return Err("the sigbus hook's page was not prepared before the sandbox".into());
            }
            // SAFETY: none: the page maps an empty memfd, so touching it raises SIGBUS,
            // which is the point.
            unsafe { std::ptr::read_volatile(page) };
            Err("touching a page past the end of its file did not raise SIGBUS".into())
        }
        "abort" => std::process::abort(),
        "panic" => panic!("fault hook: a panic in the serving worker"),
        name => match forbidden_call(name) {
            Some(ret) => Err(format!("{name} was not trapped (returned {ret})")),
            None => Err(format!("unknown fault hook {name:?}")),
        },
    }
}

/// Writes all of `bytes` to `fd` with plain write(2) calls (std's stderr lock asks for
/// the thread id, which the filter may not allow).
fn write_all(fd: i32, mut bytes: &[u8]) -> Result<(), String> {
    while !bytes.is_empty() {
        // SAFETY: write from a live buffer of the length given.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("write to fd {fd}: {e}"));
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// The `sigbus` hook's page: a shared mapping of an empty memfd, made before the sandbox
/// (which forbids making one).
static SIGBUS_PAGE: std::sync::atomic::AtomicPtr<u8> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// What a hook needs made before the sandbox.
pub fn prepare_before_sandbox(name: &str) -> Result<(), String> {
    if name != "sigbus" {
        return Ok(());
    }
    let fd =
        nix::sys::memfd::memfd_create(c"bulkhead-sigbus-hook", nix::sys::memfd::MFdFlags::empty())
            .map_err(|e| format!("memfd_create: {e}"))?;
    // SAFETY: a new shared mapping of one page of a descriptor we own; nothing else
    // refers to that address range.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    SIGBUS_PAGE.store(page.cast(), std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Issues the raw syscall of one forbidden class; returns what it returned if the filter
/// let it through (it must not), None for an unknown name.
fn forbidden_call(name: &str) -> Option<i64> {
    let path = c"/etc/passwd";
    let null = std::ptr::null::<libc::c_void>();
    // SAFETY: each arm is one raw syscall with valid pointers (a static C string, a null
    // pointer where the kernel accepts one, or a page this function maps); the policy is
    // expected to trap every one of them before it runs, which is the point.
    let ret = unsafe {
        match name {
            "open" => libc::syscall(libc::SYS_open, path.as_ptr(), libc::O_RDONLY),
            "openat" => libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
                0,
            ),
            "socket" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
            "execve" => libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), null, null),
            "ptrace" => libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0),
            "mprotect-exec" => {
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::syscall(
                    libc::SYS_mprotect,
                    page,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                )
            }
            "kill" => libc::syscall(libc::SYS_kill, 1234, libc::SIGKILL),
            "unshare" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNET),
            "mount" => libc::syscall(
                libc::SYS_mount,
                c"none".as_ptr(),
                c"/".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                null,
            ),
            "bpf" => libc::syscall(libc::SYS_bpf, 5, null, 0),
            "io_uring_setup" => libc::syscall(libc::SYS_io_uring_setup, 8, null),
            // Any ring the worker holds: lifting its restrictions is the attack.
            "io_uring_register" => libc::syscall(libc::SYS_io_uring_register, 3, 11, null, 0),
            "clone" => libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0),
            _ => return None,
        }
    };
    Some(ret)
}

/// Environment variable that selects a fault hook for one spawned worker: `ID:HOOK`, where
/// ID is the disk id the VMM gave it (`--id`).
pub const SPAWNED_HOOK_ENV: &str = "BULKHEAD_WORKER_FAULT_HOOK";

/// The hook selected for the spawned worker of disk `id`, if any.
pub fn spawned_hook(id: Option<&str>) -> Option<String> {
    let value = std::env::var(SPAWNED_HOOK_ENV).ok()?;
    let (target, hook) = value.split_once(':')?;
    (Some(target) == id).then(|| hook.to_string())
}

/// Sends bytes that are not a valid control message (the VMM must refuse them).
pub fn send_garbage(fd: std::os::fd::RawFd) {
    let garbage = [0xffu8; 23];
    // SAFETY: send on a socket descriptor we own, from a buffer that outlives the call.
    unsafe { libc::send(fd, garbage.as_ptr().cast(), garbage.len(), 0) };
}

/// Whether the vhost-user handler should misbehave as `name` asks.
pub fn serving_hook(name: Option<&str>, hook: &str) -> bool {
    name == Some(hook)
}

/// `crash-loop=PATH`: PATH holds a count N; a worker that finds N > 0 stores N - 1 and
/// exits as soon as its first ring starts, before it can complete a request. N workers in
/// a row thus die before serving: a crash loop with a known end, so a test can also see
/// the first healthy worker after it.
const CRASH_LOOP: &str = "crash-loop=";

/// Whether this worker takes a turn in the crash loop (read before the sandbox, which
/// hides the file).
pub fn take_crash_loop_turn(name: Option<&str>) -> Result<bool, String> {
    let Some(path) = name.and_then(|n| n.strip_prefix(CRASH_LOOP)) else {
        return Ok(false);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    let left: u32 = text
        .trim()
        .parse()
        .map_err(|e| format!("{path} holds {text:?}, not a count: {e}"))?;
    if left == 0 {
        return Ok(false);
    }
    std::fs::write(path, format!("{}\n", left - 1)).map_err(|e| format!("write {path}: {e}"))?;
    Ok(true)
}
