//! The ring-0 bootstrap (boot.s) and its ring-3 counterparts: the Rust entry points the
//! bootstrap `iretq`s to, and the layout constants shared with the assembly.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Most CPUs the guest brings up; per-CPU stacks and TSSs are allocated statically.
pub const MAX_CPUS: usize = 32;
/// Ring-0 stack per CPU: only interrupt entry and the bootstrap use it.
const KSTACK_SHIFT: u32 = 12;
/// Ring-3 stack per CPU, where all the real work runs.
pub const USTACK_SHIFT: u32 = 16;
/// Ring-3 stack per CPU for reporting a fatal exception (the normal one may be broken).
const FSTACK_SHIFT: u32 = 14;
/// Bytes per TSS in the TSS array: 104-byte TSS + 128-byte I/O bitmap + terminator.
const TSS_STRIDE: usize = 256;
const TSS_LIMIT: usize = 104 + 128 + 1 - 1;

/// GDT selectors (see `gdt` in boot.s).
const KCODE64: u16 = 0x08;
const KDATA: u16 = 0x10;
const KCODE32: u16 = 0x18;
const UDATA3: u16 = 0x20 | 3;
const UCODE3: u16 = 0x28 | 3;
const TSS_SEL0: u16 = 0x30;

/// Physical page the AP real-mode start code is copied to; SIPI vector = page number.
pub const TRAMPOLINE: u64 = 0x10000;

/// Interrupt vectors the ring-0 path counts and acknowledges (see `isr_common`):
/// `IRQ_FIRST..IRQ_FIRST + IRQ_COUNT`. Any other vector from 32 up (but 0xff, the
/// spurious vector) is fatal.
pub const IRQ_FIRST: u8 = 0x20;
pub const IRQ_COUNT: usize = 8;

/// Interrupts taken per vector from [`IRQ_FIRST`] on; ring 0 bumps them.
#[no_mangle]
#[allow(non_upper_case_globals, reason = "named as boot.s uses it")]
static tg_irq_counts: [AtomicU64; IRQ_COUNT] = [const { AtomicU64::new(0) }; IRQ_COUNT];

/// Address of the local APIC's EOI register, for the ring-0 interrupt path. Zero until
/// [`set_lapic_eoi`]: no vector is routed before then.
#[no_mangle]
#[allow(non_upper_case_globals, reason = "named as boot.s uses it")]
static tg_lapic_eoi: AtomicU64 = AtomicU64::new(0);

global_asm!(
    include_str!("boot.s"),
    MAX_CPUS = const MAX_CPUS,
    KSTACK_SHIFT = const KSTACK_SHIFT,
    KSTACK_SIZE = const 1usize << KSTACK_SHIFT,
    USTACK_SHIFT = const USTACK_SHIFT,
    USTACK_SIZE = const 1usize << USTACK_SHIFT,
    FSTACK_SHIFT = const FSTACK_SHIFT,
    FSTACK_SIZE = const 1usize << FSTACK_SHIFT,
    TSS_STRIDE = const TSS_STRIDE,
    TSS_LIMIT = const TSS_LIMIT,
    KCODE64 = const KCODE64,
    KDATA = const KDATA,
    KCODE32 = const KCODE32,
    UDATA3 = const UDATA3,
    UCODE3 = const UCODE3,
    TSS_SEL0 = const TSS_SEL0,
    TRAMPOLINE = const TRAMPOLINE,
    IRQ_FIRST = const IRQ_FIRST,
    IRQ_COUNT = const IRQ_COUNT,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ustacks: u8;
    /// CPU index the next AP to start takes (read by its ring-0 start code).
    static mut ap_boot_cpu: u32;
    /// Ring-0 service: halt this CPU with interrupts off (see boot.s).
    fn tg_sys_halt() -> !;
    /// Ring-0 service: unless `*counter != seen`, wait for the next interrupt.
    fn tg_sys_wait(seen: u64, counter: *const AtomicU64);
}

/// Interrupts taken so far on `vector` (0 for vectors the ring-0 path does not count).
pub fn irq_count(vector: u8) -> u64 {
    match tg_irq_counts.get(usize::from(vector.wrapping_sub(IRQ_FIRST))) {
        Some(c) if vector >= IRQ_FIRST => c.load(Ordering::Acquire),
        _ => 0,
    }
}

/// Tells the ring-0 interrupt path where the local APIC's EOI register is.
pub fn set_lapic_eoi(addr: u64) {
    tg_lapic_eoi.store(addr, Ordering::Release);
}

/// Halts with interrupts enabled until an interrupt arrives, unless one on `vector`
/// already did since its count read `seen` (see [`irq_count`]). Any interrupt ends the
/// wait; callers re-check their condition and their deadline.
pub fn wait_for_irq(vector: u8, seen: u64) {
    let Some(counter) = tg_irq_counts.get(usize::from(vector.wrapping_sub(IRQ_FIRST))) else {
        return;
    };
    // SAFETY: the trap at `tg_sys_wait` is recognised by the interrupt path, which
    // compares `*counter` with `seen`, maybe halts with interrupts on, and returns to
    // the `ret` after the trap; the counter is a static the ring-0 path only increments.
    unsafe { tg_sys_wait(seen, counter) }
}

/// Asks ring 0 to halt this CPU with interrupts off; never returns.
pub fn halt_forever() -> ! {
    // SAFETY: the trap at `tg_sys_halt` is recognised by the interrupt path, which
    // halts the CPU and never returns; no memory is touched.
    unsafe { tg_sys_halt() }
}

/// The AP start code, to be copied to [`TRAMPOLINE`].
pub fn trampoline_code() -> &'static [u8] {
    // SAFETY: both symbols delimit the assembled trampoline in the read-only image.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let end = &raw const ap_trampoline_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Tells the next AP's start code which CPU index (stack, TSS) it takes.
pub fn set_ap_boot_cpu(cpu: usize) {
    // SAFETY: a plain aligned store to a variable only the BSP writes, and only while
    // no AP is starting; the AP reads it after the SIPI that follows.
    unsafe { core::ptr::write_volatile(&raw mut ap_boot_cpu, cpu as u32) }
}

/// Index of the CPU running this code, derived from which ring-3 stack RSP lies in.
pub fn current_cpu() -> usize {
    let rsp: u64;
    // SAFETY: reads RSP, no side effects.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    let base = (&raw const ustacks) as u64;
    let cpu = (rsp.wrapping_sub(base) >> USTACK_SHIFT) as usize;
    if cpu < MAX_CPUS {
        cpu
    } else {
        MAX_CPUS
    }
}

/// Where the bootstrap enters ring 3 on every CPU.
#[no_mangle]
extern "C" fn rust_entry(cpu: u64, start_info: u64, apic_base: u64) -> ! {
    if cpu == 0 {
        crate::bsp_main(start_info, apic_base)
    } else {
        crate::smp::ap_main(cpu as usize)
    }
}

/// Where the ring-0 interrupt path sends every unexpected exception or interrupt.
#[no_mangle]
extern "C" fn rust_fault(vector: u64, rip: u64, err: u64, cpu: u64, cr2: u64) -> ! {
    crate::serial::fatal_exception(vector, rip, err, cpu as usize, cr2)
}
