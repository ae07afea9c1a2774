//! Fuzzes virtio-blk request parsing with a guest-controlled queue: the input becomes the start
//! of a 64 KiB guest (descriptor table at 0, available ring at 0x100, headers and buffers after
//! it, wherever the descriptors point), its first byte picks the queue size (1..=16, so the
//! table and ring fit in the first bytes libFuzzer mutates). Every available chain is popped and parsed; parsing must never panic,
//! and a parsed request's buffers and status byte must lie in guest RAM, within the limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::devices::virtio::block::request::{parse, Limits};

const RAM: usize = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    let Some((&size_byte, rest)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).expect("64 KiB guest");
    let n = rest.len().min(RAM);
    mem.write_slice(&rest[..n], GuestAddress(0))
        .expect("inside RAM");
    let size = 1u16 << (size_byte % 5); // 1..=16
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
    // At most one pass over the ring: a guest's avail index can claim any number.
    for _ in 0..size {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let limits = Limits {
            seg_max: 254,
            size_max: 4096,
        };
        if let Ok(req) = parse(&mem, chain, limits) {
            assert!(GuestMemoryBackend::check_range(&mem, req.status, 1));
            assert!(req.data.len() <= 254 && u64::from(req.data_len) <= 254 * 4096);
            for (addr, len) in req.data {
                assert!(len == 0 || GuestMemoryBackend::check_range(&mem, addr, len as usize));
            }
        }
    }
});
