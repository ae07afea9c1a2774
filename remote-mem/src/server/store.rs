//! The page store: regions, keyed by (vNode id, region number), each a run of pages in memory
//! (or in the memory log when the server has a data directory), within a page capacity.
//!
//! Locking: the region table is an `RwLock` taken briefly to find a region; each region has its
//! own `RwLock` over its pages, so connections working on different regions never contend,
//! and readers of one region share it.

use std::collections::HashMap;
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
    /// Appends pages `first..first + n` to `out`.
    pub fn read(&self, first: u64, n: u64, out: &mut Vec<u8>) -> Result<(), StoreError> {
        (first..first + n).try_for_each(|p| self.backing.read(self.region, p, out))
    }
}

struct RegionState {
    mem: Backing,
    /// Set, under the write lock, when the region has been migrated: a request that was
    /// already waiting for the lock must not touch the stale copy.
    moved_to: Option<String>,
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

    /// Migration: runs `copy` over all pages with every other request held off; when it
    /// succeeds, the region is marked moved to `target` before anyone else gets in.
    pub fn move_out<E>(
        &self,
        target: &str,
        copy: impl FnOnce(&Pages<'_>) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.check_moved(self.id)?;
        let r = copy(&Pages {
            backing: &st.mem,
            region: self.id,
            count: self.pages,
        });
        if r.is_ok() {
            st.moved_to = Some(target.to_string());
        }
        Ok(r)
    }
}

struct Table {
    regions: HashMap<(u64, u64), Arc<Region>>,
    /// Regions migrated away, with their new server: requests for them are redirected.
    moved: HashMap<(u64, u64), String>,
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
        if pages == 0 {
            return Err(StoreError::Empty);
        }
        let _serial = self.alloc_lock.lock().unwrap_or_else(|e| e.into_inner());
        {
            let t = self.table.read().unwrap_or_else(|e| e.into_inner());
            if t.regions.contains_key(&(vnode, region)) {
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
        }
        // pages <= capacity, and --capacity is bounded by what usize can address.
        let len = pages as usize * PAGE_SIZE;
        let mem = match &self.log {
            Some(log) => Backing::Log(log.create(vnode, region, pages)?),
            None => Backing::Memory(
                Mapping::anonymous(len).map_err(|source| StoreError::Map { region, source })?,
            ),
        };
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.used_pages += pages;
        t.moved.remove(&(vnode, region));
        t.regions.insert(
            (vnode, region),
            Arc::new(Region {
                id: region,
                pages,
                state: RwLock::new(RegionState {
                    mem,
                    moved_to: None,
                }),
            }),
        );
        Ok(())
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
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let kib = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((kib("MemTotal:") + kib("SwapTotal:")) * 1024)
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
}
