/*
 * Ring-0 bootstrap of the test guest. Under kvm_pvm every ring-0 instruction is
 * emulated (~1 M/s), so this file does as little as possible at run time: the page
 * tables, GDT, TSSs and IDT are all built by the assembler and the linker. Ring 3,
 * which runs natively, does all the real work.
 *
 * Placeholders in braces are constants handed in by boot.rs.
 */

/* ---- PVH entry note (Xen ELF note PHYS32_ENTRY, type 18) ---- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen" plus NUL */
    .long 8                         /* descsz: 8 bytes, as Linux; readers of 4 or 8 both work */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32

/* ---- BSP entry: 32-bit protected mode, paging off, EBX = hvm_start_info ---- */
    .section .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    /* Mask both legacy 8259 PICs, as an OS does: device interrupts arrive through the
       IOAPIC only. Otherwise a VMM's in-kernel PIC (unprogrammed, vector base 0) turns a
       device's ISA-range GSI into a bogus "exception" vector via LINT0/ExtINT. */
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov %ebx, %esi                  /* start_info, the 2nd argument of rust_entry */
    xor %edi, %edi                  /* CPU index 0 */
    lgdt gdt_ptr
    mov ${KDATA}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    jmp enter_long

/* APs arrive here from the real-mode trampoline, already in flat protected mode. */
ap_start32:
    mov ${KDATA}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov ap_boot_cpu, %edi           /* the index the BSP assigned to this AP */
    xor %esi, %esi

/* Shared by BSP and APs: EDI = CPU index, ESI = start_info (BSP) or 0. */
enter_long:
    mov $0x620, %eax                /* CR4: PAE | OSFXSR | OSXMMEXCPT (the compiler emits SSE) */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           /* EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov $0x80000023, %eax           /* CR0: PG | NE | MP | PE, EM clear: SSE usable */
    mov %eax, %cr0
    ljmp ${KCODE64}, $long_entry

    .code64
long_entry:
    mov ${KDATA}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov %edi, %edi                  /* upper halves are undefined after the mode switch */
    mov %esi, %esi
    /* This CPU's kernel stack (the same top is RSP0 in its TSS). */
    lea 1(%rdi), %rax
    shl ${KSTACK_SHIFT}, %rax
    add $kstacks, %rax
    mov %rax, %rsp
    /* This CPU's own TSS: per-CPU RSP0 and the I/O permission bitmap. */
    mov %edi, %eax
    shl $4, %eax
    add ${TSS_SEL0}, %eax
    ltr %ax
    lidt idt_ptr
    /* IA32_APIC_BASE for ring 3, which cannot read MSRs. */
    mov $0x1b, %ecx
    rdmsr
    shl $32, %rdx
    or %rax, %rdx                   /* 3rd argument */
    /* iretq to ring 3 on this CPU's user stack, interrupts off. */
    lea 1(%rdi), %rax
    shl ${USTACK_SHIFT}, %rax
    add $ustacks, %rax
    sub $8, %rax                    /* SysV: RSP + 8 is 16-byte aligned at function entry */
    push ${UDATA3}
    push %rax
    push $0x2
    push ${UCODE3}
    push $rust_entry
    iretq

/* ---- Interrupts and exceptions ---- */
/* Stack on entry: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
isr_common:
    /* Device and timer interrupts first: the hot path, a handful of emulated
     * instructions. Vectors IRQ_FIRST.. IRQ_FIRST+IRQ_COUNT-1 are counted (ring 3 reads
     * tg_irq_counts) and acknowledged at the local APIC; the spurious vector 0xff needs
     * no EOI. Ring 3 does everything else (InterruptStatus / InterruptACK included). */
    cmpq ${IRQ_FIRST}, (%rsp)
    jb 1f
    cmpq $0xff, (%rsp)
    je 3f
    cmpq ${IRQ_FIRST} + {IRQ_COUNT}, (%rsp)
    jae fatal
    push %rax
    mov 8(%rsp), %rax
    lock incq tg_irq_counts - {IRQ_FIRST} * 8(,%rax,8)
    mov tg_lapic_eoi, %rax
    movl $0, (%rax)
    pop %rax
3:  add $16, %rsp
    iretq
1:
    /* A service request from ring 3 (see tg_sys_halt, tg_sys_wait)? */
    cmpq $6, (%rsp)
    jne fatal
    cmpq $tg_sys_wait_ud2, 16(%rsp)
    je wait
    cmpq $tg_sys_halt, 16(%rsp)
    je halt
fatal:
    /* Everything else is fatal: report it from ring 3, natively, on this CPU's fault
     * stack. */
    pop %rdi                        /* vector */
    pop %rdx                        /* error code */
    mov (%rsp), %rsi                /* RIP */
    mov %cr2, %r8
    mov %rsp, %rcx                  /* CPU index from the kernel stack we are on */
    sub $kstacks, %rcx
    shr ${KSTACK_SHIFT}, %rcx
    cmp ${MAX_CPUS}, %rcx
    jb 2f
    xor %ecx, %ecx
2:  lea 1(%rcx), %rax
    shl ${FSTACK_SHIFT}, %rax
    add $fault_stacks, %rax
    sub $8, %rax
    push ${UDATA3}
    push %rax
    push $0x2
    push ${UCODE3}
    push $rust_fault
    iretq

/* Services for ring 3. Under kvm_pvm, `int n` from ring 3 raises #UD, and after
 * SYSCALL the handler's first `cli` raised #GP (measured); exceptions, though, are
 * delivered through the IDT to ring 0. So a service is a `ud2` at a known address,
 * recognised in isr_common. */
/* tg_sys_wait(seen, counter): unless *counter != seen already, wait with interrupts
 * enabled until the next interrupt (whose handler runs first), then return to ring 3.
 * Ring 3 reads the counter before its last look at the device, so an interrupt that
 * came in between is never slept through. */
    .globl tg_sys_wait
tg_sys_wait:
tg_sys_wait_ud2:
    ud2
    ret                             /* ring 3 resumes here */
wait:
    addq $2, 16(%rsp)               /* past the ud2 */
    cmp (%rsi), %rdi
    jne 4f
    sti
    hlt
    cli
4:  add $16, %rsp
    iretq

    .globl tg_sys_halt
tg_sys_halt:                        /* halt this CPU, interrupts off, for good */
    ud2
halt:
    cli
    hlt
    jmp halt

    .section .text.isr, "ax", @progbits
    .balign 4096
    .globl isr_stubs
isr_stubs:
    .set tg_v, 0
    .rept 256
    /* Vectors where the CPU pushes an error code; the others push a zero. */
    .if (tg_v == 8) || ((tg_v >= 10) && (tg_v <= 14)) || (tg_v == 17) || (tg_v == 21) || (tg_v == 29) || (tg_v == 30)
    .else
    pushq $0
    .endif
    pushq $tg_v
    jmp isr_common
    .balign 16, 0xcc
    .set tg_v, tg_v + 1
    .endr
    .globl isr_stubs_end
isr_stubs_end:                      /* linker.ld checks each stub took 16 bytes */

/* ---- AP real-mode trampoline: copied to {TRAMPOLINE} by the BSP (ring 3) ---- */
    .section .rodata.trampoline, "a", @progbits
    .code16
    .globl ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_gdt_ptr - ap_trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl ${KCODE32}, $ap_start32
    .balign 8
ap_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl ap_trampoline_end
ap_trampoline_end:
    .code64

/* ---- Descriptor tables ---- */
    .section .data.pagetables, "aw", @progbits
    .balign 4096
/* Identity map of 0..4 GiB with 2 MiB pages, user accessible (ring 3 does MMIO). */
pml4:
    .quad pdpt + 0x7                /* P | RW | US */
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set tg_i, 0
    .rept 2048
    .if tg_i >= 1536
    .quad (tg_i << 21) | 0x9f       /* 3..4 GiB is MMIO: P | RW | US | PWT | PCD | PS */
    .else
    .quad (tg_i << 21) | 0x87       /* P | RW | US | PS */
    .endif
    .set tg_i, tg_i + 1
    .endr

    .section .data.idt, "aw", @progbits
    .balign 4096
/* 64-bit interrupt gates to the stubs, none callable from ring 3. */
idt:
    .set tg_v, 0
    .rept 256
    .word isr_stubs_lo + tg_v * 16
    .word {KCODE64}
    .byte 0
    .byte 0x8e                      /* present, DPL 0, interrupt gate */
    .word isr_stubs_hi
    .long 0
    .long 0
    .set tg_v, tg_v + 1
    .endr
    .balign 16
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .section .data.gdt, "aw", @progbits
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* KCODE64 */
    .quad 0x00cf92000000ffff        /* KDATA */
    .quad 0x00cf9a000000ffff        /* KCODE32, for the AP trampoline */
    .quad 0x00cff2000000ffff        /* UDATA */
    .quad 0x00affa000000ffff        /* UCODE64 */
    /* One 64-bit TSS descriptor per CPU, from TSS_SEL0 on. */
    .set tg_i, 0
    .rept {MAX_CPUS}
    .word {TSS_LIMIT}
    .word tss_array_lo + tg_i * {TSS_STRIDE}
    .byte tss_array_b2
    .byte 0x89                      /* present, available 64-bit TSS */
    .byte 0
    .byte tss_array_b3
    .long 0
    .long 0
    .set tg_i, tg_i + 1
    .endr
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl ap_boot_cpu
    .balign 4
ap_boot_cpu:
    .long 0

    .section .data.tss, "aw", @progbits
    .balign 16384
/* One TSS per CPU: RSP0 and an I/O permission bitmap (IOPL does not work under
 * kvm_pvm). A clear bit lets ring 3 use the port. */
    .globl tss_array
tss_array:
    .set tg_i, 0
    .rept {MAX_CPUS}
    .long 0
    .quad kstacks + (tg_i + 1) * {KSTACK_SIZE}      /* RSP0 */
    .quad 0, 0                      /* RSP1, RSP2 */
    .quad 0
    .quad 0, 0, 0, 0, 0, 0, 0       /* IST1..7 */
    .quad 0
    .word 0
    .word 104                       /* I/O bitmap offset */
    .fill 12, 1, 0xff               /* ports 0x000-0x05f */
    .byte 0xee                      /* 0x060 and 0x064: i8042 (reset) */
    .fill 17, 1, 0xff               /* 0x068-0x0ef */
    .byte 0x0f                      /* 0x0f4-0x0f7: debug exit */
    .fill 96, 1, 0xff               /* 0x0f8-0x3f7 */
    .byte 0x00                      /* 0x3f8-0x3ff: COM1 */
    .byte 0xff                      /* required terminator byte */
    .balign {TSS_STRIDE}
    .set tg_i, tg_i + 1
    .endr

    .section .bss.stacks, "aw", @nobits
    .balign 4096
kstacks:
    .skip {MAX_CPUS} * {KSTACK_SIZE}
    .globl ustacks
ustacks:
    .skip {MAX_CPUS} * {USTACK_SIZE}
fault_stacks:
    .skip {MAX_CPUS} * {FSTACK_SIZE}
