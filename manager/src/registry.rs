//! The registry: the hosts (compute agents, memory servers, storage hosts) and the vNodes placed
//! on them, in memory. The durable part ([`HostRecord`], [`VnodeRecord`]) is written through the
//! [`crate::store::Store`] by the API layer before a request is acknowledged; what hosts report in
//! heartbeats (liveness, usage, counters, where exports are served) lives here only and is
//! reported again within a heartbeat after a restart.
//!
//! Every method is plain code over plain data: no I/O, no clock other than the `now` passed in.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vnode_manager_client::types::{
    Assignment, Capacity, CreateVnode, DiskPlacement, ExportSpec, Heartbeat, HeartbeatReply,
    HostKind, HostView, Placement, RegionPlacement, VnodeState, VnodeView,
};

use crate::credentials::Keys;
use crate::placement::{self, Node, Request, Strategy};

/// Heartbeats a host may miss before it is marked down.
pub const MISSED_BEATS: u32 = 3;

/// A registered host: what is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: String,
    pub kind: HostKind,
    pub addr: String,
    pub capacity: Capacity,
}

/// A vNode: what is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnodeRecord {
    pub id: u64,
    pub name: String,
    pub spec: CreateVnode,
    pub placement: Placement,
    pub state: VnodeState,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub console: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoFit(#[from] placement::NoFit),
    #[error("a vNode named {0:?} exists already")]
    NameTaken(String),
    #[error("no host {0:?} is registered")]
    UnknownHost(String),
    #[error("host {id:?} is registered as a {registered} host, not {claimed}")]
    KindMismatch {
        id: String,
        registered: HostKind,
        claimed: HostKind,
    },
}

struct Live {
    last_seen: Instant,
    used: Option<u64>,
}

/// Hosts and vNodes, and what hosts last reported.
pub struct Registry {
    hosts: BTreeMap<String, HostRecord>,
    vnodes: BTreeMap<u64, VnodeRecord>,
    live: HashMap<String, Live>,
    counters: HashMap<u64, serde_json::Value>,
    /// Export name -> `HOST:PORT` where its storage host serves it.
    served: HashMap<String, String>,
    interval: Duration,
    keys: Keys,
}

const MAX_VCPUS: u32 = 64;
const MIN_MEM: u64 = 1 << 20;
const MAX_NAME: usize = 64;

/// Checks a request's numbers before placement, each error naming the field.
pub fn validate(spec: &CreateVnode) -> Result<(), RegistryError> {
    let bad = |m: String| Err(RegistryError::Invalid(m));
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return bad(format!(
            "vcpus must be 1 to {MAX_VCPUS}, not {}",
            spec.vcpus
        ));
    }
    if spec.mem.0 < MIN_MEM || !spec.mem.0.is_multiple_of(4096) {
        return bad(format!(
            "mem must be at least 1 MiB and a multiple of 4 KiB, not {} bytes",
            spec.mem.0
        ));
    }
    if spec.local_mem.0 < MIN_MEM || spec.local_mem.0 > spec.mem.0 {
        return bad(format!(
            "local_mem (the ExCache) must be 1 MiB to mem ({} bytes), not {} bytes",
            spec.mem.0, spec.local_mem.0
        ));
    }
    if !spec.disk_size.0.is_multiple_of(512) {
        return bad(format!(
            "disk_size must be a multiple of 512 bytes, not {}",
            spec.disk_size.0
        ));
    }
    if spec.kernel.is_empty() {
        return bad("kernel must name the guest kernel file".into());
    }
    if let Some(n) = &spec.name {
        let ok = !n.is_empty()
            && n.len() <= MAX_NAME
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return bad(format!(
                "name {n:?} must be 1 to {MAX_NAME} of A-Z a-z 0-9 - _ ."
            ));
        }
    }
    Ok(())
}

impl Registry {
    pub fn new(interval: Duration, keys: Keys) -> Registry {
        Registry {
            hosts: BTreeMap::new(),
            vnodes: BTreeMap::new(),
            live: HashMap::new(),
            counters: HashMap::new(),
            served: HashMap::new(),
            interval,
            keys,
        }
    }

    /// Loads stored state; every host counts as seen `now` (it has three intervals to beat).
    pub fn load(&mut self, hosts: Vec<HostRecord>, vnodes: Vec<VnodeRecord>, now: Instant) {
        self.hosts = hosts.into_iter().map(|h| (h.id.clone(), h)).collect();
        self.vnodes = vnodes.into_iter().map(|v| (v.id, v)).collect();
        self.live = self
            .hosts
            .keys()
            .map(|id| {
                (
                    id.clone(),
                    Live {
                        last_seen: now,
                        used: None,
                    },
                )
            })
            .collect();
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A host (re-)registers. Returns the record to store if it changed.
    pub fn register(
        &mut self,
        rec: HostRecord,
        now: Instant,
    ) -> Result<Option<HostRecord>, RegistryError> {
        if let Some(old) = self.hosts.get(&rec.id) {
            if old.kind != rec.kind {
                return Err(RegistryError::KindMismatch {
                    id: rec.id,
                    registered: old.kind,
                    claimed: rec.kind,
                });
            }
        }
        self.live.insert(
            rec.id.clone(),
            Live {
                last_seen: now,
                used: None,
            },
        );
        if self.hosts.get(&rec.id) == Some(&rec) {
            return Ok(None);
        }
        self.hosts.insert(rec.id.clone(), rec.clone());
        Ok(Some(rec))
    }

    fn is_up(&self, id: &str, now: Instant) -> bool {
        self.live
            .get(id)
            .is_some_and(|l| now.duration_since(l.last_seen) <= self.interval * MISSED_BEATS)
    }

    /// The placement view: every host that is up, with what is allocated on it.
    fn cluster(&self, now: Instant) -> (placement::Cluster, Vec<String>, Vec<String>, Vec<String>) {
        let mut c = placement::Cluster::default();
        let (mut cn, mut mn, mut sn) = (Vec::new(), Vec::new(), Vec::new());
        for h in self.hosts.values().filter(|h| self.is_up(&h.id, now)) {
            let a = self.allocated(&h.id);
            let (list, names, cap, used) = match h.kind {
                HostKind::Compute => (
                    &mut c.compute,
                    &mut cn,
                    [u64::from(h.capacity.vcpus), h.capacity.local_mem.0],
                    [u64::from(a.vcpus), a.local_mem.0],
                ),
                HostKind::Memory => (&mut c.memory, &mut mn, [h.capacity.mem.0, 0], [a.mem.0, 0]),
                HostKind::Storage => (
                    &mut c.storage,
                    &mut sn,
                    [h.capacity.disk.0, 0],
                    [a.disk.0, 0],
                ),
            };
            list.push(Node {
                name: h.id.clone(),
                cap,
                used,
            });
            names.push(h.id.clone());
        }
        (c, cn, mn, sn)
    }

    /// What is allocated on host `id`: active vNodes' compute and memory, every vNode's disk.
    pub fn allocated(&self, id: &str) -> Capacity {
        let mut a = Capacity::default();
        for v in self.vnodes.values() {
            let p = &v.placement;
            if v.state.is_active() {
                if p.compute == id {
                    a.vcpus += v.spec.vcpus;
                    a.local_mem.0 += v.spec.local_mem.0;
                }
                for r in &p.regions {
                    a.mem.0 += r.size.0 * (u64::from(r.primary == id) + u64::from(r.backup == id));
                }
            }
            if let Some(d) = p.disk.as_ref().filter(|d| d.storage == id) {
                a.disk.0 += d.size.0;
            }
        }
        a
    }

    /// Places a new vNode with id `id`; returns its record (to store, then [`Registry::insert`]).
    pub fn place(
        &self,
        spec: &CreateVnode,
        id: u64,
        now: Instant,
    ) -> Result<VnodeRecord, RegistryError> {
        validate(spec)?;
        let name = spec.name.clone().unwrap_or_else(|| format!("vnode-{id}"));
        if self.vnodes.values().any(|v| v.name == name) {
            return Err(RegistryError::NameTaken(name));
        }
        let (cluster, cn, mn, sn) = self.cluster(now);
        let req = Request {
            vcpus: u64::from(spec.vcpus),
            local_mem: spec.local_mem.0,
            mem: spec.mem.0,
            disk: spec.disk_size.0,
        };
        let d = cluster.place(&req, Strategy::LeastAllocated)?;
        let placement = Placement {
            compute: cn[d.compute].clone(),
            regions: vec![RegionPlacement {
                region: 0,
                size: spec.mem,
                primary: mn[d.mem_primary].clone(),
                backup: mn[d.mem_backup].clone(),
            }],
            disk: d.storage.map(|s| DiskPlacement {
                storage: sn[s].clone(),
                export: format!("vnode-{id}-disk"),
                size: spec.disk_size,
            }),
        };
        Ok(VnodeRecord {
            id,
            name,
            spec: spec.clone(),
            placement,
            state: VnodeState::Pending,
            exit_code: None,
            message: None,
            console: None,
        })
    }

    pub fn insert(&mut self, v: VnodeRecord) {
        self.vnodes.insert(v.id, v);
    }

    pub fn remove(&mut self, id: u64) -> Option<VnodeRecord> {
        self.counters.remove(&id);
        self.vnodes.remove(&id)
    }

    pub fn vnode(&self, id: u64) -> Option<&VnodeRecord> {
        self.vnodes.get(&id)
    }

    pub fn host(&self, id: &str) -> Option<&HostRecord> {
        self.hosts.get(id)
    }

    /// A heartbeat from `host`. Returns the vNode records it changed (to store) and the reply.
    pub fn heartbeat(
        &mut self,
        host: &str,
        hb: Heartbeat,
        now: Instant,
    ) -> Result<(Vec<VnodeRecord>, HeartbeatReply), RegistryError> {
        let kind = self
            .hosts
            .get(host)
            .ok_or_else(|| RegistryError::UnknownHost(host.to_owned()))?
            .kind;
        self.live.insert(
            host.to_owned(),
            Live {
                last_seen: now,
                used: hb.used,
            },
        );
        for e in hb.exports {
            self.served.insert(e.name, e.addr);
        }
        let mut changed = Vec::new();
        for r in hb.vnodes {
            let Some(v) = self
                .vnodes
                .get_mut(&r.id)
                .filter(|v| v.placement.compute == host)
            else {
                continue;
            };
            if let Some(c) = r.counters {
                self.counters.insert(r.id, c);
            }
            let before = v.clone();
            // An ended vNode stays ended: a stale "running" never revives it.
            if v.state.is_active() {
                v.state = r.state;
                v.exit_code = r.exit_code;
                v.message = r.message;
            }
            if r.console.is_some() {
                v.console = r.console;
            }
            if *v != before {
                changed.push(v.clone());
            }
        }
        let reply = self.reply(host, kind);
        Ok((changed, reply))
    }

    fn reply(&self, host: &str, kind: HostKind) -> HeartbeatReply {
        let mut reply = HeartbeatReply {
            interval_ms: self.interval.as_millis() as u64,
            ..Default::default()
        };
        let active = self.vnodes.values().filter(|v| v.state.is_active());
        match kind {
            HostKind::Compute => {
                reply.run = active
                    .filter(|v| v.placement.compute == host)
                    .filter_map(|v| self.assignment(v))
                    .collect();
            }
            HostKind::Memory => {
                reply.keep_vnodes = active
                    .filter(|v| {
                        v.placement
                            .regions
                            .iter()
                            .any(|r| r.primary == host || r.backup == host)
                    })
                    .map(|v| v.id)
                    .collect();
            }
            HostKind::Storage => {
                reply.exports = self
                    .vnodes
                    .values()
                    .filter_map(|v| v.placement.disk.as_ref())
                    .filter(|d| d.storage == host)
                    .map(|d| ExportSpec {
                        name: d.export.clone(),
                        size: d.size,
                        credential: self.keys.blk_credential(&d.export),
                    })
                    .collect();
            }
        }
        reply
    }

    /// What the compute agent needs to run `v`; `None` until its disk is served.
    fn assignment(&self, v: &VnodeRecord) -> Option<Assignment> {
        let addr = |h: &str| self.hosts.get(h).map(|r| r.addr.clone());
        let r = v.placement.regions.first()?;
        let disk = match &v.placement.disk {
            None => None,
            Some(d) => Some(format!(
                "nbd://{}/{}",
                self.served.get(&d.export)?,
                d.export
            )),
        };
        Some(Assignment {
            id: v.id,
            spec: v.spec.clone(),
            mem_servers: vec![addr(&r.primary)?, addr(&r.backup)?],
            disk,
            mem_credential: self.keys.mem_credential(v.id),
            disk_credential: v
                .placement
                .disk
                .as_ref()
                .map(|d| self.keys.blk_credential(&d.export)),
        })
    }

    pub fn host_view(&self, h: &HostRecord, now: Instant) -> HostView {
        let live = self.live.get(&h.id);
        HostView {
            id: h.id.clone(),
            kind: h.kind,
            addr: h.addr.clone(),
            capacity: h.capacity,
            allocated: self.allocated(&h.id),
            used: live.and_then(|l| l.used),
            up: self.is_up(&h.id, now),
            last_seen_ms: live.map_or(0, |l| now.duration_since(l.last_seen).as_millis() as u64),
            vnodes: self
                .vnodes
                .values()
                .filter(|v| uses(v, &h.id))
                .map(|v| v.id)
                .collect(),
        }
    }

    pub fn hosts(&self, now: Instant) -> Vec<HostView> {
        self.hosts
            .values()
            .map(|h| self.host_view(h, now))
            .collect()
    }

    pub fn vnode_view(&self, v: &VnodeRecord, now: Instant) -> VnodeView {
        VnodeView {
            id: v.id,
            name: v.name.clone(),
            spec: v.spec.clone(),
            placement: v.placement.clone(),
            state: v.state,
            exit_code: v.exit_code,
            message: v.message.clone(),
            counters: self.counters.get(&v.id).cloned(),
            console: v.console.clone(),
            hosts_down: self
                .hosts
                .keys()
                .filter(|h| uses(v, h) && !self.is_up(h, now))
                .cloned()
                .collect(),
        }
    }

    pub fn vnodes(&self, now: Instant) -> Vec<VnodeView> {
        self.vnodes
            .values()
            .map(|v| self.vnode_view(v, now))
            .collect()
    }

    /// Finds a vNode by id or name.
    pub fn find(&self, key: &str) -> Option<&VnodeRecord> {
        match key.parse::<u64>() {
            Ok(id) => self.vnodes.get(&id),
            Err(_) => self.vnodes.values().find(|v| v.name == key),
        }
    }

    /// Highest vNode id in use (ids are never reused).
    pub fn max_id(&self) -> u64 {
        self.vnodes.keys().next_back().copied().unwrap_or(0)
    }
}

/// Whether `v` uses host `h` for anything.
fn uses(v: &VnodeRecord, h: &str) -> bool {
    let p = &v.placement;
    p.compute == h
        || p.regions.iter().any(|r| r.primary == h || r.backup == h)
        || p.disk.as_ref().is_some_and(|d| d.storage == h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnode_manager_client::types::{Size, VnodeReport};

    fn sz(s: &str) -> Size {
        Size(vnode_common::size::parse_size(s).unwrap())
    }

    fn reg() -> (Registry, Instant) {
        let now = Instant::now();
        let mut r = Registry::new(Duration::from_secs(1), Keys::for_tests());
        let cap = |vcpus, local: &str, mem: &str, disk: &str| Capacity {
            vcpus,
            local_mem: sz(local),
            mem: sz(mem),
            disk: sz(disk),
        };
        for (id, kind, c) in [
            ("c1", HostKind::Compute, cap(4, "1G", "0", "0")),
            ("m1", HostKind::Memory, cap(0, "0", "4G", "0")),
            ("m2", HostKind::Memory, cap(0, "0", "4G", "0")),
            ("s1", HostKind::Storage, cap(0, "0", "0", "10G")),
        ] {
            let rec = HostRecord {
                id: id.into(),
                kind,
                addr: format!("{id}:1"),
                capacity: c,
            };
            assert!(r.register(rec, now).unwrap().is_some());
        }
        (r, now)
    }

    fn spec() -> CreateVnode {
        CreateVnode {
            name: None,
            vcpus: 2,
            mem: sz("1G"),
            local_mem: sz("256M"),
            disk_size: sz("1G"),
            kernel: "k".into(),
            cmdline: String::new(),
        }
    }

    #[test]
    fn lifecycle_allocates_and_releases() {
        let (mut r, now) = reg();
        let v = r.place(&spec(), 1, now).unwrap();
        r.insert(v);
        assert_eq!(r.allocated("c1").vcpus, 2);
        assert_eq!(r.allocated("m1").mem, sz("1G"));
        assert_eq!(r.allocated("m2").mem, sz("1G"));
        // The compute agent gets nothing until the storage host serves the disk.
        let (_, rep) = r.heartbeat("c1", Heartbeat::default(), now).unwrap();
        assert!(rep.run.is_empty());
        let (_, rep) = r.heartbeat("s1", Heartbeat::default(), now).unwrap();
        assert_eq!(rep.exports.len(), 1);
        let hb = Heartbeat {
            exports: vec![vnode_manager_client::types::ServedExport {
                name: rep.exports[0].name.clone(),
                addr: "s1:9".into(),
            }],
            ..Default::default()
        };
        r.heartbeat("s1", hb, now).unwrap();
        let (_, rep) = r.heartbeat("c1", Heartbeat::default(), now).unwrap();
        assert_eq!(rep.run.len(), 1);
        assert_eq!(rep.run[0].disk.as_deref(), Some("nbd://s1:9/vnode-1-disk"));
        assert_eq!(rep.run[0].mem_servers.len(), 2);
        let (_, rep) = r.heartbeat("m1", Heartbeat::default(), now).unwrap();
        assert_eq!(rep.keep_vnodes, vec![1]);
        // The VMM is killed: compute and memory are released, the disk is kept.
        let hb = Heartbeat {
            vnodes: vec![VnodeReport {
                id: 1,
                state: VnodeState::Failed,
                exit_code: None,
                message: Some("killed by signal 9".into()),
                counters: None,
                console: None,
            }],
            ..Default::default()
        };
        let (changed, rep) = r.heartbeat("c1", hb, now).unwrap();
        assert_eq!(changed.len(), 1);
        assert!(rep.run.is_empty());
        assert_eq!(r.allocated("c1"), Capacity::default());
        let (_, rep) = r.heartbeat("m1", Heartbeat::default(), now).unwrap();
        assert!(rep.keep_vnodes.is_empty(), "the region is reclaimed");
        assert_eq!(r.allocated("s1").disk, sz("1G"));
        r.remove(1);
        let (_, rep) = r.heartbeat("s1", Heartbeat::default(), now).unwrap();
        assert!(rep.exports.is_empty());
    }

    #[test]
    fn down_hosts_are_not_placed_on_and_are_reported() {
        let (mut r, now) = reg();
        r.insert(r.place(&spec(), 1, now).unwrap());
        let later = now + Duration::from_secs(4);
        for h in ["c1", "m1", "s1"] {
            r.heartbeat(h, Heartbeat::default(), later).unwrap();
        }
        let v = r.vnode_view(r.vnode(1).unwrap(), later);
        assert_eq!(v.hosts_down, vec!["m2".to_string()]);
        let e = r.place(&spec(), 2, later).unwrap_err().to_string();
        assert!(e.contains("m1 (3 GiB free)"), "{e}");
        assert!(!r.hosts(later).iter().find(|h| h.id == "m2").unwrap().up);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let (r, now) = reg();
        let mut s = spec();
        s.vcpus = 0;
        assert!(r
            .place(&s, 1, now)
            .unwrap_err()
            .to_string()
            .contains("vcpus"));
        let mut s = spec();
        s.local_mem = sz("2G");
        assert!(r
            .place(&s, 1, now)
            .unwrap_err()
            .to_string()
            .contains("local_mem"));
        let mut s = spec();
        s.name = Some("a b".into());
        assert!(r
            .place(&s, 1, now)
            .unwrap_err()
            .to_string()
            .contains("name"));
        let mut s = spec();
        s.mem = sz("1P");
        s.local_mem = sz("1G");
        let e = r.place(&s, 1, now).unwrap_err().to_string();
        assert!(e.contains("memory servers") && e.contains("m1"), "{e}");
    }
}
