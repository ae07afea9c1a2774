//! x86_64: memory layout, boot-time CPU state, CPUID and MSRs, ACPI tables.
pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod regs;
