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

/// `AUDIT_ARCH_X86_64`: a trap from the native system call ABI.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// The part of `siginfo_t` the kernel fills for SIGSYS (`_sigsys` in the union), x86-64.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: u64,
    syscall: i32,
    arch: u32,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO
    // handler; for SIGSYS the siginfo union holds `_sigsys`, laid out as SigsysInfo. Only
    // plain loads and atomic stores follow (async-signal-safe), then the trapped call is
    // made again (refused again, before it runs: the filter decides on the same registers
    // the same way) and, should it ever return, _exit.
    unsafe {
        let info = &*(info as *const SigsysInfo);
        let uc = &*(ctx as *const libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        let args = [
            g[libc::REG_RDI as usize] as u64,
            g[libc::REG_RSI as usize] as u64,
            g[libc::REG_RDX as usize] as u64,
            g[libc::REG_R10 as usize] as u64,
            g[libc::REG_R8 as usize] as u64,
            g[libc::REG_R9 as usize] as u64,
        ];
        let status = STATUS.load(Ordering::Acquire);
        if !status.is_null() {
            (*status).record_trap(info.syscall as u64, args, info.arch, info.call_addr);
        }
        // The same call on the native ABI; a call from another ABI (int 0x80) would mean
        // something else here, so a harmless call the policy refuses stands in for it.
        if info.arch == AUDIT_ARCH_X86_64 {
            libc::syscall(
                info.syscall as libc::c_long,
                args[0],
                args[1],
                args[2],
                args[3],
                args[4],
                args[5],
            );
        } else {
            let mut uts: libc::utsname = std::mem::zeroed();
            libc::syscall(libc::SYS_uname, &mut uts);
        }
        libc::_exit(ipc::status::EXIT_POLICY_VIOLATION);
    }
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
    policies::install(policies::WorkerKind::Blk, policies::ThreadRole::Main)
        .map_err(SandboxError::Seccomp)
}

/// Learn mode in place of [`install`]: every syscall is reported to the supervisor that
/// receives the listener over `handoff` and runs only once it answers. The socket and the
/// listener stay open for the life of the process (closing them would be recorded).
pub fn install_learning(handoff: std::os::fd::OwnedFd) -> Result<(), SandboxError> {
    use std::os::fd::IntoRawFd;
    policies::learn::enter_learn_mode(handoff.into_raw_fd()).map_err(SandboxError::Learn)
}
