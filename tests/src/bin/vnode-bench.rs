//! `vnode-bench`: vNode's benchmark command. Each mode runs the real binaries (`vnode`,
//! `vnode-memd`) with the test guest and prints its tables, baselines beside each figure.
//!
//!     vnode-bench boot-mem [--runs 11] [--quick]     guest fill bandwidth vs native, start time
//!     vnode-bench excache  [--runs 3]  [--quick]     ExCache fault latency and workload slowdown
//!     vnode-bench api      [--runs 5]  [--quick]     API latency and the guest's slowdown under it
//!
//! The code lives in `src/bench/` (one module per concern); see `bench/mod.rs`.

#[path = "../bench/mod.rs"]
mod bench;

fn main() -> std::process::ExitCode {
    bench::main()
}
