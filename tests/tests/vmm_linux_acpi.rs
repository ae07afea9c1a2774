//! Debian's unmodified cloud kernel finds its CPUs through vnode's ACPI tables (it has no MP-table
//! parser): booted directly on this machine's /dev/kvm with 2 vCPUs, its console shows the RSDP,
//! XSDT, FADT, DSDT and MADT vnode wrote, the IOAPIC from the MADT, and "Allowing 2 CPUs".
//! (The DSDT's devices are used later than this test can wait for on PVM: virtio_mmio is loaded by
//! the initramfs, and the console's user-space output needs COM1's IRQ from the DSDT. Both are
//! checked in the hardware-virtualization sandbox: `guest-images/sandbox/run.sh --share DIR --
//! target/debug/vnode run --kernel guest-images/out/vmlinux --initrd guest-images/out/initrd.img
//! --vcpus 2 --mem 1G --disk DIR/rootfs.ext4 --cmdline "console=ttyS0 vnode.job=boot"` prints
//! the job's JSON with `"cpus":2` and `"block":"vda"`, and powers off through ACPI.)

use std::time::Duration;

use vnode_tests::boot_linux_until;

#[test]
fn debian_cloud_kernel_finds_two_cpus_through_acpi() {
    let want = [
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 VNODE )",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ];
    let seen = boot_linux_until(2, &want, Duration::from_secs(120));
    for bad in [
        "not listed by BIOS",
        "ACPI BIOS Error",
        "ACPI Error",
        "Invalid checksum",
    ] {
        assert!(!seen.contains(bad), "console has {bad:?}:\n{seen}");
    }
    assert!(
        seen.contains("BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved"),
        "the ACPI area is not reserved in e820:\n{seen}"
    );
}
