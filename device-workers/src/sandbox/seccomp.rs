//! The seccomp filter and what happens on a violation: the filter traps (SIGSYS), and the
//! handler records the syscall number, its six arguments, the arch and the instruction
//! pointer in the status page, then makes the same call again. SIGSYS is blocked inside
//! its own handler, so the kernel takes the default action for that second trap: the
//! worker dies by SIGSYS, which its reaper sees and records. A worker that merely exits
//! with [`ipc::status::EXIT_POLICY_VIOLATION`], whatever its page says, made no trap: a
//! violation counts only when the kernel killed the worker by SIGSYS.

use std::sync::atomic::{AtomicPtr, Ordering};

use ipc::status::StatusMapping;

use super::error::SandboxError;

/// Where the handler records a violation. Set once before the filter is installed and
/// never freed (the mapping lives as long as the process).
static STATUS: AtomicPtr<StatusMapping> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes these pointers to this SA_SIGINFO handler of SIGSYS.
    let call = unsafe { policies::trap::Trapped::from_handler(info, ctx) };
    let status = STATUS.load(Ordering::Acquire);
    if !status.is_null() {
        // SAFETY: STATUS is set once, before the filter, to a mapping that is never freed;
        // record_trap does plain and atomic stores only (async-signal-safe).
        unsafe { &*status }.record_trap(call.syscall as u64, call.args, call.arch, call.call_addr);
    }
    call.repeat(ipc::status::EXIT_POLICY_VIOLATION)
}

/// Installs the SIGSYS handler (recording into `status`) and then the blk policy's filter.
/// After this returns, any syscall outside the policy ends the process.
pub fn install(status: &'static StatusMapping) -> Result<(), SandboxError> {
    STATUS.store(status as *const _ as *mut _, Ordering::Release);
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigAction(on_sigsys),
        nix::sys::signal::SaFlags::SA_SIGINFO,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only does async-signal-safe work (loads, atomic stores,
    // _exit); no previous handler is relied on.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGSYS, &action) }.map_err(
        |source| SandboxError::Prctl {
            what: "the SIGSYS handler",
            source,
        },
    )?;
    policies::install(policies::PolicyId::BLK).map_err(SandboxError::Seccomp)
}

/// Learn mode in place of [`install`]: every syscall is reported to the supervisor that
/// receives the listener over `handoff` and runs only once it answers. The socket and the
/// listener stay open for the life of the process (closing them would be recorded).
pub fn install_learning(handoff: std::os::fd::OwnedFd) -> Result<(), SandboxError> {
    use std::os::fd::IntoRawFd;
    policies::learn::enter_learn_mode(handoff.into_raw_fd()).map_err(SandboxError::Learn)
}
