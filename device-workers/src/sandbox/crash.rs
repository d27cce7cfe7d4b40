//! How a confined worker dies of a bug: its own fault handlers and panic hook record the
//! crash in the status page (signal, faulting address) with no call the policy traps.
//! Without them, std's handlers call `rt_sigaction` or `gettid`, which trap, and a crash
//! was filed as a policy violation, an escape attempt.
//!
//! Faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE): the handler records and returns; SA_RESETHAND
//! has put the default action back, so the faulting instruction runs again and the kernel
//! ends the worker by that signal, as without the handler. abort(): its SIGABRT handler
//! records and `_exit`s with 128 + SIGABRT (the default action would be ignored: the worker
//! is pid 1 of its pid namespace). A panic: the hook records, writes its message in one
//! `write` and `_exit`s with [`ipc::status::EXIT_PANIC`], without unwinding through code
//! that might make other calls. The reaper writes down how the worker really ended; the
//! VMM believes the crash record only where the two agree.

use std::sync::atomic::{AtomicPtr, Ordering};

use ipc::status::StatusMapping;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::error::SandboxError;

/// Where the handlers record. Set once, before they are installed; the mapping lives as
/// long as the process.
static STATUS: AtomicPtr<StatusMapping> = AtomicPtr::new(std::ptr::null_mut());

/// The signals of a fault (ipc::status::FAULT_SIGNALS).
const FAULT_SIGNALS: [Signal; 4] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
];

fn record(kind: u32, addr: u64) {
    let status = STATUS.load(Ordering::Acquire);
    if !status.is_null() {
        // SAFETY: set from a `&'static StatusMapping` in `install`, never freed.
        unsafe { (*status).record_crash(kind, addr) };
    }
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code <= 0 {
        // Sent by a process (kill -SEGV), not a fault: nothing would repeat it, so end
        // now, as a stop signal does, and record no crash.
        // SAFETY: _exit is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(128 + sig) };
    }
    // SAFETY: as above; for a fault si_addr is the faulting address.
    let addr = unsafe { (*info).si_addr() } as u64;
    record(sig as u32, addr);
}

extern "C" fn on_stop(sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + sig) };
}

extern "C" fn on_abort(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, sender) = unsafe { ((*info).si_code, (*info).si_pid()) };
    // abort() raises it against itself (SI_TKILL from pid 1, this process in its pid
    // namespace); from anyone else it is a stop signal, not a crash.
    if code > 0 || sender == 1 {
        record(libc::SIGABRT as u32, 0);
    }
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + libc::SIGABRT) };
}

/// Installs the fault and abort handlers, the panic hook (recording into `status`) and the
/// handlers that let SIGTERM, SIGINT and SIGHUP end the worker.
/// Called after the sandbox is set up and before the seccomp filter.
pub fn install(status: &'static StatusMapping) -> Result<(), SandboxError> {
    STATUS.store(status as *const _ as *mut _, Ordering::Release);
    let handler = |what| move |source| SandboxError::Prctl { what, source };
    let fault = SigAction::new(
        SigHandler::SigAction(on_fault),
        // On std's alternate stack (a stack overflow is a SIGSEGV too), once.
        SaFlags::SA_SIGINFO | SaFlags::SA_RESETHAND | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    for sig in FAULT_SIGNALS {
        // SAFETY: the handler makes no call at all: a load and atomic stores.
        unsafe { sigaction(sig, &fault) }.map_err(handler("a fault signal handler"))?;
    }
    let abort = SigAction::new(
        SigHandler::SigAction(on_abort),
        SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    // SAFETY: the handler records (atomic stores) and _exits.
    unsafe { sigaction(Signal::SIGABRT, &abort) }.map_err(handler("the SIGABRT handler"))?;
    // The worker is pid 1 of its pid namespace, where a signal without a handler is
    // ignored: SIGTERM, SIGINT and SIGHUP would do nothing. With these handlers they end
    // it, as they end any other process (its supervisor then restarts it as usual).
    let stop = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only _exits.
        unsafe { sigaction(sig, &stop) }.map_err(handler("a stop signal handler"))?;
    }
    std::panic::set_hook(Box::new(|info| {
        record(ipc::status::CRASH_PANIC, 0);
        let line = format!("bulkhead-worker: panicked: {info}\n");
        // SAFETY: one write of a live buffer to stderr, then _exit; no lock is taken (std's
        // stderr lock asks for the thread id, which may trap).
        unsafe {
            libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), line.len());
            libc::_exit(ipc::status::EXIT_PANIC);
        }
    }));
    Ok(())
}
