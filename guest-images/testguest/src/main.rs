//! vNode's test guest: a freestanding ELF that boots on `vnode` (docs/guest-abi.md), drops to
//! user mode on every vCPU and runs a memory or CPU workload, reporting JSON lines on COM1.
//!
//! Only `boot.rs` runs in supervisor mode (emulated, slow, on a PVM host); everything in Rust
//! runs at CPL 3 natively. The workloads themselves live in the `testguest` library.
//!
//! Exit status (port 0xf4): 0 all checks passed, 1 memory mismatches (or, for `test=net`, a
//! frame lost, corrupted or duplicated), 2 bad command line, a `bytes=` larger than the RAM
//! available or no usable device, 3 a CPU exception or a panic, 4 not every vCPU
//! reached the guest within ~10 s.
#![no_std]
#![no_main]

mod blktest;
mod boot;
mod cputest;
mod machine;
mod memfuncs;
mod memtest;
mod netdrv;
mod nettest;
mod port;
mod virtio;

use core::sync::atomic::{AtomicU32, Ordering};

use testguest::cmdline::{self, Test};
use testguest::json::JsonLine;

/// Entered from `boot.rs` by `iretq` at CPL 3 on every vCPU.
pub extern "C" fn user_main(vcpu: u64, nvcpus: u64, boot_params: u64) -> ! {
    let n = nvcpus.clamp(1, boot::MAX_VCPUS) as u32;
    let vcpu = vcpu as u32;
    let info = machine::BootInfo::read(boot_params);
    if vcpu == 0 {
        let mut line = JsonLine::<4096>::new()
            .str("guest", "testguest")
            .u64("vcpus", n as u64)
            .u64("ram_bytes", info.ram_bytes())
            .bytes_str("cmdline", info.cmdline());
        port::serial_write(line.finish());
    }
    check_in(vcpu, n);
    let cfg = match cmdline::parse(info.cmdline()) {
        Ok(cfg) => cfg,
        Err(bad) => {
            if vcpu == 0 {
                let mut line = JsonLine::<512>::new()
                    .str("error", "bad command line value")
                    .bytes_str("key", bad.key)
                    .bytes_str("value", bad.value);
                port::serial_write(line.finish());
                port::exit(2);
            }
            park()
        }
    };
    match cfg.test {
        Test::Mem => memtest::run(vcpu, n, &info, &cfg),
        Test::Cpu => cputest::run(vcpu, n, &cfg),
        Test::Fault if vcpu == 0 => fault(),
        Test::Fault => park(),
        Test::Blk => blktest::run(vcpu, &info, &cfg),
        Test::Net => nettest::run(vcpu, &info, &cfg),
    }
}

/// Reads an address the page tables do not map (1 TiB): the page fault is reported by the
/// exception handler in boot.rs, which exits with status 3.
fn fault() -> ! {
    const UNMAPPED: u64 = 1 << 40;
    // SAFETY: deliberately faults; the #PF handler never returns to this code.
    let v = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    // Only reached if the address was mapped after all.
    let mut line = JsonLine::<128>::new()
        .str("error", "expected a page fault")
        .u64("value", v);
    port::serial_write(line.finish());
    port::exit(1)
}

/// vCPUs that reached user mode.
static STARTED: AtomicU32 = AtomicU32::new(0);
/// How long vCPU 0 waits for the others (~10 s at 2 GHz): supervisor boot is emulated and slow
/// on PVM, but takes milliseconds, not seconds.
const START_TIMEOUT_CYCLES: u64 = 20_000_000_000;

/// Counts this vCPU in; vCPU 0 waits for all `n`, and if some never come (e.g. a VMM that leaves
/// them waiting for INIT/SIPI despite the SMP note) says so and exits with status 4 instead of
/// hanging in the first barrier.
fn check_in(vcpu: u32, n: u32) {
    STARTED.fetch_add(1, Ordering::AcqRel);
    if vcpu != 0 {
        return;
    }
    let t0 = port::rdtsc();
    loop {
        let started = STARTED.load(Ordering::Acquire);
        if started >= n {
            return;
        }
        if port::rdtsc().wrapping_sub(t0) > START_TIMEOUT_CYCLES {
            let mut line = JsonLine::<256>::new()
                .str("error", "vCPUs did not start")
                .u64("started", started as u64)
                .u64("vcpus", n as u64);
            port::serial_write(line.finish());
            port::exit(4);
        }
        core::hint::spin_loop();
    }
}

/// Where a vCPU waits when vCPU 0 is about to end the VM.
pub fn park() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// An `{"error":..}` line, then the debug exit with `status`.
pub fn fail(what: &str, status: u8) -> ! {
    let mut line = JsonLine::<256>::new().str("error", what);
    port::serial_write(line.finish());
    port::exit(status)
}

/// The final line, then the debug exit: status 0 if `ok`, 1 if not.
pub fn finish(ok: bool, errors: u64) -> ! {
    let mut line = JsonLine::<128>::new()
        .bool("done", true)
        .bool("ok", ok)
        .u64("errors", errors);
    port::serial_write(line.finish());
    port::exit(if ok { 0 } else { 1 })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = JsonLine::<512>::new().str("error", "panic");
    if let Some(loc) = info.location() {
        line = line.str("file", loc.file()).u64("line", loc.line() as u64);
    }
    if let Some(msg) = info.message().as_str() {
        line = line.str("message", msg);
    }
    port::serial_write(line.finish());
    port::exit(3)
}

/// Precompiled `core` refers to the unwinding personality routine even with `panic = "abort"`
/// when it is linked without LTO (the debug profile). Nothing ever unwinds here: it is never
/// called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
