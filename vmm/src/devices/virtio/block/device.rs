//! A virtio-blk device (virtio 1.2, 5.2): its features, its configuration space, and starting
//! and stopping its queue thread (`handler`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlockBackend;
use super::handler::{DiskParams, Handler};
use super::request::{Limits, ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, DeviceThread, DeviceWorker, Interrupt, VirtioDevice,
};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

const QUEUE_SIZE: u16 = 256;
/// What a request may hold (advertised, and enforced whatever the driver does): data buffers
/// per request (the queue size less the header and status descriptors), bytes per buffer. So a
/// request carries at most ~16 MiB, however its descriptors alias guest memory.
const LIMITS: Limits = Limits {
    seg_max: QUEUE_SIZE as u32 - 2,
    size_max: 64 << 10,
};
/// Data bytes the backend holds for one queue at a time (each in a buffer of its own); more
/// requests wait in the ring.
const MAX_IN_FLIGHT: u64 = 32 << 20;

pub struct Block {
    name: String,
    backend: Arc<dyn BlockBackend>,
    read_only: bool,
    worker: DeviceWorker,
    running: Option<DeviceThread<()>>,
}

impl Block {
    /// Disk `index` (its thread, started now, is `blk<index>`); read-only if asked or if the
    /// backend is.
    pub fn new(
        index: usize,
        backend: Arc<dyn BlockBackend>,
        read_only: bool,
    ) -> std::io::Result<Self> {
        let read_only = read_only || backend.read_only();
        let name = format!("blk{index}");
        Ok(Self {
            worker: DeviceWorker::new(&name)?,
            name,
            backend,
            read_only,
            running: None,
        })
    }

    fn capacity_sectors(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE
    }

    /// virtio_blk_config up to blk_size: capacity, size_max, seg_max, geometry, blk_size.
    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        c[8..12].copy_from_slice(&LIMITS.size_max.to_le_bytes());
        c[12..16].copy_from_slice(&LIMITS.seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    fn id(&self) -> [u8; ID_BYTES as usize] {
        let mut id = [0u8; ID_BYTES as usize];
        let s = format!("vnode-{}", self.name);
        let n = s.len().min(id.len());
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        id
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        mut queues: Vec<Queue>,
        notify: EventFd,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let queue = queues
            .pop()
            .expect("the transport gives one queue per max size");
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(notify);
        let handler = Handler {
            mem,
            queue,
            wake: wake.clone(),
            stop: stop.clone(),
            interrupt,
            backend: self.backend.clone(),
            disk: DiskParams {
                capacity: self.capacity_sectors() * SECTOR_SIZE,
                read_only: self.read_only,
                id: self.id(),
                limits: LIMITS,
                max_in_flight: MAX_IN_FLIGHT,
                writeback: features & (1 << VIRTIO_BLK_F_FLUSH) != 0,
            },
            name: self.name.clone(),
        };
        self.running = Some(self.worker.start(stop, wake, move || handler.run())?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(t) = self.running.take() {
            t.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::backend::{BlockOp, Done};

    struct Fixed(u64, bool);
    impl BlockBackend for Fixed {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_only(&self) -> bool {
            self.1
        }
        fn submit(&self, _op: BlockOp, done: Done) {
            done(Ok(Vec::new()));
        }
    }

    #[test]
    fn config_space_and_features() {
        let b = Block::new(0, Arc::new(Fixed(1 << 20, false)), false).unwrap();
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut bs = [0u8; 4];
        b.read_config(20, &mut bs);
        assert_eq!(u32::from_le_bytes(bs), 512);
        b.read_config(8, &mut bs);
        assert_eq!(u32::from_le_bytes(bs), 64 << 10, "size_max");
        b.read_config(12, &mut bs);
        assert_eq!(u32::from_le_bytes(bs), 254, "seg_max");
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_SIZE_MAX), 0);
        b.read_config(200, &mut bs);
        assert_eq!(bs, [0; 4]);
        assert_eq!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        let ro = Block::new(1, Arc::new(Fixed(4096, true)), false).unwrap();
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(&ro.id()[..11], b"vnode-blk1\0");
    }
}
