//! What this host can hold, for start-up checks with the numbers in the message: its memory
//! (`/proc/meminfo`) and the free space of a file system (`statvfs`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read the free space of {path}")]
    Statvfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn meminfo_kib(info: &str, key: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The host's memory (MemTotal), or `None` if /proc/meminfo cannot be read.
pub fn mem_total_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(meminfo_kib(&info, "MemTotal:")? * 1024)
}

/// The host's memory and swap (MemTotal + SwapTotal): what a process's anonymous memory can
/// take at most.
pub fn mem_and_swap_bytes() -> std::io::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let kib = |key| meminfo_kib(&info, key).unwrap_or(0);
    Ok((kib("MemTotal:") + kib("SwapTotal:")) * 1024)
}

/// Bytes an unprivileged writer can still allocate on the file system holding `path`.
pub fn fs_available_bytes(path: &Path) -> Result<u64, HostError> {
    let err = |source| HostError::Statvfs {
        path: path.display().to_string(),
        source,
    };
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statvfs is plain data; zeroed is a valid value that the call overwrites.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs to write into.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_has_memory_and_free_space() {
        let mem = mem_total_bytes().expect("/proc/meminfo");
        assert!(mem > 64 << 20, "{mem}");
        assert!(mem_and_swap_bytes().expect("/proc/meminfo") >= mem);
        let free = fs_available_bytes(&std::env::temp_dir()).expect("statvfs");
        assert!(free > 0);
        assert!(fs_available_bytes(Path::new("/nonexistent/vnode")).is_err());
    }
}
