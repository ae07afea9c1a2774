//! Client-side replication: writes reach every replica before they complete; reads fail over;
//! a dead replica leaves the write set and the others carry on.

mod blk_common;

use std::sync::mpsc;

use blk_common::{pattern, start_blkd, TempDir};
use remote_blk::nbd::client::{Command, ConnectOptions};
use remote_blk::replica::{ReplicaError, ReplicatedClient};

#[test]
fn writes_reach_every_replica_and_reads_fail_over() {
    let dir = TempDir::new("blk-replica");
    let files: Vec<_> = (0..3).map(|i| dir.path(&format!("r{i}.img"))).collect();
    let mut servers: Vec<_> = files
        .iter()
        .map(|f| start_blkd(&["--export", &format!("disk={}:8M", f.display())]))
        .collect();
    let uris: Vec<String> = servers.iter().map(|s| s.uri("disk")).collect();
    let refs: Vec<&str> = uris.iter().map(String::as_str).collect();
    let c = ReplicatedClient::connect(&refs, &ConnectOptions::default()).expect("connect");
    assert_eq!((c.size(), c.replicas()), (8 << 20, 3));

    // Pipelined writes, FUA: when each completes, every replica's file already has it.
    let (tx, rx) = mpsc::channel();
    for i in 0..64u64 {
        let tx = tx.clone();
        let cmd = Command::Write {
            offset: i * 65536,
            data: pattern(i, 65536),
            fua: true,
        };
        c.submit(cmd, Box::new(move |r| tx.send((i, r)).expect("alive")))
            .expect("submit");
    }
    for _ in 0..64 {
        let (i, r) = rx.recv().expect("completion");
        r.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    c.flush().expect("flush");
    let want: Vec<u8> = (0..64u64).flat_map(|i| pattern(i, 65536)).collect();
    for f in &files {
        let got = std::fs::read(f).expect("replica file");
        assert!(got[..want.len()] == want[..], "{} differs", f.display());
    }

    // The primary dies: reads fail over to the next replica, writes fail (not all durable).
    drop(servers.remove(0));
    let mut got = vec![0u8; 65536];
    c.read_at(&mut got, 5 * 65536).expect("read fails over");
    assert!(got == pattern(5, 65536));
    let (tx, rx) = mpsc::channel();
    c.submit(
        Command::Read {
            offset: 7 * 65536,
            len: 65536,
        },
        Box::new(move |r| tx.send(r).expect("alive")),
    )
    .expect("submit read");
    assert!(
        rx.recv()
            .expect("completion")
            .expect("async read fails over")
            == pattern(7, 65536)
    );
    // Writes go on on the survivors (the dead replica is out of the write set), FUA: durable
    // on both of them when it returns.
    c.write_at(&pattern(99, 4096), 0, true)
        .expect("the survivors take the write");
    for f in &files[1..] {
        let got = std::fs::read(f).expect("replica file");
        assert!(
            got[..4096] == pattern(99, 4096)[..],
            "{} lacks it",
            f.display()
        );
    }
    let st = c.status();
    assert_eq!((st.state, st.failovers), ("degraded", 1), "{st:?}");
}

#[test]
fn replicas_must_agree_on_size() {
    let dir = TempDir::new("blk-replica-size");
    let a = start_blkd(&["--export", &format!("d={}:1M", dir.path("a").display())]);
    let b = start_blkd(&["--export", &format!("d={}:2M", dir.path("b").display())]);
    let r = ReplicatedClient::connect(&[&a.uri("d"), &b.uri("d")], &ConnectOptions::default());
    assert!(matches!(
        r,
        Err(ReplicaError::SizeMismatch { index: 1, .. })
    ));
}
