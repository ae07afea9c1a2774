//! Placement: where a new vNode's vCPUs, memory and disk go. Pure code over plain numbers, so the
//! unit tests and the benchmark need no manager, store or network.
//!
//! As Kubernetes' scheduler and Nomad do, first *filter* (the hosts with room for the request),
//! then *score* the survivors and take the best. The score is least-allocated by the dominant
//! resource: the host whose most-used resource would be least used after placing the vNode. That
//! spreads load evenly (the benchmark measures max/min utilisation), against [`Strategy::FirstFit`],
//! the baseline that takes the first host with room.
//!
//! Guest RAM is one region (the memory path serves guest RAM as region 0), put on a primary and
//! a backup on two *distinct* memory servers; the disk, if any, is one export on a storage server.

use std::fmt::Write as _;

use vnode_common::size::format_size;

/// One server's capacity and what is allocated on it, per resource. For a compute host `a` is
/// vCPUs and `b` local memory; for memory and storage servers only `a` (bytes) is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub cap: [u64; 2],
    pub used: [u64; 2],
}

impl Node {
    pub fn new(name: impl Into<String>, cap: [u64; 2]) -> Node {
        Node {
            name: name.into(),
            cap,
            used: [0, 0],
        }
    }

    fn free(&self, i: usize) -> u64 {
        self.cap[i].saturating_sub(self.used[i])
    }

    fn fits(&self, want: [u64; 2]) -> bool {
        want[0] <= self.free(0) && want[1] <= self.free(1)
    }

    /// The dominant resource's utilisation after adding `want`, in millionths (integer maths so
    /// ties break deterministically, by position).
    fn score(&self, want: [u64; 2]) -> u64 {
        (0..2)
            .filter(|&i| self.cap[i] > 0)
            .map(|i| (self.used[i] + want[i]) as u128 * 1_000_000 / self.cap[i] as u128)
            .max()
            .unwrap_or(0) as u64
    }

    /// Utilisation of resource `i`, 0.0 to 1.0 (0 when there is no capacity).
    pub fn utilisation(&self, i: usize) -> f64 {
        if self.cap[i] == 0 {
            0.0
        } else {
            self.used[i] as f64 / self.cap[i] as f64
        }
    }
}

/// What a vNode needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub vcpus: u64,
    pub local_mem: u64,
    /// Guest RAM; needed twice (primary and backup).
    pub mem: u64,
    /// 0: no disk.
    pub disk: u64,
}

/// The servers to choose from, by kind (the hosts that are up).
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub compute: Vec<Node>,
    pub memory: Vec<Node>,
    pub storage: Vec<Node>,
}

/// Where the vNode goes: indices into [`Cluster`]'s lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub compute: usize,
    pub mem_primary: usize,
    pub mem_backup: usize,
    pub storage: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Least-allocated by the dominant resource (the manager's choice).
    LeastAllocated,
    /// The first host with room (the benchmark's baseline).
    FirstFit,
}

/// Nothing fits: the message names the resource and every host (up to a few) with what it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoFit(pub String);

/// Most hosts named in a [`NoFit`] message.
const NAMED: usize = 8;

impl Cluster {
    /// Chooses hosts for `req` (does not allocate: see [`Cluster::apply`]).
    pub fn place(&self, req: &Request, strategy: Strategy) -> Result<Decision, NoFit> {
        let compute = pick(&self.compute, [req.vcpus, req.local_mem], strategy, None)
            .ok_or_else(|| self.no_compute(req))?;
        let mem_primary = pick(&self.memory, [req.mem, 0], strategy, None)
            .ok_or_else(|| self.no_memory(req, 2))?;
        let mem_backup = pick(&self.memory, [req.mem, 0], strategy, Some(mem_primary))
            .ok_or_else(|| self.no_memory(req, 2))?;
        let storage = match req.disk {
            0 => None,
            d => Some(
                pick(&self.storage, [d, 0], strategy, None).ok_or_else(|| self.no_storage(req))?,
            ),
        };
        Ok(Decision {
            compute,
            mem_primary,
            mem_backup,
            storage,
        })
    }

    /// Allocates `req` on the hosts of `d`.
    pub fn apply(&mut self, req: &Request, d: &Decision) {
        let c = &mut self.compute[d.compute];
        c.used[0] += req.vcpus;
        c.used[1] += req.local_mem;
        self.memory[d.mem_primary].used[0] += req.mem;
        self.memory[d.mem_backup].used[0] += req.mem;
        if let Some(s) = d.storage {
            self.storage[s].used[0] += req.disk;
        }
    }

    fn no_compute(&self, req: &Request) -> NoFit {
        let vcpu_short = !self.compute.iter().any(|n| n.free(0) >= req.vcpus);
        let (what, idx, unit): (String, usize, fn(u64) -> String) = if vcpu_short {
            (format!("{} free vCPUs", req.vcpus), 0, |v| v.to_string())
        } else {
            (
                format!(
                    "{} free local memory for the ExCache",
                    format_size(req.local_mem)
                ),
                1,
                format_size,
            )
        };
        NoFit(format!(
            "no compute host has {what}: {}",
            list(&self.compute, |n| unit(n.free(idx)))
        ))
    }

    fn no_memory(&self, req: &Request, copies: usize) -> NoFit {
        NoFit(format!(
            "no {copies} distinct memory servers have {} free each (primary and backup): {}",
            format_size(req.mem),
            list(&self.memory, |n| format_size(n.free(0)))
        ))
    }

    fn no_storage(&self, req: &Request) -> NoFit {
        NoFit(format!(
            "no storage server has {} free disk: {}",
            format_size(req.disk),
            list(&self.storage, |n| format_size(n.free(0)))
        ))
    }
}

/// The best host for `want` by `strategy`, skipping `except`.
fn pick(
    nodes: &[Node],
    want: [u64; 2],
    strategy: Strategy,
    except: Option<usize>,
) -> Option<usize> {
    let mut fit = nodes
        .iter()
        .enumerate()
        .filter(|&(i, n)| Some(i) != except && n.fits(want));
    match strategy {
        Strategy::FirstFit => fit.next().map(|(i, _)| i),
        Strategy::LeastAllocated => fit.min_by_key(|(_, n)| n.score(want)).map(|(i, _)| i),
    }
}

/// "a (2 free), b (1 free)", or "none registered and up".
fn list(nodes: &[Node], free: impl Fn(&Node) -> String) -> String {
    if nodes.is_empty() {
        return "none registered and up".into();
    }
    let mut s = String::new();
    for (i, n) in nodes.iter().take(NAMED).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{} ({} free)", n.name, free(n));
    }
    if nodes.len() > NAMED {
        let _ = write!(s, " and {} more", nodes.len() - NAMED);
    }
    s
}

/// max/min utilisation of resource `i` over `nodes` (infinite when one is empty and another not).
pub fn imbalance(nodes: &[Node], i: usize) -> f64 {
    let u: Vec<f64> = nodes.iter().map(|n| n.utilisation(i)).collect();
    let max = u.iter().copied().fold(0.0, f64::max);
    let min = u.iter().copied().fold(f64::INFINITY, f64::min);
    if max == 0.0 {
        1.0
    } else {
        max / min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn cluster() -> Cluster {
        Cluster {
            compute: vec![Node::new("a", [4, 8 * G]), Node::new("b", [8, 8 * G])],
            memory: vec![
                Node::new("m1", [16 * G, 0]),
                Node::new("m2", [16 * G, 0]),
                Node::new("m3", [4 * G, 0]),
            ],
            storage: vec![Node::new("s1", [100 * G, 0])],
        }
    }

    fn req(vcpus: u64, mem: u64, disk: u64) -> Request {
        Request {
            vcpus,
            local_mem: G,
            mem,
            disk,
        }
    }

    #[test]
    fn least_allocated_spreads_and_backup_is_distinct() {
        let mut c = cluster();
        let r = req(2, 4 * G, 10 * G);
        let d = c.place(&r, Strategy::LeastAllocated).unwrap();
        assert_eq!(
            c.compute[d.compute].name, "b",
            "b is less loaded after placing"
        );
        assert_ne!(d.mem_primary, d.mem_backup);
        assert_eq!(d.storage, Some(0));
        c.apply(&r, &d);
        let d2 = c.place(&r, Strategy::LeastAllocated).unwrap();
        c.apply(&r, &d2);
        let used: Vec<u64> = c.memory.iter().map(|n| n.used[0]).collect();
        assert_eq!(used.iter().sum::<u64>(), 16 * G, "two copies of two vNodes");
        assert!(used.iter().all(|&u| u <= 8 * G), "{used:?}");
    }

    #[test]
    fn first_fit_takes_the_first_host_with_room() {
        let c = cluster();
        let d = c.place(&req(2, G, 0), Strategy::FirstFit).unwrap();
        assert_eq!(
            (d.compute, d.mem_primary, d.mem_backup, d.storage),
            (0, 0, 1, None)
        );
    }

    #[test]
    fn no_fit_names_the_resource_and_the_hosts() {
        let mut c = cluster();
        c.compute[0].used[0] = 2;
        c.compute[1].used[0] = 7;
        let e = c
            .place(&req(4, G, 0), Strategy::LeastAllocated)
            .unwrap_err();
        assert_eq!(
            e.0,
            "no compute host has 4 free vCPUs: a (2 free), b (1 free)"
        );
        let e = c
            .place(&req(1, 17 * G, 0), Strategy::LeastAllocated)
            .unwrap_err();
        assert_eq!(
            e.0,
            "no 2 distinct memory servers have 17 GiB free each (primary and backup): m1 (16 GiB free), m2 (16 GiB free), m3 (4 GiB free)"
        );
        let e = c
            .place(&req(1, G, 200 * G), Strategy::LeastAllocated)
            .unwrap_err();
        assert!(
            e.0.starts_with("no storage server has 200 GiB free disk: s1 (100 GiB free)"),
            "{e}"
        );
        let mut big = req(1, G, 0);
        big.local_mem = 9 * G;
        let e = c.place(&big, Strategy::LeastAllocated).unwrap_err();
        assert!(e.0.contains("9 GiB free local memory"), "{e}");
    }

    #[test]
    fn one_memory_server_cannot_hold_both_copies() {
        let mut c = cluster();
        c.memory.truncate(1);
        let e = c
            .place(&req(1, G, 0), Strategy::LeastAllocated)
            .unwrap_err();
        assert!(e.0.contains("2 distinct memory servers"), "{e}");
        c.memory.clear();
        let e = c
            .place(&req(1, G, 0), Strategy::LeastAllocated)
            .unwrap_err();
        assert!(e.0.ends_with("none registered and up"), "{e}");
    }

    #[test]
    fn many_equal_vnodes_balance_exactly() {
        let mut c = Cluster {
            compute: (0..10)
                .map(|i| Node::new(format!("c{i}"), [64, 64 * G]))
                .collect(),
            memory: (0..10)
                .map(|i| Node::new(format!("m{i}"), [64 * G, 0]))
                .collect(),
            storage: (0..5)
                .map(|i| Node::new(format!("s{i}"), [64 * G, 0]))
                .collect(),
        };
        for _ in 0..100 {
            let r = req(2, 2 * G, G);
            let d = c.place(&r, Strategy::LeastAllocated).unwrap();
            c.apply(&r, &d);
        }
        assert_eq!(imbalance(&c.compute, 0), 1.0);
        assert_eq!(imbalance(&c.memory, 0), 1.0);
        assert_eq!(imbalance(&c.storage, 0), 1.0);
    }
}
