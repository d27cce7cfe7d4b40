//! Test plans, chosen with `testguest.plan=NAME`. A plan runs on the BSP in ring 3
//! once every CPU is online; it prints its result lines and returns for `TG done`, or
//! ends the run with `fail!`.

use crate::cmdline::Cmdline;
use crate::start_info::StartInfo;
use crate::virtio_mmio::{Slots, MAGIC_VALUE};
use crate::{fail, tg};

/// What a plan gets to work with.
#[derive(Debug)]
pub struct Ctx {
    pub start_info: StartInfo,
    pub cmdline: Cmdline,
    pub devices: Slots,
    pub cpus: usize,
    pub tsc_hz: u64,
    /// IA32_APIC_BASE of the BSP (local APIC address and mode).
    pub apic_base_msr: u64,
    pub ioapics: crate::irq::IoApics,
}

#[derive(Debug)]
pub struct Plan {
    pub name: &'static str,
    pub run: fn(&Ctx),
}

pub const PLANS: &[Plan] = &[
    Plan {
        name: "info",
        run: info,
    },
    Plan {
        name: "boot",
        run: boot,
    },
    Plan {
        name: "fault",
        run: fault,
    },
    Plan {
        name: "blk-verify",
        run: crate::blk_verify::run,
    },
    Plan {
        name: "hostile",
        run: crate::hostile::run,
    },
    Plan {
        name: "blk-chaos",
        run: crate::chaos::run,
    },
    Plan {
        name: "blk-recover",
        run: crate::recover::run,
    },
    Plan {
        name: "blk-abuse",
        run: crate::abuse::run,
    },
    Plan {
        name: "blk-reinit",
        run: crate::reinit::run,
    },
    Plan {
        name: "blk-resize",
        run: crate::resize::run,
    },
    Plan {
        name: "blk-bench",
        run: crate::bench::run,
    },
    Plan {
        name: "blk-pair",
        run: crate::pair::run,
    },
    Plan {
        name: "blk-jitter",
        run: crate::jitter::run,
    },
    Plan {
        name: "notify-cost",
        run: crate::notify_cost::run,
    },
];

pub fn find(name: &str) -> Option<&'static Plan> {
    PLANS.iter().find(|p| p.name == name)
}

/// What APs do once online: under `blk-jitter` a CPU-bound loop until the plan ends, else
/// nothing (they halt).
pub fn ap_work(_cpu: usize) -> ! {
    if crate::jitter::SPIN_APS.load(core::sync::atomic::Ordering::Relaxed) {
        crate::jitter::ap_spin();
    }
    crate::boot::halt_forever()
}

/// `info`: identify every virtio-mmio device.
fn info(ctx: &Ctx) {
    for (n, dev) in ctx.devices.iter().enumerate() {
        let magic = dev.magic();
        let ok = magic == MAGIC_VALUE;
        tg!(
            "dev {n} addr={:#x} irq={} magic={} version={} id={}",
            dev.addr,
            dev.irq,
            if ok { "ok" } else { "bad" },
            dev.version(),
            dev.device_id()
        );
        if !ok {
            fail!("dev {n} magic {magic:#x}");
        }
    }
}

/// `boot`: what the loader handed over (for debugging a VMM's boot path).
fn boot(ctx: &Ctx) {
    let si = &ctx.start_info;
    tg!(
        "boot start_info={:#x} version={} cmdline={:#x} rsdp={:#x}",
        si.paddr,
        si.version,
        si.cmdline_paddr,
        si.rsdp_paddr
    );
    tg!("boot cpus={} tsc_hz={}", ctx.cpus, ctx.tsc_hz);
    for (n, e) in si.memmap().enumerate() {
        tg!(
            "mem {n} addr={:#x} size={:#x} type={}",
            e.addr,
            e.size,
            e.kind
        );
    }
}

/// `fault`: checks the failure path itself; expect `TG fail exception 6 ...` and exit
/// status 3.
fn fault(_ctx: &Ctx) {
    // SAFETY: UD2 raises #UD, which the interrupt path reports and turns into an exit;
    // execution never continues past it.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) }
}
