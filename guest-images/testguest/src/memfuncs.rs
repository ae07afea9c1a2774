//! memcpy, memmove, memset, memcmp and bcmp: the compiler emits calls to them and the guest
//! links no libc. Written with `rep movsb`/`rep stosb` in assembly so the compiler cannot turn
//! them back into calls to themselves. They run only in user mode (natively).

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.tg_memfuncs, "ax"
    .global memcpy
    .global memmove
    .global memset
    .global memcmp
    .global bcmp
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe 1f
    lea r8, [rsi + rdx]
    cmp rdi, r8
    jae 1f
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret
memcmp:
bcmp:
    xor eax, eax
    xor ecx, ecx
2:  cmp rcx, rdx
    jae 3f
    movzx eax, byte ptr [rdi + rcx]
    movzx r8d, byte ptr [rsi + rcx]
    sub eax, r8d
    jnz 3f
    inc rcx
    jmp 2b
3:  ret
"#
);
