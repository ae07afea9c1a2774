//! The etcd store, for several managers on one etcd cluster (etcd v3 API over gRPC, through the
//! etcd-client crate). No consensus of our own: etcd's.
//!
//! Leader election with a lease and a transaction: each manager holds a lease (TTL
//! [`DEFAULT_TTL`] s, kept alive every third of it) and tries `if create_revision(LEADER) == 0
//! then put(LEADER, my URL, lease)`. The one whose put succeeds leads; the revision of that put
//! is its *term*. Every write the leader makes is a transaction guarded by
//! `create_revision(LEADER) == term`, so a manager that lost its lease (paused, partitioned,
//! killed and restarted) can never write again under the old term: no vNode placed twice.
//! When the leader dies its lease expires within the TTL, etcd deletes the key, and a follower's
//! next attempt (every [`RETRY`]) takes over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use super::{decode, encode, Role, Snapshot, Store, StoreError};
use crate::registry::{HostRecord, VnodeRecord};

/// Lease TTL in seconds: how long a dead leader keeps the others waiting, at most.
pub const DEFAULT_TTL: i64 = 3;
/// How often a follower tries to take the lead.
const RETRY: Duration = Duration::from_millis(500);

const LEADER: &str = "/vnode/leader";
const HOSTS: &str = "/vnode/hosts/";
const VNODES: &str = "/vnode/vnodes/";
const NEXT_ID: &str = "/vnode/next_id";

pub struct EtcdStore {
    client: Client,
    role: Arc<Mutex<Role>>,
    campaign: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Stop keeping the lease alive: it expires within the TTL and another manager may lead.
        self.campaign.abort();
    }
}

impl EtcdStore {
    /// Connects and starts campaigning in the background; `me` is this manager's URL.
    pub async fn connect(urls: &[String], me: &str, ttl: i64) -> Result<EtcdStore, StoreError> {
        let client = Client::connect(urls, None).await?;
        let role = Arc::new(Mutex::new(Role::Follower { leader: None }));
        let campaign = Campaign {
            client: client.clone(),
            role: Arc::clone(&role),
            me: me.to_owned(),
            ttl,
        };
        let campaign = tokio::spawn(campaign.run());
        Ok(EtcdStore {
            client,
            role,
            campaign,
        })
    }

    fn term(&self) -> Result<i64, StoreError> {
        match *self.role.lock().unwrap_or_else(|e| e.into_inner()) {
            Role::Leader { term } => Ok(term as i64),
            Role::Follower { .. } => Err(StoreError::NotLeader),
        }
    }

    /// Runs `ops` only if this manager still leads (and `extra` holds).
    async fn guarded(&self, extra: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, StoreError> {
        let term = self.term()?;
        let mut when = vec![Compare::create_revision(LEADER, CompareOp::Equal, term)];
        let guards = extra.len();
        when.extend(extra);
        let txn = Txn::new()
            .when(when)
            .and_then(ops)
            .or_else(vec![TxnOp::get(LEADER, None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        if guards == 0 {
            return Err(self.lost());
        }
        // Either the leadership or `extra` failed: tell which by looking at the leader key.
        let still = self
            .client
            .clone()
            .get(LEADER, None)
            .await?
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == term);
        if still {
            Ok(false)
        } else {
            Err(self.lost())
        }
    }

    fn lost(&self) -> StoreError {
        let mut r = self.role.lock().unwrap_or_else(|e| e.into_inner());
        *r = Role::Follower { leader: None };
        StoreError::NotLeader
    }

    async fn put(&self, key: String, body: Vec<u8>) -> Result<(), StoreError> {
        self.guarded(vec![], vec![TxnOp::put(key, body, None)])
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut c = self.client.clone();
        let mut snap = Snapshot::default();
        let opts = || Some(GetOptions::new().with_prefix());
        for kv in c.get(HOSTS, opts()).await?.kvs() {
            snap.hosts
                .push(decode(&String::from_utf8_lossy(kv.key()), kv.value())?);
        }
        for kv in c.get(VNODES, opts()).await?.kvs() {
            snap.vnodes
                .push(decode(&String::from_utf8_lossy(kv.key()), kv.value())?);
        }
        snap.vnodes.sort_by_key(|v: &VnodeRecord| v.id);
        Ok(snap)
    }

    async fn put_host(&self, h: &HostRecord) -> Result<(), StoreError> {
        self.put(format!("{HOSTS}{}", h.id), encode(h)).await
    }

    async fn put_vnode(&self, v: &VnodeRecord) -> Result<(), StoreError> {
        self.put(format!("{VNODES}{:020}", v.id), encode(v)).await
    }

    async fn delete_vnode(&self, id: u64) -> Result<(), StoreError> {
        let op = TxnOp::delete(format!("{VNODES}{id:020}"), None);
        self.guarded(vec![], vec![op]).await.map(|_| ())
    }

    async fn next_id(&self) -> Result<u64, StoreError> {
        loop {
            let resp = self.client.clone().get(NEXT_ID, None).await?;
            let (cur, rev) = match resp.kvs().first() {
                Some(kv) => (
                    std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0),
                    kv.mod_revision(),
                ),
                None => (0, 0),
            };
            let next = cur + 1;
            let unchanged = Compare::mod_revision(NEXT_ID, CompareOp::Equal, rev);
            let op = TxnOp::put(NEXT_ID, next.to_string(), None);
            if self.guarded(vec![unchanged], vec![op]).await? {
                return Ok(next);
            }
        }
    }

    fn role(&self) -> Role {
        self.role.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The background task that keeps this manager's lease alive and takes the lead when free.
struct Campaign {
    client: Client,
    role: Arc<Mutex<Role>>,
    me: String,
    ttl: i64,
}

impl Campaign {
    async fn run(self) {
        loop {
            if let Err(e) = self.term_of_office().await {
                tracing::warn!(error = %e, "etcd: lost the lease or the connection; campaigning again");
            }
            self.set(Role::Follower { leader: None });
            tokio::time::sleep(RETRY).await;
        }
    }

    fn set(&self, role: Role) {
        let mut r = self.role.lock().unwrap_or_else(|e| e.into_inner());
        if *r != role {
            tracing::info!(?role, "manager role");
        }
        *r = role;
    }

    /// One lease: campaign with it until it is lost.
    async fn term_of_office(&self) -> Result<(), etcd_client::Error> {
        let mut c = self.client.clone();
        let lease = c.lease_grant(self.ttl, None).await?.id();
        let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
        let every = Duration::from_millis((self.ttl as u64 * 1000) / 3);
        let mut next_keepalive = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_keepalive {
                keeper.keep_alive().await?;
                match acks.message().await? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Ok(()),
                }
                next_keepalive += every;
            }
            let claim = Txn::new()
                .when(vec![Compare::create_revision(LEADER, CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(
                    LEADER,
                    self.me.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else(vec![TxnOp::get(LEADER, None)]);
            let leader = c.get(LEADER, None).await?;
            let role = match leader.kvs().first() {
                Some(kv) if kv.lease() == lease => Role::Leader {
                    term: kv.create_revision() as u64,
                },
                Some(kv) => Role::Follower {
                    leader: Some(String::from_utf8_lossy(kv.value()).into_owned()),
                },
                None => {
                    let r = c.txn(claim).await?;
                    if r.succeeded() {
                        Role::Leader {
                            term: r.header().map_or(0, |h| h.revision()) as u64,
                        }
                    } else {
                        Role::Follower { leader: None }
                    }
                }
            };
            self.set(role);
            tokio::time::sleep(RETRY.min(every)).await;
        }
    }
}
