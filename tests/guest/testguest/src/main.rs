//! bulkhead's test guest: a freestanding x86-64 PVH program. A tiny ring-0 bootstrap
//! (boot.s, emulated and slow under kvm_pvm) enters ring 3 on every CPU, where all the
//! work runs natively: command line, ACPI, SMP bring-up, devices, test plans. Results
//! are `TG ...` lines on COM1; the exit status goes to port 0xf4 (see `cpu::exit`).

#![no_std]
#![no_main]
#![allow(
    dead_code,
    reason = "helpers (options, registers, context) are there for the plans to come"
)]

mod abuse;
mod acpi;
mod bench;
mod blk_verify;
mod boot;
mod chaos;
mod cmdline;
mod cpu;
mod hostile;
mod irq;
mod jitter;
mod mem;
mod notify_cost;
mod pair;
mod phys;
mod plans;
mod reinit;
mod recover;
mod resize;
mod serial;
mod smp;
mod start_info;
mod virtio_blk;
mod virtio_mmio;

use cmdline::Cmdline;
use start_info::StartInfo;
use virtio_mmio::Slots;

/// The BSP's ring-3 main: from the PVH start info to the plan's end.
fn bsp_main(start_info_paddr: u64, apic_base_msr: u64) -> ! {
    let si = StartInfo::read(start_info_paddr).unwrap_or_else(|e| fail!("{e}"));
    let cmdline = Cmdline::new(si.cmdline().unwrap_or_else(|e| fail!("{e}")));
    let plan = match cmdline.plan() {
        Some(name) => plans::find(name).unwrap_or_else(|| fail!("unknown plan {name}")),
        None => fail!(
            "no plan: add {}=NAME to the command line",
            cmdline::PLAN_KEY
        ),
    };
    let devices = Slots::from_cmdline(&cmdline).unwrap_or_else(|e| fail!("{e}"));
    let tsc_hz = cpu::tsc_hz();
    let timeout_ms = match cmdline.number("testguest.ap_timeout_ms") {
        Ok(v) => v.unwrap_or(smp::DEFAULT_AP_TIMEOUT_MS),
        Err(v) => fail!("bad testguest.ap_timeout_ms={v}"),
    };
    if plan.name == "blk-jitter" {
        jitter::SPIN_APS.store(true, core::sync::atomic::Ordering::Relaxed);
    }
    let cpu_list = acpi::cpus(si.rsdp_paddr).unwrap_or_else(|e| fail!("{e}"));
    let cpus = smp::bring_up(&si, cpu_list.as_ref(), apic_base_msr, tsc_hz, timeout_ms);
    let ioapics = irq::IoApics::new(cpu_list.as_ref().map(|c| c.ioapics()));
    let ctx = plans::Ctx {
        start_info: si,
        cmdline,
        devices,
        cpus,
        tsc_hz,
        apic_base_msr,
        ioapics,
    };
    (plan.run)(&ctx);
    // `hold_ms=N`: stay alive (spinning in ring 3, no exits) before the final line, so a
    // test can look at the VMM and its workers from outside after the plan's I/O.
    match ctx.cmdline.number("hold_ms") {
        Ok(Some(ms)) => {
            tg!("hold {ms}");
            cpu::delay_us(ctx.tsc_hz, ms.saturating_mul(1000));
        }
        Ok(None) => {}
        Err(e) => fail!("hold_ms: {e}"),
    }
    tg!("done");
    cpu::exit(cpu::EXIT_OK)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(l) => tg!("fail panic {}:{}: {}", l.file(), l.line(), info.message()),
        None => tg!("fail panic: {}", info.message()),
    }
    cpu::exit(cpu::EXIT_PANIC)
}
