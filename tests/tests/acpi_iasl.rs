//! Our ACPI tables as ACPICA's `iasl` reads them: a parser nobody here wrote.
//!
//! The tables are written into guest memory by `vmm_core::acpi`, found again from the RSDP
//! by following the guest-visible pointers (RSDP -> XSDT -> FADT/MADT, FADT -> DSDT), dumped
//! as `.dat` files and disassembled with `iasl -d`. iasl cannot disassemble a bare RSDP, so
//! the RSDP is instead compiled from an iasl data-table source with the expected fields and
//! compared byte for byte: iasl computes both RSDP checksums itself.
//!
//! iasl exits 0 even for a bad checksum; it says so in its log and in the `.dsl`, and
//! `checksum_problems` looks for that. `a_corrupted_table_is_caught` proves the detector.

use std::path::{Path, PathBuf};
use std::process::Command;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::acpi::{create_acpi_tables, VirtioMmioSlot, OEM_ID};
use vmm_core::layout;

const SLOTS: [VirtioMmioSlot; 2] = [
    VirtioMmioSlot {
        base: layout::virtio_mmio_slot_addr(0),
        size: 0x1000,
        gsi: layout::virtio_mmio_slot_gsi(0),
    },
    VirtioMmioSlot {
        base: layout::virtio_mmio_slot_addr(1),
        size: 0x1000,
        gsi: layout::virtio_mmio_slot_gsi(1),
    },
];

/// Guest memory covering low memory (the ACPI area included), with the tables written.
fn guest_with_tables() -> (GuestMemoryMmap, GuestAddress) {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::HIMEM_START as usize)])
            .expect("map low guest memory");
    let tables = create_acpi_tables(&mem, 2, &SLOTS).expect("create ACPI tables");
    let rsdp = tables.rsdp();
    (mem, rsdp)
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .unwrap_or_else(|e| panic!("read {len} bytes of guest memory at {addr:#x}: {e}"));
    buf
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A table read from guest memory, as long as its own header says it is.
fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &str) -> Vec<u8> {
    let header = read(mem, addr, 36);
    assert_eq!(
        &header[..4],
        signature.as_bytes(),
        "table at {addr:#x} should be {signature}"
    );
    let len = u32_at(&header, 4) as usize;
    assert!(
        (36..=layout::ACPI_SIZE as usize).contains(&len),
        "{signature} at {addr:#x} claims {len} bytes"
    );
    assert!(
        addr >= layout::ACPI_START && addr + len as u64 <= layout::ACPI_START + layout::ACPI_SIZE,
        "{signature} at {addr:#x} (+{len}) lies outside the ACPI area"
    );
    read(mem, addr, len)
}

/// All tables found by walking the pointers from the RSDP, keyed by signature.
struct Found {
    rsdp: Vec<u8>,
    xsdt: (u64, Vec<u8>),
    fadt: (u64, Vec<u8>),
    madt: (u64, Vec<u8>),
    dsdt: (u64, Vec<u8>),
}

fn walk(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Found {
    assert_eq!(
        rsdp_addr.0,
        layout::ACPI_START,
        "the RSDP must be where a BIOS-area scan finds it"
    );
    let rsdp = read(mem, rsdp_addr.0, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ", "RSDP signature");
    assert_eq!(rsdp[15], 2, "RSDP revision (2 = has an XSDT)");
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = read_table(mem, xsdt_addr, "XSDT");
    let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
    assert_eq!(
        entries.len(),
        2,
        "XSDT should list the FADT and the MADT: {entries:#x?}"
    );
    let mut fadt = None;
    let mut madt = None;
    for addr in entries {
        match &read(mem, addr, 4)[..] {
            b"FACP" => fadt = Some((addr, read_table(mem, addr, "FACP"))),
            b"APIC" => madt = Some((addr, read_table(mem, addr, "APIC"))),
            other => panic!(
                "XSDT entry {addr:#x} is {:?}",
                String::from_utf8_lossy(other)
            ),
        }
    }
    let fadt = fadt.expect("XSDT lists a FADT");
    let madt = madt.expect("XSDT lists a MADT");
    let dsdt_addr = u64_at(&fadt.1, 140); // X_DSDT
    let dsdt = (dsdt_addr, read_table(mem, dsdt_addr, "DSDT"));
    Found {
        rsdp,
        xsdt: (xsdt_addr, xsdt),
        fadt,
        madt,
        dsdt,
    }
}

struct Disassembly {
    /// iasl's stdout and stderr.
    log: String,
    /// The `.dsl` it wrote.
    dsl: String,
}

impl Disassembly {
    /// The `.dsl` with runs of whitespace collapsed, one line per source line.
    fn lines(&self) -> Vec<String> {
        self.dsl
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// Lines that are `line`, or `line` after an `[offset ...]` field prefix.
    fn count(&self, line: &str) -> usize {
        let prefixed = format!("] {line}");
        self.lines()
            .iter()
            .filter(|l| l.as_str() == line || l.ends_with(&prefixed))
            .count()
    }

    fn assert_line(&self, line: &str) {
        assert!(
            self.count(line) >= 1,
            "no line `{line}` in the disassembly:\n{}",
            self.dsl
        );
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{log}",
        out.status
    );
    log
}

/// `iasl -d name.dat` in `dir`.
fn disassemble(iasl: &Path, dir: &Path, name: &str, bytes: &[u8]) -> Disassembly {
    let dat = format!("{name}.dat");
    let dsl = dir.join(format!("{name}.dsl"));
    std::fs::write(dir.join(&dat), bytes).expect("write .dat");
    // iasl leaves an old .dsl alone when it rejects its input: never read a stale one.
    let _ = std::fs::remove_file(&dsl);
    let log = run(Command::new(iasl).arg("-d").arg(&dat).current_dir(dir));
    let dsl = std::fs::read_to_string(&dsl)
        .unwrap_or_else(|e| panic!("iasl wrote no {}: {e}\n{log}", dsl.display()));
    Disassembly { log, dsl }
}

/// Everything iasl said about a bad checksum or length, in its log or the `.dsl`.
fn checksum_problems(d: &Disassembly) -> Vec<String> {
    d.log
        .lines()
        .chain(d.dsl.lines())
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("incorrect checksum") || l.contains("too long") || l.contains("warning")
        })
        .map(str::to_string)
        .collect()
}

/// iasl read the whole file as one table of the length its header gives, with a valid
/// checksum.
fn assert_valid(d: &Disassembly, signature: &str, name: &str, len: usize) {
    let problems = checksum_problems(d);
    assert!(
        problems.is_empty(),
        "iasl found problems in {signature}: {problems:#?}\n{}",
        d.log
    );
    let input = format!("Input file {name}.dat, Length 0x{len:X} ({len}) bytes");
    assert!(d.log.contains(&input), "expected `{input}` in:\n{}", d.log);
    // iasl's one-line table summary: signature, address (0 for a file), header length.
    let summary = format!("ACPI: {signature} 0x0000000000000000 {len:06X} ");
    assert!(
        d.log.contains(&summary),
        "expected `{summary}` in:\n{}",
        d.log
    );
}

#[test]
fn iasl_accepts_our_tables() {
    let iasl = tests::require_tool("iasl", "acpica-tools");
    let dir = tests::scratch_dir("acpi_iasl");
    let (mem, rsdp_addr) = guest_with_tables();
    let found = walk(&mem, rsdp_addr);

    // RSDP: iasl compiles the expected RSDP, computing both checksums; ours must match.
    let oem_id = String::from_utf8(OEM_ID.to_vec()).unwrap();
    let source = format!(
        "[0008] Signature : \"RSD PTR \"\n\
         [0001] Checksum : 00\n\
         [0006] Oem ID : \"{oem_id}\"\n\
         [0001] Revision : 02\n\
         [0004] RSDT Address : 00000000\n\
         [0004] Length : 00000024\n\
         [0008] XSDT Address : {:016X}\n\
         [0001] Extended Checksum : 00\n\
         [0003] Reserved : 000000\n",
        found.xsdt.0
    );
    std::fs::write(dir.join("rsdp.asl"), source).unwrap();
    std::fs::write(dir.join("rsdp.dat"), &found.rsdp).unwrap();
    let log = run(Command::new(&iasl).arg("rsdp.asl").current_dir(&dir));
    let expected = std::fs::read(dir.join("rsdp.aml"))
        .unwrap_or_else(|e| panic!("iasl compiled no rsdp.aml: {e}\n{log}"));
    assert_eq!(
        found.rsdp, expected,
        "our RSDP (left) differs from the one iasl builds (right)"
    );

    // XSDT
    let xsdt = disassemble(&iasl, &dir, "xsdt", &found.xsdt.1);
    assert_valid(&xsdt, "XSDT", "xsdt", found.xsdt.1.len());
    xsdt.assert_line(&format!(
        "[024h 0036 8] ACPI Table Address 0 : {:016X}",
        found.fadt.0
    ));
    xsdt.assert_line(&format!(
        "[02Ch 0044 8] ACPI Table Address 1 : {:016X}",
        found.madt.0
    ));

    // FADT
    let fadt = disassemble(&iasl, &dir, "facp", &found.fadt.1);
    assert_valid(&fadt, "FACP", "facp", found.fadt.1.len());
    for line in [
        "[008h 0008 1] Revision : 06".to_string(),
        "[083h 0131 1] FADT Minor Revision : 05".to_string(),
        format!("[08Ch 0140 8] DSDT Address : {:016X}", found.dsdt.0),
        "Hardware Reduced (V5) : 1".to_string(),
        "VGA Not Present (V4) : 1".to_string(),
        "MSI Not Supported (V4) : 1".to_string(),
        "Legacy Devices Supported (V2) : 0".to_string(),
        "[02Dh 0045 1] PM Profile : 04 [Enterprise Server]".to_string(),
        // Poweroff path of hardware-reduced ACPI: 8-bit I/O sleep control/status ports.
        "[0F4h 0244 1] Space ID : 01 [SystemIO]".to_string(),
        "[0F5h 0245 1] Bit Width : 08".to_string(),
        format!(
            "[0F8h 0248 8] Address : {:016X}",
            layout::ACPI_SLEEP_CONTROL_PORT
        ),
        "[100h 0256 1] Space ID : 01 [SystemIO]".to_string(),
        "[101h 0257 1] Bit Width : 08".to_string(),
        format!(
            "[104h 0260 8] Address : {:016X}",
            layout::ACPI_SLEEP_STATUS_PORT
        ),
    ] {
        fadt.assert_line(&line);
    }

    // MADT
    let madt = disassemble(&iasl, &dir, "apic", &found.madt.1);
    assert_valid(&madt, "APIC", "apic", found.madt.1.len());
    madt.assert_line(&format!(
        "[024h 0036 4] Local Apic Address : {:08X}",
        layout::APIC_START
    ));
    assert_eq!(
        madt.dsl.matches("[Processor Local APIC]").count(),
        2,
        "two Processor Local APIC entries:\n{}",
        madt.dsl
    );
    assert_eq!(madt.count("Processor Enabled : 1"), 2, "{}", madt.dsl);
    for id in 0..2 {
        assert_eq!(madt.count(&format!("Local Apic ID : {id:02X}")), 1);
        assert_eq!(madt.count(&format!("Processor ID : {id:02X}")), 1);
    }
    assert_eq!(
        madt.dsl.matches("[I/O APIC]").count(),
        1,
        "one I/O APIC:\n{}",
        madt.dsl
    );
    madt.assert_line("I/O Apic ID : 00");
    madt.assert_line(&format!("Address : {:08X}", layout::IOAPIC_START));
    madt.assert_line("Interrupt : 00000000"); // GSI base

    // DSDT
    let dsdt = disassemble(&iasl, &dir, "dsdt", &found.dsdt.1);
    assert_valid(&dsdt, "DSDT", "dsdt", found.dsdt.1.len());
    assert!(
        dsdt.log.contains("Disassembly completed"),
        "iasl did not finish the DSDT:\n{}",
        dsdt.log
    );
    assert_eq!(
        dsdt.count("Name (_HID, \"LNRO0005\") // _HID: Hardware ID"),
        2
    );
    // COM1, then one Device block per slot, in slot order.
    let devices: Vec<String> = dsdt
        .lines()
        .join("\n")
        .split("Device (")
        .skip(1)
        .map(str::to_string)
        .collect();
    assert_eq!(devices.len(), 1 + SLOTS.len(), "{}", dsdt.dsl);
    let com1 = &devices[0];
    for want in [
        "COM1)",
        "Name (_HID, EisaId (\"PNP0501\") /* 16550A-compatible COM Serial Port */) // _HID: Hardware ID",
        "Name (_UID, Zero) // _UID: Unique ID",
        "IO (Decode16,",
        "0x03F8, // Range Minimum",
        "0x03F8, // Range Maximum",
        "0x08, // Length",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        "0x00000004,",
    ] {
        assert!(com1.lines().any(|l| l == want), "COM1 lacks `{want}`:\n{com1}");
    }
    for (i, (device, slot)) in devices[1..].iter().zip(SLOTS).enumerate() {
        let uid = ["Zero", "One"][i];
        for want in [
            "Name (_HID, \"LNRO0005\") // _HID: Hardware ID".to_string(),
            format!("Name (_UID, {uid}) // _UID: Unique ID"),
            "Memory32Fixed (ReadWrite,".to_string(),
            format!("0x{:08X}, // Address Base", slot.base),
            format!("0x{:08X}, // Address Length", slot.size),
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )".to_string(),
            format!("0x{:08X},", slot.gsi),
        ] {
            assert!(
                device.lines().any(|l| l == want),
                "device {i} lacks `{want}`:\n{device}"
            );
        }
    }

    // \_S5_ with the sleep type the VMM's sleep control port acts on.
    let lines = dsdt.lines();
    let s5 = lines
        .iter()
        .position(|l| l == "Name (\\_S5, Package (0x04) // _S5_: S5 System State")
        .unwrap_or_else(|| panic!("no \\_S5 package:\n{}", dsdt.dsl));
    assert_eq!(
        lines[s5 + 2],
        format!("0x{:02X},", layout::ACPI_S5_SLEEP_TYPE),
        "SLP_TYPa of \\_S5:\n{}",
        dsdt.dsl
    );

    // The disassembled DSDT is valid ASL: it compiles again without complaint.
    let log = run(Command::new(&iasl).arg("dsdt.dsl").current_dir(&dir));
    assert!(
        log.contains("Compilation successful. 0 Errors, 0 Warnings"),
        "recompiling the DSDT:\n{log}"
    );
}

/// The checks above would notice a broken table: flip one byte and iasl complains.
#[test]
fn a_corrupted_table_is_caught() {
    let iasl = tests::require_tool("iasl", "acpica-tools");
    let dir: PathBuf = tests::scratch_dir("acpi_iasl_corrupt");
    let (mem, rsdp_addr) = guest_with_tables();
    let found = walk(&mem, rsdp_addr);

    for (name, signature, bytes) in [
        ("apic", "APIC", &found.madt.1),
        ("dsdt", "DSDT", &found.dsdt.1),
        ("facp", "FACP", &found.fadt.1),
    ] {
        let good = disassemble(&iasl, &dir, name, bytes);
        assert_valid(&good, signature, name, bytes.len());

        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] = bad[last].wrapping_add(1);
        let d = disassemble(&iasl, &dir, &format!("{name}-bad"), &bad);
        let problems = checksum_problems(&d);
        assert!(
            problems.iter().any(|p| p.contains("Incorrect checksum")),
            "iasl did not flag the corrupted {signature}:\n{}\n{}",
            d.log,
            d.dsl
        );
    }

    // A wrong length is caught too: iasl refuses a table longer than its file.
    let mut long = found.madt.1.clone();
    long[4] = long[4].wrapping_add(8);
    std::fs::write(dir.join("apic-long.dat"), &long).unwrap();
    let out = Command::new(&iasl)
        .arg("-d")
        .arg("apic-long.dat")
        .current_dir(&dir)
        .output()
        .expect("run iasl");
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("too long for file"), "{log}");
    assert!(!dir.join("apic-long.dsl").exists(), "{log}");
}
