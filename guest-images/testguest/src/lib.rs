//! vNode's test-guest workloads as plain `no_std` code.
//!
//! Everything here is pure: it works on slices and numbers, never on ports or page tables, so it
//! runs in three places: inside the guest (`main.rs`, at CPL 3), in host unit tests
//! (`cargo test`), and in host benchmarks that link this crate to run the very same fill and verify
//! loops natively as a baseline.
#![cfg_attr(not(test), no_std)]

pub mod blk;
pub mod cmdline;
pub mod content;
pub mod json;
pub mod math;
pub mod net;
pub mod perm;
pub mod plan;
pub mod region;
pub mod rng;
pub mod sync;
pub mod zipf;

pub use content::{fill_pages, verify_pages, Mismatches, PAGE_SIZE};
