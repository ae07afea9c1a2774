//! The manager on a real etcd (Debian's etcd-server, started here): the store suite shared with
//! SQLite, and HA: two managers, `kill -9` of the leader while vNodes are being created; the other
//! takes over within a few seconds and no vNode is lost or placed twice.

mod manager_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use manager_support::*;
use vnode_manager::store::{etcd::EtcdStore, suite, Role, Store};
use vnode_manager_client::types::{CreateVnode, HostKind, LeaderView, Size, VnodeView};
use vnode_manager_client::Client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_suite_on_etcd() {
    let dir = tempdir("mgr-etcd-suite");
    let (_etcd, url) = etcd(&dir);
    let urls = vec![url.clone()];
    let s = EtcdStore::connect(&urls, "http://me", 2).await.unwrap();
    let start = Instant::now();
    while !matches!(s.role(), Role::Leader { .. }) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never became leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    suite::run(s, |s| async move {
        drop(s);
        // The old lease still holds the leader key until it expires: the new store waits.
        let s = EtcdStore::connect(&[url], "http://me-again", 2)
            .await
            .unwrap();
        let start = Instant::now();
        while !matches!(s.role(), Role::Leader { .. }) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "never became leader again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s
    })
    .await;
}

fn leader_of(urls: &[&str]) -> Option<String> {
    urls.iter().find_map(|u| {
        let l: LeaderView = Client::new(u).get("/leader").ok()?;
        l.leader.then(|| u.to_string())
    })
}

fn spec(name: &str) -> CreateVnode {
    CreateVnode {
        name: Some(name.into()),
        vcpus: 1,
        mem: Size(16 << 20),
        local_mem: Size(4 << 20),
        disk_size: Size(0),
        kernel: "/k".into(),
        cmdline: String::new(),
    }
}

#[test]
fn leader_killed_during_creates_the_other_takes_over() {
    let dir = tempdir("mgr-etcd-ha");
    let (_etcd, eurl) = etcd(&dir);
    let store = format!("etcd:{eurl}");
    let (pa, pb) = (free_port(), free_port());
    let (ma, ua) = manager(&dir, "a", &store, pa);
    let (mb, ub) = manager(&dir, "b", &store, pb);
    let both = format!("{ua},{ub}");
    let start = Instant::now();
    let first = loop {
        if let Some(l) = leader_of(&[&ua, &ub]) {
            break l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no leader elected"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    keep_alive(&both, "c1", compute(64, "64G"));
    keep_alive(&both, "m1", server(HostKind::Memory, "64G"));
    keep_alive(&both, "m2", server(HostKind::Memory, "64G"));
    std::thread::sleep(Duration::from_millis(700));
    let (mut leader, follower) = if first == ua { (ma, mb) } else { (mb, ma) };
    let _keep = follower;
    let client = Client::new(&both);
    // Creates, each retried until acknowledged (a retry of a committed create is a 409 "exists":
    // the vNode is there once).
    let mut acked = Vec::new();
    let mut killed_at = None;
    let mut took_over = None;
    for i in 0..30 {
        let name = format!("ha-{i}");
        if i == 10 {
            leader.0.kill().unwrap(); // SIGKILL
            leader.0.wait().unwrap();
            killed_at = Some(Instant::now());
        }
        let t = Instant::now();
        loop {
            match client.post::<_, VnodeView>("/vnodes", &spec(&name)) {
                Ok(_) => break,
                Err(e) if e.status() == Some(409) && e.to_string().contains("exists") => break,
                Err(e) => {
                    assert!(
                        t.elapsed() < Duration::from_secs(20),
                        "create {name} never succeeded: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if let (Some(k), None) = (killed_at, took_over) {
            took_over = Some(k.elapsed());
        }
        acked.push(name);
    }
    let took = took_over.unwrap();
    eprintln!("the follower took over {took:?} after the leader's kill -9");
    assert!(took < Duration::from_secs(8), "takeover took {took:?}");
    let list: Vec<VnodeView> = client.get("/vnodes").unwrap();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for v in &list {
        *seen.entry(v.name.as_str()).or_default() += 1;
    }
    for n in &acked {
        assert_eq!(
            seen.get(n.as_str()),
            Some(&1),
            "{n} lost or placed twice: {seen:?}"
        );
    }
    assert_eq!(list.len(), acked.len(), "{seen:?}");
    let mut ids: Vec<u64> = list.iter().map(|v| v.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), list.len(), "ids are unique");
    let l: LeaderView = client.get("/leader").unwrap();
    assert!(l.leader_url.is_some());
}
