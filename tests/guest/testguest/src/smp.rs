//! Starting the other CPUs: INIT, SIPI, SIPI through the local APIC (xAPIC MMIO, from
//! ring 3), one AP at a time so each knows its index before it runs.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::acpi::CpuList;
use crate::boot::{self, MAX_CPUS, TRAMPOLINE};
use crate::cpu::{self, Deadline};
use crate::phys::{self, Mmio};
use crate::start_info::{StartInfo, MEMMAP_RAM};
use crate::{fail, tg};

const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_MASK: u64 = 0x000f_ffff_ffff_f000;

const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
/// SVR: APIC software enable, spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
const ICR_BUSY: u32 = 1 << 12;
/// INIT, level triggered, assert / de-assert (Intel SDM 10.6.1, MP spec B.4).
const ICR_INIT_ASSERT: u32 = 0xc500;
const ICR_INIT_DEASSERT: u32 = 0x8500;
/// Start-up IPI; the low byte is the start page number.
const ICR_SIPI: u32 = 0x4600;

static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// How long the BSP waits for each AP, unless `testguest.ap_timeout_ms=` says otherwise.
pub const DEFAULT_AP_TIMEOUT_MS: u64 = 2000;

/// Brings every enabled CPU of `cpus` online (the BSP is CPU 0, the others follow in
/// MADT order); returns how many CPUs run. Fails the run if one does not come up.
pub fn bring_up(
    si: &StartInfo,
    cpus: Option<&CpuList>,
    apic_base_msr: u64,
    tsc_hz: u64,
    timeout_ms: u64,
) -> usize {
    tg!("cpu 0 online");
    let Some(cpus) = cpus.filter(|c| c.apic_ids().len() > 1) else {
        return 1;
    };
    if cpus.total > MAX_CPUS {
        tg!("note {} cpus, starting {}", cpus.total, MAX_CPUS);
    }
    if apic_base_msr & APIC_BASE_ENABLE == 0 || apic_base_msr & APIC_BASE_X2APIC != 0 {
        fail!("local apic not in xapic mode (apic base msr {apic_base_msr:#x})");
    }
    let base = apic_base_msr & APIC_BASE_MASK;
    // SAFETY: the local APIC page holds registers only.
    let Some(lapic) = (unsafe { Mmio::new(base, 0x1000) }) else {
        fail!("local apic at {base:#x} not mapped");
    };
    let bsp_id = lapic.read32(LAPIC_ID) >> 24;
    if !cpus.apic_ids().contains(&bsp_id) {
        fail!("bsp apic id {bsp_id} not in MADT");
    }
    install_trampoline(si);
    lapic.write32(LAPIC_SVR, SVR_ENABLE);

    let aps = cpus.apic_ids().iter().copied().filter(|&id| id != bsp_id);
    for (i, apic_id) in aps.enumerate() {
        let cpu = i + 1;
        if apic_id > 0xfe {
            fail!("cpu {cpu} apic id {apic_id} needs x2apic");
        }
        boot::set_ap_boot_cpu(cpu);
        send_ipi(&lapic, apic_id, ICR_INIT_ASSERT, tsc_hz);
        send_ipi(&lapic, apic_id, ICR_INIT_DEASSERT, tsc_hz);
        cpu::delay_us(tsc_hz, 10);
        let sipi = ICR_SIPI | (TRAMPOLINE >> 12) as u32;
        send_ipi(&lapic, apic_id, sipi, tsc_hz);
        cpu::delay_us(tsc_hz, 200);
        // A second SIPI as the MP spec says; a CPU already running ignores it.
        if !ONLINE[cpu].load(Ordering::Acquire) {
            send_ipi(&lapic, apic_id, sipi, tsc_hz);
        }
        let deadline = Deadline::after_us(tsc_hz, timeout_ms * 1000);
        while !ONLINE[cpu].load(Ordering::Acquire) {
            if deadline.passed() {
                fail!("cpu {cpu} did not come online");
            }
            core::hint::spin_loop();
        }
    }
    cpus.apic_ids().len()
}

fn send_ipi(lapic: &Mmio, apic_id: u32, icr: u32, tsc_hz: u64) {
    lapic.write32(LAPIC_ICR_HI, apic_id << 24);
    lapic.write32(LAPIC_ICR_LO, icr);
    let deadline = Deadline::after_us(tsc_hz, 100_000);
    while lapic.read32(LAPIC_ICR_LO) & ICR_BUSY != 0 {
        if deadline.passed() {
            fail!("ipi {icr:#x} to apic {apic_id} stuck");
        }
        core::hint::spin_loop();
    }
}

/// Copies the AP start code to its page after checking the page is free RAM.
fn install_trampoline(si: &StartInfo) {
    let code = boot::trampoline_code();
    let page = (TRAMPOLINE, 0x1000);
    let overlaps = |(a, len): (u64, u64)| len != 0 && a < page.0 + page.1 && page.0 < a + len;
    if let Some(r) = si.in_use().into_iter().find(|&r| overlaps(r)) {
        fail!(
            "trampoline page {:#x} holds boot data at {:#x}",
            page.0,
            r.0
        );
    }
    // Without a memory map (start_info version 0) the page is assumed to be RAM.
    let mut memmap = si.memmap().peekable();
    if memmap.peek().is_some()
        && !memmap
            .any(|e| e.kind == MEMMAP_RAM && e.addr <= page.0 && page.0 + page.1 <= e.addr + e.size)
    {
        fail!("trampoline page {:#x} is not RAM in the memory map", page.0);
    }
    debug_assert!(phys::mapped(page.0, code.len() as u64));
    // SAFETY: the page is RAM no one else uses (checked above), outside the image, and
    // identity mapped; the source is the trampoline in the image.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE as *mut u8, code.len());
    }
}

/// Ring-3 entry of every AP.
pub fn ap_main(cpu: usize) -> ! {
    tg!("cpu {cpu} online");
    ONLINE[cpu].store(true, Ordering::Release);
    crate::plans::ap_work(cpu)
}
