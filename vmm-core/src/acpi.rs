//! ACPI tables for the guest: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT that
//! describes the virtio-mmio slots and the soft-off (S5) state.
//!
//! The tables are built with rust-vmm's `acpi_tables` and written into the legacy BIOS area
//! ([`layout::ACPI_START`], [`layout::ACPI_SIZE`]). The RSDP goes first, at the start of
//! that area, so a kernel that scans 0xe0000..0x100000 for it (the bzImage path) finds it
//! as well as one that is handed its address (PVH `rsdp_paddr`).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout;

/// OEM id in every table header (6 bytes, space padded as the spec asks).
pub const OEM_ID: [u8; 6] = *b"BLKHD ";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"BULKHEAD";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;

/// Most vCPUs the MADT can describe: Processor Local APIC entries carry an 8-bit APIC id
/// and 0xff is the broadcast id (more would need x2APIC entries).
pub const MAX_VCPUS: u8 = 254;

/// `_HID` of a virtio-mmio device; Linux's virtio_mmio driver matches it.
const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Tables start on 16-byte boundaries (the RSDP must, the others just stay tidy).
const TABLE_ALIGN: u64 = 16;

// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
/// No VGA: Linux then skips probing the legacy VGA ranges.
const IAPC_BOOT_VGA_NOT_PRESENT: u16 = 1 << 2;
/// No MSI: there is no PCI; virtio-mmio interrupts are IOAPIC pins.
const IAPC_BOOT_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// No CMOS RTC: Linux then registers no RTC platform device to poke ports 0x70/0x71.
const IAPC_BOOT_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
// LEGACY_DEVICES (bit 0) and 8042 (bit 1) stay clear: no LPC/ISA devices are enumerated
// through firmware (COM1 is found by the 8250 driver's fixed-port probe regardless).

/// MADT flag PCAT_COMPAT: KVM's in-kernel irqchip includes the dual 8259 PIC.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision of ACPI 6.3 and later.
const MADT_REVISION: u8 = 5;
/// DSDT revision 2 makes AML integers 64-bit.
const DSDT_REVISION: u8 = 2;

/// One virtio-mmio device slot as the guest must see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest physical address of the register window.
    pub base: u64,
    /// Size of the register window.
    pub size: u64,
    /// IOAPIC pin (GSI) of the device's interrupt.
    pub gsi: u32,
}

impl VirtioMmioSlot {
    /// Slot `index` of the fixed layout ([`layout::virtio_mmio_slot_addr`] and
    /// [`layout::virtio_mmio_slot_gsi`]).
    pub const fn from_layout(index: u32) -> Self {
        Self {
            base: layout::virtio_mmio_slot_addr(index),
            size: layout::VIRTIO_MMIO_SLOT_SIZE,
            gsi: layout::virtio_mmio_slot_gsi(index),
        }
    }
}

/// One table as written into guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// Header signature ("DSDT", "FACP", "APIC", "XSDT").
    pub signature: [u8; 4],
    /// Guest physical address the table was written at.
    pub addr: GuestAddress,
    /// The table, header included.
    pub bytes: Vec<u8>,
}

/// The tables written into guest memory and where the guest finds them.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    rsdp_addr: GuestAddress,
    rsdp: Vec<u8>,
    tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// Address of the RSDP: PVH `hvm_start_info.rsdp_paddr`, or found by a BIOS-area scan.
    pub fn rsdp(&self) -> GuestAddress {
        self.rsdp_addr
    }

    /// The RSDP's bytes (36, revision 2).
    pub fn rsdp_bytes(&self) -> &[u8] {
        &self.rsdp
    }

    /// Every table other than the RSDP, in the order they were written.
    pub fn tables(&self) -> &[AcpiTable] {
        &self.tables
    }

    /// The table with this signature, if it was written.
    pub fn table(&self, signature: &[u8; 4]) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| &t.signature == signature)
    }
}

/// Why the ACPI tables could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("a VM needs at least one vCPU, got 0")]
    NoVcpus,
    #[error("{0} vCPUs do not fit the MADT's 8-bit APIC ids (at most {MAX_VCPUS})")]
    TooManyVcpus(u8),
    #[error("virtio-mmio slot {index} has size 0")]
    EmptySlot { index: usize },
    #[error(
        "virtio-mmio slot {index} at {base:#x} (size {size:#x}) is outside the MMIO hole {:#x}..{:#x}",
        layout::MMIO_HOLE_START,
        layout::IOAPIC_START
    )]
    SlotOutsideHole { index: usize, base: u64, size: u64 },
    #[error(
        "virtio-mmio slot {index} uses GSI {gsi}, outside the IOAPIC pins free for devices ({}..{})",
        layout::VIRTIO_MMIO_FIRST_GSI,
        layout::IOAPIC_PINS
    )]
    GsiOutOfRange { index: usize, gsi: u32 },
    #[error("virtio-mmio slots {first} ({first_base:#x}) and {second} ({second_base:#x}) overlap")]
    SlotsOverlap {
        first: usize,
        first_base: u64,
        second: usize,
        second_base: u64,
    },
    #[error("virtio-mmio slots {first} and {second} both use GSI {gsi}")]
    GsiShared {
        first: usize,
        second: usize,
        gsi: u32,
    },
    #[error(
        "ACPI table {table} ({len} bytes at {addr:#x}) does not fit the ACPI area ending at {end:#x}"
    )]
    TablesTooLarge {
        table: &'static str,
        addr: u64,
        len: usize,
        end: u64,
    },
    #[error("writing ACPI table {table} ({len} bytes) to guest memory at {addr:#x} failed")]
    GuestWrite {
        table: &'static str,
        addr: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
}

/// Builds the ACPI tables for `num_vcpus` vCPUs and the virtio-mmio `slots`, writes them to
/// `mem` at [`layout::ACPI_START`] and returns where they went.
///
/// Slot `i` becomes DSDT device `\_SB.Vxxx` (xxx = `i` in hex) with `_UID` `i`.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    num_vcpus: u8,
    slots: &[VirtioMmioSlot],
) -> Result<AcpiTables, AcpiError> {
    create_acpi_tables_in(
        mem,
        GuestAddress(layout::ACPI_START),
        layout::ACPI_SIZE,
        num_vcpus,
        slots,
    )
}

/// [`create_acpi_tables`] with the area as a parameter, so tests can make it too small.
fn create_acpi_tables_in<M: GuestMemory>(
    mem: &M,
    start: GuestAddress,
    size: u64,
    num_vcpus: u8,
    slots: &[VirtioMmioSlot],
) -> Result<AcpiTables, AcpiError> {
    validate(num_vcpus, slots)?;

    let mut area = Area {
        next: start.0,
        end: start.0 + size,
    };
    // The RSDP's place is fixed first; its content needs the XSDT's address.
    let rsdp_addr = area.place("RSDP", Rsdp::len())?;

    let mut tables = Vec::new();
    let dsdt = dsdt(slots);
    let dsdt_addr = area.place("DSDT", dsdt.len())?;
    tables.push(table(*b"DSDT", dsdt_addr, dsdt));

    let fadt = fadt(dsdt_addr);
    let fadt_addr = area.place("FACP", fadt.len())?;
    tables.push(table(*b"FACP", fadt_addr, fadt));

    let madt = madt(num_vcpus);
    let madt_addr = area.place("APIC", madt.len())?;
    tables.push(table(*b"APIC", madt_addr, madt));

    // The DSDT is reached through the FADT, not listed in the XSDT.
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr.0);
    xsdt.add_entry(madt_addr.0);
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = area.place("XSDT", xsdt.len())?;
    tables.push(table(*b"XSDT", xsdt_addr, xsdt));

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0));

    for t in &tables {
        write(mem, signature_name(&t.signature), t.addr, &t.bytes)?;
    }
    // Last, so a guest never sees an RSDP pointing at tables not yet written.
    write(mem, "RSDP", rsdp_addr, &rsdp)?;

    tracing::debug!(
        rsdp = format_args!("{:#x}", rsdp_addr.0),
        vcpus = num_vcpus,
        slots = slots.len(),
        "ACPI tables written"
    );
    Ok(AcpiTables {
        rsdp_addr,
        rsdp,
        tables,
    })
}

fn validate(num_vcpus: u8, slots: &[VirtioMmioSlot]) -> Result<(), AcpiError> {
    if num_vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    if num_vcpus > MAX_VCPUS {
        return Err(AcpiError::TooManyVcpus(num_vcpus));
    }
    for (index, s) in slots.iter().enumerate() {
        if s.size == 0 {
            return Err(AcpiError::EmptySlot { index });
        }
        // Below the IOAPIC, not the hole's end: the IOAPIC, LAPIC and KVM's TSS pages live
        // above it. Inside the hole also means the 32-bit Memory32Fixed descriptor holds it.
        let in_hole = s.base >= layout::MMIO_HOLE_START
            && s.base
                .checked_add(s.size)
                .is_some_and(|end| end <= layout::IOAPIC_START);
        if !in_hole {
            return Err(AcpiError::SlotOutsideHole {
                index,
                base: s.base,
                size: s.size,
            });
        }
        // Pins below the first virtio GSI are the legacy ISA lines (timer, serial...).
        if !(layout::VIRTIO_MMIO_FIRST_GSI..layout::IOAPIC_PINS).contains(&s.gsi) {
            return Err(AcpiError::GsiOutOfRange { index, gsi: s.gsi });
        }
        for (first, f) in slots[..index].iter().enumerate() {
            // Both ends are checked_add-validated above, so these cannot overflow.
            if f.base < s.base + s.size && s.base < f.base + f.size {
                return Err(AcpiError::SlotsOverlap {
                    first,
                    first_base: f.base,
                    second: index,
                    second_base: s.base,
                });
            }
            // The interrupt is declared exclusive: a shared edge line would lose interrupts.
            if f.gsi == s.gsi {
                return Err(AcpiError::GsiShared {
                    first,
                    second: index,
                    gsi: s.gsi,
                });
            }
        }
    }
    Ok(())
}

/// Bump allocator over the ACPI area.
struct Area {
    next: u64,
    end: u64,
}

impl Area {
    fn place(&mut self, table: &'static str, len: usize) -> Result<GuestAddress, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        match addr.checked_add(len as u64) {
            Some(end) if end <= self.end => {
                self.next = end;
                Ok(GuestAddress(addr))
            }
            _ => Err(AcpiError::TablesTooLarge {
                table,
                addr,
                len,
                end: self.end,
            }),
        }
    }
}

fn table(signature: [u8; 4], addr: GuestAddress, bytes: Vec<u8>) -> AcpiTable {
    AcpiTable {
        signature,
        addr,
        bytes,
    }
}

fn signature_name(signature: &[u8; 4]) -> &'static str {
    match signature {
        b"DSDT" => "DSDT",
        b"FACP" => "FACP",
        b"APIC" => "APIC",
        b"XSDT" => "XSDT",
        _ => "unknown",
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn write<M: GuestMemory>(
    mem: &M,
    table: &'static str,
    addr: GuestAddress,
    bytes: &[u8],
) -> Result<(), AcpiError> {
    mem.write_slice(bytes, addr)
        .map_err(|source| AcpiError::GuestWrite {
            table,
            addr: addr.0,
            len: bytes.len(),
            source,
        })
}

/// DSDT: `\_SB` with COM1 and one `LNRO0005` device per virtio-mmio slot.
fn dsdt(slots: &[VirtioMmioSlot]) -> Vec<u8> {
    let mut devices = Vec::new();
    com1(&mut devices);
    for (index, slot) in slots.iter().enumerate() {
        // validate() put base and base + size below 4 GiB.
        let mmio = aml::Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
        // Edge, active high, exclusive: the GSI is raised by an irqfd without a resample
        // fd, which KVM delivers as an edge.
        let irq = aml::Interrupt::new(true, true, false, false, slot.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mmio, &irq]);
        let uid = index as u32;
        let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
        let uid = aml::Name::new("_UID".into(), &uid);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("V{index:03X}");
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut devices);
    }
    let mut body = aml::Scope::raw("\\_SB_".into(), devices);

    // \_S5_ (soft off): Linux writes SLP_TYPa from it, with SLP_EN, to the FADT's sleep
    // control register to power off. SLP_TYPb would go to a PM1b block, which
    // hardware-reduced ACPI does not have.
    let s5_type = layout::ACPI_S5_SLEEP_TYPE;
    let s5 = aml::Package::new(vec![&s5_type, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("\\_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// COM1 as a PNP0501 device with its ports and interrupt. A hardware-reduced FADT tells
/// Linux there is no legacy ISA platform, so it routes no ISA interrupt unless a device
/// asks for one: without this, the 8250 driver never gets its transmit interrupt and
/// everything but printk (which polls the port) is lost, a shell prompt included.
fn com1(sink: &mut Vec<u8>) {
    let ports = aml::IO::new(
        layout::SERIAL_PORT_BASE,
        layout::SERIAL_PORT_BASE,
        1,
        layout::SERIAL_PORT_COUNT,
    );
    // Edge, active high, exclusive: the serial model raises an irqfd without a resample
    // fd, which KVM delivers as an edge.
    let irq = aml::Interrupt::new(true, true, false, false, layout::SERIAL_GSI);
    let crs = aml::ResourceTemplate::new(vec![&ports, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// FADT: hardware-reduced ACPI, so Linux expects no PM timer, SCI, GPE or PM1 blocks.
fn fadt(dsdt_addr: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr.0)
        .flag(Flags::HwReducedAcpi)
        // Set means "no fixed-feature button" (there is no power or sleep button at all).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        // A headless VM serving workloads; Linux uses this only for policy defaults.
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_VGA_NOT_PRESENT | IAPC_BOOT_MSI_NOT_SUPPORTED | IAPC_BOOT_CMOS_RTC_NOT_PRESENT)
            .into();
    // Hardware-reduced ACPI has no PM1 control block: poweroff goes through these.
    fadt.sleep_control_reg = sleep_register(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = sleep_register(layout::ACPI_SLEEP_STATUS_PORT);
    // No FACS: allowed for hardware-reduced ACPI (there is no firmware waking vector or
    // global lock to share).
    to_bytes(&fadt.finalize())
}

/// An 8-bit I/O port register, as the sleep control and status registers must be.
fn sleep_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// MADT: the local APIC address, one enabled Processor Local APIC per vCPU (APIC id =
/// processor UID = vCPU index, as KVM assigns them) and the one IOAPIC owning GSIs 0..24.
///
/// No Interrupt Source Overrides: without KVM_SET_GSI_ROUTING, KVM routes GSI n to IOAPIC
/// pin n and (n < 16) PIC pin n, so ISA IRQs are identity-mapped, which is what Linux
/// assumes when the MADT has no override. (QEMU's IRQ0 -> GSI 2 override matches the
/// routing QEMU installs itself; here it would send Linux to the wrong pin for the PIT.)
fn madt(num_vcpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, layout::APIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_vcpus {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&to_bytes(&IoApic::new(0, layout::IOAPIC_START as u32, 0)));
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn low_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::HIMEM_START as usize)]).unwrap()
    }

    fn slots(n: u32) -> Vec<VirtioMmioSlot> {
        (0..n).map(VirtioMmioSlot::from_layout).collect()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn checksums_lengths_and_memory_contents() {
        let mem = low_mem();
        let t = create_acpi_tables(&mem, 2, &slots(3)).unwrap();

        assert_eq!(t.rsdp(), GuestAddress(layout::ACPI_START));
        let rsdp = t.rsdp_bytes();
        assert_eq!(rsdp.len(), 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        let mut back = vec![0; rsdp.len()];
        mem.read_slice(&mut back, t.rsdp()).unwrap();
        assert_eq!(back, rsdp);

        let sigs: Vec<_> = t.tables().iter().map(|t| t.signature).collect();
        assert_eq!(sigs, [*b"DSDT", *b"FACP", *b"APIC", *b"XSDT"]);
        let end = layout::ACPI_START + layout::ACPI_SIZE;
        let mut prev_end = t.rsdp().0 + 36;
        for table in t.tables() {
            let name = signature_name(&table.signature);
            assert_eq!(&table.bytes[..4], &table.signature, "{name}");
            assert_eq!(
                u32_at(&table.bytes, 4) as usize,
                table.bytes.len(),
                "{name}"
            );
            assert_eq!(sum(&table.bytes), 0, "{name} checksum");
            assert_eq!(&table.bytes[10..16], &OEM_ID, "{name}");
            assert_eq!(table.addr.0 % TABLE_ALIGN, 0, "{name}");
            assert!(table.addr.0 >= prev_end, "{name} overlaps its predecessor");
            prev_end = table.addr.0 + table.bytes.len() as u64;
            assert!(prev_end <= end, "{name} past the ACPI area");
            let mut back = vec![0; table.bytes.len()];
            mem.read_slice(&mut back, table.addr).unwrap();
            assert_eq!(back, table.bytes, "{name} in guest memory");
        }
    }

    #[test]
    fn pointers_chain_rsdp_xsdt_fadt_dsdt() {
        let mem = low_mem();
        let t = create_acpi_tables(&mem, 1, &slots(1)).unwrap();
        let xsdt = t.table(b"XSDT").unwrap();
        let fadt = t.table(b"FACP").unwrap();
        let madt = t.table(b"APIC").unwrap();
        let dsdt = t.table(b"DSDT").unwrap();

        assert_eq!(u64_at(t.rsdp_bytes(), 24), xsdt.addr.0);
        assert_eq!(xsdt.bytes.len(), 36 + 2 * 8);
        assert_eq!(u64_at(&xsdt.bytes, 36), fadt.addr.0);
        assert_eq!(u64_at(&xsdt.bytes, 44), madt.addr.0);
        // FADT: 32-bit DSDT zero, X_DSDT set.
        assert_eq!(u32_at(&fadt.bytes, 40), 0);
        assert_eq!(u64_at(&fadt.bytes, 140), dsdt.addr.0);
    }

    #[test]
    fn fadt_is_hardware_reduced() {
        let t = create_acpi_tables(&low_mem(), 1, &[]).unwrap();
        let fadt = &t.table(b"FACP").unwrap().bytes;
        assert_eq!(fadt.len(), 276, "ACPI 6.x FADT length");
        assert_eq!(fadt[8], 6, "FADT major revision");
        assert_eq!(fadt[45], PmProfile::EnterpriseServer as u8);
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(
            boot_arch,
            IAPC_BOOT_VGA_NOT_PRESENT
                | IAPC_BOOT_MSI_NOT_SUPPORTED
                | IAPC_BOOT_CMOS_RTC_NOT_PRESENT
        );
        assert_eq!(u32_at(fadt, 36), 0, "no FACS");
        // Sleep control / status registers: GAS {SystemIO, 8 bits, offset 0, byte access}.
        for (off, port) in [
            (244, layout::ACPI_SLEEP_CONTROL_PORT),
            (256, layout::ACPI_SLEEP_STATUS_PORT),
        ] {
            assert_eq!(&fadt[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
            assert_eq!(u64_at(fadt, off + 4), u64::from(port), "GAS at {off}");
        }
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu_and_the_ioapic() {
        let t = create_acpi_tables(&low_mem(), 4, &[]).unwrap();
        let madt = &t.table(b"APIC").unwrap().bytes;
        assert_eq!(u32_at(madt, 36) as u64, layout::APIC_START);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            let e = &madt[off..off + len];
            match ty {
                0 => lapics.push((e[2], e[3], u32_at(e, 4))),
                1 => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                _ => panic!("unexpected MADT entry type {ty}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        assert_eq!(ioapics, [(0, layout::IOAPIC_START as u32, 0)]);

        let t = create_acpi_tables(&low_mem(), MAX_VCPUS, &[]).unwrap();
        assert_eq!(t.table(b"APIC").unwrap().bytes.len(), 44 + 8 * 254 + 12);
    }

    #[test]
    fn dsdt_describes_each_slot() {
        let t = create_acpi_tables(&low_mem(), 1, &slots(2)).unwrap();
        let dsdt = &t.table(b"DSDT").unwrap().bytes;
        assert_eq!(count(dsdt, b"LNRO0005\0"), 2);
        for (i, s) in slots(2).iter().enumerate() {
            assert_eq!(count(dsdt, format!("V{i:03X}").as_bytes()), 1);
            // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
            let mut mem32 = vec![0x86, 9, 0, 1];
            mem32.extend_from_slice(&(s.base as u32).to_le_bytes());
            mem32.extend_from_slice(&(s.size as u32).to_le_bytes());
            assert_eq!(count(dsdt, &mem32), 1, "slot {i} Memory32Fixed");
            // Extended Interrupt: tag 0x89, length 6, consumer|edge (0x03), one GSI.
            let mut irq = vec![0x89, 6, 0, 0x03, 1];
            irq.extend_from_slice(&s.gsi.to_le_bytes());
            assert_eq!(count(dsdt, &irq), 1, "slot {i} interrupt");
        }
    }

    #[test]
    fn dsdt_declares_s5() {
        let t = create_acpi_tables(&low_mem(), 1, &[]).unwrap();
        let dsdt = &t.table(b"DSDT").unwrap().bytes;
        // NameOp \_S5_ PackageOp len 4 elements: BytePrefix 5, Zero, Zero, Zero.
        let s5 = [
            0x08,
            b'\\',
            b'_',
            b'S',
            b'5',
            b'_',
            0x12,
            0x07,
            4,
            0x0a,
            layout::ACPI_S5_SLEEP_TYPE,
            0,
            0,
            0,
        ];
        assert_eq!(count(dsdt, &s5), 1, "{dsdt:x?}");
    }

    #[test]
    fn all_slots_of_the_layout_fit() {
        let n = layout::VIRTIO_MMIO_MAX_SLOTS;
        let t = create_acpi_tables(&low_mem(), 2, &slots(n)).unwrap();
        let dsdt = &t.table(b"DSDT").unwrap().bytes;
        assert_eq!(count(dsdt, b"LNRO0005\0"), n as usize);
    }

    fn err(num_vcpus: u8, slots: &[VirtioMmioSlot]) -> AcpiError {
        create_acpi_tables(&low_mem(), num_vcpus, slots).unwrap_err()
    }

    fn slot(base: u64, size: u64, gsi: u32) -> VirtioMmioSlot {
        VirtioMmioSlot { base, size, gsi }
    }

    #[test]
    fn rejects_bad_vcpu_counts() {
        assert!(matches!(err(0, &[]), AcpiError::NoVcpus));
        let e = err(255, &[]);
        assert!(matches!(e, AcpiError::TooManyVcpus(255)));
        assert!(e.to_string().contains("255"), "{e}");
    }

    #[test]
    fn rejects_slots_outside_the_hole() {
        let s0 = layout::virtio_mmio_slot_addr(0);
        for (base, size) in [
            (layout::MMIO_HOLE_START - 0x1000, 0x1000),
            (layout::IOAPIC_START - 0x800, 0x1000),
            (layout::IOAPIC_START, 0x1000),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            let e = err(1, &[slot(s0, 0x1000, 5), slot(base, size, 6)]);
            assert!(
                matches!(e, AcpiError::SlotOutsideHole { index: 1, base: b, .. } if b == base),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("{base:#x}")), "{e}");
        }
        assert!(matches!(
            err(1, &[slot(s0, 0, 5)]),
            AcpiError::EmptySlot { index: 0 }
        ));
        // The whole hole below the IOAPIC is fine.
        let whole = layout::IOAPIC_START - layout::MMIO_HOLE_START;
        create_acpi_tables(&low_mem(), 1, &[slot(layout::MMIO_HOLE_START, whole, 5)]).unwrap();
    }

    #[test]
    fn rejects_bad_gsis() {
        let s0 = layout::virtio_mmio_slot_addr(0);
        for gsi in [layout::IOAPIC_PINS, 1000, 0, layout::SERIAL_GSI] {
            let e = err(1, &[slot(s0, 0x1000, gsi)]);
            assert!(
                matches!(e, AcpiError::GsiOutOfRange { index: 0, gsi: g } if g == gsi),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("GSI {gsi}")), "{e}");
        }
        create_acpi_tables(&low_mem(), 1, &[slot(s0, 0x1000, layout::IOAPIC_PINS - 1)]).unwrap();
        let e = err(1, &[slot(s0, 0x1000, 7), slot(s0 + 0x1000, 0x1000, 7)]);
        assert!(
            matches!(
                e,
                AcpiError::GsiShared {
                    first: 0,
                    second: 1,
                    gsi: 7
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn rejects_overlapping_slots() {
        let s0 = layout::virtio_mmio_slot_addr(0);
        let e = err(
            1,
            &[
                slot(s0, 0x1000, 5),
                slot(s0 + 0x2000, 0x1000, 6),
                slot(s0 + 0x800, 0x1000, 7),
            ],
        );
        assert!(
            matches!(
                e,
                AcpiError::SlotsOverlap {
                    first: 0,
                    second: 2,
                    ..
                }
            ),
            "{e}"
        );
        // Adjacent is not overlapping.
        create_acpi_tables(
            &low_mem(),
            1,
            &[slot(s0, 0x1000, 5), slot(s0 + 0x1000, 0x1000, 6)],
        )
        .unwrap();
    }

    #[test]
    fn reports_tables_that_do_not_fit() {
        let e = create_acpi_tables_in(&low_mem(), GuestAddress(layout::ACPI_START), 0x100, 2, &[])
            .unwrap_err();
        // RSDP (36) + DSDT fit in 0x100; the 276-byte FADT does not.
        assert!(
            matches!(
                e,
                AcpiError::TablesTooLarge {
                    table: "FACP",
                    len: 276,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("FACP"), "{e}");
    }

    #[test]
    fn reports_failed_guest_writes() {
        // Memory that ends in the middle of the ACPI area.
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::ACPI_START as usize + 0x40)])
                .unwrap();
        let e = create_acpi_tables(&mem, 1, &slots(1)).unwrap_err();
        assert!(
            matches!(e, AcpiError::GuestWrite { table: "DSDT", .. }),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert!(e.to_string().contains("0xe0030"), "{e}");
    }
}
