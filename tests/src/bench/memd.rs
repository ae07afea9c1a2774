//! A `vnode-memd` for one benchmark run: started on 127.0.0.1:0, its address read from its
//! `listening on ADDR` line, killed when dropped. Its stderr goes to a log file.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};

pub struct MemServer {
    child: Child,
    pub addr: String,
    /// Kept open so the server never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl MemServer {
    pub fn start(bin: &Path, capacity: &str, secret: &str, log: &Path) -> Result<MemServer> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--capacity", capacity])
            .env("VNODE_SECRET", secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut out = BufReader::new(child.stdout.take().context("stdout is piped")?);
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).context("reading vnode-memd")? == 0 {
                let _ = child.kill();
                let status = child.wait().context("waiting for vnode-memd")?;
                bail!("vnode-memd exited ({status}) before listening: see its log");
            }
            if let Some(addr) = line.trim().strip_prefix("listening on ") {
                return Ok(MemServer {
                    addr: addr.to_string(),
                    child,
                    _stdout: out,
                });
            }
        }
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
