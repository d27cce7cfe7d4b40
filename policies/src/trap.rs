//! What a SIGSYS handler needs from a trapped call, for both sides of bulkhead: the worker
//! records it in its status page, the VMM writes it to its log. Either way the handler ends
//! by making the same call again ([`Trapped::repeat`]): SIGSYS is blocked inside its own
//! handler, so the kernel takes the default action for that second trap and the process
//! dies by SIGSYS, which is what its parent sees.

/// `AUDIT_ARCH_X86_64`: a trap from the native system call ABI.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

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

/// A call the filter trapped: number, arguments, ABI and where it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trapped {
    /// The syscall number (of `arch`'s table).
    pub syscall: i32,
    /// rdi, rsi, rdx, r10, r8, r9.
    pub args: [u64; 6],
    /// `AUDIT_ARCH_*` of the calling ABI.
    pub arch: u32,
    /// The instruction after the call.
    pub call_addr: u64,
}

impl Trapped {
    /// Reads the trapped call out of an `SA_SIGINFO` SIGSYS handler's arguments.
    ///
    /// # Safety
    /// `info` and `ctx` must be the pointers the kernel passed to an `SA_SIGINFO` handler
    /// of SIGSYS (so `info` holds `_sigsys` and `ctx` is a `ucontext_t`).
    pub unsafe fn from_handler(info: *const libc::siginfo_t, ctx: *const libc::c_void) -> Self {
        // SAFETY: the caller guarantees both pointers come from the kernel for SIGSYS; the
        // union member for SIGSYS is laid out as SigsysInfo on x86-64.
        let (info, uc) = unsafe {
            (
                &*info.cast::<SigsysInfo>(),
                &*ctx.cast::<libc::ucontext_t>(),
            )
        };
        let g = &uc.uc_mcontext.gregs;
        Trapped {
            syscall: info.syscall,
            args: [
                g[libc::REG_RDI as usize] as u64,
                g[libc::REG_RSI as usize] as u64,
                g[libc::REG_RDX as usize] as u64,
                g[libc::REG_R10 as usize] as u64,
                g[libc::REG_R8 as usize] as u64,
                g[libc::REG_R9 as usize] as u64,
            ],
            arch: info.arch,
            call_addr: info.call_addr,
        }
    }

    /// Makes the trapped call again from inside the SIGSYS handler, where SIGSYS is
    /// blocked: the filter refuses it again before it runs, and the kernel kills the
    /// process by SIGSYS. A call from another ABI (int 0x80) would mean something else on
    /// the native one, so a harmless call every bulkhead policy refuses stands in for it.
    /// Should either ever return, the process exits with `fallback_status`.
    pub fn repeat(&self, fallback_status: i32) -> ! {
        // SAFETY: the arguments are the trapped call's own; the filter refuses the call
        // before it runs (the same registers give the same verdict), so nothing happens
        // but the kernel's default action for SIGSYS. uname only writes into `uts`.
        unsafe {
            if self.arch == AUDIT_ARCH_X86_64 {
                let a = self.args;
                libc::syscall(
                    self.syscall as libc::c_long,
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                    a[4],
                    a[5],
                );
            } else {
                let mut uts: libc::utsname = std::mem::zeroed();
                libc::syscall(libc::SYS_uname, &mut uts);
            }
            libc::_exit(fallback_status)
        }
    }
}
