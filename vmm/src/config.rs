//! The VM's configuration, validated before anything is created.

use std::path::PathBuf;

use crate::arch::x86_64::layout::MIN_MEM_SIZE;
use crate::devices::debug_exit::CorruptHook;

/// Where guest serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOut {
    Stdout,
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_size: u64,
    pub vcpus: u32,
    pub serial: SerialOut,
    pub kvm_device: PathBuf,
    pub corrupt: Option<CorruptHook>,
    /// virtio-blk disks, in slot order (docs/guest-abi.md).
    pub disks: Vec<DiskSpec>,
    /// virtio-net devices on TAPs, in slot order after the disks.
    pub nets: Vec<NetSpec>,
    /// Guest RAM on memory servers behind the ExCache; local RAM if None.
    pub remote_mem: Option<crate::memory::RemoteMemConfig>,
    /// Populate local guest RAM before the guest starts (no host page faults at first touch).
    pub mem_prealloc: bool,
}

impl VmConfig {
    /// What the control API reports of this configuration.
    pub fn summary(&self) -> vnode_api::VmConfigSummary {
        vnode_api::VmConfigSummary {
            vcpus: self.vcpus,
            mem_size: self.mem_size,
            kernel: self.kernel.display().to_string(),
            excache: self.remote_mem.as_ref().map(|rm| vnode_api::ExCacheInfo {
                local_mem: rm.local_mem,
                policy: rm.policy.name().to_owned(),
                servers: rm.servers.clone(),
                prefetch_max: rm.prefetch_max,
            }),
            disks: self
                .disks
                .iter()
                .map(|d| vnode_api::DiskInfo {
                    source: match &d.source {
                        DiskSource::File(p) => p.display().to_string(),
                        DiskSource::Nbd(uri) => uri.clone(),
                        DiskSource::NbdReplicated { primary, backup } => {
                            format!("{primary},backup={backup}")
                        }
                    },
                    read_only: d.read_only,
                })
                .collect(),
            nets: self
                .nets
                .iter()
                .map(|n| vnode_api::NetInfo {
                    tap: n.tap.clone(),
                    mac: n.mac.map(|b| format!("{b:02x}")).join(":"),
                })
                .collect(),
        }
    }
}

/// Where a `--disk` lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    File(PathBuf),
    /// An NBD URI, already checked to parse.
    Nbd(String),
    /// An NBD export replicated on a primary and a backup export (`,backup=URI`): writes and
    /// flushes reach both, reads the primary (the backup while the primary is out).
    NbdReplicated {
        primary: String,
        backup: String,
    },
}

/// One `--disk PATH|nbd://HOST:PORT/EXPORT|nbd+unix:///EXPORT?socket=PATH[,backup=URI]
/// [,credential-file=PATH][,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub source: DiskSource,
    pub read_only: bool,
    /// NBD only: the file holding the export's credential (64 hex digits, `vnode-cred blk
    /// --export NAME`), proven to vnode-blkd by challenge-response.
    pub credential_file: Option<PathBuf>,
}

/// One `--net tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    /// Given, or derived from the TAP name.
    pub mac: [u8; 6],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size {0:?}: use a number with an optional K, M, G or T suffix")]
    Size(String),
    #[error("--mem {0} is too small: a guest needs at least {min} MiB", min = MIN_MEM_SIZE >> 20)]
    MemTooSmall(u64),
    #[error("--mem {mem} is larger than this host's memory ({host} bytes)")]
    MemTooLarge { mem: u64, host: u64 },
    #[error("--mem {0} is not a multiple of 4 KiB")]
    MemUnaligned(u64),
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {0} is more than the 254 this VMM supports")]
    TooManyVcpus(u32),
    #[error("invalid --debug-corrupt {0:?}: expected GPA@PHASE, e.g. 0x20000000@1")]
    Corrupt(String),
    #[error("invalid --disk {0:?}: expected PATH, nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH, then optionally ,backup=NBD-URI and ,credential-file=PATH (NBD only) and ,readonly")]
    Disk(String),
    #[error("invalid --net {spec:?}: {why}")]
    Net { spec: String, why: String },
}

/// Parses "4096", "64K", "512M", "1G", "1.5GiB" (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|_| ConfigError::Size(s.to_owned()))
}

/// Parses a number in decimal or 0x-prefixed hex.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses `GPA@PHASE`.
pub fn parse_corrupt(s: &str) -> Result<CorruptHook, ConfigError> {
    let err = || ConfigError::Corrupt(s.to_owned());
    let (gpa, phase) = s.split_once('@').ok_or_else(err)?;
    Ok(CorruptHook {
        gpa: parse_u64(gpa).ok_or_else(err)?,
        phase: parse_u64(phase)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(err)?,
    })
}

/// Parses one `--disk` value.
pub fn parse_disk(s: &str) -> Result<DiskSpec, ConfigError> {
    let err = || ConfigError::Disk(s.to_owned());
    // Options are peeled off the end, so a file name may contain commas.
    let (mut target, mut read_only, mut backup, mut credential) = (s, false, None, None);
    while let Some((t, opt)) = target.rsplit_once(',') {
        match opt {
            "readonly" | "ro" if !read_only => read_only = true,
            _ => match (
                opt.strip_prefix("backup="),
                opt.strip_prefix("credential-file="),
            ) {
                (Some(b), _) if backup.is_none() => backup = Some(b),
                (_, Some(c)) if credential.is_none() && !c.is_empty() => {
                    credential = Some(PathBuf::from(c))
                }
                _ => break,
            },
        }
        target = t;
    }
    if target.contains(",backup=") {
        return Err(err());
    }
    let is_nbd = |u: &str| u.starts_with("nbd://") || u.starts_with("nbd+unix://");
    let source = if is_nbd(target) {
        remote_blk::nbd::client::parse_uri(target).map_err(|_| err())?;
        match backup {
            None => DiskSource::Nbd(target.to_owned()),
            Some(b) if is_nbd(b) && b != target => {
                remote_blk::nbd::client::parse_uri(b).map_err(|_| err())?;
                DiskSource::NbdReplicated {
                    primary: target.to_owned(),
                    backup: b.to_owned(),
                }
            }
            Some(_) => return Err(err()),
        }
    } else if target.is_empty() || target.contains("://") || backup.is_some() {
        return Err(err());
    } else {
        DiskSource::File(PathBuf::from(target))
    };
    if credential.is_some() && matches!(source, DiskSource::File(_)) {
        return Err(err());
    }
    Ok(DiskSpec {
        source,
        read_only,
        credential_file: credential,
    })
}

/// Parses one `--net tap=NAME[,mac=52:54:00:12:34:56]`.
pub fn parse_net(s: &str) -> Result<NetSpec, ConfigError> {
    use crate::devices::virtio::net::{default_mac, tap};
    let err = |why: &str| ConfigError::Net {
        spec: s.to_owned(),
        why: why.to_owned(),
    };
    let (mut name, mut mac) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", n)) if name.is_none() => name = Some(n),
            Some(("mac", m)) if mac.is_none() => mac = Some(parse_mac(m).ok_or_else(|| {
                err("mac must be six hex bytes like 52:54:00:12:34:56, unicast and not all zero")
            })?),
            _ => return Err(err("expected tap=NAME[,mac=MAC]")),
        }
    }
    let name = name.ok_or_else(|| err("expected tap=NAME[,mac=MAC]"))?;
    if !tap::valid_name(name) {
        return Err(err(&format!(
            "TAP name {name:?} must be 1 to {} bytes, without '/', ':' or spaces",
            tap::MAX_NAME_LEN
        )));
    }
    Ok(NetSpec {
        tap: name.to_owned(),
        mac: mac.unwrap_or_else(|| default_mac(name)),
    })
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`), unicast and not all zero.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    let unicast = mac[0] & 1 == 0 && mac != [0; 6];
    (parts.next().is_none() && unicast).then_some(mac)
}

/// Total RAM of this host, from /proc/meminfo.
pub fn host_mem_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks memory size and vCPU count against what this VMM and host can do.
pub fn validate(mem_size: u64, vcpus: u32, host_mem: Option<u64>) -> Result<(), ConfigError> {
    if vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    if vcpus > 254 {
        return Err(ConfigError::TooManyVcpus(vcpus));
    }
    if mem_size < MIN_MEM_SIZE {
        return Err(ConfigError::MemTooSmall(mem_size));
    }
    if !mem_size.is_multiple_of(4096) {
        return Err(ConfigError::MemUnaligned(mem_size));
    }
    if let Some(host) = host_mem {
        if mem_size > host {
            return Err(ConfigError::MemTooLarge {
                mem: mem_size,
                host,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn corrupt_hook() {
        assert_eq!(
            parse_corrupt("0x1000@2"),
            Ok(CorruptHook {
                gpa: 0x1000,
                phase: 2
            })
        );
        assert!(parse_corrupt("0x1000").is_err());
        assert!(parse_corrupt("zz@1").is_err());
    }

    #[test]
    fn disks() {
        let file = |p: &str, ro| DiskSpec {
            source: DiskSource::File(PathBuf::from(p)),
            read_only: ro,
            credential_file: None,
        };
        assert_eq!(parse_disk("/tmp/d.img"), Ok(file("/tmp/d.img", false)));
        assert_eq!(parse_disk("d.img,readonly"), Ok(file("d.img", true)));
        assert_eq!(parse_disk("a,b.img"), Ok(file("a,b.img", false)));
        let nbd = parse_disk("nbd://127.0.0.1:10809/disk0,readonly").unwrap();
        assert_eq!(
            nbd.source,
            DiskSource::Nbd("nbd://127.0.0.1:10809/disk0".into())
        );
        assert!(nbd.read_only);
        let unix = parse_disk("nbd+unix:///exp?socket=/run/nbd.sock").unwrap();
        assert_eq!(
            unix,
            DiskSpec {
                source: DiskSource::Nbd("nbd+unix:///exp?socket=/run/nbd.sock".into()),
                read_only: false,
                credential_file: None,
            }
        );
        let rep = parse_disk("nbd://a:1/d,backup=nbd://b:2/d,readonly").unwrap();
        assert_eq!(
            rep,
            DiskSpec {
                source: DiskSource::NbdReplicated {
                    primary: "nbd://a:1/d".into(),
                    backup: "nbd://b:2/d".into()
                },
                read_only: true,
                credential_file: None,
            }
        );
        let cred = parse_disk("nbd://a:1/d,credential-file=/run/d.cred,readonly").unwrap();
        assert_eq!(cred.credential_file, Some(PathBuf::from("/run/d.cred")));
        assert!(cred.read_only);
        assert!(parse_disk("d.img,credential-file=/x").is_err());
        for bad in [
            "",
            ",readonly",
            "d.img,backup=nbd://b/d",
            "nbd://a/d,backup=nbd://a/d",
            "nbd://a/d,backup=/tmp/x",
            "nbd://a/d,backup=nbd://b/d,backup=nbd://c/d",
            "http://x/y",
            "nbd://",
            "nbd+unix:///exp",
            "nbd://h:notaport/e",
        ] {
            assert_eq!(parse_disk(bad), Err(ConfigError::Disk(bad.into())), "{bad}");
        }
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=vnt0,mac=52:54:00:ab:CD:0f").unwrap();
        assert_eq!(n.tap, "vnt0");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        let d = parse_net("tap=tap7").unwrap();
        assert_eq!(d.mac, parse_net("tap=tap7").unwrap().mac, "deterministic");
        assert_ne!(d.mac, parse_net("tap=tap8").unwrap().mac);
        assert_eq!(d.mac[0] & 3, 2, "locally administered unicast");
        for bad in [
            "",
            "tap=",
            "vnt0",
            "tap=a234567890123456",
            "tap=a/b",
            "tap=x,mac=52:54:00:00:00",
            "tap=x,mac=01:00:5e:00:00:01",
            "tap=x,mac=00:00:00:00:00:00",
            "tap=x,mac=52:54:00:00:00:zz",
            "tap=x,speed=10",
            "tap=x,tap=y",
        ] {
            assert!(
                matches!(parse_net(bad), Err(ConfigError::Net { .. })),
                "{bad}"
            );
        }
        let e = parse_net("tap=x,mac=1:2").unwrap_err().to_string();
        assert!(e.contains("mac must be six hex bytes"), "{e}");
    }

    #[test]
    fn limits() {
        assert_eq!(validate(1 << 30, 0, None), Err(ConfigError::NoVcpus));
        assert_eq!(
            validate(1 << 20, 1, None),
            Err(ConfigError::MemTooSmall(1 << 20))
        );
        assert!(matches!(
            validate(8 << 30, 1, Some(4 << 30)),
            Err(ConfigError::MemTooLarge { .. })
        ));
        assert_eq!(
            validate((1 << 30) + 1, 1, None),
            Err(ConfigError::MemUnaligned((1 << 30) + 1))
        );
        assert_eq!(validate(1 << 30, 2, Some(4 << 30)), Ok(()));
    }
}
