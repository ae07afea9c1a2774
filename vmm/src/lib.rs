//! vnode: a KVM virtual machine monitor that runs one guest as one vNode.
//!
//! The vCPUs run here (the processor component); guest RAM is local memory or, through the
//! ExCache, memory served by remote memory servers; the disk is served by storage servers.
//! `builder` assembles a VM from a [`config::VmConfig`] as an ordered list of steps; `kvm` is the
//! only module that speaks kvm-ioctls.

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod devices;
pub mod kvm;
pub mod memory;
pub mod metrics;
pub mod sandbox;
pub mod snapshot;
pub mod vm;
