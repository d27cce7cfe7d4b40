//! The VMM confines itself: each thread it starts installs the seccomp filter of its role
//! (`policies/vmm*.policy`) once it is set up, and the main thread installs its own once
//! the vCPUs run. Only `bulkhead run` turns this on ([`enable`]): a library user (a test,
//! `bulkhead-bench restart`) keeps its threads as they are.
//!
//! A call a thread's policy forbids traps; the handler here writes one line naming the
//! thread and the call to stderr, then makes the call again, so the kernel ends the VMM
//! by SIGSYS (the guest with it). A VMM thread that makes a forbidden call is a bulkhead
//! bug or an attack; neither is survivable in place.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

pub use policies::VmmThread;

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The role whose filter this thread installed, for the SIGSYS handler's line.
    static ROLE: Cell<&'static str> = const { Cell::new("") };
}

/// Exit status should the repeated call ever return (it cannot: the filter refuses it).
const EXIT_TRAPPED: i32 = 128 + libc::SIGSYS;

/// Errors of turning confinement on.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot install the VMM's SIGSYS handler")]
    Handler(#[source] nix::Error),
}

/// Turns confinement on for this process: installs the SIGSYS handler; from now on each
/// thread started through [`crate::thread::spawn`] with a role installs that role's filter,
/// and [`enter`] confines the calling thread.
pub fn enable() -> Result<(), ConfineError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::SigAction(on_sigsys),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: the handler formats into a stack buffer and makes two calls (write, then the
    // trapped call again): async-signal-safe. No previous handler is relied on.
    unsafe { sigaction(Signal::SIGSYS, &action) }.map_err(ConfineError::Handler)?;
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Confines the calling thread with `role`'s filter, if confinement is on. A thread that
/// cannot be confined would run with more than its policy allows: the VMM ends instead.
pub fn enter(role: VmmThread) {
    if !enabled() {
        return;
    }
    if let Err(e) = policies::install(policies::PolicyId::Vmm(role)) {
        crate::say!(
            "bulkhead: cannot confine thread {:?} ({role}): {e}; stopping",
            std::thread::current().name().unwrap_or("?")
        );
        std::process::exit(1);
    }
    ROLE.with(|r| r.set(role.name()));
}

/// A fixed buffer that `write!` fills without allocating (the handler must not).
struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    use std::fmt::Write as _;
    // SAFETY: the kernel passes these pointers to this SA_SIGINFO handler of SIGSYS.
    let call = unsafe { policies::trap::Trapped::from_handler(info, ctx) };
    let mut line = LineBuf {
        buf: [0; 256],
        len: 0,
    };
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let name = policies::syscalls::name(i64::from(call.syscall)).unwrap_or("?");
    let _ = match ROLE.with(|r| r.get()) {
        // A thread with no role of its own runs the filter of the thread that started it.
        "" => write!(
            line,
            "bulkhead: seccomp: VMM thread {tid} (its creator's policy)"
        ),
        role => write!(
            line,
            "bulkhead: seccomp: VMM thread {tid} (policy vmm/{role})"
        ),
    };
    let _ = writeln!(
        line,
        " made a call its policy forbids: {name} (nr {}, arg0 {:#x}, arg1 {:#x}); \
         ending the VMM by SIGSYS",
        call.syscall, call.args[0], call.args[1]
    );
    // SAFETY: writes `len` initialised bytes of a live buffer to stderr; the result is
    // ignored (there is nothing else to tell).
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    call.repeat(EXIT_TRAPPED)
}
