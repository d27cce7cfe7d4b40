//! x86-64 vCPU setup: CPUID, MSRs, FPU, local APIC LINT pins, and the boot vCPU's entry
//! state for each boot protocol. Application processors get everything but registers:
//! the guest starts them with INIT/SIPI through the in-kernel local APIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::EntryPoint;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// Errors from configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot read the CPUID features KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot set CPUID on vCPU {vcpu}")]
    SetCpuid {
        vcpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot {what} of vCPU {vcpu}")]
    Ioctl {
        what: &'static str,
        vcpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs on vCPU {vcpu}")]
    PartialMsrs { vcpu: u8, set: usize, wanted: usize },
}

/// CPUID leaf 1 ECX bit: running under a hypervisor.
const CPUID_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 ECX bit: TSC deadline timer (the in-kernel LAPIC emulates it).
const CPUID_TSC_DEADLINE: u32 = 1 << 24;

/// Supported CPUID of this host's KVM, fetched once and specialised per vCPU.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)
}

/// The hypervisor timing leaf (as VMware defined it and crosvm and others expose it):
/// EAX the TSC frequency in kHz, EBX the local APIC timer's in kHz.
const CPUID_TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_TIMER_KHZ: u32 = 1_000_000;

/// Tells the guest the TSC frequency (leaf 0x40000010, announced by the hypervisor leaf
/// 0x40000000's maximum), so that a guest without a reference clock (the test guest)
/// need not guess it: AMD hosts have no CPUID frequency leaf of their own. Unchanged when
/// KVM offers no hypervisor leaves.
pub fn with_tsc_frequency(base: &CpuId, tsc_khz: u32) -> CpuId {
    let mut cpuid = base.clone();
    let mut announced = false;
    for entry in cpuid.as_mut_slice() {
        if entry.function == 0x4000_0000 {
            entry.eax = entry.eax.max(CPUID_TIMING_LEAF);
            announced = true;
        }
    }
    if !announced {
        return cpuid;
    }
    let timing = kvm_bindings::kvm_cpuid_entry2 {
        function: CPUID_TIMING_LEAF,
        eax: tsc_khz,
        ebx: APIC_TIMER_KHZ,
        ..Default::default()
    };
    match cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == CPUID_TIMING_LEAF)
    {
        Some(e) => *e = timing,
        None => {
            if cpuid.push(timing).is_err() {
                tracing::debug!("no room for CPUID leaf {CPUID_TIMING_LEAF:#x}");
            }
        }
    }
    cpuid
}

/// Gives vCPU `id` its APIC id and topology in CPUID.
pub fn cpuid_for(base: &CpuId, id: u8, num_vcpus: u8) -> CpuId {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(id) << 24)
                    | (u32::from(num_vcpus) << 16);
                entry.ecx |= CPUID_HYPERVISOR | CPUID_TSC_DEADLINE;
                // EDX bit 28 (HTT): the package has more than one logical processor.
                if num_vcpus > 1 {
                    entry.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                // x2APIC id of this logical processor.
                entry.edx = u32::from(id);
            }
            _ => {}
        }
    }
    cpuid
}

/// Everything a vCPU needs before its first KVM_RUN, except the entry registers.
pub fn configure_common(vcpu: &VcpuFd, id: u8, cpuid: &CpuId) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|source| CpuError::SetCpuid { vcpu: id, source })?;
    let ioctl = |what| {
        move |source| CpuError::Ioctl {
            what,
            vcpu: id,
            source,
        }
    };

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("set the FPU state"))?;

    let entries = [
        // IA32_MISC_ENABLE: fast string operations, as firmware leaves it.
        kvm_msr_entry {
            index: 0x1a0,
            data: 1,
            ..Default::default()
        },
        kvm_msr_entry {
            index: 0x10,
            data: 0,
            ..Default::default()
        }, // TSC
    ];
    let msrs = Msrs::from_entries(&entries).expect("two MSR entries fit a FAM wrapper");
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("set MSRs"))?;
    if set != entries.len() {
        return Err(CpuError::PartialMsrs {
            vcpu: id,
            set,
            wanted: entries.len(),
        });
    }

    // LINT0 = ExtINT (the legacy PIC), LINT1 = NMI, as firmware programs them.
    let mut lapic = vcpu.get_lapic().map_err(ioctl("read the local APIC"))?;
    set_lapic_lvt(&mut lapic.regs, 0x350, 0b111);
    set_lapic_lvt(&mut lapic.regs, 0x360, 0b100);
    vcpu.set_lapic(&lapic)
        .map_err(ioctl("write the local APIC"))?;
    Ok(())
}

fn set_lapic_lvt(regs: &mut [std::os::raw::c_char], offset: usize, delivery_mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (delivery_mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long || type_ < 8),
        s: 1,
        l: u8::from(long && type_ >= 8),
        g: 1,
        ..Default::default()
    }
}

/// Puts the boot vCPU at the kernel's entry point in the state its boot protocol defines.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), CpuError> {
    let ioctl = |what| {
        move |source| CpuError::Ioctl {
            what,
            vcpu: 0,
            source,
        }
    };
    let mut sregs = vcpu.get_sregs().map_err(ioctl("read special registers"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh(addr) => {
            // PVH: 32-bit flat protected mode, paging off, EBX = start info.
            sregs.cs = segment(0x08, 0xb, false);
            let data = segment(0x10, 0x3, false);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr0 = 0x1; // PE
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = addr.0;
            regs.rbx = PVH_INFO_START;
        }
        EntryPoint::Linux64(addr) => {
            sregs.gdt.base = BOOT_GDT_START;
            sregs.gdt.limit = (4 * 8 - 1) as u16;
            sregs.idt.base = BOOT_IDT_START;
            sregs.idt.limit = 7;
            sregs.cs = segment(0x08, 0xb, true);
            let data = segment(0x10, 0x3, true);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = kvm_segment {
                selector: 0x18,
                type_: 0xb,
                present: 1,
                limit: 0xfffff,
                ..Default::default()
            };
            sregs.cr3 = PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LMA | LME
            regs.rip = addr.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(ioctl("set special registers"))?;
    vcpu.set_regs(&regs).map_err(ioctl("set registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_tsc_frequency_goes_into_the_timing_leaf() {
        let entry = |function, eax| kvm_bindings::kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[entry(0, 0xd), entry(0x4000_0000, 0x4000_0001)]).unwrap();
        let c = with_tsc_frequency(&base, 2_445_420);
        let get = |f| c.as_slice().iter().find(|e| e.function == f).copied();
        assert_eq!(get(0x4000_0000).unwrap().eax, CPUID_TIMING_LEAF);
        let timing = get(CPUID_TIMING_LEAF).unwrap();
        assert_eq!((timing.eax, timing.ebx), (2_445_420, APIC_TIMER_KHZ));
        // Without KVM's hypervisor leaves nothing announces it: left out.
        let bare = CpuId::from_entries(&[entry(0, 0xd)]).unwrap();
        assert_eq!(with_tsc_frequency(&bare, 1).as_slice().len(), 1);
    }
    use super::*;

    #[test]
    fn lvt_delivery_mode_is_replaced_not_ored() {
        let mut regs = [0 as std::os::raw::c_char; 0x400];
        set_lapic_lvt(&mut regs, 0x350, 0b111);
        set_lapic_lvt(&mut regs, 0x350, 0b100);
        assert_eq!(regs[0x351] as u8, 0b100);
    }

    #[test]
    fn code_segments_are_long_only_in_long_mode() {
        assert_eq!(segment(0x08, 0xb, true).l, 1);
        assert_eq!(segment(0x08, 0xb, true).db, 0);
        assert_eq!(segment(0x08, 0xb, false).db, 1);
        assert_eq!(segment(0x10, 0x3, true).l, 0);
    }
}
