//! `test=blk`: on vCPU 0, writes `sectors` sectors of the first virtio-blk disk in pattern order
//! (batches of requests in flight), flushes, then reads them all back and verifies them
//! (`mode=verify`: only the read-back, for a disk an earlier run wrote). `mode=hostile` first
//! sends a read into a buffer outside RAM (must get IOERR) and a looping chain (must set
//! DEVICE_NEEDS_RESET), resets the device, and then does the normal run. `mode=hostile-4g` first
//! sends a write and a read whose buffers alias one 32 MiB area 126 times (3.94 GiB each: the
//! device must answer IOERR without holding that much), and then does the normal run.
//!
//! Output: `{"test":"blk",...}` then `{"done":true,"ok":..,"errors":..}`; exit 0 if every request
//! succeeded and every word matched, 1 otherwise, 2 if there is no usable disk.

use testguest::blk::{fill_sectors, verify_sectors, ChunkOrder, SECTOR};
use testguest::cmdline::{BlkMode, Config};
use testguest::content::Mismatches;
use testguest::json::JsonLine;
use testguest::region::Region;

use crate::machine::BootInfo;
use crate::virtio::{
    Blk, Error, Req, BATCH, D_NEXT, D_WRITE, MEM_BYTES, SLOT0, SLOT_SIZE, T_FLUSH, T_GET_ID, T_IN,
    T_OUT,
};
use crate::{boot, fail, finish, park, port};

#[derive(Default)]
struct Tally {
    mism: Mismatches,
    io_errors: u64,
    first_io_error_sector: Option<u64>,
}

impl Tally {
    fn status(&mut self, s: u8, sector: u64) {
        if s != 0 {
            self.io_errors += 1;
            self.first_io_error_sector.get_or_insert(sector);
        }
    }
}

pub fn run(vcpu: u32, info: &BootInfo, cfg: &Config) -> ! {
    if vcpu != 0 {
        park()
    }
    let base = boot::page_tables_end().next_multiple_of(2 << 20);
    let region = Region::above(info.ram(), base);
    if region.bytes() < MEM_BYTES {
        fail("not enough RAM for the driver", 2);
    }
    let slot = SLOT0 + cfg.disk * SLOT_SIZE;
    let mut blk = start(slot, region.gpa(0));
    let hostile = (cfg.blk_mode == BlkMode::Hostile).then(|| {
        let h = hostile_chains(&mut blk);
        blk = start(slot, region.gpa(0)); // the reset the looping chain made necessary
        h
    });
    let aliased = (cfg.blk_mode == BlkMode::Hostile4g).then(|| aliased_4g(&mut blk, &region));
    let verify_only = cfg.blk_mode == BlkMode::Verify;
    let sectors = cfg.sectors.unwrap_or(blk.capacity);
    if sectors > blk.capacity {
        fail("sectors exceeds the disk's capacity", 2);
    }
    let id = get_id(&mut blk);
    let order = ChunkOrder::new(sectors, cfg.pattern, cfg.seed);
    let mut t = Tally::default();
    let t0 = port::rdtsc();
    if !verify_only {
        pass(&mut blk, &order, cfg.seed, T_OUT, &mut t);
    }
    let t1 = port::rdtsc();
    if !verify_only && blk.flush {
        let mut st = [0u8; 1];
        let flush = Req {
            kind: T_FLUSH,
            sector: 0,
            len: 0,
        };
        if let Err(e) = blk.run(&[flush], &mut st) {
            fail(e.what(), 1);
        }
        t.status(st[0], u64::MAX);
    }
    let t2 = port::rdtsc();
    pass(&mut blk, &order, cfg.seed, T_IN, &mut t);
    let t3 = port::rdtsc();
    let mut line = JsonLine::<1024>::new()
        .str("test", "blk")
        .str("mode", cfg.blk_mode.name())
        .u64("disk", cfg.disk)
        .str("pattern", cfg.pattern.name())
        .u64("seed", cfg.seed)
        .u64("sectors", sectors)
        .u64("capacity", blk.capacity)
        .bytes_str(
            "id",
            &id[..id.iter().position(|&b| b == 0).unwrap_or(id.len())],
        )
        .bool("flush", blk.flush)
        .u64("io_errors", t.io_errors)
        .opt_u64("first_io_error_sector", t.first_io_error_sector)
        .u64("errors", t.mism.errors)
        .opt_u64(
            "first_error_sector",
            t.mism.first_error_gpa.map(|b| b / SECTOR),
        )
        .u64("write_cycles", t1 - t0)
        .u64("flush_cycles", t2 - t1)
        .u64("read_cycles", t3 - t2);
    if let Some((outside_ram, loop_reset)) = hostile {
        line = line
            .u64("outside_ram_status", u64::from(outside_ram))
            .bool("loop_needs_reset", loop_reset);
        // The device must have refused both.
        if outside_ram != 1 || !loop_reset {
            t.io_errors += 1;
        }
    }
    if let Some((write, read)) = aliased {
        line = line
            .u64("aliased_bytes", ALIASED_SEGS * u64::from(ALIASED_LEN))
            .u64("aliased_write_status", u64::from(write))
            .u64("aliased_read_status", u64::from(read));
        if write != 1 || read != 1 {
            t.io_errors += 1;
        }
    }
    port::serial_write(line.finish());
    let errors = t.mism.errors + t.io_errors;
    finish(errors == 0, errors)
}

/// (Re)starts the device at `slot` with its memory at `mem`.
fn start(slot: u64, mem: u64) -> Blk {
    // SAFETY: `mem` is the start of R: MEM_BYTES of RAM above the page tables that nothing else
    // uses (R starts at a 2 MiB boundary and is contiguous for this small size; `run` checked
    // it is large enough).
    match unsafe { Blk::init(slot, mem) } {
        Ok(b) => b,
        Err(e) => fail(e.what(), 2),
    }
}

/// Sends the two hostile chains: (status of the outside-RAM read, whether the loop made the
/// device need a reset).
fn hostile_chains(blk: &mut Blk) -> (u8, bool) {
    let (hdr, st, buf) = (blk.header_addr(), blk.status_addr(), blk.buf_addr(0));
    let outside = [
        (hdr, 16, D_NEXT, 1),
        (1 << 40, 512, D_WRITE | D_NEXT, 2),
        (st, 1, D_WRITE, 0),
    ];
    let outside_ram = match blk.raw_chain(T_IN, &outside) {
        Ok(s) => s,
        Err(e) => fail(e.what(), 1),
    };
    let looping = [(hdr, 16, D_NEXT, 1), (buf, 512, D_WRITE | D_NEXT, 0)];
    let loop_reset = blk.raw_chain(T_IN, &looping) == Err(Error::NeedsReset);
    (outside_ram, loop_reset)
}

/// Data descriptors of an aliased request: the driver's queue (128) less header and status.
const ALIASED_SEGS: u64 = 126;
const ALIASED_LEN: u32 = 32 << 20;

/// Sends a write then a read of `ALIASED_SEGS` descriptors that all name the same 32 MiB of R
/// (past the driver's own RAM); returns their status bytes.
fn aliased_4g(blk: &mut Blk, region: &Region) -> (u8, u8) {
    let scratch = region.gpa(0) + (2 << 20);
    if region.bytes() < (2 << 20) + u64::from(ALIASED_LEN) {
        fail("not enough RAM for the aliased buffer", 2);
    }
    let (hdr, st) = (blk.header_addr(), blk.status_addr());
    let mut status = [0u8; 2];
    for (i, (kind, dir)) in [(T_OUT, 0), (T_IN, D_WRITE)].into_iter().enumerate() {
        let mut descs = [(0u64, 0u32, 0u16, 0u16); ALIASED_SEGS as usize + 2];
        descs[0] = (hdr, 16, D_NEXT, 1);
        for k in 1..=ALIASED_SEGS as usize {
            descs[k] = (scratch, ALIASED_LEN, dir | D_NEXT, k as u16 + 1);
        }
        descs[ALIASED_SEGS as usize + 1] = (st, 1, D_WRITE, 0);
        status[i] = match blk.raw_chain(kind, &descs) {
            Ok(s) => s,
            Err(e) => fail(e.what(), 1),
        };
    }
    (status[0], status[1])
}

fn get_id(blk: &mut Blk) -> [u8; 20] {
    let mut st = [0u8; 1];
    let req = Req {
        kind: T_GET_ID,
        sector: 0,
        len: 20,
    };
    let mut id = [0u8; 20];
    if blk.run(&[req], &mut st).is_ok() && st[0] == 0 {
        id.copy_from_slice(&blk.buf(0)[..20]);
    }
    id
}

/// Writes (filling buffers first) or reads (verifying after) every chunk in `order`.
fn pass(blk: &mut Blk, order: &ChunkOrder, seed: u64, kind: u32, t: &mut Tally) {
    let mut reqs = [Req {
        kind,
        sector: 0,
        len: 0,
    }; BATCH];
    let mut st = [0u8; BATCH];
    let mut i = 0;
    while i < order.len() {
        let n = (order.len() - i).min(BATCH as u64) as usize;
        for (k, r) in reqs.iter_mut().enumerate().take(n) {
            let (first, count) = order.chunk(i + k as u64);
            *r = Req {
                kind,
                sector: first,
                len: (count * SECTOR) as u32,
            };
            if kind == T_OUT {
                fill_sectors(&mut blk.buf(k)[..r.len as usize], first, seed);
            }
        }
        if let Err(e) = blk.run(&reqs[..n], &mut st) {
            fail(e.what(), 1);
        }
        for k in 0..n {
            t.status(st[k], reqs[k].sector);
            if kind == T_IN && st[k] == 0 {
                let len = reqs[k].len as usize;
                t.mism
                    .merge(verify_sectors(&blk.buf(k)[..len], reqs[k].sector, seed));
            }
        }
        i += n as u64;
    }
}
