//! Guest physical address map shared by the boot code, ACPI and devices.
//!
//! Low memory follows the conventions of Firecracker and Cloud Hypervisor so that stock
//! kernels find what they expect; the 32-bit MMIO hole below 4 GiB holds the virtio-mmio
//! slots, the IOAPIC and the local APIC.

/// GDT for the 64-bit Linux boot protocol.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) for the 64-bit Linux boot protocol.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (array of `hvm_memmap_table_entry`).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we accept (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA; RAM below this is free for the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the legacy BIOS area, which the memory map marks reserved.
pub const ACPI_START: u64 = 0xe0000;
/// Size of the ACPI area: up to the page of the reset vector.
pub const ACPI_SIZE: u64 = 0x1f000;
/// The reset vector, F000:FFF0, at the top of the legacy BIOS area.
pub const RESET_VECTOR: u64 = 0xffff0;
const _: () = assert!(
    ACPI_START + ACPI_SIZE <= RESET_VECTOR,
    "ACPI tables overlap the reset vector"
);
/// Where kernels are loaded ("high memory" for the boot protocols).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: RAM above this moves to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio slot; slots are [`VIRTIO_MMIO_SLOT_SIZE`] apart.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// Most virtio-mmio slots: one GSI each, from [`VIRTIO_MMIO_FIRST_GSI`] up to the last
/// IOAPIC pin.
pub const VIRTIO_MMIO_MAX_SLOTS: u32 = 18;
/// GSI of the first virtio-mmio slot (IOAPIC pins 0-4 are the legacy ISA devices).
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 5;
/// GSI of the COM1 serial port.
pub const SERIAL_GSI: u32 = 4;
/// IOAPIC registers (the in-kernel irqchip's fixed address).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's identity map page and TSS need three pages below 4 GiB outside RAM.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// Port whose writes end the VM with the written value as bulkhead's exit status
/// (QEMU's isa-debug-exit at the same port reports `(value << 1) | 1`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// ACPI sleep control register (hardware-reduced ACPI: the FADT points here, the DSDT's
/// `_S5_` gives the value that means "power off"); the status register is the next port.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// SLP_TYP value of the `_S5_` (soft off) state we declare.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// The 16550's eight registers.
pub const SERIAL_PORT_COUNT: u8 = 8;

/// Address of virtio-mmio slot `index`.
pub const fn virtio_mmio_slot_addr(index: u32) -> u64 {
    VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SLOT_SIZE
}

/// GSI of virtio-mmio slot `index`.
pub const fn virtio_mmio_slot_gsi(index: u32) -> u32 {
    VIRTIO_MMIO_FIRST_GSI + index
}

// The map is checked when it is compiled: slots fit below the IOAPIC, each has an IOAPIC
// pin, and the ACPI area stays below the kernel.
const _: () = {
    let last = VIRTIO_MMIO_MAX_SLOTS - 1;
    assert!(virtio_mmio_slot_addr(last) + VIRTIO_MMIO_SLOT_SIZE <= IOAPIC_START);
    assert!(virtio_mmio_slot_gsi(last) < IOAPIC_PINS);
    assert!(VIRTIO_MMIO_START >= MMIO_HOLE_START);
    assert!(ACPI_START + ACPI_SIZE <= HIMEM_START);
};
