//! Several hosts on one machine for fault tests: network namespaces on a bridge (veth pairs;
//! the same set-up as `vnodectl up`, whose functions make it), and faults made inside a
//! namespace with nftables: a partition drops (never rejects) every packet in and out, so to
//! its peers the host looks hung, as a cut cable or a dead switch port does.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use vnode_manager_client::ctl::up::{network, teardown_network, ClusterFile};

/// Namespaces joined by a bridge; deleted on drop.
pub struct Net {
    cf: ClusterFile,
    /// The bridge's address (how the root namespace is reached), then each namespace's.
    pub addrs: Vec<String>,
    dir: PathBuf,
}

/// The nftables table a partition adds (and a heal deletes).
const TABLE: &str = "vnode_fault";

impl Net {
    /// `n` namespaces, named from `tag` (unique per test: they share the machine).
    pub fn new(tag: &str, n: u32) -> Net {
        let dir = std::env::temp_dir().join(format!("vnode-net-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create net dir");
        let mut cf = ClusterFile::default();
        let made = network(n, &dir, &mut cf);
        // Built before the check, so a partial set-up is torn down by the drop.
        let mut net = Net {
            cf,
            addrs: Vec::new(),
            dir,
        };
        net.addrs = made.unwrap_or_else(|e| panic!("network namespaces: {e}")).1;
        net
    }

    /// Namespace `i` (1-based, as in `addrs`).
    pub fn ns(&self, i: usize) -> &str {
        &self.cf.netns[i - 1]
    }

    /// A command that runs `program` inside namespace `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(i)]).arg(program);
        c
    }

    /// Cuts namespace `i` off: every packet in or out is dropped, so connections to it go
    /// silent (no reset, no ICMP).
    pub fn partition(&self, i: usize) {
        let rules = format!(
            "table inet {TABLE} {{\n\
             chain input {{ type filter hook input priority -10; policy drop; }}\n\
             chain output {{ type filter hook output priority -10; policy drop; }}\n\
             }}\n"
        );
        self.nft(i, &["-f", "-"], Some(&rules));
    }

    /// Undoes [`Net::partition`].
    pub fn heal(&self, i: usize) {
        self.nft(i, &["delete", "table", "inet", TABLE], None);
    }

    fn nft(&self, i: usize, args: &[&str], stdin: Option<&str>) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.ns(i), "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft (Debian's nftables)");
        if let Some(s) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(s.as_bytes())
                .expect("write nft rules");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("wait for nft");
        assert!(
            out.status.success(),
            "nft {args:?} in {}: {}",
            self.ns(i),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        teardown_network(&self.cf);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
