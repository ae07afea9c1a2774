//! The snapshot file format: self-describing, versioned, checksummed.
//!
//! ```text
//!  0        8          12             20
//!  +--------+----------+--------------+------------------+-------------------------+--------+
//!  | magic  | version  | header_len   | header (JSON)    | RAM section             | crc32  |
//!  |VNODESNP| u32 LE   | u64 LE       | header_len bytes | records, then END       | u32 LE |
//!  +--------+----------+--------------+------------------+-------------------------+--------+
//! ```
//!
//! The header is one JSON document (the VM's configuration and its vCPU, VM and device state):
//! readable with `jq`, and serde tells which field is missing or wrong. The RAM section holds
//! guest RAM when it is local (with remote memory it lives on the memory servers and the
//! section is empty): one record per page that is not all zeros, `page u64 LE` (guest-physical
//! address / 4096) then its 4096 bytes, ended by `u64::MAX`. The CRC-32 covers every byte before
//! it. A reader checks magic, version and checksum over the whole file before it trusts any of
//! it, so a truncated, corrupted or foreign file is refused before anything is created.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub const MAGIC: [u8; 8] = *b"VNODESNP";
/// The format this vnode writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
const PREFIX_LEN: u64 = 20;
const CRC_LEN: u64 = 4;
/// Far above any real header (a few hundred KiB for many vCPUs), far below a memory problem.
const MAX_HEADER: u64 = 64 << 20;
const END_OF_RAM: u64 = u64::MAX;
const PAGE: usize = 4096;
/// Pages read from guest RAM at once while writing.
const CHUNK_PAGES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("cannot open snapshot {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not a vNode snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found}; this vnode reads version {FORMAT_VERSION} only")]
    Version { found: u32 },
    #[error("snapshot is truncated")]
    Truncated,
    #[error("snapshot is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { found: u32, expected: u32 },
    #[error("snapshot header of {0} bytes exceeds the {MAX_HEADER} allowed")]
    HeaderTooLarge(u64),
    #[error("snapshot header is not valid: {0}")]
    Header(#[source] serde_json::Error),
    #[error("snapshot RAM section: page {0} is outside guest RAM")]
    PageOutside(u64),
    #[error("snapshot I/O: {0}")]
    Io(#[from] io::Error),
    #[error("guest RAM: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Adds every byte written to a CRC-32.
struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a snapshot: `header`, then the pages of `ram` that are not all zero (local RAM; None
/// when guest RAM lives on memory servers). Returns the bytes written.
pub fn write<W: Write, H: Serialize>(
    out: W,
    header: &H,
    ram: Option<&GuestMemoryMmap>,
) -> Result<u64, SnapshotFileError> {
    let json = serde_json::to_vec(header).map_err(SnapshotFileError::Header)?;
    let mut w = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        crc: crc32fast::Hasher::new(),
        written: 0,
    };
    w.write_all(&MAGIC)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())?;
    w.write_all(&(json.len() as u64).to_le_bytes())?;
    w.write_all(&json)?;
    if let Some(mem) = ram {
        write_ram(&mut w, mem)?;
    }
    w.write_all(&END_OF_RAM.to_le_bytes())?;
    let crc = w.crc.clone().finalize();
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes())?;
    inner.flush()?;
    Ok(w.written + CRC_LEN)
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

fn write_ram<W: Write>(w: &mut W, mem: &GuestMemoryMmap) -> Result<(), SnapshotFileError> {
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = ((len - off) as usize).min(buf.len());
            mem.read_slice(&mut buf[..n], GuestAddress(start + off))?;
            for (i, page) in buf[..n].chunks_exact(PAGE).enumerate() {
                if !is_zero(page) {
                    let gpa = start + off + (i * PAGE) as u64;
                    w.write_all(&(gpa / PAGE as u64).to_le_bytes())?;
                    w.write_all(page)?;
                }
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// An opened, verified snapshot: its header is parsed, the RAM section is next.
pub struct SnapshotReader {
    reader: BufReader<File>,
}

fn open(path: &Path) -> Result<File, SnapshotFileError> {
    File::open(path).map_err(|source| SnapshotFileError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Reads magic and version (the first things a reader must refuse on), returns header_len.
fn read_prefix(r: &mut impl Read) -> Result<u64, SnapshotFileError> {
    let mut p = [0u8; PREFIX_LEN as usize];
    r.read_exact(&mut p).map_err(truncated)?;
    if p[..8] != MAGIC {
        return Err(SnapshotFileError::BadMagic);
    }
    let version = u32::from_le_bytes(p[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotFileError::Version { found: version });
    }
    let header_len = u64::from_le_bytes(p[12..20].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER {
        return Err(SnapshotFileError::HeaderTooLarge(header_len));
    }
    Ok(header_len)
}

fn truncated(e: io::Error) -> SnapshotFileError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        SnapshotFileError::Truncated
    } else {
        SnapshotFileError::Io(e)
    }
}

/// Checks magic, version and the checksum over the whole file.
fn verify(path: &Path) -> Result<(), SnapshotFileError> {
    let mut f = BufReader::with_capacity(1 << 20, open(path)?);
    let header_len = read_prefix(&mut f)?;
    let size = f.get_ref().metadata()?.len();
    if size < PREFIX_LEN + header_len + 8 + CRC_LEN {
        return Err(SnapshotFileError::Truncated);
    }
    f.seek(SeekFrom::Start(0))?;
    let mut crc = crc32fast::Hasher::new();
    let mut left = size - CRC_LEN;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        f.read_exact(&mut buf[..n]).map_err(truncated)?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; 4];
    f.read_exact(&mut stored).map_err(truncated)?;
    let expected = u32::from_le_bytes(stored);
    let found = crc.finalize();
    if found != expected {
        return Err(SnapshotFileError::Checksum { found, expected });
    }
    Ok(())
}

impl SnapshotReader {
    /// Opens and verifies `path`, and parses its header.
    pub fn open<H: DeserializeOwned>(
        path: &Path,
    ) -> Result<(H, SnapshotReader), SnapshotFileError> {
        verify(path)?;
        let mut reader = BufReader::with_capacity(1 << 20, open(path)?);
        let header_len = read_prefix(&mut reader)?;
        let mut json = vec![0u8; header_len as usize];
        reader.read_exact(&mut json).map_err(truncated)?;
        let header = serde_json::from_slice(&json).map_err(SnapshotFileError::Header)?;
        Ok((header, SnapshotReader { reader }))
    }

    /// Copies the RAM section into `mem` (pages not in it stay as they are: zero in new RAM).
    /// Returns the number of pages loaded.
    pub fn load_ram(mut self, mem: &GuestMemoryMmap) -> Result<u64, SnapshotFileError> {
        let mut page = vec![0u8; PAGE];
        let mut loaded = 0;
        loop {
            let mut idx = [0u8; 8];
            self.reader.read_exact(&mut idx).map_err(truncated)?;
            let idx = u64::from_le_bytes(idx);
            if idx == END_OF_RAM {
                return Ok(loaded);
            }
            let gpa = idx
                .checked_mul(PAGE as u64)
                .filter(|a| mem.address_in_range(GuestAddress(*a)))
                .ok_or(SnapshotFileError::PageOutside(idx))?;
            self.reader.read_exact(&mut page).map_err(truncated)?;
            mem.write_slice(&page, GuestAddress(gpa))?;
            loaded += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct H {
        name: String,
        n: u32,
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * PAGE),
            (GuestAddress(0x10_0000), 16 * PAGE),
        ])
        .unwrap()
    }

    fn written(dir: &Path) -> (PathBuf, u64) {
        let m = mem();
        m.write_slice(b"first page", GuestAddress(0)).unwrap();
        m.write_slice(b"high", GuestAddress(0x10_0000 + 5 * PAGE as u64 + 7))
            .unwrap();
        let path = dir.join("snap");
        let h = H {
            name: "vm".into(),
            n: 3,
        };
        let n = write(File::create(&path).unwrap(), &h, Some(&m)).unwrap();
        (path, n)
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vnode-snapfile-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn header_and_nonzero_pages_round_trip() {
        let d = tmp("ok");
        let (path, n) = written(&d);
        assert_eq!(n, std::fs::metadata(&path).unwrap().len());
        // Two data pages, not 80.
        assert!(n < 3 * PAGE as u64, "zero pages are skipped: {n} bytes");
        let (h, r): (H, _) = SnapshotReader::open(&path).unwrap();
        assert_eq!(
            h,
            H {
                name: "vm".into(),
                n: 3
            }
        );
        let m = mem();
        assert_eq!(r.load_ram(&m).unwrap(), 2);
        let mut b = [0u8; 10];
        m.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(&b, b"first page");
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(0x10_0000 + 5 * PAGE as u64 + 7))
            .unwrap();
        assert_eq!(&b, b"high");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn truncated_corrupted_foreign_and_newer_files_are_refused() {
        let d = tmp("bad");
        let (path, n) = written(&d);
        let good = std::fs::read(&path).unwrap();
        let open = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            SnapshotReader::open::<H>(&path).map(|_| ()).unwrap_err()
        };
        assert!(matches!(
            open(&good[..n as usize - 100]),
            SnapshotFileError::Checksum { .. } | SnapshotFileError::Truncated
        ));
        assert!(matches!(open(&good[..30]), SnapshotFileError::Truncated));
        assert!(matches!(open(&good[..10]), SnapshotFileError::Truncated));
        let mut flipped = good.clone();
        flipped[PREFIX_LEN as usize + 40] ^= 1;
        assert!(matches!(open(&flipped), SnapshotFileError::Checksum { .. }));
        let mut newer = good.clone();
        newer[8] = 2;
        let e = open(&newer);
        assert!(matches!(e, SnapshotFileError::Version { found: 2 }));
        assert_eq!(
            e.to_string(),
            "snapshot format version 2; this vnode reads version 1 only"
        );
        let mut foreign = good.clone();
        foreign[0] = b'X';
        assert!(matches!(open(&foreign), SnapshotFileError::BadMagic));
        let missing = SnapshotReader::open::<H>(&d.join("none"))
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(missing, SnapshotFileError::Open { .. }));
        std::fs::remove_dir_all(d).unwrap();
    }
}
