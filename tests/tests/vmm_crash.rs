//! A guest that dies (triple fault) ends bulkhead with status 120 and a log that shows the
//! vCPU's registers and the instruction bytes at RIP.
//!
//! The guest is a hand-assembled 32-bit PVH ELF (built below, byte by byte) whose entry
//! executes `ud2` with no IDT: #UD cannot be delivered, nor can the #DF that follows, so
//! the CPU shuts down.

use std::time::Duration;

use tests::{require_kvm, run_bulkhead, scratch_dir};

const LOAD_ADDR: u64 = 0x10_0000;

/// ELF64 with one PT_LOAD (the code) and one PT_NOTE (XEN_ELFNOTE_PHYS32_ENTRY).
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let code_off = note_off + note.len();

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LE, SysV
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // no sections
    let phdr = |elf: &mut Vec<u8>, kind: u32, off: usize, addr: u64, size: usize, align: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&(off as u64).to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&(size as u64).to_le_bytes());
        elf.extend_from_slice(&(size as u64).to_le_bytes());
        elf.extend_from_slice(&align.to_le_bytes());
    };
    phdr(&mut elf, 1, code_off, LOAD_ADDR, code.len(), 1); // PT_LOAD
    phdr(&mut elf, 4, note_off, 0, note.len(), 4); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.extend_from_slice(code);
    elf
}

#[test]
fn triple_fault_is_reported_with_registers_and_code() {
    require_kvm();
    let dir = scratch_dir("crash");
    let kernel = dir.join("ud2.elf");
    // mov eax, 0x600dc0de ; ud2
    std::fs::write(
        &kernel,
        pvh_elf(&[0xb8, 0xde, 0xc0, 0x0d, 0x60, 0x0f, 0x0b]),
    )
    .unwrap();
    let r = run_bulkhead(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "16",
            "--timeout",
            "30",
        ],
        Duration::from_secs(60),
    );
    let t = r.transcript();
    assert_eq!(r.code, Some(120), "a crashed guest exits with 120: {t}");
    assert!(
        r.stderr.contains("guest crashed on vCPU 0"),
        "crash must be logged: {t}"
    );
    assert!(
        r.stderr.contains("rip=0x0000000000100005"),
        "RIP must point at the ud2: {t}"
    );
    assert!(
        r.stderr.contains("rax=0x00000000600dc0de"),
        "registers must be logged: {t}"
    );
    assert!(
        r.stderr.contains("0f 0b"),
        "code bytes at RIP must be logged: {t}"
    );
}
