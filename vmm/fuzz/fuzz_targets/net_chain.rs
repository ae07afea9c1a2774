//! Fuzzes virtio-net chain parsing (`net/chain.rs`) with a guest-controlled queue, laid out as
//! in `blk_request`: the input becomes the start of a 64 KiB guest (descriptor table at 0,
//! available ring at 0x100, buffers wherever the descriptors point); its first byte picks the
//! queue size (1..=16), the direction (transmit or receive) and the frame limit. Every available
//! chain is popped and parsed; parsing must never panic, a parsed chain must lie in guest RAM,
//! hold between the 12-byte header and the limit, and its bytes must copy both ways.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::devices::virtio::net::chain::{parse, Direction};

const RAM: usize = 0x1_0000;
const HDR: u32 = 12;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).expect("64 KiB guest");
    let n = rest.len().min(RAM);
    vm_memory::Bytes::write_slice(&mem, &rest[..n], GuestAddress(0)).expect("inside RAM");
    let size = 1u16 << (sel % 5); // 1..=16
    let dir = if sel & 0x8 == 0 {
        Direction::Tx
    } else {
        Direction::Rx
    };
    // A small limit (so TooLong is reached) or the device's own.
    let max_len = if sel & 0x10 == 0 {
        1514 + HDR
    } else {
        65_535 + 18 + HDR
    };
    let Ok(mut q) = Queue::new(256) else {
        return;
    };
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let mut frame = vec![0u8; max_len as usize];
    for _ in 0..size {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        match parse(&mem, chain, dir, max_len) {
            Ok(b) => {
                assert_eq!(b.head, head);
                assert!(b.len >= HDR && b.len <= max_len);
                assert!(b.segs.len() <= usize::from(size));
                for &(addr, len) in &b.segs {
                    assert!(len > 0 && GuestMemoryBackend::check_range(&mem, addr, len as usize));
                }
                let buf = &mut frame[..b.len as usize];
                match dir {
                    Direction::Tx => b.gather(&mem, buf).expect("a parsed chain copies out"),
                    Direction::Rx => b.scatter(&mem, buf).expect("a parsed chain copies in"),
                }
            }
            Err(f) => assert_eq!(f.head, head),
        }
    }
});
