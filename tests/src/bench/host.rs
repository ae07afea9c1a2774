//! The host side of the baselines: the TSC, the machine's load, and the test guest's own fill
//! loop (`testguest::fill_pages`, linked from guest-images/testguest) run natively on fresh and
//! on warm memory.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use testguest::{fill_pages, verify_pages, PAGE_SIZE};

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86_64 CPU has it (the guest uses it too).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC frequency in Hz: the median of three 100 ms samples against the monotonic clock.
pub fn tsc_hz() -> f64 {
    let mut v: Vec<f64> = (0..3)
        .map(|_| {
            let (t0, c0) = (Instant::now(), rdtsc());
            std::thread::sleep(Duration::from_millis(100));
            let (c1, t1) = (rdtsc(), Instant::now());
            (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[1]
}

/// `uptime`'s load averages and the number of CPUs, for the header of every report.
pub fn load_line() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut f = load.split_whitespace();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "load average {} {} {} (1/5/15 min), {} CPUs",
        f.next().unwrap_or("?"),
        f.next().unwrap_or("?"),
        f.next().unwrap_or("?"),
        cpus
    )
}

/// A private anonymous mapping, fresh (never touched) when created, unmapped on drop. Plain
/// `mmap` like the VMM's guest RAM: with THP in `madvise` mode both get 4 KiB pages.
struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

impl AnonMap {
    fn new(len: usize) -> Result<AnonMap> {
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap of {len} bytes: {}", std::io::Error::last_os_error());
        }
        Ok(AnonMap {
            ptr: ptr.cast(),
            len,
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is our readable, writable mapping for as long as self lives, and
        // &mut self makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` and no slice of it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The guest's fill phase for `pattern=seq`: every page once, ascending, each with
/// `fill_pages` at its own address (the guest also stores one metadata byte per page).
fn fill_seq(mem: &mut [u8], base_gpa: u64, pass: u32, seed: u64) {
    for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_pages(page, base_gpa + (i * PAGE_SIZE) as u64, pass, seed);
    }
}

/// TSC cycles of one native fill on fresh memory and of `warm` fills on the same memory.
pub struct NativeFill {
    pub first_touch_cycles: u64,
    pub warm_cycles: Vec<u64>,
}

/// Runs the fill natively over `bytes` of fresh memory, then `warm` more times, and verifies
/// the last pass (a fill that was optimized away or went wrong fails loudly).
pub fn native_fill(bytes: usize, warm: u32, seed: u64) -> Result<NativeFill> {
    const BASE_GPA: u64 = 0x40_0000;
    let mut map = AnonMap::new(bytes)?;
    let mem = map.as_mut_slice();
    let c0 = rdtsc();
    fill_seq(mem, BASE_GPA, 0, seed);
    let first_touch_cycles = rdtsc() - c0;
    let mut warm_cycles = Vec::new();
    for pass in 1..=warm {
        let c0 = rdtsc();
        fill_seq(mem, BASE_GPA, pass, seed);
        warm_cycles.push(rdtsc() - c0);
    }
    let bad = verify_pages(mem, BASE_GPA, warm, seed);
    if bad.errors != 0 {
        bail!("native fill verification failed: {bad:?}");
    }
    Ok(NativeFill {
        first_touch_cycles,
        warm_cycles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_fill_verifies() {
        let f = native_fill(64 * PAGE_SIZE, 2, 7).unwrap();
        assert!(f.first_touch_cycles > 0);
        assert_eq!(f.warm_cycles.len(), 2);
    }
}
