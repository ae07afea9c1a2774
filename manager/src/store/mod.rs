//! Where the manager's state is durable: one [`Store`] trait, two implementations. SQLite
//! ([`sqlite::SqliteStore`], the default: one file, no other process) and etcd
//! ([`etcd::EtcdStore`], for several managers: they elect a leader through an etcd lease, and
//! only the leader's writes are accepted, by a transaction that checks it still holds the lease).
//!
//! A write returns only once it is durable (SQLite: committed with `synchronous=FULL`; etcd:
//! committed by the etcd cluster), so a request the manager acknowledged survives `kill -9`.

pub mod etcd;
pub mod sqlite;

use async_trait::async_trait;

use crate::registry::{HostRecord, VnodeRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("etcd: {0}")]
    Etcd(Box<etcd_client::Error>),
    #[error("stored record {key} is not valid JSON")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("this manager is not the leader (any more)")]
    NotLeader,
    #[error("bad --store {0:?}: use sqlite:PATH or etcd:URL[,URL]...")]
    Spec(String),
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> StoreError {
        StoreError::Etcd(Box::new(e))
    }
}

/// Everything stored.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub hosts: Vec<HostRecord>,
    pub vnodes: Vec<VnodeRecord>,
}

/// Whether this manager may write, and who may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This manager leads; `term` changes each time it (re)gains leadership, so the caller
    /// reloads the state others may have written meanwhile.
    Leader { term: u64 },
    /// Another manager leads (its URL, when known).
    Follower { leader: Option<String> },
}

#[async_trait]
pub trait Store: Send + Sync {
    async fn load(&self) -> Result<Snapshot, StoreError>;
    async fn put_host(&self, h: &HostRecord) -> Result<(), StoreError>;
    async fn put_vnode(&self, v: &VnodeRecord) -> Result<(), StoreError>;
    async fn delete_vnode(&self, id: u64) -> Result<(), StoreError>;
    /// A fresh vNode id, never handed out before (durably).
    async fn next_id(&self) -> Result<u64, StoreError>;
    /// This manager's role now.
    fn role(&self) -> Role;
}

/// Opens `sqlite:PATH` or `etcd:URL[,URL]...`; `me` is this manager's URL (told to followers).
pub async fn open(spec: &str, me: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if let Some(path) = spec.strip_prefix("sqlite:") {
        return Ok(std::sync::Arc::new(sqlite::SqliteStore::open(
            std::path::Path::new(path),
        )?));
    }
    if let Some(urls) = spec.strip_prefix("etcd:") {
        let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
        return Ok(std::sync::Arc::new(
            etcd::EtcdStore::connect(&urls, me, etcd::DEFAULT_TTL).await?,
        ));
    }
    Err(StoreError::Spec(spec.to_owned()))
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, body: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(body).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize: plain data, string keys")
}

/// The same suite runs on both stores (`sqlite::tests`, and `tests/tests/manager_etcd.rs`
/// against a real etcd).
pub mod suite {
    use super::*;
    use vnode_manager_client::types::{
        Capacity, CreateVnode, HostKind, Placement, Size, VnodeState,
    };

    pub fn host(id: &str) -> HostRecord {
        HostRecord {
            id: id.into(),
            kind: HostKind::Memory,
            addr: format!("{id}:7000"),
            capacity: Capacity {
                mem: Size(1 << 30),
                ..Default::default()
            },
        }
    }

    pub fn vnode(id: u64) -> VnodeRecord {
        VnodeRecord {
            id,
            name: format!("v{id}"),
            spec: CreateVnode {
                name: None,
                vcpus: 1,
                mem: Size(1 << 30),
                local_mem: Size(1 << 28),
                disk_size: Size(0),
                kernel: "k".into(),
                cmdline: String::new(),
            },
            placement: Placement {
                compute: "c".into(),
                regions: vec![],
                disk: None,
            },
            state: VnodeState::Pending,
            exit_code: None,
            message: None,
            console: None,
        }
    }

    /// Puts, overwrites, deletes and ids, then reopens with `reopen` and checks all survived.
    pub async fn run<S: Store, F, Fut>(s: S, reopen: F)
    where
        F: FnOnce(S) -> Fut,
        Fut: std::future::Future<Output = S>,
    {
        assert!(matches!(s.role(), Role::Leader { .. }));
        let a = s.next_id().await.unwrap();
        let b = s.next_id().await.unwrap();
        assert!(b > a && a > 0, "ids grow: {a} {b}");
        s.put_host(&host("m1")).await.unwrap();
        let mut h = host("m1");
        h.addr = "elsewhere:1".into();
        s.put_host(&h).await.unwrap();
        s.put_host(&host("m2")).await.unwrap();
        s.put_vnode(&vnode(a)).await.unwrap();
        let mut v = vnode(b);
        s.put_vnode(&v).await.unwrap();
        v.state = VnodeState::Running;
        s.put_vnode(&v).await.unwrap();
        s.delete_vnode(a).await.unwrap();
        s.delete_vnode(999_999).await.unwrap();
        let s = reopen(s).await;
        let snap = s.load().await.unwrap();
        let mut ids: Vec<&str> = snap.hosts.iter().map(|h| h.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["m1", "m2"]);
        assert_eq!(
            snap.hosts.iter().find(|h| h.id == "m1").unwrap().addr,
            "elsewhere:1"
        );
        assert_eq!(snap.vnodes, vec![v]);
        assert!(s.next_id().await.unwrap() > b, "ids are never reused");
    }
}
