//! One region's file in the memory log: every page has two slots, and each slot a 32-byte
//! record with a CRC-32C and a sequence number, so a torn or corrupt write is detected at
//! recovery and never served, and the previous version of a page stays intact while its
//! replacement is being written.
//!
//! Layout (little-endian; the file is sparse, only written slots take space):
//!
//! ```text
//! 0        superblock (4096 B): "VNMLOG01", version u32, page size u32, pages u64, crc32c u32
//! 4096     records: 2 x pages x 32 B, rounded up to 4096; record (p, s) at 4096 + (2p+s) x 32
//! data     slots: 2 x pages x 4096 B; slot (p, s) at data + (2p+s) x 4096
//! record   magic u32 "VPG1" | crc32c u32 over bytes 8..32 and the slot's page | seq u64 | page u64 | 0 u64
//! ```
//!
//! A write of page p goes to the slot that does *not* hold its current version (within one
//! batch, a page written twice reuses the batch's slot): data first, then the record with the
//! next sequence number. With `--sync` the file is fdatasync'd before the write is
//! acknowledged, so an acknowledged write is durable and the version it replaced stays on disk
//! until then. Recovery reads both records of every page and takes the valid one with the
//! higher sequence number. A record that fails its check (a write torn by a crash, or corrupt
//! bytes) is reported; if the page still has a valid slot that version is served, else the page
//! is *damaged*: reads of it are refused (never zeroes, never the torn bytes). An all-zero
//! record is an empty slot: a page with no valid and no bad record was never written (zeroes).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::mapping::Mapping;
use crate::protocol::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"VNMLOG01";
const VERSION: u32 = 1;
const SUPER: usize = 4096;
const REC: usize = 32;
const REC_MAGIC: u32 = 0x3147_5056; // "VPG1"

/// A page's state in the index.
const NEVER: u8 = 0;
const SLOT0: u8 = 1;
const SLOT1: u8 = 2;
const DAMAGED: u8 = 3;

/// What recovery found in one region file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Pages with a valid version.
    pub pages: u64,
    /// Records that failed their check (torn or corrupt) where the page had another valid slot:
    /// that slot is served.
    pub torn: Vec<u64>,
    /// Pages with no valid slot but a bad one: refused on read.
    pub damaged: Vec<u64>,
}

/// A page with no valid version: reads of it are refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("page {0} has no valid version in the memory log")]
pub struct Damaged(pub u64);

/// Why a page file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PageFileError {
    #[error("not a memory log file (bad superblock)")]
    BadSuperblock,
    #[error("file is {len} bytes, {want} expected for {pages} pages")]
    Size { len: u64, want: u64, pages: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A region's page file, mapped shared.
pub struct PageFile {
    file: File,
    map: Mapping,
    pages: u64,
    /// Per page: NEVER, SLOT0, SLOT1 or DAMAGED.
    index: Vec<u8>,
    next_seq: u64,
}

/// Bytes of a file for `pages` pages.
pub fn file_len(pages: u64) -> Option<u64> {
    let recs = pages.checked_mul(2 * REC as u64)?.next_multiple_of(4096);
    let data = pages.checked_mul(2 * PAGE_SIZE as u64)?;
    (SUPER as u64).checked_add(recs)?.checked_add(data)
}

/// Where slot `slot` of `page` starts in the file of a region of `pages` pages (for tests and
/// tools that inspect a file).
pub fn slot_offset(pages: u64, page: u64, slot: usize) -> u64 {
    (data_off(pages) + (2 * page as usize + slot) * PAGE_SIZE) as u64
}

fn data_off(pages: u64) -> usize {
    SUPER + (pages as usize * 2 * REC).next_multiple_of(4096)
}

fn superblock(pages: u64) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    b[16..24].copy_from_slice(&pages.to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The record's checksum: its fields after the CRC, then the page's bytes.
fn record_crc(fields: &[u8], data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(fields), data)
}

#[derive(Clone, Copy)]
enum Slot {
    Empty,
    Valid(u64),
    Bad,
}

impl PageFile {
    /// Formats `file` (already [`file_len`]`(pages)` long, zero-filled) for `pages` pages.
    pub fn create(file: File, pages: u64) -> Result<PageFile, PageFileError> {
        let len = file.metadata()?.len();
        let want = file_len(pages).ok_or(PageFileError::BadSuperblock)?;
        if len != want {
            return Err(PageFileError::Size { len, want, pages });
        }
        let mut map = Self::map(&file, pages)?;
        map.as_mut_slice()[..28].copy_from_slice(&superblock(pages));
        Ok(PageFile {
            file,
            map,
            pages,
            index: vec![NEVER; pages as usize],
            next_seq: 1,
        })
    }

    /// Opens an existing file and recovers its index.
    pub fn open(file: File) -> Result<(PageFile, Recovery), PageFileError> {
        let len = file.metadata()?.len();
        let mut head = [0u8; 28];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)
            .map_err(|_| PageFileError::BadSuperblock)?;
        let pages = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        if head != superblock(pages) {
            return Err(PageFileError::BadSuperblock);
        }
        let want = file_len(pages).ok_or(PageFileError::BadSuperblock)?;
        if len != want {
            return Err(PageFileError::Size { len, want, pages });
        }
        let map = Self::map(&file, pages)?;
        let mut pf = PageFile {
            file,
            map,
            pages,
            index: vec![NEVER; pages as usize],
            next_seq: 1,
        };
        let rec = pf.recover();
        Ok((pf, rec))
    }

    fn map(file: &File, pages: u64) -> Result<Mapping, PageFileError> {
        let len = file_len(pages).ok_or(PageFileError::BadSuperblock)?;
        let len = usize::try_from(len).map_err(|_| PageFileError::BadSuperblock)?;
        Ok(Mapping::file(file, len)?)
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn rec_range(&self, page: u64, slot: usize) -> std::ops::Range<usize> {
        let at = SUPER + (2 * page as usize + slot) * REC;
        at..at + REC
    }

    fn data_range(&self, page: u64, slot: usize) -> std::ops::Range<usize> {
        let at = data_off(self.pages) + (2 * page as usize + slot) * PAGE_SIZE;
        at..at + PAGE_SIZE
    }

    fn check_slot(&self, page: u64, slot: usize) -> Slot {
        let m = self.map.as_slice();
        let r = &m[self.rec_range(page, slot)];
        if r.iter().all(|&b| b == 0) {
            return Slot::Empty;
        }
        let word = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
        let magic = u32::from_le_bytes(r[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes"));
        let data = &m[self.data_range(page, slot)];
        if magic == REC_MAGIC
            && word(16) == page
            && word(24) == 0
            && crc == record_crc(&r[8..], data)
        {
            Slot::Valid(word(8))
        } else {
            Slot::Bad
        }
    }

    /// Rebuilds the index from the records; reports bad ones.
    fn recover(&mut self) -> Recovery {
        let mut rec = Recovery::default();
        let mut max_seq = 0;
        for page in 0..self.pages {
            let (a, b) = (self.check_slot(page, 0), self.check_slot(page, 1));
            let bad = matches!(a, Slot::Bad) || matches!(b, Slot::Bad);
            for s in [a, b] {
                if let Slot::Valid(seq) = s {
                    max_seq = max_seq.max(seq);
                }
            }
            let state = match (a, b) {
                (Slot::Valid(x), Slot::Valid(y)) if y > x => SLOT1,
                (Slot::Valid(_), _) => SLOT0,
                (_, Slot::Valid(_)) => SLOT1,
                _ if bad => DAMAGED,
                _ => NEVER,
            };
            match state {
                DAMAGED => rec.damaged.push(page),
                NEVER => {}
                _ => {
                    rec.pages += 1;
                    if bad {
                        rec.torn.push(page);
                    }
                }
            }
            self.index[page as usize] = state;
        }
        self.next_seq = max_seq + 1;
        rec
    }

    /// Appends page `page`'s current contents to `out`; refuses a damaged page.
    pub fn read(&self, page: u64, out: &mut Vec<u8>) -> Result<(), Damaged> {
        match self.index[page as usize] {
            NEVER => out.resize(out.len() + PAGE_SIZE, 0),
            DAMAGED => return Err(Damaged(page)),
            s => {
                out.extend_from_slice(&self.map.as_slice()[self.data_range(page, (s - 1) as usize)])
            }
        }
        Ok(())
    }

    /// Writes `data` (a page per entry of `pages`) into the free slots; with `sync`, makes the
    /// file durable before returning.
    pub fn write(
        &mut self,
        pages: impl Iterator<Item = u64>,
        data: &[u8],
        sync: bool,
    ) -> io::Result<()> {
        let mut this_batch = HashSet::new();
        for (page, d) in pages.zip(data.chunks_exact(PAGE_SIZE)) {
            let cur = self.index[page as usize];
            let slot = match cur {
                // Written earlier in this batch: not durable yet, overwrite that slot again.
                SLOT0 | SLOT1 if this_batch.contains(&page) => (cur - 1) as usize,
                SLOT0 => 1,
                _ => 0,
            };
            this_batch.insert(page);
            let seq = self.next_seq;
            self.next_seq += 1;
            let dr = self.data_range(page, slot);
            let rr = self.rec_range(page, slot);
            let m = self.map.as_mut_slice();
            m[dr].copy_from_slice(d);
            let mut r = [0u8; REC];
            r[..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
            r[8..16].copy_from_slice(&seq.to_le_bytes());
            r[16..24].copy_from_slice(&page.to_le_bytes());
            let crc = record_crc(&r[8..], d);
            r[4..8].copy_from_slice(&crc.to_le_bytes());
            m[rr].copy_from_slice(&r);
            self.index[page as usize] = slot as u8 + 1;
        }
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// fdatasync: every write so far is durable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: fdatasync on a descriptor this value owns; no memory is involved.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Crash consistency: a write torn at a random point (any subset of its 512-byte sectors
    //! reached the disk, one of them cut mid-way), and random corruption of written pages, at
    //! 60 random points each. Recovery must give back exactly the acknowledged versions, report
    //! every torn or corrupt record, and never serve torn bytes.
    use super::*;
    use std::collections::HashMap;
    use std::fs::OpenOptions;
    use std::path::{Path, PathBuf};

    const PAGES: u64 = 16;
    const SECTOR: usize = 512;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Version `v` of page `p` (v = 0: never written, zeroes).
    fn content(p: u64, v: u32) -> Vec<u8> {
        if v == 0 {
            return vec![0; PAGE_SIZE];
        }
        let mut r = Rng(((p + 1) * 0x9e37_79b9) ^ (u64::from(v) << 32) | 1);
        (0..PAGE_SIZE / 8)
            .flat_map(|_| r.next().to_le_bytes())
            .collect()
    }

    fn fresh(dir: &Path) -> (PathBuf, PageFile) {
        let path = dir.join("r.mlog");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        f.set_len(file_len(PAGES).expect("len")).expect("size");
        (path.clone(), PageFile::create(f, PAGES).expect("format"))
    }

    fn reopen(path: &Path) -> Result<(PageFile, Recovery), PageFileError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open");
        PageFile::open(f)
    }

    /// A random batch of 1-4 pages (duplicates allowed), each with a new version number.
    fn batch(rng: &mut Rng, next: &mut u32) -> Vec<(u64, u32)> {
        (0..1 + rng.below(4))
            .map(|_| {
                *next += 1;
                (rng.below(PAGES), *next)
            })
            .collect()
    }

    fn write(pf: &mut PageFile, b: &[(u64, u32)]) {
        let data: Vec<u8> = b.iter().flat_map(|&(p, v)| content(p, v)).collect();
        pf.write(b.iter().map(|&(p, _)| p), &data, false)
            .expect("write");
    }

    /// Acknowledged history: per page, its versions in order.
    fn history(rng: &mut Rng, pf: &mut PageFile, next: &mut u32) -> HashMap<u64, Vec<u32>> {
        let mut acked: HashMap<u64, Vec<u32>> = HashMap::new();
        for _ in 0..1 + rng.below(30) {
            let b = batch(rng, next);
            write(pf, &b);
            for (p, v) in b {
                acked.entry(p).or_default().push(v);
            }
        }
        acked
    }

    fn last(acked: &HashMap<u64, Vec<u32>>, p: u64) -> u32 {
        acked.get(&p).and_then(|v| v.last().copied()).unwrap_or(0)
    }

    fn read(pf: &PageFile, p: u64) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        pf.read(p, &mut out).ok().map(|()| out)
    }

    #[test]
    fn torn_writes_at_random_points_recover_exactly_the_acknowledged_writes() {
        let dir = std::env::temp_dir().join(format!("pagefile-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (mut torn_seen, mut served_new) = (0, 0);
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let (path, mut pf) = fresh(&dir);
            let mut next = 0;
            let acked = history(&mut rng, &mut pf, &mut next);
            // The write in flight when the host crashed.
            let before = std::fs::read(&path).expect("before");
            let inflight = batch(&mut rng, &mut next);
            write(&mut pf, &inflight);
            let slots: Vec<(u64, usize)> = inflight
                .iter()
                .map(|&(p, _)| (p, (pf.index[p as usize] - 1) as usize))
                .collect();
            let ranges: Vec<_> = slots
                .iter()
                .map(|&(p, s)| (p, pf.rec_range(p, s), pf.data_range(p, s)))
                .collect();
            drop(pf);
            let after = std::fs::read(&path).expect("after");
            // Any subset of the changed sectors reached the disk (every third crash: all of
            // them), one of them cut mid-way.
            let mut crashed = before.clone();
            let changed: Vec<usize> = (0..before.len() / SECTOR)
                .filter(|i| {
                    before[i * SECTOR..(i + 1) * SECTOR] != after[i * SECTOR..(i + 1) * SECTOR]
                })
                .collect();
            let cut = changed[rng.below(changed.len() as u64) as usize];
            for &i in &changed {
                let r = i * SECTOR..(i + 1) * SECTOR;
                if i == cut {
                    let k = r.start + 1 + rng.below(SECTOR as u64 - 1) as usize;
                    crashed[r.start..k].copy_from_slice(&after[r.start..k]);
                } else if seed % 3 == 0 || rng.below(2) == 0 {
                    crashed[r.clone()].copy_from_slice(&after[r]);
                }
            }
            std::fs::write(&path, &crashed).expect("crash image");
            let (pf, rec) = reopen(&path).expect("recover");
            for p in 0..PAGES {
                let old = content(p, last(&acked, p));
                let got = read(&pf, p);
                let new: Vec<_> = inflight.iter().filter(|(q, _)| *q == p).collect();
                if new.is_empty() {
                    assert_eq!(got.as_ref(), Some(&old), "seed {seed}: page {p} changed");
                    continue;
                }
                match got {
                    Some(g) if g == old => {}
                    Some(g) if new.iter().any(|&&(_, v)| g == content(p, v)) => served_new += 1,
                    Some(_) => panic!("seed {seed}: page {p} served bytes never written"),
                    None => assert!(
                        last(&acked, p) == 0 && rec.damaged.contains(&p),
                        "seed {seed}: page {p} refused though it had a version"
                    ),
                }
            }
            // Every slot caught half-written is reported, unless its record was still empty
            // (then the slot holds nothing recovery could take for a page: it is ignored).
            for (p, rr, dr) in &ranges {
                let same = |img: &[u8]| {
                    crashed[rr.clone()] == img[rr.clone()] && crashed[dr.clone()] == img[dr.clone()]
                };
                let invisible = crashed[rr.clone()].iter().all(|&b| b == 0);
                if !same(&before) && !same(&after) && !invisible {
                    torn_seen += 1;
                    assert!(
                        rec.torn.contains(p) || rec.damaged.contains(p),
                        "seed {seed}: torn page {p} not reported: {rec:?}"
                    );
                }
            }
        }
        assert!(torn_seen >= 30, "only {torn_seen} torn slots in 60 crashes");
        assert!(served_new > 0, "no crash kept its new version");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_pages_are_reported_and_never_served() {
        let dir = std::env::temp_dir().join(format!("pagefile-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (path, mut pf) = fresh(&dir);
            let mut next = 0;
            let acked = history(&mut rng, &mut pf, &mut next);
            // Flip bytes of one written slot (its record or its data) of one written page.
            let written: Vec<u64> = acked.keys().copied().collect();
            let p = written[rng.below(written.len() as u64) as usize];
            let slot = match pf.index[p as usize] {
                _ if acked[&p].len() > 1 && rng.below(2) == 0 => rng.below(2) as usize,
                s => (s - 1) as usize,
            };
            let target = if rng.below(3) == 0 {
                pf.rec_range(p, slot)
            } else {
                pf.data_range(p, slot)
            };
            drop(pf);
            let mut img = std::fs::read(&path).expect("image");
            for _ in 0..1 + rng.below(3) {
                let at = target.start + rng.below(target.len() as u64) as usize;
                img[at] ^= 1 << rng.below(8);
            }
            std::fs::write(&path, &img).expect("corrupt");
            let (pf, rec) = reopen(&path).expect("recover");
            assert!(
                rec.torn.contains(&p) || rec.damaged.contains(&p),
                "seed {seed}: corrupt page {p} not reported: {rec:?}"
            );
            for q in 0..PAGES {
                let got = read(&pf, q);
                if q != p {
                    assert_eq!(
                        got,
                        Some(content(q, last(&acked, q))),
                        "seed {seed}: page {q}"
                    );
                    continue;
                }
                match got {
                    // An acknowledged version of it (the current one if the stale slot was hit).
                    Some(g) => assert!(
                        acked[&p].iter().any(|&v| g == content(p, v)),
                        "seed {seed}: page {p} served corrupt bytes"
                    ),
                    None => assert!(rec.damaged.contains(&p)),
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cut_or_foreign_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("pagefile-cut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (path, mut pf) = fresh(&dir);
        write(&mut pf, &[(3, 1)]);
        drop(pf);
        let img = std::fs::read(&path).expect("image");
        std::fs::write(&path, &img[..img.len() - 100]).expect("cut");
        assert!(matches!(reopen(&path), Err(PageFileError::Size { .. })));
        let mut bad = img.clone();
        bad[9] ^= 1;
        std::fs::write(&path, &bad).expect("superblock");
        assert!(matches!(reopen(&path), Err(PageFileError::BadSuperblock)));
        std::fs::write(&path, &img).expect("restore");
        let (pf, rec) = reopen(&path).expect("intact");
        assert_eq!(read(&pf, 3), Some(content(3, 1)));
        assert_eq!((rec.pages, rec.torn.len(), rec.damaged.len()), (1, 0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
