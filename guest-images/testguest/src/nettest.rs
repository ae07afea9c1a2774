//! `test=net`: on vCPU 0, finds the first virtio-net device, sends `frames` frames (see the
//! library's `net` module: EtherType 0x88B5, lengths 60..=1514, a sequence number and a payload
//! fixed by it) to the broadcast address with at most `WINDOW` unanswered, and checks that each
//! comes back exactly once, intact, from the host's echo peer (which swaps the MAC addresses).
//! Frames of other EtherTypes (host chatter on the TAP) are counted and ignored.
//!
//! `mode=hostile` first sends the device bad transmit chains (a buffer at 1 TiB, outside RAM; a
//! device-writable buffer; a zero-length buffer: each must come back used with length 0) and a
//! looping chain (must set DEVICE_NEEDS_RESET), resets the device, then does the normal run.
//!
//! Output: `{"test":"net",...}` then `{"done":true,"ok":..,"errors":..}`; exit 0 if every frame
//! came back once and intact, 1 if one was lost (nothing received for ~5 s), corrupted or
//! duplicated, 2 if there is no usable virtio-net device.

use testguest::cmdline::{BlkMode, Config};
use testguest::json::JsonLine;
use testguest::net::{build, check, format_mac, Seen, Verdict};
use testguest::region::Region;

use crate::machine::BootInfo;
use crate::netdrv::{self, Net, MEM_BYTES, RX_BUFS};
use crate::virtio::{Error, D_NEXT, D_WRITE, SLOT0, SLOT_SIZE};
use crate::{boot, fail, finish, park, port};

/// Unanswered frames at most: fewer than the receive buffers, so every echo finds one.
const WINDOW: u32 = RX_BUFS as u32 / 2;
/// Nothing received for this long (~5 s at 2 GHz) ends the test: the rest are lost.
const IDLE_TIMEOUT_CYCLES: u64 = 10_000_000_000;
/// vnode's virtio-mmio slots.
const SLOTS: u64 = 19;

#[derive(Default)]
struct Tally {
    sent: u64,
    bytes: u64,
    unique: u64,
    duplicates: u64,
    mismatches: u64,
    foreign: u64,
}

impl Tally {
    /// Echoes of our frames received, good or bad.
    fn echoes(&self) -> u64 {
        self.unique + self.duplicates + self.mismatches
    }
}

pub fn run(vcpu: u32, info: &BootInfo, cfg: &Config) -> ! {
    if vcpu != 0 {
        park()
    }
    let frames = cfg.frames;
    let base = boot::page_tables_end().next_multiple_of(2 << 20);
    let region = Region::above(info.ram(), base);
    let bits_bytes = (Seen::words(frames) * 8) as u64;
    if region.bytes() < MEM_BYTES + bits_bytes {
        fail("not enough RAM for the driver", 2);
    }
    let Some(slot) = netdrv::find(SLOT0, SLOT_SIZE, SLOTS) else {
        fail("no virtio-net device", 2)
    };
    let mut net = start(slot, region.gpa(0));
    let hostile = (cfg.blk_mode == BlkMode::Hostile).then(|| {
        let h = hostile_chains(&mut net);
        net = start(slot, region.gpa(0)); // the reset the looping chain made necessary
        h
    });
    // SAFETY: the words right after the driver's memory, inside R, used by nothing else.
    let bits = unsafe {
        core::slice::from_raw_parts_mut(
            (region.gpa(0) + MEM_BYTES) as *mut u64,
            Seen::words(frames),
        )
    };
    let mut seen = Seen::new(bits);
    let mac = net.mac;
    let mut t = Tally::default();
    let t0 = port::rdtsc();
    let mut last = t0;
    while t.unique + t.mismatches < u64::from(frames) {
        let mut queued = false;
        while t.sent < u64::from(frames) && t.sent - t.echoes() < u64::from(WINDOW) && net.tx_free()
        {
            let n = build(net.tx_frame(), mac, t.sent as u32);
            net.queue_tx(n);
            t.sent += 1;
            t.bytes += n as u64;
            queued = true;
        }
        if queued {
            net.publish_tx();
        }
        let mut got = false;
        while let Some((i, frame)) = net.poll_rx() {
            match check(frame, mac, frames) {
                Verdict::Echo(seq) if seen.mark(seq) => t.unique += 1,
                Verdict::Echo(_) => t.duplicates += 1,
                Verdict::Corrupt => t.mismatches += 1,
                Verdict::Foreign => t.foreign += 1,
            }
            net.repost(i);
            got = true;
        }
        if got {
            net.publish_rx();
            last = port::rdtsc();
        } else if port::rdtsc().wrapping_sub(last) > IDLE_TIMEOUT_CYCLES {
            break;
        }
        if net.needs_reset() {
            fail("device needs a reset", 1);
        }
    }
    let t1 = port::rdtsc();
    let lost = u64::from(frames) - t.unique - t.mismatches;
    let mut line = JsonLine::<1024>::new()
        .str("test", "net")
        .bool("hostile", hostile.is_some())
        .bytes_str("mac", &format_mac(mac))
        .u64("frames", u64::from(frames))
        .u64("sent", t.sent)
        .u64("received", t.echoes())
        .u64("mismatches", t.mismatches)
        .u64("duplicates", t.duplicates)
        .u64("lost", lost)
        .u64("foreign", t.foreign)
        .u64("bytes", t.bytes)
        .u64("cycles", t1 - t0);
    let mut errors = t.mismatches + t.duplicates + lost;
    if let Some((lens, loop_reset)) = hostile {
        line = line
            .u64("outside_ram_len", u64::from(lens[0]))
            .u64("writable_len", u64::from(lens[1]))
            .u64("zero_len", u64::from(lens[2]))
            .bool("loop_needs_reset", loop_reset);
        // The device must have returned the three bad chains empty and given up on the loop.
        if lens != [0; 3] || !loop_reset {
            errors += 1;
        }
    }
    port::serial_write(line.finish());
    finish(errors == 0, errors)
}

/// (Re)starts the device at `slot` with its memory at `mem`.
fn start(slot: u64, mem: u64) -> Net {
    // SAFETY: `mem` is the start of R, which starts at a 2 MiB boundary above the page tables,
    // is used by nothing else, and is contiguous and large enough (`run` checked) for the
    // driver's memory and the bitmap after it.
    match unsafe { Net::init(slot, mem) } {
        Ok(n) => n,
        Err(e) => fail(e.what(), 2),
    }
}

/// Sends the hostile chains: (used lengths of the three bad ones, whether the loop made the
/// device need a reset).
fn hostile_chains(net: &mut Net) -> ([u32; 3], bool) {
    let buf = net.tx_buf_addr();
    let mut lens = [u32::MAX; 3];
    let bad: [&[(u64, u32, u16, u16)]; 3] = [
        &[(buf, 12, D_NEXT, 1), (1 << 40, 64, 0, 0)],
        &[(buf, 76, D_WRITE, 0)],
        &[(buf, 0, 0, 0)],
    ];
    for (len, chain) in lens.iter_mut().zip(bad) {
        *len = match net.raw_tx(chain) {
            Ok(l) => l,
            Err(e) => fail(e.what(), 1),
        };
    }
    let looping = [(buf, 12, D_NEXT, 1), (buf + 12, 64, D_NEXT, 0)];
    let loop_reset = net.raw_tx(&looping) == Err(Error::NeedsReset);
    (lens, loop_reset)
}
