//! Supervisor-mode boot, in assembly: the only code of the guest that runs at CPL 0.
//!
//! On a PVM host every supervisor instruction goes through KVM's instruction emulator (~1.5 M
//! instructions/s), and the emulator knows few SSE instructions, so this part is hand-written,
//! small, and never touches guest RAM in bulk. It:
//!   1. takes a per-vCPU kernel stack from RDI (vCPU index) and keeps RSI (boot_params), RDX (N);
//!   2. enables SSE (CR0.EM=0, CR0.MP=1, CR0.TS=0; CR4.OSFXSR|OSXMMEXCPT) for the Rust code;
//!   3. on vCPU 0 only: builds page tables after `_end` that identity-map RAM up to the highest
//!      e820 RAM address (at least 4 GiB) with 2 MiB user-accessible pages, and the IDT;
//!      the other vCPUs wait for `TG_BOOT_READY`;
//!   4. loads CR3, the GDT (kernel + user segments, one TSS per vCPU with RSP0 = its kernel
//!      stack), TR and the IDT;
//!   5. `iretq`s to `user_main(vcpu, nvcpus, boot_params)` at CPL 3 with RFLAGS = IOPL3 | 0x2.
//!      On a PVM host user mode nevertheless runs with IOPL 0 (RFLAGS reads 0x202 there), and
//!      `in`/`out` at CPL 3 are checked against the TSS I/O permission bitmap, so each TSS
//!      carries a bitmap that allows ports 0-0x3ff.
//!
//! Exceptions (vectors 0-31) print one JSON line on COM1 with the vector, error code, RIP, CS,
//! RSP, CR2 and vCPU, then leave through the debug-exit port 0xf4 with status 3.

use core::arch::global_asm;

/// vCPUs beyond this many halt in supervisor mode and take no part (stacks and TSSs are static).
pub const MAX_VCPUS: u64 = 32;
/// log2 of the per-vCPU kernel stack (boot and exceptions).
const KSTACK_SHIFT: u64 = 13;
/// log2 of the per-vCPU user stack.
const USTACK_SHIFT: u64 = 16;
/// Where the page tables built by vCPU 0 end (the metadata starts at the next page): written once
/// in supervisor mode before any vCPU enters user mode.
pub fn page_tables_end() -> u64 {
    extern "C" {
        static TG_PT_END: u64;
    }
    // SAFETY: TG_PT_END is written by vCPU 0 before it sets TG_BOOT_READY, and every vCPU waits
    // for TG_BOOT_READY before entering user mode: nothing writes it while Rust code runs.
    unsafe { core::ptr::addr_of!(TG_PT_END).read_volatile() }
}

global_asm!(
    r#"
    .section .note.vnode, "a"
    .balign 4
    .long 6                 /* namesz: "vNode\0" */
    .long 4                 /* descsz */
    .long 1                 /* type 1: flags */
    .asciz "vNode"
    .balign 4
    .long 1                 /* SMP_ENTRY: every vCPU starts at e_entry */
    .balign 4

    .section .text._start, "ax"
    .global _start
_start:
    cli
    cld
    mov r12, rdi            /* vCPU index */
    mov r13, rsi            /* boot_params */
    mov r14, rdx            /* number of vCPUs */
    cmp r12, {max_vcpus}
    jae 90f
    /* kernel stack: top of slot r12 */
    lea r15, [rip + TG_KSTACKS]
    mov rax, r12
    inc rax
    shl rax, {kstack_shift}
    add r15, rax
    mov rsp, r15

    /* SSE for user mode */
    mov rax, cr0
    and rax, ~0xc           /* clear EM (bit 2) and TS (bit 3) */
    or rax, 0x2             /* set MP */
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600           /* OSFXSR | OSXMMEXCPT */
    mov cr4, rax

    test r12, r12
    jnz 20f

    /* ---- vCPU 0: page tables. r8 = highest e820 RAM address ---- */
    xor r8, r8
    movzx ecx, byte ptr [r13 + 0x1e8]
    cmp ecx, 128
    jbe 2f
    mov ecx, 128
2:  lea rsi, [r13 + 0x2d0]
3:  test ecx, ecx
    jz 5f
    cmp dword ptr [rsi + 16], 1
    jne 4f
    mov rax, [rsi]
    add rax, [rsi + 8]
    cmp rax, r8
    cmova r8, rax
4:  add rsi, 20
    dec ecx
    jmp 3b
5:  /* r8 = number of page directories (1 GiB each), clamped to [4, 512] */
    add r8, 0x3fffffff
    shr r8, 30
    cmp r8, 4
    jae 6f
    mov r8, 4
6:  cmp r8, 512
    jbe 7f
    mov r8, 512
7:  lea rbx, [rip + _end]   /* PML4 at _end, PDPT after it, then the PDs */
    mov rdi, rbx
    xor eax, eax
    mov ecx, 1024
    rep stosq               /* zero the PML4 and the PDPT */
    lea rax, [rbx + 0x1007]
    mov [rbx], rax          /* PML4[0] -> PDPT, present | writable | user */
    xor ecx, ecx
8:  mov rax, rcx
    shl rax, 12
    lea rax, [rax + rbx + 0x2007]
    mov [rbx + rcx * 8 + 0x1000], rax
    inc rcx
    cmp rcx, r8
    jb 8b
    mov rdx, r8
    shl rdx, 9              /* number of 2 MiB entries */
    xor ecx, ecx
    mov eax, 0x87           /* present | writable | user | 2 MiB page */
9:  mov [rbx + rcx * 8 + 0x2000], rax
    add rax, 0x200000
    inc rcx
    cmp rcx, rdx
    jb 9b
    lea rax, [rbx + rdx * 8 + 0x2000]
    mov [rip + TG_PT_END], rax
    mov [rip + TG_PML4], rbx

    /* ---- vCPU 0: IDT, 32 interrupt gates to the stubs ---- */
    lea rsi, [rip + tg_isr_table]
    lea rdi, [rip + TG_IDT]
    xor ecx, ecx
10: mov rax, [rsi + rcx * 8]
    mov [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8e00
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    add rdi, 16
    inc ecx
    cmp ecx, 32
    jb 10b
    mov byte ptr [rip + TG_BOOT_READY], 1
    jmp 21f

20: pause                   /* the other vCPUs wait for vCPU 0 */
    cmp byte ptr [rip + TG_BOOT_READY], 0
    je 20b

21: /* ---- every vCPU ---- */
    mov rax, [rip + TG_PML4]
    mov cr3, rax
    lgdt [rip + tg_gdtr]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    /* this vCPU's TSS: RSP0 = kernel stack top, and an I/O permission bitmap allowing ports
       0-0x3ff (bits clear, then the 0xff terminator): on PVM user mode runs with IOPL 0
       whatever iretq loaded, and port access from CPL 3 is checked against this bitmap */
    lea rbx, [rip + TG_TSS]
    mov rax, r12
    shl rax, 8
    add rbx, rax
    mov [rbx + 4], r15
    mov word ptr [rbx + 102], 104
    mov byte ptr [rbx + 104 + 128], 0xff
    /* its descriptor at GDT offset 0x28 + 16 * vCPU */
    lea rdi, [rip + tg_gdt]
    mov rax, r12
    shl rax, 4
    lea rdi, [rdi + rax + 0x28]
    mov rax, rbx
    and rax, 0xffffff
    shl rax, 16
    or rax, 104 + 128       /* limit: the TSS, the bitmap and its terminator */
    mov rcx, 0x89
    shl rcx, 40             /* present, 64-bit TSS (available) */
    or rax, rcx
    mov rcx, rbx
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56
    or rax, rcx
    mov [rdi], rax
    mov rcx, rbx
    shr rcx, 32
    mov [rdi + 8], rcx
    mov rax, r12
    shl rax, 4
    add rax, 0x28
    ltr ax
    lidt [rip + tg_idtr]

    /* to user mode: SS, RSP, RFLAGS, CS, RIP */
    lea rax, [rip + TG_USTACKS]
    mov rcx, r12
    inc rcx
    shl rcx, {ustack_shift}
    add rax, rcx
    sub rax, 8              /* as if called: RSP + 8 is 16-byte aligned at entry */
    push 0x1b
    push rax
    push 0x3002             /* IOPL 3, IF 0 */
    push 0x23
    lea rax, [rip + {user_main}]
    push rax
    mov rdi, r12
    mov rsi, r14
    mov rdx, r13
    iretq

90: hlt                     /* a vCPU beyond MAX_VCPUS: stays out of the way */
    jmp 90b

    /* ---- exceptions ---- */
    .macro TG_ISR_NOERR v
tg_isr\v:
    push 0
    push \v
    jmp tg_isr_common
    .endm
    .macro TG_ISR_ERR v
tg_isr\v:
    push \v
    jmp tg_isr_common
    .endm
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    TG_ISR_NOERR \v
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    TG_ISR_ERR \v
    .endr

tg_isr_common:              /* [rsp]: vector, error code, RIP, CS, RFLAGS, RSP, SS */
    mov rbx, rsp
    lea rsi, [rip + tg_s_vec]
    call tg_kputs
    mov rax, [rbx]
    call tg_kputdec
    lea rsi, [rip + tg_s_err]
    call tg_kputs
    mov rax, [rbx + 8]
    call tg_kputdec
    lea rsi, [rip + tg_s_rip]
    call tg_kputs
    mov rax, [rbx + 16]
    call tg_kputdec
    lea rsi, [rip + tg_s_cs]
    call tg_kputs
    mov rax, [rbx + 24]
    call tg_kputdec
    lea rsi, [rip + tg_s_rsp]
    call tg_kputs
    mov rax, [rbx + 40]
    call tg_kputdec
    lea rsi, [rip + tg_s_cr2]
    call tg_kputs
    mov rax, cr2
    call tg_kputdec
    lea rsi, [rip + tg_s_vcpu]
    call tg_kputs
    mov rax, rbx
    lea rcx, [rip + TG_KSTACKS]
    sub rax, rcx
    shr rax, {kstack_shift}
    call tg_kputdec
    lea rsi, [rip + tg_s_end]
    call tg_kputs
    mov dx, 0xf4
    mov eax, 3
    out dx, eax
91: hlt
    jmp 91b

tg_kputs:                   /* rsi: NUL-terminated string */
    movzx eax, byte ptr [rsi]
    test al, al
    jz 2f
    call tg_kputc
    inc rsi
    jmp tg_kputs
2:  ret

tg_kputc:                   /* al: byte. Waits for THR empty (LSR bit 5). */
    mov r9d, eax
    mov dx, 0x3fd
3:  in al, dx
    test al, 0x20
    jz 3b
    mov eax, r9d
    mov dx, 0x3f8
    out dx, al
    ret

tg_kputdec:                 /* rax: unsigned decimal */
    sub rsp, 32
    lea rdi, [rsp + 31]
    mov rcx, 10
4:  xor edx, edx
    div rcx
    add dl, 0x30
    mov [rdi], dl
    dec rdi
    test rax, rax
    jnz 4b
    lea rcx, [rsp + 32]
5:  inc rdi
    cmp rdi, rcx
    jae 6f
    movzx eax, byte ptr [rdi]
    push rdi
    push rcx
    call tg_kputc
    pop rcx
    pop rdi
    jmp 5b
6:  add rsp, 32
    ret

    .section .rodata.tg_boot, "a"
    .balign 8
tg_isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad tg_isr\v
    .endr
tg_s_vec:  .asciz "{{\"exception\":"
tg_s_err:  .asciz ",\"error_code\":"
tg_s_rip:  .asciz ",\"rip\":"
tg_s_cs:   .asciz ",\"cs\":"
tg_s_rsp:  .asciz ",\"rsp\":"
tg_s_cr2:  .asciz ",\"cr2\":"
tg_s_vcpu: .asciz ",\"vcpu\":"
tg_s_end:  .asciz "}}\n"

    .section .data.tg_gdt, "aw"
    .balign 16
tg_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08 kernel code, 64-bit (same as the boot GDT) */
    .quad 0x00cf93000000ffff    /* 0x10 kernel data */
    .quad 0x00cff3000000ffff    /* 0x18 user data, DPL 3 */
    .quad 0x00affb000000ffff    /* 0x20 user code, 64-bit, DPL 3 */
    .fill {max_vcpus} * 16, 1, 0 /* 0x28 + 16 * i: TSS of vCPU i */
tg_gdt_end:
    .balign 8
    .word 0
tg_gdtr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt
    .word 0
tg_idtr:
    .word 32 * 16 - 1
    .quad TG_IDT

    .section .bss.tg_boot, "aw", @nobits
    .balign 4096
TG_KSTACKS:  .zero {max_vcpus} << {kstack_shift}
TG_USTACKS:  .zero {max_vcpus} << {ustack_shift}
TG_IDT:      .zero 32 * 16
TG_TSS:      .zero {max_vcpus} * 256
    .global TG_PT_END
TG_PT_END:   .zero 8
TG_PML4:     .zero 8
TG_BOOT_READY: .zero 8
"#,
    max_vcpus = const MAX_VCPUS,
    kstack_shift = const KSTACK_SHIFT,
    ustack_shift = const USTACK_SHIFT,
    user_main = sym crate::user_main,
);
