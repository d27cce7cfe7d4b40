//! Just enough ACPI to count CPUs: RSDP -> XSDT (or RSDT) -> MADT.

use core::fmt;

use crate::boot::MAX_CPUS;
use crate::phys;

/// Where the BIOS-era RSDP search looks (ACPI 5.2.5.1), when start_info has none.
const SCAN_START: u64 = 0xe0000;
const SCAN_END: u64 = 0x100000;
const HEADER_LEN: u64 = 36;
/// Sanity bound on a table's length field.
const TABLE_MAX: u64 = 1 << 20;

const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
/// Most I/O APICs remembered from the MADT.
pub const MAX_IOAPICS: usize = 4;
const MADT_X2APIC: u8 = 9;
const MADT_ENABLED: u32 = 1;

#[derive(Debug)]
pub enum AcpiError {
    BadRsdp(u64),
    Unmapped(&'static str, u64),
    BadLength([u8; 4], u64),
    BadChecksum([u8; 4], u64),
    BadMadtEntry(u64),
}

fn sig(s: &[u8; 4]) -> &str {
    core::str::from_utf8(s).unwrap_or("????")
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::BadRsdp(a) => write!(f, "acpi RSDP at {a:#x} invalid"),
            Self::Unmapped(what, a) => write!(f, "acpi {what} at {a:#x} not mapped"),
            Self::BadLength(s, a) => write!(f, "acpi {} at {a:#x} bad length", sig(s)),
            Self::BadChecksum(s, a) => write!(f, "acpi {} at {a:#x} bad checksum", sig(s)),
            Self::BadMadtEntry(a) => write!(f, "acpi MADT entry at {a:#x} malformed"),
        }
    }
}

/// Enabled CPUs from the MADT, by APIC ID, in MADT order.
#[derive(Clone, Copy, Debug)]
pub struct CpuList {
    apic_ids: [u32; MAX_CPUS],
    len: usize,
    /// Enabled CPUs the MADT lists, including any beyond `MAX_CPUS`.
    pub total: usize,
    /// The MADT's local APIC address.
    pub lapic_addr: u64,
    /// I/O APICs from the MADT: (register base, first GSI).
    ioapics: [(u64, u32); MAX_IOAPICS],
    ioapic_len: usize,
}

impl CpuList {
    fn empty() -> Self {
        CpuList {
            apic_ids: [0; MAX_CPUS],
            len: 0,
            total: 0,
            lapic_addr: 0,
            ioapics: [(0, 0); MAX_IOAPICS],
            ioapic_len: 0,
        }
    }

    /// The MADT's I/O APICs as (register base, first GSI), in MADT order.
    pub fn ioapics(&self) -> &[(u64, u32)] {
        &self.ioapics[..self.ioapic_len]
    }

    fn push(&mut self, apic_id: u32) {
        if self.len < MAX_CPUS {
            self.apic_ids[self.len] = apic_id;
            self.len += 1;
        }
        self.total += 1;
    }

    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.len]
    }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    // SAFETY: callers check the range is mapped; ACPI tables are not written.
    let bytes = unsafe { phys::bytes(addr, len as usize) };
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

fn rsdp_valid(addr: u64) -> bool {
    if !phys::mapped(addr, 36) {
        return false;
    }
    // SAFETY: mapped (checked above).
    let head = unsafe { phys::bytes(addr, 20) };
    if &head[..8] != b"RSD PTR " || !checksum_ok(addr, 20) {
        return false;
    }
    // ACPI 2.0+: the extended checksum covers the whole 36-byte structure.
    head[15] < 2 || checksum_ok(addr, 36)
}

/// The RSDP: `hint` (start_info.rsdp_paddr) if non-zero, else the 0xE0000 scan.
pub fn find_rsdp(hint: u64) -> Result<Option<u64>, AcpiError> {
    if hint != 0 {
        return if rsdp_valid(hint) {
            Ok(Some(hint))
        } else {
            Err(AcpiError::BadRsdp(hint))
        };
    }
    Ok((SCAN_START..SCAN_END).step_by(16).find(|&a| rsdp_valid(a)))
}

/// A checked system description table: returns its signature and length.
fn table(addr: u64) -> Result<([u8; 4], u64), AcpiError> {
    if !phys::mapped(addr, HEADER_LEN) {
        return Err(AcpiError::Unmapped("table", addr));
    }
    // SAFETY: the header is mapped (checked above).
    let (signature, len) = unsafe { (phys::read::<[u8; 4]>(addr), phys::read::<u32>(addr + 4)) };
    let len = u64::from(len);
    if !(HEADER_LEN..=TABLE_MAX).contains(&len) || !phys::mapped(addr, len) {
        return Err(AcpiError::BadLength(signature, addr));
    }
    if !checksum_ok(addr, len) {
        return Err(AcpiError::BadChecksum(signature, addr));
    }
    Ok((signature, len))
}

/// Finds the MADT through the XSDT (revision >= 2) or the RSDT.
fn find_madt(rsdp: u64) -> Result<Option<(u64, u64)>, AcpiError> {
    // SAFETY: `rsdp_valid` checked the 36-byte RSDP is mapped.
    let (revision, rsdt, xsdt) = unsafe {
        (
            phys::read::<u8>(rsdp + 15),
            phys::read::<u32>(rsdp + 16),
            phys::read::<u64>(rsdp + 24),
        )
    };
    let (root, entry_size) = if revision >= 2 && xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(rsdt), 4)
    };
    let (_, len) = table(root)?;
    let mut entry = root + HEADER_LEN;
    while entry + entry_size <= root + len {
        // SAFETY: inside the root table, whose range `table` checked.
        let addr = unsafe {
            if entry_size == 8 {
                phys::read::<u64>(entry)
            } else {
                u64::from(phys::read::<u32>(entry))
            }
        };
        entry += entry_size;
        let (signature, len) = table(addr)?;
        if &signature == b"APIC" {
            return Ok(Some((addr, len)));
        }
    }
    Ok(None)
}

/// The enabled CPUs, or `None` without ACPI or MADT (then there is one CPU).
pub fn cpus(rsdp_hint: u64) -> Result<Option<CpuList>, AcpiError> {
    let Some(rsdp) = find_rsdp(rsdp_hint)? else {
        return Ok(None);
    };
    let Some((madt, len)) = find_madt(rsdp)? else {
        return Ok(None);
    };
    if len < HEADER_LEN + 8 {
        return Err(AcpiError::BadLength(*b"APIC", madt));
    }
    let mut cpus = CpuList::empty();
    // SAFETY: the MADT range was checked by `table` and is at least 44 bytes long.
    cpus.lapic_addr = u64::from(unsafe { phys::read::<u32>(madt + HEADER_LEN) });
    let end = madt + len;
    let mut e = madt + HEADER_LEN + 8;
    while e + 2 <= end {
        // SAFETY: two header bytes inside the checked table.
        let (kind, elen) = unsafe { (phys::read::<u8>(e), u64::from(phys::read::<u8>(e + 1))) };
        if elen < 2 || e + elen > end {
            return Err(AcpiError::BadMadtEntry(e));
        }
        match kind {
            MADT_LAPIC if elen >= 8 => {
                // SAFETY: inside this entry (length checked).
                let (id, flags) = unsafe { (phys::read::<u8>(e + 3), phys::read::<u32>(e + 4)) };
                if flags & MADT_ENABLED != 0 {
                    cpus.push(u32::from(id));
                }
            }
            MADT_X2APIC if elen >= 16 => {
                // SAFETY: inside this entry (length checked).
                let (id, flags) = unsafe { (phys::read::<u32>(e + 4), phys::read::<u32>(e + 8)) };
                if flags & MADT_ENABLED != 0 {
                    cpus.push(id);
                }
            }
            MADT_IOAPIC if elen >= 12 => {
                // SAFETY: inside this entry (length checked).
                let (addr, gsi) = unsafe { (phys::read::<u32>(e + 4), phys::read::<u32>(e + 8)) };
                if cpus.ioapic_len < MAX_IOAPICS {
                    cpus.ioapics[cpus.ioapic_len] = (u64::from(addr), gsi);
                    cpus.ioapic_len += 1;
                }
            }
            MADT_LAPIC | MADT_X2APIC | MADT_IOAPIC => return Err(AcpiError::BadMadtEntry(e)),
            _ => {}
        }
        e += elen;
    }
    Ok(Some(cpus))
}
