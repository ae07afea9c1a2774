//! `test=cpu iters=N`: a dependent xorshift/multiply chain on every vCPU; the compiler cannot
//! shorten it because the result is printed. Measures how fast guest user code runs.

use core::hint::black_box;
use testguest::cmdline::Config;
use testguest::json::JsonLine;
use testguest::sync::SpinBarrier;

use crate::port;

static BARRIER: SpinBarrier = SpinBarrier::new();

fn chain(seed: u64, iters: u64) -> u64 {
    let mut x = seed | 1;
    let mut acc = 0u64;
    for _ in 0..black_box(iters) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(x);
    }
    acc
}

pub fn run(vcpu: u32, n: u32, cfg: &Config) -> ! {
    BARRIER.wait(n);
    let t0 = port::rdtsc();
    let result = chain(cfg.seed, cfg.iters);
    BARRIER.wait(n);
    if vcpu != 0 {
        crate::park();
    }
    let cycles = port::rdtsc() - t0;
    let mut line = JsonLine::<256>::new()
        .str("test", "cpu")
        .u64("vcpus", n as u64)
        .u64("iters", cfg.iters)
        .u64("cycles", cycles)
        .u64("result", result);
    port::serial_write(line.finish());
    crate::finish(true, 0)
}
