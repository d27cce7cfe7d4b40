//! The PVH `hvm_start_info` the loader hands over in EBX (Xen's
//! `public/arch-x86/hvm/start_info.h`).

use core::fmt;

use crate::phys;

pub const MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM in the memory map.
pub const MEMMAP_RAM: u32 = 1;

const OFF_MAGIC: u64 = 0;
const OFF_VERSION: u64 = 4;
const OFF_NR_MODULES: u64 = 12;
const OFF_MODLIST: u64 = 16;
const OFF_CMDLINE: u64 = 24;
const OFF_RSDP: u64 = 32;
const OFF_MEMMAP: u64 = 40;
const OFF_MEMMAP_ENTRIES: u64 = 48;
/// Size of the version 1 structure.
pub const SIZE: u64 = 56;
const MEMMAP_ENTRY_SIZE: u64 = 24;
const MODLIST_ENTRY_SIZE: u64 = 32;
const CMDLINE_MAX: usize = 4096;

#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    pub paddr: u64,
    pub version: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

#[derive(Debug)]
pub enum StartInfoError {
    Unmapped(u64),
    BadMagic(u32),
    CmdlineNotUtf8,
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Unmapped(a) => write!(f, "start_info at {a:#x} is not mapped"),
            Self::BadMagic(m) => write!(f, "start_info magic {m:#x}, expected {MAGIC:#x}"),
            Self::CmdlineNotUtf8 => write!(f, "command line is not UTF-8"),
        }
    }
}

/// One PVH memory map entry (`hvm_memmap_table_entry`).
#[derive(Clone, Copy, Debug)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl StartInfo {
    pub fn read(paddr: u64) -> Result<Self, StartInfoError> {
        if !phys::mapped(paddr, SIZE) {
            return Err(StartInfoError::Unmapped(paddr));
        }
        // SAFETY: the structure's range was checked to be mapped; all fields are
        // plain integers.
        let field32 = |off| unsafe { phys::read::<u32>(paddr + off) };
        // SAFETY: as above.
        let field64 = |off| unsafe { phys::read::<u64>(paddr + off) };
        let magic = field32(OFF_MAGIC);
        if magic != MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version = field32(OFF_VERSION);
        // The memory map fields only exist from version 1 on.
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (field64(OFF_MEMMAP), field32(OFF_MEMMAP_ENTRIES))
        } else {
            (0, 0)
        };
        Ok(StartInfo {
            paddr,
            version,
            nr_modules: field32(OFF_NR_MODULES),
            modlist_paddr: field64(OFF_MODLIST),
            cmdline_paddr: field64(OFF_CMDLINE),
            rsdp_paddr: field64(OFF_RSDP),
            memmap_paddr,
            memmap_entries,
        })
    }

    /// The NUL-terminated command line (empty if there is none).
    pub fn cmdline(&self) -> Result<&'static str, StartInfoError> {
        let addr = self.cmdline_paddr;
        if addr == 0 {
            return Ok("");
        }
        if !phys::mapped(addr, CMDLINE_MAX as u64) {
            return Err(StartInfoError::Unmapped(addr));
        }
        // SAFETY: mapped (checked above); nothing writes the command line.
        let bytes = unsafe { phys::bytes(addr, CMDLINE_MAX) };
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(CMDLINE_MAX);
        core::str::from_utf8(&bytes[..len]).map_err(|_| StartInfoError::CmdlineNotUtf8)
    }

    /// Memory map entries (none before version 1 or when unmapped).
    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> {
        let base = self.memmap_paddr;
        let n = u64::from(self.memmap_entries);
        let n = if phys::mapped(base, n * MEMMAP_ENTRY_SIZE) {
            n
        } else {
            0
        };
        (0..n).map(move |i| {
            let e = base + i * MEMMAP_ENTRY_SIZE;
            // SAFETY: the whole table was checked to be mapped; plain integers.
            unsafe {
                MemmapEntry {
                    addr: phys::read(e),
                    size: phys::read(e + 8),
                    kind: phys::read(e + 16),
                }
            }
        })
    }

    /// Memory the loader handed over that the guest must not overwrite: the structure,
    /// the command line, the memory map, the module list.
    pub fn in_use(&self) -> [(u64, u64); 4] {
        [
            (self.paddr, SIZE),
            (self.cmdline_paddr, CMDLINE_MAX as u64),
            (
                self.memmap_paddr,
                u64::from(self.memmap_entries) * MEMMAP_ENTRY_SIZE,
            ),
            (
                self.modlist_paddr,
                u64::from(self.nr_modules) * MODLIST_ENTRY_SIZE,
            ),
        ]
    }
}
