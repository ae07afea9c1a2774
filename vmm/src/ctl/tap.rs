//! The host side of a guest's TAP network: vnodectl gives the TAP device an address (creating
//! it as a persistent TAP first if it does not exist, so vnode's `--net tap=NAME` attaches to it)
//! and undoes exactly what it did when dropped. Uses iproute2's `ip` (the VMM itself never
//! shells out; this is a convenience of the benchmark runner, run as root).

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    #[error("{0:?} is not ADDR/PREFIX (e.g. 10.0.0.1/24)")]
    BadAddr(String),
    #[error("`ip {args}` failed: {msg}")]
    Ip { args: String, msg: String },
}

/// `10.0.0.1/24` -> (address, prefix).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), TapError> {
    let bad = || TapError::BadAddr(s.to_owned());
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

fn ip(args: &[&str]) -> Result<(), TapError> {
    let err = |msg: String| TapError::Ip {
        args: args.join(" "),
        msg,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| err(format!("cannot run ip: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// A TAP device with a host address, undone on drop.
#[derive(Debug)]
pub struct HostTap {
    name: String,
    cidr: String,
    created: bool,
}

impl HostTap {
    /// Gives TAP `name` the address `cidr` and brings it up, creating it if it does not exist.
    pub fn setup(name: &str, cidr: &str) -> Result<Self, TapError> {
        parse_cidr(cidr)?;
        let created = !Path::new("/sys/class/net").join(name).exists();
        if created {
            ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        }
        let tap = Self {
            name: name.to_owned(),
            cidr: cidr.to_owned(),
            created,
        };
        ip(&["addr", "replace", cidr, "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let r = if self.created {
            ip(&["link", "del", &self.name])
        } else {
            ip(&["addr", "del", &self.cidr, "dev", &self.name])
        };
        if let Err(e) = r {
            eprintln!(
                "vnodectl: warning: cannot undo the TAP setup of {}: {e}",
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.1/24").unwrap().1, 24);
        assert!(parse_cidr("fd00::1/64").is_ok());
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/24", "10.0.0.1/", "/24"] {
            assert_eq!(parse_cidr(bad), Err(TapError::BadAddr(bad.into())), "{bad}");
        }
    }
}
