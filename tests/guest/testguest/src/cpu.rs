//! Ring-3 CPU primitives: port I/O (allowed by the TSS I/O bitmap), the TSC, CPUID,
//! and leaving the VM.

use core::arch::asm;

/// Ports ring 3 may use (see the I/O bitmap in boot.s).
pub const PORT_DEBUG_EXIT: u16 = 0xf4;
pub const PORT_I8042_CMD: u16 = 0x64;

/// Exit statuses written to the debug-exit port.
pub const EXIT_OK: u32 = 0;
pub const EXIT_FAIL: u32 = 1;
pub const EXIT_PANIC: u32 = 2;
pub const EXIT_EXCEPTION: u32 = 3;

pub fn outb(port: u16, value: u8) {
    // SAFETY: the I/O bitmap only lets ring 3 reach the serial port, debug exit and
    // i8042, none of which can corrupt guest memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed in ring 3 (CR4.TSD is clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// TSC frequency in Hz: the hypervisor timing leaf, else the CPUID crystal or base
/// frequency leaves, else a guess of 2 GHz (only used for timeouts then).
pub fn tsc_hz() -> u64 {
    let (_, _, ecx, _) = cpuid(1, 0);
    if ecx & (1 << 31) != 0 {
        let (max, _, _, _) = cpuid(0x4000_0000, 0);
        if max >= 0x4000_0010 {
            let (khz, _, _, _) = cpuid(0x4000_0010, 0);
            if khz != 0 {
                return u64::from(khz) * 1000;
            }
        }
    }
    let (max, _, _, _) = cpuid(0, 0);
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return u64::from(crystal) * u64::from(num) / u64::from(den);
        }
    }
    if max >= 0x16 {
        let (mhz, _, _, _) = cpuid(0x16, 0);
        if mhz != 0 {
            return u64::from(mhz) * 1_000_000;
        }
    }
    2_000_000_000
}

/// A deadline in TSC ticks.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_us(tsc_hz: u64, us: u64) -> Self {
        Deadline(rdtsc().saturating_add(tsc_hz / 1_000_000 * us))
    }

    pub fn passed(self) -> bool {
        rdtsc() >= self.0
    }
}

pub fn delay_us(tsc_hz: u64, us: u64) {
    let d = Deadline::after_us(tsc_hz, us);
    while !d.passed() {
        core::hint::spin_loop();
    }
}

/// Leaves the VM with `status`: debug-exit port (QEMU exits with (status << 1) | 1,
/// bulkhead with status), then an i8042 reset for VMMs without it, then halt.
pub fn exit(status: u32) -> ! {
    outl(PORT_DEBUG_EXIT, status);
    outb(PORT_I8042_CMD, 0xfe);
    crate::boot::halt_forever()
}
