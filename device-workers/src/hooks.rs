//! Test-only fault hooks (feature `test-hooks`): make a confined worker misbehave on
//! purpose, so tests can watch the real seccomp filter kill it. Absent from release
//! builds; a test checks the release binary has none.

/// Runs the named hook right after the sandbox is complete. Hooks that change how the
/// worker serves (rather than trap) return Ok and act through [`serving_hook`].
pub fn run_after_sandbox(name: &str) -> Result<(), String> {
    match name {
        "bad-vhost-config" | "refuse-mem-table" => Ok(()),
        "openat" => {
            let path = c"/etc/passwd";
            // SAFETY: a raw openat with a valid NUL-terminated path; the policy traps it,
            // which is the point.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                    0,
                )
            };
            Err(format!("openat was not trapped (returned {fd})"))
        }
        other => Err(format!("unknown fault hook {other:?}")),
    }
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
