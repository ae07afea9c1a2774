//! Guest RAM: plain local memory, or remote memory behind the ExCache.
pub mod excache;
pub mod fault;
pub mod guest;
pub mod source;
pub mod stats;
pub mod uffd;

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::ram_ranges;
use crate::devices::StopSignal;
use excache::{ExCache, Policy, Prefetcher};
use fault::{FaultCmd, FaultError, FaultServer};
use source::{LocalSource, PageSource, RemoteSource, SourceError};
use stats::{ExCacheStats, EXCACHE_STATS};
use uffd::{GuestUffd, UffdError, PAGE};

/// This process's vNode id, once remote memory is set up (for the stats).
pub static VNODE_ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Where remote guest RAM lives and how much of it may be resident here.
#[derive(Clone, Debug)]
pub struct RemoteMemConfig {
    /// `vnode-memd` addresses (one, or primary and backup), or `["local"]` for the in-process
    /// page store (the fault path without a network).
    pub servers: Vec<String>,
    /// The ExCache's capacity in bytes.
    pub local_mem: u64,
    pub policy: Policy,
    /// Largest prefetch window in pages (0 turns prefetching off).
    pub prefetch_max: u32,
    /// Who this vNode is to its memory servers, and the credential it proves that with.
    pub auth: remote_mem::ClientAuth,
    /// The fault thread busy-polls its userfaultfd instead of sleeping.
    pub spin: bool,
    /// Eviction runs between faults with write-backs in flight (`reclaim.rs`); off, faults
    /// evict when the ExCache is full, and wait for it.
    pub reclaim: bool,
    /// Memory servers a new copy of replicated guest RAM goes to when a replica is lost.
    pub spares: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteMemError {
    #[error("cannot map {0} bytes of guest RAM")]
    Map(u64, #[source] std::io::Error),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("cannot reach guest memory servers")]
    Connect(#[source] SourceError),
    #[error("--local-mem {0} must be at least 1 MiB and at most --mem")]
    LocalMem(u64),
    #[error("cannot start the fault server thread")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Fault(#[from] FaultError),
    #[error("local_mem {bytes} must be at least 1 MiB and at most the guest's {mem} bytes")]
    Limit { bytes: u64, mem: u64 },
    #[error("the ExCache's fault server has stopped")]
    Gone,
    #[error("cannot signal the fault server")]
    Doorbell(#[source] std::io::Error),
    #[error("cannot write dirty pages back: {0}")]
    Flush(String),
    #[error("{0}")]
    Spare(String),
}

/// The smallest ExCache.
pub const MIN_LOCAL_MEM: u64 = 1 << 20;

/// Guest RAM served through the ExCache, and the handle that commands its fault server.
pub struct RemoteMemory {
    pub mem: GuestMemoryMmap,
    pub stats: Arc<ExCacheStats>,
    cmds: Mutex<Sender<FaultCmd>>,
    doorbell: EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
    pages: usize,
}

/// How long a command waits for the fault server's answer.
const COMMAND_WAIT: Duration = Duration::from_secs(10);

/// How long `stop` waits for the fault server to free guest RAM on its servers.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

impl RemoteMemory {
    fn send(&self, cmd: FaultCmd) -> Result<(), RemoteMemError> {
        self.cmds
            .lock()
            .expect("fault command lock poisoned")
            .send(cmd)
            .map_err(|_| RemoteMemError::Gone)?;
        self.doorbell.write(1).map_err(RemoteMemError::Doorbell)
    }

    /// Sets the ExCache's capacity to `bytes` (at least 1 MiB, at most guest RAM): growing takes
    /// effect at once, shrinking evicts in the background.
    pub fn set_limit(&self, bytes: u64) -> Result<(), RemoteMemError> {
        let mem = (self.pages * PAGE) as u64;
        if bytes < MIN_LOCAL_MEM || bytes > mem {
            return Err(RemoteMemError::Limit { bytes, mem });
        }
        let (tx, rx) = mpsc::channel();
        self.send(FaultCmd::SetLimit(bytes as usize / PAGE, tx))?;
        rx.recv_timeout(COMMAND_WAIT)
            .map_err(|_| RemoteMemError::Gone)
    }

    /// Writes every dirty resident page to the memory servers; returns how many, once done.
    pub fn flush_dirty(&self, timeout: Duration) -> Result<usize, RemoteMemError> {
        let (tx, rx) = mpsc::channel();
        self.send(FaultCmd::FlushDirty(tx))?;
        rx.recv_timeout(timeout)
            .map_err(|_| RemoteMemError::Gone)?
            .map_err(RemoteMemError::Flush)
    }

    /// Adds `server` to the memory servers a lost replica of guest RAM is re-made on (at once,
    /// if one is lost now). Refused when guest RAM is not replicated.
    pub fn add_spare(&self, server: &str) -> Result<(), RemoteMemError> {
        let (tx, rx) = mpsc::channel();
        self.send(FaultCmd::AddSpare(server.to_string(), tx))?;
        rx.recv_timeout(COMMAND_WAIT)
            .map_err(|_| RemoteMemError::Gone)?
            .map_err(RemoteMemError::Spare)
    }

    /// Waits until the fault server has served every fault raised so far.
    pub fn drain(&self, timeout: Duration) -> Result<(), RemoteMemError> {
        let (tx, rx) = mpsc::channel();
        self.send(FaultCmd::Drain(tx))?;
        rx.recv_timeout(timeout).map_err(|_| RemoteMemError::Gone)
    }

    /// Stops the fault server thread, which frees guest RAM on the memory servers if
    /// `free_region` (else leaves it for a hand-over), and waits for that a little (a dead
    /// server must not hold up the VMM's exit).
    pub fn stop(&self, free_region: bool) {
        if let Err(e) = self.send(FaultCmd::Stop { free_region }) {
            tracing::debug!("fault server already gone: {e}");
        }
        let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) else {
            return;
        };
        let deadline = Instant::now() + RELEASE_WAIT;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("the fault server did not stop within {RELEASE_WAIT:?}");
        }
    }
}

/// Maps `mem_size` bytes of guest RAM registered with userfaultfd and starts the fault server.
/// The mapping lives as long as the process (the VM owns it until exit).
pub fn remote_memory(
    mem_size: u64,
    cfg: &RemoteMemConfig,
    vm_stop: &StopSignal,
) -> Result<RemoteMemory, RemoteMemError> {
    remote_memory_with(mem_size, cfg, vm_stop, false)
}

/// As [`remote_memory`], but with `attach` guest RAM is the region an earlier VMM of this vNode
/// left on the servers (a restore): opened, not allocated, and every page fetched from there.
pub fn remote_memory_with(
    mem_size: u64,
    cfg: &RemoteMemConfig,
    vm_stop: &StopSignal,
    attach: bool,
) -> Result<RemoteMemory, RemoteMemError> {
    if cfg.local_mem < MIN_LOCAL_MEM || cfg.local_mem > mem_size {
        return Err(RemoteMemError::LocalMem(cfg.local_mem));
    }
    let pages = (mem_size as usize) / PAGE;
    let _ = VNODE_ID.set(cfg.auth.vnode_id());
    let source: Box<dyn PageSource> = if cfg.servers.len() == 1 && cfg.servers[0] == "local" {
        Box::new(LocalSource::new(pages))
    } else {
        Box::new(
            RemoteSource::connect(&cfg.servers, &cfg.auth, pages as u64, attach)
                .map_err(RemoteMemError::Connect)?
                .with_spares(&cfg.spares),
        )
    };
    // SAFETY: a fresh anonymous private mapping; nothing else refers to the address range.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(RemoteMemError::Map(
            mem_size,
            std::io::Error::last_os_error(),
        ));
    }
    let base = base.cast::<u8>();
    // No transparent huge pages: the ExCache works in 4 KiB pages.
    // SAFETY: the range is the mapping just created.
    unsafe { libc::madvise(base.cast(), mem_size as usize, libc::MADV_NOHUGEPAGE) };
    let uffd = GuestUffd::register(base, mem_size as usize)?;

    let mut regions = Vec::new();
    let mut offset = 0usize;
    for (start, len) in ram_ranges(mem_size) {
        // SAFETY: [base+offset, base+offset+len) lies inside the mapping above, which is never
        // unmapped while the process runs; the region does not own (unmap) it.
        let mapping = unsafe {
            MmapRegion::build_raw(
                base.add(offset),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(|e| RemoteMemError::Map(mem_size, std::io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| {
            RemoteMemError::Map(mem_size, std::io::Error::other("region overflows"))
        })?;
        regions.push(region);
        offset += len as usize;
    }
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| RemoteMemError::Map(mem_size, std::io::Error::other(e.to_string())))?;

    let limit = (cfg.local_mem as usize) / PAGE;
    let stats = Arc::new(ExCacheStats::default());
    let _ = EXCACHE_STATS.set(stats.clone());
    let server = FaultServer::new(
        uffd,
        base,
        {
            let mut cache = ExCache::new(pages, limit, cfg.policy);
            if attach {
                cache.assume_all_on_server();
            }
            cache
        },
        Prefetcher::new(4.min(cfg.prefetch_max), cfg.prefetch_max),
        source,
        stats.clone(),
    )
    .with_spin(cfg.spin)
    .with_reclaim(cfg.reclaim);
    let doorbell = EventFd::new(libc::EFD_NONBLOCK).map_err(RemoteMemError::Spawn)?;
    let thread_doorbell = doorbell.try_clone().map_err(RemoteMemError::Spawn)?;
    let (cmds, rx) = mpsc::channel();
    let vm_stop = vm_stop.clone();
    let thread = std::thread::Builder::new()
        .name("excache-fault".into())
        .spawn(move || {
            crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Fault);
            server.run(rx, thread_doorbell, vm_stop)
        })
        .map_err(RemoteMemError::Spawn)?;
    Ok(RemoteMemory {
        mem,
        stats,
        cmds: Mutex::new(cmds),
        doorbell,
        thread: Mutex::new(Some(thread)),
        pages,
    })
}
