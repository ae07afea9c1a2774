//! Parsing one virtio-net descriptor chain into the guest buffers it names. Pure: it checks
//! every descriptor and touches no frame data. The guest controls all of it: a chain that is
//! cut short or loops, buffers outside guest RAM, buffers with the wrong direction (a read-only
//! buffer on the receive queue, a writable one on the transmit queue), chains too short for the
//! 12-byte header or longer than any frame are all refused.
//!
//! Any split of header and frame over descriptors is accepted (virtio 1.2, 5.1.6.6: no layout
//! may be assumed); zero-length descriptors are skipped.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::tap::VNET_HDR_LEN;

/// Which way the buffers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Transmit queue: the device reads.
    Tx,
    /// Receive queue: the device writes.
    Rx,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain is cut short, loops, or is longer than the queue")]
    Broken,
    #[error("buffer {addr:#x}+{len:#x} is outside guest RAM")]
    OutsideRam { addr: u64, len: u32 },
    #[error("a {0:?} chain has a buffer in the wrong direction")]
    WrongDirection(Direction),
    #[error("chain holds {0} bytes, less than the 12-byte header")]
    TooShort(u64),
    #[error("chain holds {0} bytes, more than a frame may take")]
    TooLong(u64),
}

impl ChainError {
    /// Whether the chain can still be returned to the driver (used, with nothing in it); if
    /// not, the queue cannot be trusted any more and the device needs a reset.
    pub fn recoverable(&self) -> bool {
        *self != ChainError::Broken
    }
}

/// The guest buffers of one chain, checked to lie in guest RAM with the right direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffers {
    pub head: u16,
    pub segs: Vec<(GuestAddress, u32)>,
    /// Total bytes (at most `max_len` given to [`parse`]).
    pub len: u32,
}

impl Buffers {
    /// Copies the chain's bytes (a transmit chain) into `out`, which must hold `len` bytes.
    pub fn gather(
        &self,
        mem: &GuestMemoryMmap,
        out: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut at = 0usize;
        for &(addr, len) in &self.segs {
            let end = at + len as usize;
            mem.read_slice(&mut out[at..end], addr)?;
            at = end;
        }
        Ok(())
    }

    /// Copies `data` (no longer than `len`) into the chain's buffers (a receive chain).
    pub fn scatter(
        &self,
        mem: &GuestMemoryMmap,
        data: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut left = data;
        for &(addr, len) in &self.segs {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(len as usize);
            mem.write_slice(&left[..n], addr)?;
            left = &left[n..];
        }
        Ok(())
    }
}

/// A failed parse: why, and the chain's head (so a recoverable chain can be returned).
#[derive(Debug, PartialEq, Eq)]
pub struct ParseFailure {
    pub head: u16,
    pub error: ChainError,
}

fn check(mem: &GuestMemoryMmap, d: &Descriptor, dir: Direction) -> Result<(), ChainError> {
    if d.is_write_only() != (dir == Direction::Rx) {
        return Err(ChainError::WrongDirection(dir));
    }
    if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
        return Err(ChainError::OutsideRam {
            addr: d.addr().0,
            len: d.len(),
        });
    }
    Ok(())
}

/// Parses a chain of `dir` buffers holding between the header and `max_len` bytes.
pub fn parse<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    dir: Direction,
    max_len: u32,
) -> Result<Buffers, ParseFailure>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let head = chain.head_index();
    let fail = |error| ParseFailure { head, error };
    let descs: Vec<Descriptor> = chain.collect();
    if descs.last().is_none_or(|d| d.has_next()) {
        return Err(fail(ChainError::Broken));
    }
    let mut segs = Vec::with_capacity(descs.len());
    let mut total = 0u64;
    for d in descs.iter().filter(|d| d.len() > 0) {
        check(mem, d, dir).map_err(fail)?;
        total += u64::from(d.len());
        segs.push((d.addr(), d.len()));
    }
    if total < VNET_HDR_LEN as u64 {
        return Err(fail(ChainError::TooShort(total)));
    }
    if total > u64::from(max_len) {
        if dir == Direction::Tx {
            return Err(fail(ChainError::TooLong(total)));
        }
        // A receive buffer larger than any frame: use what a frame can fill.
        total = u64::from(max_len);
    }
    Ok(Buffers {
        head,
        segs,
        len: total as u32,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;
    pub(crate) const N: u16 = VRING_DESC_F_NEXT as u16;

    pub(crate) fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// 1 MiB of guest RAM at 0.
    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn parse_one(descs: &[RawDescriptor], dir: Direction) -> Result<Buffers, ChainError> {
        let m = mem();
        let q = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        q.add_desc_chains(descs, 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        parse(&m, chain, dir, 1526).map_err(|f| f.error)
    }

    #[test]
    fn split_chains_and_directions() {
        let b = parse_one(
            &[
                raw(0x1_0000, 12, N, 1),
                raw(0x2_0000, 0, N, 2),
                raw(0x3_0000, 60, 0, 0),
            ],
            Direction::Tx,
        )
        .unwrap();
        assert_eq!(
            b.segs,
            vec![(GuestAddress(0x1_0000), 12), (GuestAddress(0x3_0000), 60)]
        );
        assert_eq!(b.len, 72);
        assert_eq!(
            parse_one(&[raw(0x1_0000, 2048, W, 0)], Direction::Rx)
                .unwrap()
                .len,
            1526
        );
        assert_eq!(
            parse_one(&[raw(0x1_0000, 2048, 0, 0)], Direction::Rx),
            Err(ChainError::WrongDirection(Direction::Rx))
        );
        assert_eq!(
            parse_one(&[raw(0x1_0000, 64, W, 0)], Direction::Tx),
            Err(ChainError::WrongDirection(Direction::Tx))
        );
    }

    #[test]
    fn hostile_chains_are_refused() {
        assert_eq!(
            parse_one(&[raw(1 << 40, 64, 0, 0)], Direction::Tx),
            Err(ChainError::OutsideRam {
                addr: 1 << 40,
                len: 64
            })
        );
        assert_eq!(
            parse_one(&[raw(0xf_fff0, 64, W, 0)], Direction::Rx),
            Err(ChainError::OutsideRam {
                addr: 0xf_fff0,
                len: 64
            })
        );
        assert_eq!(
            parse_one(&[raw(0x1_0000, 0, 0, 0)], Direction::Tx),
            Err(ChainError::TooShort(0))
        );
        assert_eq!(
            parse_one(&[raw(0x1_0000, 11, W, 0)], Direction::Rx),
            Err(ChainError::TooShort(11))
        );
        assert_eq!(
            parse_one(&[raw(0x1_0000, 4096, 0, 0)], Direction::Tx),
            Err(ChainError::TooLong(4096))
        );
        let looping = parse_one(
            &[raw(0x1_0000, 12, N, 1), raw(0x2_0000, 64, N, 0)],
            Direction::Tx,
        );
        assert_eq!(looping, Err(ChainError::Broken));
        assert!(!ChainError::Broken.recoverable());
        assert!(ChainError::TooShort(0).recoverable());
    }

    #[test]
    fn aliased_and_overlong_chains_stay_bounded() {
        // 16 MiB of guest RAM and a 256-entry queue: 255 receive descriptors each naming the
        // same 16 MiB (4080 MiB in all; virtio-queue itself stops a chain at 4 GiB) give a
        // chain of one frame's length, no more.
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let q = MockSplitQueue::create(&m, GuestAddress(0x4_0000), 256);
        let raws: Vec<_> = (0..255).map(|_| raw(0, 16 << 20, W, 0)).collect();
        let chain = q.build_desc_chain(&raws).unwrap();
        let b = parse(&m, chain, Direction::Rx, 65_565).unwrap();
        assert_eq!(b.len, 65_565);
        // The same on the transmit queue is refused.
        let q = MockSplitQueue::create(&m, GuestAddress(0x4_0000), 256);
        let raws: Vec<_> = (0..255).map(|_| raw(0, 16 << 20, 0, 0)).collect();
        let chain = q.build_desc_chain(&raws).unwrap();
        let e = parse(&m, chain, Direction::Tx, 65_565).unwrap_err();
        assert_eq!(e.error, ChainError::TooLong(255 << 24));
        // A loop through every entry of the table: longer than the queue, refused.
        let q = MockSplitQueue::create(&m, GuestAddress(0x4_0000), 256);
        let looped: Vec<_> = (0..256u16).map(|i| raw(0, 64, N, (i + 1) % 256)).collect();
        q.add_desc_chains(&looped, 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        let e = parse(&m, chain, Direction::Tx, 65_565).unwrap_err();
        assert_eq!(e.error, ChainError::Broken);
    }

    #[test]
    fn gather_and_scatter_follow_the_segments() {
        let m = mem();
        let b = Buffers {
            head: 0,
            segs: vec![(GuestAddress(0x1_0000), 3), (GuestAddress(0x2_0000), 5)],
            len: 8,
        };
        b.scatter(&m, b"abcdefg").unwrap();
        let mut out = [0u8; 8];
        b.gather(&m, &mut out).unwrap();
        assert_eq!(&out, b"abcdefg\0");
        let mut first = [0u8; 3];
        m.read_slice(&mut first, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(&first, b"abc");
    }
}
