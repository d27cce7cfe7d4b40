//! PVH boot: `hvm_start_info`, the memory map and the module list (the initrd).
//! Spec: xenbits "x86/HVM direct boot ABI" (docs/misc/pvh.pandoc).

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, GuestAddress};

use super::error::BootError;
use super::memory_map::MemoryMapEntry;
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::memory::GuestMemory;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes the start info at [`PVH_INFO_START`], the memory map at [`PVH_MEMMAP_START`] and,
/// with an initrd, a one-entry module list at [`PVH_MODLIST_START`].
pub fn write_start_info(
    mem: &GuestMemory,
    map: &[MemoryMapEntry],
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        // Version 1 adds the memory map, which Linux uses instead of probing.
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |a| a.raw_value()),
        ..Default::default()
    };
    let mut params;
    if let Some((addr, size)) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    } else {
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    }
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.start,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    params.set_sections(&entries, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configure)
}
