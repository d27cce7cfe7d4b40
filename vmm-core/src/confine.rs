//! The VMM confines itself: each thread it starts installs the seccomp filter of its role
//! (`policies/vmm*.policy`) once it is set up, and the main thread installs its own once
//! the vCPUs run. Only `bulkhead run` turns this on ([`enable`]): a library user (a test,
//! `bulkhead-bench restart`) keeps its threads as they are.
//!
//! A call a thread's policy forbids traps; the handler here writes one line naming the
//! thread and the call to stderr, then makes the call again, so the kernel ends the VMM
//! by SIGSYS (the guest with it). A VMM thread that makes a forbidden call is a bulkhead
//! bug or an attack; neither is survivable in place.
//!
//! Learn mode (`bulkhead policy learn`, [`enable_learning`]) runs the same filters, each
//! with one rule in front: a call made from one instruction of this module's trampoline is
//! allowed. A call the policy forbids still traps; the handler records it and makes it
//! through the trampoline on the thread's behalf, so the workload runs on and
//! [`learned`] lists every call a VMM thread would have been killed for. (The trampoline is
//! a way around every filter: no filter has that rule outside learn mode.)

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use policies::VmmThread;

static ENABLED: AtomicBool = AtomicBool::new(false);
static LEARNING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The role whose filter this thread installed, for the SIGSYS handler's line.
    static ROLE: Cell<Option<VmmThread>> = const { Cell::new(None) };
}

/// Calls learn mode keeps (more are counted, not kept: a workload that makes that many
/// forbidden calls has its answer long before).
const LEARNED_MAX: usize = 4096;

/// One forbidden call, as the handler stores it without allocating: the role's index in
/// [`VmmThread::ALL`] + 1 (0: a thread with no role of its own), the number, the arguments,
/// and last, `ready`.
struct LearnedSlot {
    role: AtomicU64,
    nr: AtomicU64,
    args: [AtomicU64; 6],
    ready: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: LearnedSlot = LearnedSlot {
    role: AtomicU64::new(0),
    nr: AtomicU64::new(0),
    args: [const { AtomicU64::new(0) }; 6],
    ready: AtomicBool::new(false),
};
static LEARNED: [LearnedSlot; LEARNED_MAX] = [EMPTY_SLOT; LEARNED_MAX];
static LEARNED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// A call a VMM thread made that its policy forbids, recorded in learn mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedCall {
    /// The thread's role; None for a thread that runs the filter of the thread that
    /// started it.
    pub role: Option<VmmThread>,
    pub nr: i64,
    pub args: [u64; 6],
}

// The trampoline: `learn_syscall(nr, a0, .., a5)` makes system call `nr` from the one
// instruction learn-mode filters allow (the address after it is what the kernel reports as
// the call's instruction pointer).
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.bulkhead_learn_syscall, \"ax\", @progbits",
    ".globl bulkhead_learn_syscall",
    ".hidden bulkhead_learn_syscall",
    ".type bulkhead_learn_syscall, @function",
    "bulkhead_learn_syscall:",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "mov r10, r8",
    "mov r8, r9",
    "mov r9, [rsp + 8]",
    "syscall",
    ".globl bulkhead_learn_syscall_end",
    ".hidden bulkhead_learn_syscall_end",
    "bulkhead_learn_syscall_end:",
    "ret",
    ".size bulkhead_learn_syscall, . - bulkhead_learn_syscall",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn bulkhead_learn_syscall(nr: i64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64)
        -> i64;
    static bulkhead_learn_syscall_end: u8;
}

/// The instruction pointer the kernel reports for a call the trampoline makes.
fn trampoline_ip() -> u64 {
    // Only the symbol's address is taken (no read): safe.
    std::ptr::addr_of!(bulkhead_learn_syscall_end) as u64
}

/// `program` with the learn-mode rule in front: a call from the trampoline is allowed.
/// The program's own jumps are relative, so they hold after the prefix.
fn learning_program(program: &[policies::sock_filter]) -> Vec<policies::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    // struct seccomp_data: nr (4), arch (4), instruction_pointer (8, little-endian).
    const IP_LOW: u32 = 8;
    const IP_HIGH: u32 = 12;
    let ip = trampoline_ip();
    let insn = |code, jt, jf, k| policies::sock_filter { code, jt, jf, k };
    let mut out = vec![
        insn(LD_W_ABS, 0, 0, IP_LOW),
        insn(JEQ_K, 0, 3, ip as u32),
        insn(LD_W_ABS, 0, 0, IP_HIGH),
        insn(JEQ_K, 0, 1, (ip >> 32) as u32),
        insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ];
    out.extend_from_slice(program);
    out
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

/// Learn mode, for `bulkhead policy learn`: call before any thread is confined (before
/// [`enable`]).
pub fn enable_learning() {
    LEARNING.store(true, Ordering::SeqCst);
}

/// The calls VMM threads made in learn mode that their policies forbid, in order, and how
/// many more were not kept (beyond the first 4096, or still being recorded at this moment).
pub fn learned() -> (Vec<LearnedCall>, usize) {
    let count = LEARNED_COUNT.load(Ordering::Acquire);
    let calls: Vec<LearnedCall> = LEARNED[..count.min(LEARNED_MAX)]
        .iter()
        .filter(|s| s.ready.load(Ordering::Acquire))
        .map(|s| LearnedCall {
            role: match s.role.load(Ordering::Relaxed) {
                0 => None,
                i => VmmThread::ALL.get(i as usize - 1).copied(),
            },
            nr: s.nr.load(Ordering::Relaxed) as i64,
            args: std::array::from_fn(|i| s.args[i].load(Ordering::Relaxed)),
        })
        .collect();
    let not_kept = count - calls.len();
    (calls, not_kept)
}

/// Confines the calling thread with `role`'s filter, if confinement is on. A thread that
/// cannot be confined would run with more than its policy allows: the VMM ends instead.
pub fn enter(role: VmmThread) {
    if !enabled() {
        return;
    }
    let id = policies::PolicyId::Vmm(role);
    let installed = if LEARNING.load(Ordering::SeqCst) {
        policies::install_program(id, &learning_program(policies::bpf(id)))
    } else {
        policies::install(id)
    };
    if let Err(e) = installed {
        crate::say!(
            "bulkhead: cannot confine thread {:?} ({role}): {e}; stopping",
            std::thread::current().name().unwrap_or("?")
        );
        std::process::exit(1);
    }
    ROLE.with(|r| r.set(Some(role)));
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
    let role = ROLE.with(|r| r.get());
    if LEARNING.load(Ordering::Relaxed) && call.arch == policies::trap::AUDIT_ARCH_X86_64 {
        let result = learn_and_make(role, &call);
        // SAFETY: `ctx` is this handler's ucontext_t; the value written to RAX is what the
        // interrupted thread sees as the call's result when the handler returns.
        unsafe {
            let uc = &mut *ctx.cast::<libc::ucontext_t>();
            uc.uc_mcontext.gregs[libc::REG_RAX as usize] = result;
        }
        return;
    }
    let mut line = LineBuf {
        buf: [0; 256],
        len: 0,
    };
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let name = policies::syscalls::name(i64::from(call.syscall)).unwrap_or("?");
    let _ = match role {
        // A thread with no role of its own runs the filter of the thread that started it.
        None => write!(
            line,
            "bulkhead: seccomp: VMM thread {tid} (its creator's policy)"
        ),
        Some(role) => write!(
            line,
            "bulkhead: seccomp: VMM thread {tid} (policy vmm/{})",
            role.name()
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

/// Learn mode, inside the SIGSYS handler: records `call` and makes it through the
/// trampoline; returns its result. Calls that cannot be made from a signal handler on the
/// thread's behalf get -ENOSYS instead: a new thread or process would start inside this
/// handler, a new program with SIGSYS blocked, and what the signal mask and the signal
/// stack are set to would be undone as the handler returns; x32 calls (bit 30 of the
/// number) would mean other calls on the trampoline's 64-bit ABI.
fn learn_and_make(role: Option<VmmThread>, call: &policies::trap::Trapped) -> i64 {
    let at = LEARNED_COUNT.fetch_add(1, Ordering::AcqRel);
    if let Some(slot) = LEARNED.get(at) {
        let role_index = role
            .and_then(|r| VmmThread::ALL.iter().position(|a| *a == r))
            .map_or(0, |i| i as u64 + 1);
        slot.role.store(role_index, Ordering::Relaxed);
        slot.nr.store(call.syscall as u64, Ordering::Relaxed);
        for (a, v) in slot.args.iter().zip(call.args) {
            a.store(v, Ordering::Relaxed);
        }
        slot.ready.store(true, Ordering::Release);
    }
    let nr = i64::from(call.syscall);
    const X32_SYSCALL_BIT: i64 = 0x4000_0000;
    if nr & X32_SYSCALL_BIT != 0
        || [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
        ]
        .contains(&nr)
    {
        return -i64::from(libc::ENOSYS);
    }
    let a = call.args;
    // SAFETY: the thread made this very call with these registers; it is made as the
    // thread would have made it had its filter allowed it, in learn mode only.
    unsafe { bulkhead_learn_syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefix allows exactly the trampoline's address and hands everything else to the
    /// program unchanged.
    #[test]
    fn the_learning_prefix_checks_both_halves_of_the_trampolines_address() {
        let program = policies::bpf(policies::PolicyId::Vmm(VmmThread::Vcpu));
        let learning = learning_program(program);
        assert_eq!(&learning[5..], program);
        let ip = trampoline_ip();
        assert_ne!(ip, 0);
        assert_eq!(learning[1].k, ip as u32);
        assert_eq!(learning[3].k, (ip >> 32) as u32);
        // Both misses land on the program's first instruction.
        assert_eq!(1 + 1 + usize::from(learning[1].jf), 5);
        assert_eq!(3 + 1 + usize::from(learning[3].jf), 5);
    }
}
