//! Loading a kernel and describing the machine to it.
//!
//! ELF kernels with a PVH note (Linux vmlinux, the test guest) boot through PVH, as Cloud
//! Hypervisor does; a bzImage, or an ELF without the note, boots through the 64-bit Linux
//! boot protocol, as Firecracker does.

mod error;
mod linux;
mod memory_map;
mod pvh;

pub use error::BootError;
pub use memory_map::{MemoryMapEntry, MemoryType};

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_HOLE_END};
use crate::memory::GuestMemory;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh(GuestAddress),
    /// 64-bit Linux boot protocol: long mode, identity-mapped, RSI = `boot_params`.
    Linux64(GuestAddress),
}

/// What the caller supplies to boot a kernel.
#[derive(Debug)]
pub struct BootConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    /// Where the ACPI RSDP is, if the VMM wrote tables.
    pub rsdp: Option<GuestAddress>,
}

/// Where the kernel and initrd ended up.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub initrd: Option<(GuestAddress, u64)>,
}

/// Loads the kernel and initrd, writes the command line and the boot protocol's structures.
pub fn load(mem: &GuestMemory, cfg: &BootConfig) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: cfg.kernel.to_path_buf(),
        source,
    };
    let mut kernel = File::open(cfg.kernel).map_err(open_err)?;
    if !kernel.metadata().map_err(open_err)?.is_file() {
        return Err(BootError::NotAKernel {
            path: cfg.kernel.to_path_buf(),
        });
    }
    let (result, format) = load_kernel_image(mem, &mut kernel, cfg.kernel)?;

    let initrd = match cfg.initrd {
        Some(path) => Some(load_initrd(mem, path, result.kernel_end, format)?),
        None => None,
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(cfg.cmdline)
        .map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|source| {
        BootError::LoadKernel {
            path: cfg.kernel.to_path_buf(),
            source,
        }
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(BootError::Cmdline)?;

    write_reset_stub(mem)?;
    let map = memory_map(mem);
    let entry = match (format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            pvh::write_start_info(mem, &map, initrd, cfg.rsdp)?;
            EntryPoint::Pvh(entry)
        }
        _ => {
            let header = result.setup_header;
            linux::write_boot_params(mem, &map, header, initrd, cmdline_len)?;
            let entry = match format {
                // startup_64 sits 0x200 bytes into the protected-mode code of a bzImage.
                KernelFormat::BzImage => result.kernel_load.unchecked_add(0x200),
                KernelFormat::Elf => result.kernel_load,
            };
            linux::write_page_tables_and_gdt(mem)?;
            EntryPoint::Linux64(entry)
        }
    };
    Ok(LoadedKernel { entry, initrd })
}

/// Real-mode code at the reset vector: with interrupts off (no real-mode interrupt table
/// exists), pulse the i8042 reset line (`mov al, 0xfe; out 0x64, al`), then halt. It stands in for a BIOS's reset path: Linux on a
/// hardware-reduced ACPI machine without EFI reboots by jumping there (its "BIOS" method,
/// after the EFI one it prefers found no EFI), so a guest `reboot` ends the VM as an
/// i8042 reset does, instead of running whatever the memory holds.
const RESET_STUB: [u8; 8] = [0xfa, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

fn write_reset_stub(mem: &GuestMemory) -> Result<(), BootError> {
    let addr = crate::layout::RESET_VECTOR;
    mem.write_slice(&RESET_STUB, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite {
            what: "the reset vector",
            addr,
            source,
        })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn load_kernel_image(
    mem: &GuestMemory,
    kernel: &mut File,
    path: &Path,
) -> Result<(KernelLoaderResult, KernelFormat), BootError> {
    let load_err = |source| BootError::LoadKernel {
        path: path.to_path_buf(),
        source,
    };
    match Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => return Ok((result, KernelFormat::Elf)),
        Err(loader::Error::Elf(
            loader::elf::Error::InvalidElfMagicNumber | loader::elf::Error::ReadElfHeader,
        )) => {}
        Err(e) => return Err(load_err(e)),
    }
    match BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok((result, KernelFormat::BzImage)),
        Err(loader::Error::Bzimage(
            loader::bzimage::Error::InvalidBzImage | loader::bzimage::Error::ReadBzImageHeader,
        )) => Err(BootError::NotAKernel {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(load_err(e)),
    }
}

/// Highest address (exclusive) the 64-bit boot protocol lets us put an initrd below when the
/// kernel does not say (`initrd_addr_max` default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x3800_0000;

fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    _format: KernelFormat,
) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let low_end = low_ram_end(mem);
    let limit = low_end.min(DEFAULT_INITRD_ADDR_MAX);
    let start = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end && size > 0);
    let Some(start) = start else {
        return Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            kernel_end,
            limit,
        });
    };
    let mut data = Vec::with_capacity(size as usize);
    file.read_to_end(&mut data).map_err(read_err)?;
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|source| BootError::GuestWrite {
            what: "initrd",
            addr: start,
            source,
        })?;
    Ok((GuestAddress(start), size))
}

/// End (exclusive) of RAM below the MMIO hole.
fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| {
            use vm_memory::GuestMemoryRegion;
            r.start_addr().raw_value() + r.len()
        })
        .filter(|&end| end <= crate::layout::MMIO_HOLE_START)
        .max()
        .unwrap_or(0)
}

/// The guest's memory map: RAM below the EBDA, the reserved legacy BIOS area (which holds
/// the ACPI tables), RAM from 1 MiB to the hole, and RAM above 4 GiB.
pub fn memory_map(mem: &GuestMemory) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            start: 0,
            size: EBDA_START,
            kind: MemoryType::Ram,
        },
        MemoryMapEntry {
            start: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: MemoryType::Reserved,
        },
    ];
    let low_end = low_ram_end(mem);
    if low_end > HIMEM_START {
        map.push(MemoryMapEntry {
            start: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: MemoryType::Ram,
        });
    }
    let end = mem.last_addr().raw_value() + 1;
    if end > MMIO_HOLE_END {
        map.push(MemoryMapEntry {
            start: MMIO_HOLE_END,
            size: end - MMIO_HOLE_END,
            kind: MemoryType::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn memory_map_covers_low_ram_and_reserves_the_bios_area() {
        let ram = GuestRam::new(64, crate::memory::RamPages::Small).unwrap();
        let map = memory_map(ram.memory());
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].kind, MemoryType::Reserved);
        assert!(map[1].start <= crate::layout::ACPI_START);
        assert_eq!(map[2].start + map[2].size, 64 << 20);
    }

    #[test]
    fn the_reset_vector_pulses_the_i8042_reset_line() {
        let ram = GuestRam::new(16, crate::memory::RamPages::Small).unwrap();
        write_reset_stub(ram.memory()).unwrap();
        let mut code = [0u8; 8];
        ram.memory()
            .read_slice(&mut code, GuestAddress(crate::layout::RESET_VECTOR))
            .unwrap();
        // cli; mov al, I8042_CMD_RESET; out I8042_COMMAND_PORT, al; hlt; jmp to the hlt.
        assert_eq!(code[0], 0xfa);
        assert_eq!(code[1..3], [0xb0, crate::devices::I8042_CMD_RESET]);
        assert_eq!(code[3..5], [0xe6, crate::devices::I8042_COMMAND_PORT as u8]);
        assert_eq!(code[5..], [0xf4, 0xeb, 0xfd]);
        // It sits in the reserved legacy BIOS area.
        let map = memory_map(ram.memory());
        assert!(map.iter().any(|e| e.kind == MemoryType::Reserved
            && e.start <= crate::layout::RESET_VECTOR
            && crate::layout::RESET_VECTOR + 16 <= e.start + e.size));
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let ram = GuestRam::new(16, crate::memory::RamPages::Small).unwrap();
        let dir = std::env::temp_dir().join(format!("bulkhead-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-kernel");
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        let cfg = BootConfig {
            kernel: &path,
            initrd: None,
            cmdline: "console=ttyS0",
            rsdp: None,
        };
        let err = load(ram.memory(), &cfg).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
