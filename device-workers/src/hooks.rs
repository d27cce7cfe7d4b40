//! Test-only fault hooks (feature `test-hooks`): make a confined worker misbehave on
//! purpose, so tests can watch the real seccomp filter kill it. Absent from release
//! builds; a test checks the release binary has none.

/// Runs the named hook right after the sandbox is complete.
pub fn run_after_sandbox(name: &str) -> Result<(), String> {
    match name {
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
