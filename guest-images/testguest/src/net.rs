//! `test=net`'s pure parts: the frames the guest sends, checking what comes back, and which
//! sequence numbers have been seen.
//!
//! Frame `seq` (an Ethernet frame without FCS, 60..=1514 bytes, its length a function of `seq`):
//! destination broadcast, source the guest's MAC, EtherType 0x88B5 (IEEE local experimental),
//! then `seq` as a little-endian u32, then payload bytes that depend only on `seq` and their
//! offset. The echo peer swaps the two MAC addresses, so an echoed frame is addressed to the
//! guest; everything after the addresses must come back unchanged.

use crate::rng::mix64;

pub const ETHERTYPE: u16 = 0x88b5;
pub const MIN_FRAME: usize = 60;
pub const MAX_FRAME: usize = 1514;
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Addresses, EtherType, sequence number.
const HEAD: usize = 6 + 6 + 2 + 4;

/// The length of frame `seq`: spread over 60..=1514 bytes.
pub fn frame_len(seq: u32) -> usize {
    MIN_FRAME + (mix64(u64::from(seq) ^ 0x6e65_746c) % (MAX_FRAME - MIN_FRAME + 1) as u64) as usize
}

fn payload_byte(seq: u32, i: usize) -> u8 {
    let w = mix64((u64::from(seq) << 32) ^ (i / 8) as u64 ^ 0x6e65_7470);
    (w >> (8 * (i % 8))) as u8
}

/// Writes frame `seq` from `mac` into `buf`; returns its length.
pub fn build(buf: &mut [u8], mac: [u8; 6], seq: u32) -> usize {
    let len = frame_len(seq);
    let f = &mut buf[..len];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f[HEAD..].iter_mut().enumerate() {
        *b = payload_byte(seq, i);
    }
    len
}

/// What a received frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An intact echo of frame `seq` (`seq < frames`).
    Echo(u32),
    /// Not for this test (another EtherType or destination): host chatter on the TAP.
    Foreign,
    /// Ours, but wrong: bad sequence number, length or payload.
    Corrupt,
}

/// Checks a received frame (without the virtio-net header) against frames `0..frames`.
pub fn check(frame: &[u8], mac: [u8; 6], frames: u32) -> Verdict {
    if frame.len() < HEAD || frame[12..14] != ETHERTYPE.to_be_bytes() || frame[0..6] != mac {
        return Verdict::Foreign;
    }
    let seq = u32::from_le_bytes([frame[14], frame[15], frame[16], frame[17]]);
    if seq >= frames || frame.len() != frame_len(seq) {
        return Verdict::Corrupt;
    }
    let intact = frame[HEAD..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == payload_byte(seq, i));
    if intact {
        Verdict::Echo(seq)
    } else {
        Verdict::Corrupt
    }
}

/// A bitmap of the sequence numbers seen, over caller-given words (one bit a frame).
pub struct Seen<'a> {
    bits: &'a mut [u64],
}

impl<'a> Seen<'a> {
    /// Words needed for `frames` frames.
    pub fn words(frames: u32) -> usize {
        (frames as usize).div_ceil(64)
    }

    /// Clears `bits` and tracks frames with it.
    pub fn new(bits: &'a mut [u64]) -> Self {
        bits.fill(0);
        Seen { bits }
    }

    /// Marks `seq`; false if it was already seen (a duplicate).
    pub fn mark(&mut self, seq: u32) -> bool {
        let (w, b) = (seq as usize / 64, seq % 64);
        let was = self.bits[w] & (1 << b) != 0;
        self.bits[w] |= 1 << b;
        !was
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> [u8; 17] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = [b':'; 17];
    for (i, b) in mac.iter().enumerate() {
        s[3 * i] = HEX[usize::from(b >> 4)];
        s[3 * i + 1] = HEX[usize::from(b & 15)];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    /// What the echo peer does: swap the addresses.
    fn echo(f: &mut [u8]) {
        let (dst, rest) = f.split_at_mut(6);
        dst.swap_with_slice(&mut rest[..6]);
    }

    #[test]
    fn echoed_frames_check_and_lengths_vary() {
        let mut buf = [0u8; MAX_FRAME];
        let (mut min, mut max) = (usize::MAX, 0);
        for seq in 0..2000 {
            let n = build(&mut buf, MAC, seq);
            assert!((MIN_FRAME..=MAX_FRAME).contains(&n));
            (min, max) = (min.min(n), max.max(n));
            assert_eq!(&buf[6..12], &MAC);
            assert_eq!(
                check(&buf[..n], MAC, 2000),
                Verdict::Foreign,
                "not echoed yet"
            );
            echo(&mut buf[..n]);
            assert_eq!(check(&buf[..n], MAC, 2000), Verdict::Echo(seq));
        }
        assert!(min < 100 && max > 1450, "{min}..{max}");
    }

    #[test]
    fn any_change_is_caught() {
        let mut buf = [0u8; MAX_FRAME];
        let n = build(&mut buf, MAC, 7);
        echo(&mut buf[..n]);
        for at in 14..n {
            let mut f = buf;
            f[at] ^= 0x40;
            assert_ne!(check(&f[..n], MAC, 100), Verdict::Echo(7), "byte {at}");
        }
        assert_eq!(check(&buf[..n - 1], MAC, 100), Verdict::Corrupt);
        assert_eq!(
            check(&buf[..n], MAC, 7),
            Verdict::Corrupt,
            "seq out of range"
        );
        assert_eq!(check(&buf[..n], [2; 6], 100), Verdict::Foreign);
    }

    #[test]
    fn seen_finds_duplicates() {
        let mut words = [u64::MAX; 2];
        assert_eq!(Seen::words(65), 2);
        let mut s = Seen::new(&mut words);
        assert!(s.mark(0) && s.mark(64));
        assert!(!s.mark(64));
        assert_eq!(&format_mac(MAC), b"52:54:00:01:02:03");
    }
}
