//! `test=net`: on vCPU 0, finds the first virtio-net device, sends `frames` frames (see the
//! library's `net` module: EtherType 0x88B5, lengths 60..=1514, a sequence number and a payload
//! fixed by it) to the broadcast address with at most `WINDOW` unanswered, and checks that each
//! comes back exactly once, intact, from the host's echo peer (which swaps the MAC addresses).
//! Frames of other EtherTypes (host chatter on the TAP) are counted and ignored.
//!
//! Output: `{"test":"net",...}` then `{"done":true,"ok":..,"errors":..}`; exit 0 if every frame
//! came back once and intact, 1 if one was lost (nothing received for ~5 s), corrupted or
//! duplicated, 2 if there is no usable virtio-net device.

use testguest::cmdline::Config;
use testguest::json::JsonLine;
use testguest::net::{build, check, format_mac, Seen, Verdict};
use testguest::region::Region;

use crate::machine::BootInfo;
use crate::netdrv::{self, Net, MEM_BYTES, RX_BUFS};
use crate::virtio::{SLOT0, SLOT_SIZE};
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
    // SAFETY: R starts at a 2 MiB boundary above the page tables and nothing else uses it; it is
    // contiguous and large enough (checked above) for the driver's memory and the bitmap.
    let mut net = match unsafe { Net::init(slot, region.gpa(0)) } {
        Ok(n) => n,
        Err(e) => fail(e.what(), 2),
    };
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
    port::serial_write(line.finish());
    let errors = t.mismatches + t.duplicates + lost;
    finish(errors == 0, errors)
}
