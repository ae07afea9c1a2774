//! Snapshots of a running vNode: its vCPU, VM and device state and its configuration, written
//! to a file (`file` has the format) and restored in a new `vnode` process on the same memory
//! and storage servers. Guest RAM stays on the memory servers when it is remote (the snapshot
//! flushes the ExCache's dirty pages there first and keeps the region); local guest RAM goes
//! into the file.
pub mod file;
