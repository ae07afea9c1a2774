//! CPUID and MSR values for a vCPU: KVM's supported set, with the topology filled in and, on a
//! PVM host, the features hidden whose instructions KVM's emulator cannot run in guest
//! supervisor mode (../shared/DESIGN.md: `cmpxchg16b`, `xsave`/`xrstor` and everything that
//! needs XSAVE state such as AVX).

use kvm_bindings::kvm_cpuid_entry2;

/// What kind of KVM this is, as far as guest CPU features are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// KVM with hardware virtualization (VMX/SVM): every supported feature works.
    Hardware,
    /// KVM on PVM: guest supervisor code is emulated, some instructions are missing.
    Pvm,
}

impl HostKind {
    /// Detects the host: the kvm_pvm module is loaded on a PVM host.
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }
}

const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7.0 EBX: AVX2 and the AVX-512 family.
const LEAF7_EBX_XSAVE_DEPENDENT: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7.0 ECX: AVX-512 extensions, VAES, VPCLMULQDQ.
const LEAF7_ECX_XSAVE_DEPENDENT: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// Leaf 7.0 EDX: AVX-512 4VNNIW/4FMAPS, AMX, AVX512-FP16.
const LEAF7_EDX_XSAVE_DEPENDENT: u32 =
    (1 << 2) | (1 << 3) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
/// Leaf 7.1 EAX: AVX-VNNI, AVX512-BF16.
const LEAF7_1_EAX_XSAVE_DEPENDENT: u32 = (1 << 4) | (1 << 5);
/// Leaf 0x80000001 ECX: XOP, FMA4.
const EXT1_ECX_XSAVE_DEPENDENT: u32 = (1 << 11) | (1 << 16);

/// Number of bits needed to hold `n` distinct ids.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Patches KVM's supported CPUID for vCPU `index` of `count`.
pub fn patch_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, index: u32, count: u32, host: HostKind) {
    if host == HostKind::Pvm {
        entries.retain(|e| e.function != 0xd);
    }
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (1, _) => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.max(1) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
                if host == HostKind::Pvm {
                    e.ecx &= !(LEAF1_ECX_CX16
                        | LEAF1_ECX_XSAVE
                        | LEAF1_ECX_OSXSAVE
                        | LEAF1_ECX_AVX
                        | LEAF1_ECX_FMA
                        | LEAF1_ECX_F16C);
                }
            }
            (4, _) => {
                // Cores per package - 1 in EAX[31:26]; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | ((count.max(1) - 1) << 26);
                e.eax &= !(0xfff << 14);
            }
            (7, 0) if host == HostKind::Pvm => {
                e.ebx &= !LEAF7_EBX_XSAVE_DEPENDENT;
                e.ecx &= !LEAF7_ECX_XSAVE_DEPENDENT;
                e.edx &= !LEAF7_EDX_XSAVE_DEPENDENT;
            }
            (7, 1) if host == HostKind::Pvm => e.eax &= !LEAF7_1_EAX_XSAVE_DEPENDENT,
            (0xb, level) | (0x1f, level) => {
                // Level 0: one thread per core. Level 1: `count` cores per package.
                e.edx = index;
                match level {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = level;
                    }
                }
            }
            (0x8000_0001, _) if host == HostKind::Pvm => e.ecx &= !EXT1_ECX_XSAVE_DEPENDENT,
            (0x8000_0008, _) => e.ecx = (e.ecx & !0xff) | (count.max(1) - 1),
            _ => {}
        }
    }
}

/// MSR values at boot: SYSCALL/SYSENTER state cleared, TSC zero, fast strings, MTRRs on (WB).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0x10, 0),              // IA32_TSC
        (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn topology_and_apic_id() {
        let mut e = vec![entry(1, 0, 0), entry(0xb, 1, 0)];
        patch_cpuid(&mut e, 1, 2, HostKind::Hardware);
        assert_eq!(e[0].ebx >> 24, 1);
        assert_eq!((e[0].ebx >> 16) & 0xff, 2);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (1, 2, 1));
    }

    #[test]
    fn pvm_hides_cx16_and_xsave() {
        let all = LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE | LEAF1_ECX_AVX;
        let mut e = vec![entry(1, 0, all), entry(0xd, 0, 0), entry(0xd, 1, 0)];
        patch_cpuid(&mut e, 0, 1, HostKind::Pvm);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].ecx & all, 0);
    }

    #[test]
    fn hardware_keeps_cx16_and_xsave() {
        let all = LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE;
        let mut e = vec![entry(1, 0, all), entry(0xd, 0, 0)];
        patch_cpuid(&mut e, 0, 1, HostKind::Hardware);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].ecx & all, all);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            (id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)),
            (0, 1, 2, 2, 3)
        );
    }
}
