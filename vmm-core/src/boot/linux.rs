//! The 64-bit Linux boot protocol (Documentation/arch/x86/boot.rst): `boot_params` with an
//! e820 map, an identity-mapped first GiB and a flat GDT for the boot vCPU.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, Bytes, GuestAddress};

use super::error::BootError;
use super::memory_map::MemoryMapEntry;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, CMDLINE_START, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemory;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Linux refuses kernels aligned below 2 MiB when it relocates; an ELF has no header to say.
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// The flat GDT for 64-bit entry: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const GDT_64: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Packs a GDT descriptor from `flags` (access byte in bits 0-7, flags nibble in 12-15).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

pub fn write_boot_params(
    mem: &GuestMemory,
    map: &[MemoryMapEntry],
    header: Option<setup_header>,
    initrd: Option<(GuestAddress, u64)>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        // An ELF vmlinux has no setup header: fill in what the kernel checks.
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: entry.start,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::Configure)
}

/// Identity-maps the first GiB with 2 MiB pages and writes the GDT and an empty IDT.
pub fn write_page_tables_and_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    let write = |what, addr: u64, value: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|source| BootError::GuestWrite { what, addr, source })
    };
    // Present | writable.
    write("PML4", PML4_START, PDPTE_START | 0x03)?;
    write("PDPT", PDPTE_START, PDE_START | 0x03)?;
    for i in 0..512u64 {
        // Present | writable | 2 MiB page.
        write("page directory", PDE_START + i * 8, (i << 21) | 0x83)?;
    }
    for (i, entry) in GDT_64.iter().enumerate() {
        write("GDT", BOOT_GDT_START + i as u64 * 8, *entry)?;
    }
    write("IDT", BOOT_IDT_START, 0)
}
