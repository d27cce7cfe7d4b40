//! Interrupt routing from ring 3: the local APIC (software enable, LVT timer as a
//! watchdog tick) and I/O APIC redirection entries, all through their MMIO registers,
//! which the page tables map user-accessible. The ring-0 side (count, EOI, `sti; hlt`)
//! is in boot.s; see `boot::wait_for_irq`.

use crate::boot::{self, IRQ_FIRST};
use crate::phys::Mmio;

/// Vector of virtio device interrupts (one device is driven at a time).
pub const VECTOR_DEVICE: u8 = IRQ_FIRST;
/// Vector of the local APIC timer tick that bounds every interrupt wait.
pub const VECTOR_TIMER: u8 = IRQ_FIRST + 1;

const APIC_BASE_MASK: u64 = 0x000f_ffff_ffff_f000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
/// SVR: APIC software enable, spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration "by 1".
const TIMER_DIV_1: u32 = 0xb;
/// Timer ticks per period: 10 ms at KVM's 1 GHz APIC timer (elsewhere just "some ms").
const TIMER_PERIOD: u32 = 10_000_000;

/// Where QEMU, Firecracker and bulkhead put the first I/O APIC when no MADT says so.
const IOAPIC_DEFAULT: u64 = 0xfec0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_VER: u32 = 0x01;
const IOAPIC_REDTBL: u32 = 0x10;
/// Redirection entry: masked (bit 16). Edge, active high, fixed, physical are all 0.
const REDIR_MASKED: u32 = 1 << 16;

/// The I/O APICs: (register base, first GSI), from the MADT or the default one.
#[derive(Clone, Copy, Debug)]
pub struct IoApics {
    list: [(u64, u32); crate::acpi::MAX_IOAPICS],
    len: usize,
}

impl IoApics {
    pub fn new(madt: Option<&[(u64, u32)]>) -> Self {
        let mut s = IoApics {
            list: [(0, 0); crate::acpi::MAX_IOAPICS],
            len: 0,
        };
        for &e in madt.unwrap_or(&[]).iter().take(s.list.len()) {
            s.list[s.len] = e;
            s.len += 1;
        }
        if s.len == 0 {
            s.list[0] = (IOAPIC_DEFAULT, 0);
            s.len = 1;
        }
        s
    }

    /// The I/O APIC serving `gsi` and the pin on it.
    fn find(&self, gsi: u32) -> Option<(Mmio, u32)> {
        self.list[..self.len].iter().find_map(|&(addr, base)| {
            // SAFETY: the MADT (or the platform default) names this page as an I/O
            // APIC's registers.
            let regs = unsafe { Mmio::new(addr, 0x20) }?;
            let pins = ((ioapic_read(&regs, IOAPIC_VER) >> 16) & 0xff) + 1;
            (gsi >= base && gsi - base < pins).then_some((regs, gsi - base))
        })
    }
}

fn ioapic_read(regs: &Mmio, reg: u32) -> u32 {
    regs.write32(IOREGSEL, reg);
    regs.read32(IOWIN)
}

fn ioapic_write(regs: &Mmio, reg: u32, value: u32) {
    regs.write32(IOREGSEL, reg);
    regs.write32(IOWIN, value);
}

/// Interrupt delivery to this CPU (the BSP), set up for one device GSI; dropping it masks
/// the pin and stops the timer again.
#[derive(Debug)]
pub struct Routing {
    lapic: Mmio,
    ioapic: Mmio,
    pin: u32,
}

impl Routing {
    /// Enables the local APIC, starts the watchdog tick and routes `gsi` (edge, active
    /// high, fixed) to this CPU at [`VECTOR_DEVICE`].
    pub fn new(apic_base_msr: u64, ioapics: &IoApics, gsi: u32) -> Result<Self, &'static str> {
        let base = apic_base_msr & APIC_BASE_MASK;
        // SAFETY: the local APIC page holds registers only.
        let lapic = unsafe { Mmio::new(base, 0x1000) }.ok_or("local apic not mapped")?;
        let (ioapic, pin) = ioapics.find(gsi).ok_or("no i/o apic serves the gsi")?;
        boot::set_lapic_eoi(base + LAPIC_EOI);
        lapic.write32(LAPIC_SVR, SVR_ENABLE);
        lapic.write32(LAPIC_TPR, 0);
        lapic.write32(LAPIC_TIMER_DIV, TIMER_DIV_1);
        lapic.write32(LAPIC_LVT_TIMER, LVT_PERIODIC | u32::from(VECTOR_TIMER));
        lapic.write32(LAPIC_TIMER_INIT, TIMER_PERIOD);
        let apic_id = lapic.read32(LAPIC_ID) >> 24;
        let reg = IOAPIC_REDTBL + 2 * pin;
        ioapic_write(&ioapic, reg, REDIR_MASKED);
        ioapic_write(&ioapic, reg + 1, apic_id << 24);
        ioapic_write(&ioapic, reg, u32::from(VECTOR_DEVICE));
        Ok(Routing { lapic, ioapic, pin })
    }
}

impl Drop for Routing {
    fn drop(&mut self) {
        ioapic_write(&self.ioapic, IOAPIC_REDTBL + 2 * self.pin, REDIR_MASKED);
        self.lapic.write32(LAPIC_TIMER_INIT, 0);
        self.lapic
            .write32(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(VECTOR_TIMER));
    }
}
