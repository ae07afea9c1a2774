//! The page store: regions, keyed by (vNode id, region number), each a run of pages in memory
//! (or in the memory log when the server has a data directory), within a page capacity.
//!
//! Locking: the region table is an `RwLock` taken briefly to find a region; each region has its
//! own `RwLock` over its pages, so connections working on different regions never contend,
//! and readers of one region share it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

use super::log::{LogError, MemLog};
use super::mapping::Mapping;
use super::pagefile::PageFile;
use crate::protocol::{ErrorCode, PageList, PAGE_SIZE};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("vnode {vnode} has no region {region}")]
    NoRegion { vnode: u64, region: u64 },
    #[error("region {region} moved to {target}")]
    Moved { region: u64, target: String },
    #[error("region {region} already exists")]
    Exists { region: u64 },
    #[error("region {region} has {pages} pages, not the {asked} asked for")]
    SizeMismatch { region: u64, pages: u64, asked: u64 },
    #[error(
        "capacity exceeded: region {region} needs {pages} pages, {free} of {capacity} pages free"
    )]
    Capacity {
        region: u64,
        pages: u64,
        free: u64,
        capacity: u64,
    },
    #[error("a region needs at least one page")]
    Empty,
    #[error("page {page} beyond the end of region {region} ({pages} pages)")]
    OutOfRange { region: u64, page: u64, pages: u64 },
    #[error("cannot map memory for region {region}")]
    Map {
        region: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("page {page} of region {region} is damaged in the memory log (no valid version)")]
    Damaged { region: u64, page: u64 },
    #[error("cannot write region {region} to the memory log")]
    LogWrite {
        region: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("vnode {vnode:#x} would hold {what}, over this server's per-vNode limit of {limit}")]
    Limit {
        vnode: u64,
        what: String,
        limit: u64,
    },
    #[error("--capacity of {capacity} bytes is more than {place} can hold ({room} bytes)")]
    TooLarge {
        capacity: u64,
        room: u64,
        place: String,
    },
    #[error("cannot tell how much {place} can hold")]
    Room {
        place: String,
        #[source]
        source: std::io::Error,
    },
    #[error("migration to {target} failed: {reason}")]
    Migrate { target: String, reason: String },
    #[error("region {region} is already being migrated")]
    Migrating { region: u64 },
    #[error("{what} is for memory servers only")]
    ServerOnly { what: &'static str },
    #[error("no incoming region {region} on this connection")]
    NoIncoming { region: u64 },
    #[error(transparent)]
    Log(#[from] LogError),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NoRegion { .. } => ErrorCode::NoRegion,
            StoreError::Moved { .. } => ErrorCode::Moved,
            StoreError::Exists { .. } => ErrorCode::Exists,
            StoreError::SizeMismatch { .. } => ErrorCode::SizeMismatch,
            StoreError::Capacity { .. } => ErrorCode::Capacity,
            StoreError::Empty => ErrorCode::Malformed,
            StoreError::OutOfRange { .. } => ErrorCode::OutOfRange,
            StoreError::Limit { .. } => ErrorCode::Limit,
            StoreError::Migrating { .. } => ErrorCode::Exists,
            StoreError::ServerOnly { .. } => ErrorCode::Auth,
            StoreError::NoIncoming { region } => {
                let _ = region;
                ErrorCode::NoRegion
            }
            StoreError::Log(LogError::NoSpace { .. }) => ErrorCode::NoSpace,
            StoreError::Map { .. }
            | StoreError::Log(_)
            | StoreError::Migrate { .. }
            | StoreError::Damaged { .. }
            | StoreError::LogWrite { .. }
            | StoreError::TooLarge { .. }
            | StoreError::Room { .. } => ErrorCode::Internal,
        }
    }
}

/// One region's pages.
pub struct Region {
    pub id: u64,
    pub pages: u64,
    state: RwLock<RegionState>,
}

/// Where a region's pages are: in memory, or in the memory log.
enum Backing {
    Memory(Mapping),
    Log(PageFile),
}

impl Backing {
    fn read(&self, region: u64, page: u64, out: &mut Vec<u8>) -> Result<(), StoreError> {
        match self {
            Backing::Memory(m) => {
                let off = page as usize * PAGE_SIZE;
                out.extend_from_slice(&m.as_slice()[off..off + PAGE_SIZE]);
                Ok(())
            }
            Backing::Log(f) => f
                .read(page, out)
                .map_err(|_| StoreError::Damaged { region, page }),
        }
    }
}

/// A region's pages, read-only, while it is being migrated.
pub struct Pages<'a> {
    backing: &'a Backing,
    region: u64,
    pub count: u64,
}

impl Pages<'_> {
    /// Appends `pages` (in range) to `out`, in order.
    pub fn read_list(&self, pages: &[u64], out: &mut Vec<u8>) -> Result<(), StoreError> {
        pages
            .iter()
            .try_for_each(|&p| self.backing.read(self.region, p, out))
    }
}

struct RegionState {
    mem: Backing,
    /// Set, under the write lock, when the region has been migrated: a request that was
    /// already waiting for the lock must not touch the stale copy.
    moved_to: Option<String>,
    /// While a live migration copies the region out: one bit per page written since the copy
    /// of that page was taken (see `migrate.rs`).
    dirty: Option<Vec<u64>>,
}

impl RegionState {
    fn check_moved(&self, region: u64) -> Result<(), StoreError> {
        match &self.moved_to {
            Some(target) => Err(StoreError::Moved {
                region,
                target: target.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl Region {
    fn check(&self, pages: PageList<'_>) -> Result<(), StoreError> {
        match pages.iter().find(|&p| p >= self.pages) {
            Some(page) => Err(StoreError::OutOfRange {
                region: self.id,
                page,
                pages: self.pages,
            }),
            None => Ok(()),
        }
    }

    /// Appends the contents of `pages` to `out`.
    pub fn read(&self, pages: PageList<'_>, out: &mut Vec<u8>) -> Result<(), StoreError> {
        self.check(pages)?;
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.check_moved(self.id)?;
        pages.iter().try_for_each(|p| st.mem.read(self.id, p, out))
    }

    /// Stores `data` (one page per entry of `pages`); with `sync`, the memory log is durable
    /// before this returns.
    pub fn write(&self, pages: PageList<'_>, data: &[u8], sync: bool) -> Result<(), StoreError> {
        self.check(pages)?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.check_moved(self.id)?;
        if let Some(bits) = st.dirty.as_mut() {
            for p in pages.iter() {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        match &mut st.mem {
            Backing::Memory(m) => {
                let m = m.as_mut_slice();
                for (p, d) in pages.iter().zip(data.chunks_exact(PAGE_SIZE)) {
                    let off = p as usize * PAGE_SIZE;
                    m[off..off + PAGE_SIZE].copy_from_slice(d);
                }
                Ok(())
            }
            Backing::Log(f) => {
                f.write(pages.iter(), data, sync)
                    .map_err(|source| StoreError::LogWrite {
                        region: self.id,
                        source,
                    })
            }
        }
    }

    /// Starts tracking writes for a live migration (every page clean). Refused when the
    /// region moved or another migration of it runs.
    pub fn start_tracking(&self) -> Result<(), StoreError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.check_moved(self.id)?;
        if st.dirty.is_some() {
            return Err(StoreError::Migrating { region: self.id });
        }
        st.dirty = Some(vec![0; self.pages.div_ceil(64) as usize]);
        Ok(())
    }

    /// Ends tracking (a migration that failed or finished).
    pub fn stop_tracking(&self) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.dirty = None;
    }

    /// Pages written since tracking started or since the last `take_dirty`.
    pub fn dirty_count(&self) -> u64 {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.dirty
            .as_ref()
            .map_or(0, |b| b.iter().map(|w| u64::from(w.count_ones())).sum())
    }

    /// Returns the dirty pages and marks them clean; a later write marks a page again.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.dirty.as_deref_mut().map_or_else(Vec::new, take_bits)
    }

    /// Appends the contents of `pages` (in range) to `out` and their numbers to `copied`,
    /// leaving out zero pages with `skip_zero`; under the read lock, so writers wait only for
    /// this one batch.
    pub fn copy_pages(
        &self,
        pages: &[u64],
        skip_zero: bool,
        copied: &mut Vec<u64>,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.check_moved(self.id)?;
        for &p in pages {
            let at = out.len();
            st.mem.read(self.id, p, out)?;
            if skip_zero && is_zero(&out[at..]) {
                out.truncate(at);
                continue;
            }
            copied.push(p);
        }
        Ok(())
    }

    /// The switch of a live migration: with every request on the region held off, hands
    /// `finish` the region's memory and its last dirty pages; when `finish` succeeds the
    /// region is marked moved to `target` before anyone else gets in. Tracking ends either way.
    pub fn switch<E>(
        &self,
        target: &str,
        finish: impl FnOnce(&Pages<'_>, &[u64]) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.check_moved(self.id)?;
        let dirty = st
            .dirty
            .take()
            .map_or_else(Vec::new, |mut b| take_bits(&mut b));
        let r = finish(
            &Pages {
                backing: &st.mem,
                region: self.id,
                count: self.pages,
            },
            &dirty,
        );
        if r.is_ok() {
            st.moved_to = Some(target.to_string());
        }
        Ok(r)
    }
}

/// Whether a page is all zero (64-byte blocks, so the inner loop vectorizes).
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// The set bits of a page bitmap as page numbers, clearing them.
fn take_bits(bits: &mut [u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (i, w) in bits.iter_mut().enumerate() {
        let mut word = std::mem::take(w);
        while word != 0 {
            pages.push(i as u64 * 64 + u64::from(word.trailing_zeros()));
            word &= word - 1;
        }
    }
    pages
}

struct Table {
    regions: HashMap<(u64, u64), Arc<Region>>,
    /// Regions migrated away, with their new server: requests for them are redirected.
    moved: HashMap<(u64, u64), String>,
    /// Regions migrating in, not yet committed: their capacity is taken, nobody sees them.
    incoming: HashSet<(u64, u64)>,
    used_pages: u64,
}

/// What one vNode may hold on this server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub regions_per_vnode: usize,
    pub pages_per_vnode: u64,
}

impl Limits {
    /// No limit beyond the server's capacity.
    pub const NONE: Limits = Limits {
        regions_per_vnode: usize::MAX,
        pages_per_vnode: u64::MAX,
    };
}

pub struct Store {
    table: RwLock<Table>,
    capacity_pages: u64,
    limits: Limits,
    log: Option<MemLog>,
    sync: bool,
    /// Serializes allocation and free against the log, so file creation and the table agree.
    alloc_lock: Mutex<()>,
}

impl Store {
    /// Opens a store of `capacity_pages`, in memory or, with `data_dir`, in the memory log
    /// (loading the regions it holds).
    pub fn open(
        capacity_pages: u64,
        data_dir: Option<&Path>,
        sync: bool,
        limits: Limits,
    ) -> Result<Store, StoreError> {
        let mut table = Table {
            regions: HashMap::new(),
            moved: HashMap::new(),
            incoming: HashSet::new(),
            used_pages: 0,
        };
        let log = match data_dir {
            None => {
                check_room(
                    capacity_pages,
                    0,
                    host_memory_bytes(),
                    "this host's RAM and swap",
                )?;
                None
            }
            Some(dir) => {
                let (log, found) = MemLog::open(dir, sync)?;
                for r in found {
                    tracing::info!(
                        vnode = r.vnode,
                        region = r.region,
                        pages = r.pages,
                        "region restored from the memory log"
                    );
                    table.used_pages += r.pages;
                    table.regions.insert(
                        (r.vnode, r.region),
                        Arc::new(Region {
                            id: r.region,
                            pages: r.pages,
                            state: RwLock::new(RegionState {
                                mem: Backing::Log(r.file),
                                moved_to: None,
                                dirty: None,
                            }),
                        }),
                    );
                }
                check_room(
                    capacity_pages,
                    table.used_pages,
                    // Each page has two slots and two records in the log.
                    super::log::available_bytes(dir).map(|b| b / 2),
                    &format!("the data directory {}", dir.display()),
                )?;
                if table.used_pages > capacity_pages {
                    tracing::warn!(used = table.used_pages, capacity_pages, "memory log holds more than --capacity; no allocation will succeed until regions are freed");
                }
                Some(log)
            }
        };
        Ok(Store {
            table: RwLock::new(table),
            capacity_pages,
            limits,
            log,
            sync,
            alloc_lock: Mutex::new(()),
        })
    }

    pub fn capacity_pages(&self) -> u64 {
        self.capacity_pages
    }

    pub fn free_pages(&self) -> u64 {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        self.capacity_pages.saturating_sub(t.used_pages)
    }

    /// Per vNode: its regions here and their pages.
    pub fn usage_by_vnode(&self) -> Vec<(u64, u64, u64)> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut by: HashMap<u64, (u64, u64)> = HashMap::new();
        for ((vnode, _), r) in &t.regions {
            let e = by.entry(*vnode).or_default();
            e.0 += 1;
            e.1 += r.pages;
        }
        let mut v: Vec<_> = by.into_iter().map(|(n, (r, p))| (n, r, p)).collect();
        v.sort_unstable();
        v
    }

    pub fn sync(&self) -> bool {
        self.sync
    }

    /// Looks a region up.
    pub fn region(&self, vnode: u64, region: u64) -> Result<Arc<Region>, StoreError> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = t.regions.get(&(vnode, region)) {
            return Ok(Arc::clone(r));
        }
        match t.moved.get(&(vnode, region)) {
            Some(target) => Err(StoreError::Moved {
                region,
                target: target.clone(),
            }),
            None => Err(StoreError::NoRegion { vnode, region }),
        }
    }

    /// Creates a zero-filled region of `pages` pages.
    pub fn alloc(&self, vnode: u64, region: u64, pages: u64) -> Result<(), StoreError> {
        let _serial = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.reserve(vnode, region, pages, false)?;
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.moved.remove(&(vnode, region));
        t.regions.insert((vnode, region), r);
        Ok(())
    }

    /// Creates a region migrating in: its capacity is taken, but nobody sees it (`region`
    /// answers `NoRegion`) until [`Store::commit_incoming`]; [`Store::abort_incoming`] drops it.
    pub fn alloc_incoming(
        &self,
        vnode: u64,
        region: u64,
        pages: u64,
    ) -> Result<Arc<Region>, StoreError> {
        let _serial = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.reserve(vnode, region, pages, true)?;
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.incoming.insert((vnode, region));
        Ok(r)
    }

    /// Makes an incoming region this server's: from here it is served, and the source may
    /// free its copy.
    pub fn commit_incoming(&self, vnode: u64, r: Arc<Region>) -> Result<(), StoreError> {
        let _serial = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = &self.log {
            log.commit_incoming(vnode, r.id)?;
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.incoming.remove(&(vnode, r.id));
        t.moved.remove(&(vnode, r.id));
        t.regions.insert((vnode, r.id), r);
        Ok(())
    }

    /// Drops an incoming region that will not commit (its source failed, or gave up).
    pub fn abort_incoming(&self, vnode: u64, r: Arc<Region>) {
        let _serial = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if t.incoming.remove(&(vnode, r.id)) {
            t.used_pages -= r.pages;
        }
        drop(t);
        if let Some(log) = &self.log {
            if let Err(e) = log.remove_incoming(vnode, r.id) {
                tracing::warn!(vnode, region = r.id, error = %e, "cannot delete an aborted incoming region's file");
            }
        }
    }

    /// Checks room and limits, takes the capacity, and creates the region's memory.
    fn reserve(
        &self,
        vnode: u64,
        region: u64,
        pages: u64,
        incoming: bool,
    ) -> Result<Arc<Region>, StoreError> {
        if pages == 0 {
            return Err(StoreError::Empty);
        }
        {
            let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
            let key = (vnode, region);
            if t.regions.contains_key(&key) || t.incoming.contains(&key) {
                return Err(StoreError::Exists { region });
            }
            let free = self.capacity_pages.saturating_sub(t.used_pages);
            if pages > free {
                return Err(StoreError::Capacity {
                    region,
                    pages,
                    free,
                    capacity: self.capacity_pages,
                });
            }
            self.check_limits(&t, vnode, pages)?;
            t.used_pages += pages;
        }
        let mem = self.create_mem(vnode, region, pages, incoming);
        let mem = match mem {
            Ok(m) => m,
            Err(e) => {
                let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
                t.used_pages -= pages;
                return Err(e);
            }
        };
        Ok(Arc::new(Region {
            id: region,
            pages,
            state: RwLock::new(RegionState {
                mem,
                moved_to: None,
                dirty: None,
            }),
        }))
    }

    fn create_mem(
        &self,
        vnode: u64,
        region: u64,
        pages: u64,
        incoming: bool,
    ) -> Result<Backing, StoreError> {
        // pages <= capacity, and --capacity is bounded by what usize can address.
        let len = pages as usize * PAGE_SIZE;
        Ok(match &self.log {
            Some(log) if incoming => Backing::Log(log.create_incoming(vnode, region, pages)?),
            Some(log) => Backing::Log(log.create(vnode, region, pages)?),
            None => Backing::Memory(
                Mapping::anonymous(len).map_err(|source| StoreError::Map { region, source })?,
            ),
        })
    }

    /// Refuses an allocation of `pages` more pages that would take `vnode` over its limits.
    fn check_limits(&self, t: &Table, vnode: u64, pages: u64) -> Result<(), StoreError> {
        let (mut regions, mut held) = (0usize, 0u64);
        for ((v, _), r) in &t.regions {
            if *v == vnode {
                regions += 1;
                held += r.pages;
            }
        }
        if regions >= self.limits.regions_per_vnode {
            return Err(StoreError::Limit {
                vnode,
                what: format!("{} regions", regions + 1),
                limit: self.limits.regions_per_vnode as u64,
            });
        }
        if held.saturating_add(pages) > self.limits.pages_per_vnode {
            return Err(StoreError::Limit {
                vnode,
                what: format!("{} pages", held.saturating_add(pages)),
                limit: self.limits.pages_per_vnode,
            });
        }
        Ok(())
    }

    /// Attaches to an existing region (a restored VMM taking over its guest RAM): returns its
    /// size in pages, refusing a size other than `pages` (0 accepts any).
    pub fn open_region(&self, vnode: u64, region: u64, pages: u64) -> Result<u64, StoreError> {
        let r = self.region(vnode, region)?;
        {
            let st = r.state.read().unwrap_or_else(|e| e.into_inner());
            st.check_moved(region)?;
        }
        if pages != 0 && pages != r.pages {
            return Err(StoreError::SizeMismatch {
                region,
                pages: r.pages,
                asked: pages,
            });
        }
        Ok(r.pages)
    }

    /// Frees a region. Connections still holding it finish their current request.
    pub fn free(&self, vnode: u64, region: u64) -> Result<(), StoreError> {
        self.remove(vnode, region, None)
    }

    /// Drops a migrated region, remembering where it went.
    pub fn mark_moved(&self, vnode: u64, region: u64, target: &str) -> Result<(), StoreError> {
        self.remove(vnode, region, Some(target))
    }

    fn remove(&self, vnode: u64, region: u64, moved_to: Option<&str>) -> Result<(), StoreError> {
        let _serial = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let Some(r) = t.regions.remove(&(vnode, region)) else {
            return Err(StoreError::NoRegion { vnode, region });
        };
        t.used_pages -= r.pages;
        if let Some(target) = moved_to {
            t.moved.insert((vnode, region), target.to_string());
        }
        drop(t);
        if let Some(log) = &self.log {
            log.remove(vnode, region)?;
        }
        Ok(())
    }
}

/// Refuses a capacity larger than `room` (bytes free, in page-size units: the memory log
/// passes half its free space, for its two slots per page) plus what the store already holds.
fn check_room(
    capacity_pages: u64,
    held_pages: u64,
    room: std::io::Result<u64>,
    place: &str,
) -> Result<(), StoreError> {
    let room = room.map_err(|source| StoreError::Room {
        place: place.to_string(),
        source,
    })?;
    let page = PAGE_SIZE as u64;
    let can_hold = room.saturating_add(held_pages.saturating_mul(page));
    let capacity = capacity_pages.saturating_mul(page);
    if capacity > can_hold {
        return Err(StoreError::TooLarge {
            capacity,
            room: can_hold,
            place: place.to_string(),
        });
    }
    Ok(())
}

/// MemTotal + SwapTotal from /proc/meminfo: what anonymous regions could ever use.
fn host_memory_bytes() -> std::io::Result<u64> {
    vnode_common::host::mem_and_swap_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_batch, Op, Request};

    fn with_pages<R>(pages: &[u64], f: impl FnOnce(PageList<'_>) -> R) -> R {
        let mut buf = Vec::new();
        encode_batch(&mut buf, Op::Read, 0, 0, pages);
        match crate::protocol::decode_frame(&buf) {
            Ok((_, Request::Read { pages, .. })) => f(pages),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_read_capacity_and_namespaces() {
        let s = Store::open(10, None, false, Limits::NONE).expect("open");
        s.alloc(1, 0, 4).expect("alloc");
        assert!(matches!(s.alloc(1, 0, 1), Err(StoreError::Exists { .. })));
        assert!(matches!(
            s.alloc(1, 1, 7),
            Err(StoreError::Capacity { free: 6, .. })
        ));
        s.alloc(2, 0, 6).expect("other vnode, same region number");
        assert_eq!(s.free_pages(), 0);
        let r = s.region(1, 0).expect("region");
        let data: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        with_pages(&[3, 1], |p| r.write(p, &data, false)).expect("write");
        let mut out = Vec::new();
        with_pages(&[3, 1, 0], |p| r.read(p, &mut out)).expect("read");
        assert_eq!(&out[..2 * PAGE_SIZE], &data[..]);
        assert!(out[2 * PAGE_SIZE..].iter().all(|&b| b == 0));
        assert!(matches!(
            with_pages(&[4], |p| r.read(p, &mut out)),
            Err(StoreError::OutOfRange { page: 4, .. })
        ));
        assert!(matches!(s.region(3, 0), Err(StoreError::NoRegion { .. })));
        assert_eq!(s.open_region(1, 0, 4).expect("open"), 4);
        assert_eq!(s.open_region(1, 0, 0).expect("open any size"), 4);
        assert!(matches!(
            s.open_region(1, 0, 5),
            Err(StoreError::SizeMismatch {
                pages: 4,
                asked: 5,
                ..
            })
        ));
        assert!(matches!(
            s.open_region(3, 0, 4),
            Err(StoreError::NoRegion { .. })
        ));
        s.free(2, 0).expect("free");
        assert_eq!(s.free_pages(), 6);
        s.mark_moved(1, 0, "10.0.0.1:7").expect("moved");
        assert!(matches!(s.region(1, 0), Err(StoreError::Moved { .. })));
        assert!(matches!(
            s.open_region(1, 0, 4),
            Err(StoreError::Moved { .. })
        ));
    }

    #[test]
    fn capacity_beyond_the_host_is_refused() {
        let e = Store::open(u64::MAX / 8192, None, false, Limits::NONE)
            .err()
            .expect("an exabyte of RAM is refused");
        assert!(e.to_string().contains("RAM and swap"), "{e}");
        assert!(check_room(10, 0, Ok(10 * PAGE_SIZE as u64), "x").is_ok());
        assert!(check_room(10, 5, Ok(5 * PAGE_SIZE as u64), "x").is_ok());
        assert!(check_room(10, 0, Ok(9 * PAGE_SIZE as u64), "x").is_err());
    }

    #[test]
    fn per_vnode_limits() {
        let limits = Limits {
            regions_per_vnode: 2,
            pages_per_vnode: 5,
        };
        let s = Store::open(100, None, false, limits).expect("open");
        s.alloc(1, 0, 1).expect("first");
        s.alloc(1, 1, 1).expect("second");
        let e = s.alloc(1, 2, 1).expect_err("third region");
        assert_eq!(e.code(), ErrorCode::Limit);
        assert!(e.to_string().contains("3 regions"), "{e}");
        s.alloc(2, 0, 5).expect("another vNode has its own budget");
        s.free(1, 1).expect("free");
        assert!(matches!(s.alloc(1, 1, 5), Err(StoreError::Limit { .. })));
        s.alloc(1, 1, 4).expect("within the page limit");
    }

    #[test]
    fn live_migration_tracks_writes_and_incoming_regions_stay_hidden() {
        let s = Store::open(100, None, false, Limits::NONE).expect("open");
        s.alloc(1, 0, 70).expect("alloc");
        let r = s.region(1, 0).expect("region");
        let page = vec![7u8; PAGE_SIZE];
        with_pages(&[3], |p| r.write(p, &page, false)).expect("write");
        r.start_tracking().expect("track");
        assert!(matches!(
            r.start_tracking(),
            Err(StoreError::Migrating { .. })
        ));
        // Zero pages are left out of a copy; written ones are copied.
        let (mut idx, mut out) = (Vec::new(), Vec::new());
        r.copy_pages(&[2, 3], true, &mut idx, &mut out)
            .expect("copy");
        assert_eq!(idx, [3]);
        assert_eq!(out, page);
        with_pages(&[65, 1], |p| {
            r.write(p, &[page.clone(), page.clone()].concat(), false)
        })
        .expect("write while tracked");
        assert_eq!(r.dirty_count(), 2);
        assert_eq!(r.take_dirty(), [1, 65]);
        assert_eq!(r.dirty_count(), 0);
        with_pages(&[9], |p| r.write(p, &page, false)).expect("write");
        // An incoming copy takes capacity but is invisible until committed.
        let inc = s
            .alloc_incoming(1, 0, 70)
            .err()
            .expect("the region exists here");
        assert_eq!(inc.code(), ErrorCode::Exists);
        let inc = s.alloc_incoming(2, 0, 20).expect("incoming");
        assert!(matches!(s.region(2, 0), Err(StoreError::NoRegion { .. })));
        assert_eq!(s.free_pages(), 10);
        s.abort_incoming(2, inc);
        assert_eq!(s.free_pages(), 30);
        let inc = s.alloc_incoming(2, 0, 20).expect("a retry works");
        s.commit_incoming(2, inc).expect("commit");
        s.region(2, 0).expect("committed region is served");
        // The switch hands over the last dirty pages and marks the region moved.
        let got = r
            .switch("b:1", |_, dirty| {
                assert_eq!(dirty, [9]);
                Ok::<(), ()>(())
            })
            .expect("switch");
        assert_eq!(got, Ok(()));
        let mut out = Vec::new();
        assert!(matches!(
            with_pages(&[0], |p| r.read(p, &mut out)),
            Err(StoreError::Moved { .. })
        ));
    }
}
