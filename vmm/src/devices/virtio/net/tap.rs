//! A Linux TAP device opened through /dev/net/tun: every read returns one frame and every write
//! sends one, each preceded by a 12-byte virtio_net_hdr_v1 (IFF_VNET_HDR with TUNSETVNETHDRSZ),
//! so frames move between the guest's buffers and the TAP without translation. The fd is
//! non-blocking: the device thread waits for it with epoll.
//!
//! If no interface of that name exists, TUNSETIFF creates a transient TAP that disappears when
//! the fd is closed (needs CAP_NET_ADMIN). This is the only module that issues TUN ioctls.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of struct virtio_net_hdr_v1 (virtio 1.2, 5.1.6): what precedes every frame.
pub const VNET_HDR_LEN: usize = 12;
/// IFNAMSIZ less the terminating NUL.
pub const MAX_NAME_LEN: usize = 15;
const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{TUN_PATH} is missing: load the tun module (modprobe tun)")]
    NoTunDevice,
    #[error("cannot open {TUN_PATH}: permission denied (needs root or CAP_NET_ADMIN)")]
    TunNotPermitted,
    #[error("cannot open {TUN_PATH}")]
    Open(#[source] io::Error),
    #[error("invalid TAP name {0:?}: 1 to 15 bytes, without '/', ':' or spaces")]
    BadName(String),
    #[error("TAP {0}: creating or attaching a TAP needs CAP_NET_ADMIN")]
    NotPermitted(String),
    #[error(
        "{0} exists and is not a TAP device, or is a multi-queue TAP (TUNSETIFF: EINVAL): use \
         another name"
    )]
    NotTap(String),
    #[error(
        "TAP {0} is busy (TUNSETIFF: EBUSY): another process has it open, or the name belongs to \
         an interface that cannot be attached"
    )]
    Busy(String),
    #[error("TAP {name}: {what}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Whether Linux accepts `name` as an interface name (dev_valid_name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// struct ifreq as TUNSETIFF reads it: the name and the flags (the rest of the union unused).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP (or, in tests, any fd that moves one frame per read and write).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) the TAP `name` with virtio-net headers, non-blocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice,
                io::ErrorKind::PermissionDenied => TapError::TunNotPermitted,
                _ => TapError::Open(e),
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) an ifreq; `req` is one, laid out as the
        // kernel's, and lives across the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::NotPermitted(name),
                Some(libc::EINVAL) => TapError::NotTap(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                _ => TapError::Ioctl {
                    name,
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.to_owned(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `hdr_len`.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(r, "TUNSETVNETHDRSZ")?;
        // No checksum or segmentation offloads (the argument is the flags themselves): the host
        // stack hands the TAP finished frames.
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let r = unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                0 as libc::c_ulong,
            )
        };
        tap.check(r, "TUNSETOFFLOAD")?;
        Ok(tap)
    }

    /// Wraps an fd that already behaves like a TAP with vnet headers (a SOCK_SEQPACKET socket
    /// in tests). It must be non-blocking.
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_owned(),
        }
    }

    fn check(&self, r: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header) into `buf`; WouldBlock if none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Sends one frame (with its header).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("tap0"));
        assert!(valid_name("a23456789012345"));
        for bad in ["", "a234567890123456", "a/b", "a b", "a:1", ".", ".."] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
    }
}
