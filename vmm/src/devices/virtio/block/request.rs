//! Parsing one virtio-blk descriptor chain into a [`Request`]. Pure: it reads the request header
//! from guest memory and checks every descriptor, nothing else. The guest controls all of it,
//! so everything is checked: a chain that is cut short, loops or runs past the queue; buffers
//! outside guest RAM; buffers with the wrong direction; short headers.
//!
//! Layout accepted (what Linux and the test guest send): the 16-byte header alone in the first
//! descriptor (device-readable), data descriptors, and the status byte alone in the last
//! descriptor (device-writable).

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
/// VIRTIO_BLK_ID_BYTES.
pub const ID_BYTES: u32 = 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

/// A parsed request: where its data and status byte are in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Data buffers, all checked to lie in guest RAM with the right direction.
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u32,
    pub status: GuestAddress,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain is cut short, loops, or is longer than the queue")]
    BadChain,
    #[error("descriptor chain has no device-writable status byte in guest RAM")]
    NoStatus,
    #[error("request header is shorter than 16 bytes, device-writable or outside guest RAM")]
    BadHeader,
    #[error("buffer {addr:#x}+{len:#x} is outside guest RAM")]
    OutsideRam { addr: u64, len: u32 },
    #[error("data buffer has the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("{0} data buffers, more than the {1} this device takes")]
    TooManySegments(usize, u32),
    #[error("data length {0} is not a multiple of 512 bytes")]
    Unaligned(u32),
    #[error("data buffer of {0} bytes, more than the {1} this device takes")]
    SegmentTooLarge(u32, u32),
}

/// What the device advertises (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX) and so enforces: a
/// request's data is at most `seg_max * size_max` bytes, whatever its descriptors alias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Data buffers per request.
    pub seg_max: u32,
    /// Bytes per data buffer.
    pub size_max: u32,
}

impl RequestError {
    /// Whether the status byte can still carry an error back to the driver; if not, the chain
    /// is unusable and the device needs a reset.
    pub fn has_status(&self) -> bool {
        !matches!(self, RequestError::BadChain | RequestError::NoStatus)
    }
}

/// A failed parse: why, and where the status byte is if the chain has one.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseFailure {
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: `Header` is plain old data (two u32 and a u64, no padding): any bytes are a valid value.
unsafe impl ByteValued for Header {}

fn in_ram(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), RequestError> {
    if d.len() > 0 && !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
        return Err(RequestError::OutsideRam {
            addr: d.addr().0,
            len: d.len(),
        });
    }
    Ok(())
}

/// Reads the chain's descriptors, refusing a chain that was cut short (a descriptor outside the
/// table or guest RAM, or a loop stopped by the queue-size limit).
fn descriptors<M>(chain: DescriptorChain<M>) -> Result<Vec<Descriptor>, RequestError>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let descs: Vec<Descriptor> = chain.collect();
    match descs.last() {
        Some(last) if !last.has_next() => Ok(descs),
        _ => Err(RequestError::BadChain),
    }
}

/// Parses a chain within `limits`.
pub fn parse<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    limits: Limits,
) -> Result<Request, ParseFailure>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let no_status = |error| ParseFailure {
        error,
        status: None,
    };
    let descs = descriptors(chain).map_err(no_status)?;
    let (status_desc, rest) = descs
        .split_last()
        .ok_or(no_status(RequestError::BadChain))?;
    if rest.is_empty()
        || !status_desc.is_write_only()
        || status_desc.len() < 1
        || !GuestMemoryBackend::check_range(mem, status_desc.addr(), 1)
    {
        return Err(no_status(RequestError::NoStatus));
    }
    let status = status_desc.addr();
    parse_body(mem, rest, limits, status).map_err(|error| ParseFailure {
        error,
        status: Some(status),
    })
}

/// The header and data buffers of a chain whose status byte is usable.
fn parse_body(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    limits: Limits,
    status: GuestAddress,
) -> Result<Request, RequestError> {
    let (head, data_descs) = descs.split_first().ok_or(RequestError::BadHeader)?;
    if head.is_write_only() || (head.len() as usize) < std::mem::size_of::<Header>() {
        return Err(RequestError::BadHeader);
    }
    let header: Header = mem
        .read_obj(head.addr())
        .map_err(|_| RequestError::BadHeader)?;
    let raw_kind = u32::from_le(header.kind);
    let kind = match raw_kind {
        T_IN => RequestType::In,
        T_OUT => RequestType::Out,
        T_FLUSH => RequestType::Flush,
        T_GET_ID => RequestType::GetId,
        other => RequestType::Unsupported(other),
    };
    if data_descs.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments(
            data_descs.len(),
            limits.seg_max,
        ));
    }
    // FLUSH and unknown types carry no data the device touches: their direction is not checked.
    let direction = match kind {
        RequestType::In | RequestType::GetId => Some(true),
        RequestType::Out => Some(false),
        _ => None,
    };
    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len = 0u32;
    for d in data_descs {
        if d.len() > limits.size_max {
            return Err(RequestError::SegmentTooLarge(d.len(), limits.size_max));
        }
        in_ram(mem, d)?;
        if direction.is_some_and(|device_writes| d.is_write_only() != device_writes) {
            return Err(RequestError::WrongDirection(raw_kind));
        }
        // At most seg_max * size_max bytes: cannot saturate with the device's limits.
        data_len = data_len.saturating_add(d.len());
        data.push((d.addr(), d.len()));
    }
    if matches!(kind, RequestType::In | RequestType::Out)
        && !u64::from(data_len).is_multiple_of(SECTOR_SIZE)
    {
        return Err(RequestError::Unaligned(data_len));
    }
    Ok(Request {
        kind,
        sector: u64::from_le(header.sector),
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const RAM: u64 = 0x10_0000;
    const HDR: u64 = 0x1_0000;
    const BUF: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const LIMITS: Limits = Limits {
        seg_max: 8,
        size_max: 0x1_0000,
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(
            Header {
                kind,
                reserved: 0,
                sector,
            },
            GuestAddress(HDR),
        )
        .unwrap();
    }

    /// Parses the chain made of `descs` linked in order (NEXT set on all but the last).
    fn parse_linked(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
    ) -> Result<Request, ParseFailure> {
        let q = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let raws: Vec<_> = descs.iter().map(|&(a, l, f)| raw(a, l, f, 0)).collect();
        let chain = q.build_desc_chain(&raws).unwrap();
        parse(mem, chain, LIMITS)
    }

    /// Parses a chain given with explicit flags and next indices.
    fn parse_raw(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, ParseFailure> {
        let q = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        q.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        parse(mem, chain, LIMITS)
    }

    #[test]
    fn good_read_write_flush_get_id() {
        let m = mem();
        header(&m, T_IN, 7);
        let r = parse_linked(&m, &[(HDR, 16, 0), (BUF, 1024, W), (STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(
            (r.sector, r.data_len, r.status),
            (7, 1024, GuestAddress(STATUS))
        );
        header(&m, T_OUT, 9);
        let r = parse_linked(
            &m,
            &[
                (HDR, 16, 0),
                (BUF, 512, 0),
                (BUF + 512, 512, 0),
                (STATUS, 1, W),
            ],
        )
        .unwrap();
        assert_eq!((r.kind, r.data.len()), (RequestType::Out, 2));
        header(&m, T_FLUSH, 0);
        let r = parse_linked(&m, &[(HDR, 16, 0), (STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestType::Flush);
        header(&m, T_GET_ID, 0);
        let r = parse_linked(&m, &[(HDR, 16, 0), (BUF, 20, W), (STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestType::GetId);
        header(&m, 99, 0);
        let r = parse_linked(&m, &[(HDR, 16, 0), (STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestType::Unsupported(99));
    }

    #[test]
    fn buffers_outside_ram() {
        let m = mem();
        header(&m, T_IN, 0);
        let e =
            parse_linked(&m, &[(HDR, 16, 0), (RAM - 512, 1024, W), (STATUS, 1, W)]).unwrap_err();
        assert_eq!(
            e.error,
            RequestError::OutsideRam {
                addr: RAM - 512,
                len: 1024
            }
        );
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        let e = parse_linked(&m, &[(HDR, 16, 0), (1 << 40, 512, W), (STATUS, 1, W)]).unwrap_err();
        assert!(matches!(e.error, RequestError::OutsideRam { .. }));
        // Header outside RAM: the status byte still reports the error.
        let e = parse_linked(&m, &[(u64::MAX - 8, 16, 0), (STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::BadHeader);
        // Status outside RAM: nothing can be reported.
        let e = parse_linked(&m, &[(HDR, 16, 0), (RAM, 1, W)]).unwrap_err();
        assert_eq!((e.error, e.status), (RequestError::NoStatus, None));
    }

    #[test]
    fn loops_and_broken_links() {
        let m = mem();
        header(&m, T_IN, 0);
        // 0 -> 1 -> 0 -> ...: stopped by the queue-size limit, refused.
        let e = parse_raw(&m, &[raw(HDR, 16, N, 1), raw(STATUS, 1, W | N, 0)]).unwrap_err();
        assert_eq!((e.error, e.status), (RequestError::BadChain, None));
        // A descriptor pointing to itself.
        let e = parse_raw(&m, &[raw(HDR, 16, N, 0)]).unwrap_err();
        assert_eq!(e.error, RequestError::BadChain);
        // Next index past the end of the table.
        let e = parse_raw(&m, &[raw(HDR, 16, N, 500)]).unwrap_err();
        assert_eq!(e.error, RequestError::BadChain);
        assert!(!e.error.has_status());
    }

    #[test]
    fn too_long_chains() {
        let m = mem();
        header(&m, T_OUT, 0);
        let mut d = vec![(HDR, 16, 0)];
        d.extend((0..9).map(|i| (BUF + i * 512, 512, 0)));
        d.push((STATUS, 1, W));
        let e = parse_linked(&m, &d).unwrap_err();
        assert_eq!(e.error, RequestError::TooManySegments(9, 8));
    }

    #[test]
    fn segments_over_size_max_are_refused_before_anything_is_read() {
        let m = mem();
        header(&m, T_OUT, 0);
        // Eight aliased 64 KiB + 512 buffers: each one over the limit.
        let mut d = vec![(HDR, 16, 0)];
        d.extend((0..8).map(|_| (BUF, 0x1_0200, 0)));
        d.push((STATUS, 1, W));
        let e = parse_linked(&m, &d).unwrap_err();
        assert_eq!(e.error, RequestError::SegmentTooLarge(0x1_0200, 0x1_0000));
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        // At the limit: accepted.
        let mut d = vec![(HDR, 16, 0)];
        d.extend((0..8).map(|_| (BUF, 0x1_0000, 0)));
        d.push((STATUS, 1, W));
        assert_eq!(parse_linked(&m, &d).unwrap().data_len, 8 * 0x1_0000);
    }

    #[test]
    fn aliased_buffers_totalling_4_gib_are_refused() {
        // 16 MiB of guest RAM, a 256-entry queue, the device's own limits, and 254 device-
        // writable descriptors each naming the same 16 MiB: 4064 MiB of "data".
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        header(&m, T_IN, 0);
        let q = MockSplitQueue::create(&m, GuestAddress(0x4_0000), 256);
        let mut raws = vec![raw(HDR, 16, 0, 0)];
        raws.extend((0..254).map(|_| raw(0, 16 << 20, W, 0)));
        raws.push(raw(STATUS, 1, W, 0));
        let chain = q.build_desc_chain(&raws).unwrap();
        let limits = Limits {
            seg_max: 254,
            size_max: 64 << 10,
        };
        let e = parse(&m, chain, limits).unwrap_err();
        assert_eq!(e.error, RequestError::SegmentTooLarge(16 << 20, 64 << 10));
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        // A chain longer than the queue (a loop through all 256 entries) has no status.
        let q = MockSplitQueue::create(&m, GuestAddress(0x4_0000), 256);
        let looped: Vec<_> = (0..256u16)
            .map(|i| raw(HDR, 16, N, (i + 1) % 256))
            .collect();
        q.add_desc_chains(&looped, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let e = parse(&m, chain, limits).unwrap_err();
        assert_eq!((e.error, e.status), (RequestError::BadChain, None));
    }

    #[test]
    fn wrong_directions() {
        let m = mem();
        header(&m, T_IN, 0);
        // Reading into a device-readable buffer.
        let e = parse_linked(&m, &[(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::WrongDirection(T_IN));
        header(&m, T_OUT, 0);
        let e = parse_linked(&m, &[(HDR, 16, 0), (BUF, 512, W), (STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::WrongDirection(T_OUT));
        // Device-readable status byte.
        let e = parse_linked(&m, &[(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, 0)]).unwrap_err();
        assert_eq!(e.error, RequestError::NoStatus);
        // Device-writable header.
        let e = parse_linked(&m, &[(HDR, 16, W), (STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::BadHeader);
    }

    #[test]
    fn short_headers_and_chains() {
        let m = mem();
        header(&m, T_IN, 0);
        let e = parse_linked(&m, &[(HDR, 8, 0), (BUF, 512, W), (STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::BadHeader);
        // A lone header: no status byte.
        let e = parse_linked(&m, &[(HDR, 16, 0)]).unwrap_err();
        assert_eq!(e.error, RequestError::NoStatus);
        // A lone writable descriptor: a status byte but no header.
        let e = parse_linked(&m, &[(STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::NoStatus);
        let e = parse_linked(&m, &[(HDR, 16, 0), (BUF, 100, W), (STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::Unaligned(100));
    }
}
