//! Disks on real `vnode-blkd` processes while one dies (`kill -9`) or hangs (`kill -STOP`):
//! a replicated disk (`--disk URI,backup=URI`) carries the guest's `test=blk` run on the
//! survivor (the guest verifies every sector, `ok:true`, no I/O error, the stats show the
//! fail-over); an unreplicated disk whose server hangs gives the guest I/O errors after the
//! deadline, never a hang; and a backup that dies and comes back is resynced before it rejoins,
//! so that when the primary dies afterwards every byte is on the backup.

mod blk_common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use blk_common::failover::{
    check_blk_failover, check_io_error_not_hang, disk_files, export, run_blk_and_act, stop,
};
use blk_common::{pattern, start_blkd, Server, TempDir};
use remote_blk::nbd::client::{Command, ConnectOptions};
use remote_blk::replica::{ReplicaState, ReplicatedClient};

/// A replicated disk whose primary `fault` hits mid-run: the guest is unharmed, the stats show
/// the fail-over within the bound, and the backup's file holds everything (a second, read-only
/// guest verifies it).
fn replicated_primary_fault(fault: impl FnOnce(&mut Server)) {
    let dir = TempDir::new("failover-blk");
    let (pf, bf) = disk_files(&dir);
    let mut primary = start_blkd(&["--export", &export(&pf)]);
    let backup = start_blkd(&["--export", &export(&bf)]);
    let disk = format!("{},backup={}", primary.uri("disk"), backup.uri("disk"));
    let (f, at) = run_blk_and_act(&disk, &pf, || fault(&mut primary));
    check_blk_failover(&f, at, &bf);
}

#[test]
fn failover_blk_primary_kill9() {
    replicated_primary_fault(|p| {
        let _ = p.child.kill();
    });
}

#[test]
fn failover_blk_primary_stop() {
    replicated_primary_fault(|p| stop(p));
}

#[test]
fn failover_blk_unreplicated_stop_is_an_io_error_not_a_hang() {
    let dir = TempDir::new("failover-blk-single");
    let (pf, _) = disk_files(&dir);
    let server = start_blkd(&["--export", &export(&pf)]);
    let (f, at) = run_blk_and_act(&server.uri("disk"), &pf, || stop(&server));
    check_io_error_not_hang(&f, at);
}

fn wait_state(c: &ReplicatedClient, i: usize, want: ReplicaState) {
    let start = Instant::now();
    while c.status().replicas[i].state != want {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replica {i} never {want:?}: {:?}",
            c.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pipelined writes of `chunks` 64 KiB chunks with `seed`; returns after all completed.
fn write_all(c: &ReplicatedClient, chunks: std::ops::Range<u64>, seed: u64) {
    let (tx, rx) = mpsc::channel();
    let n = chunks.end - chunks.start;
    for i in chunks {
        let tx = tx.clone();
        let cmd = Command::Write {
            offset: i * 65536,
            data: pattern(seed + i, 65536),
            fua: false,
        };
        c.submit(cmd, Box::new(move |r| tx.send((i, r)).expect("alive")))
            .expect("submit");
    }
    for _ in 0..n {
        let (i, r) = rx.recv().expect("completion");
        r.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
}

#[test]
fn failover_blk_backup_returns_is_resynced_then_survives_the_primary() {
    let dir = TempDir::new("failover-blk-resync");
    let (pf, bf) = disk_files(&dir);
    let sock = |n: &str| dir.path(n).display().to_string();
    let (ps, bs) = (sock("p.sock"), sock("b.sock"));
    let mut primary = start_blkd(&["--socket", &ps, "--export", &export(&pf)]);
    let mut backup = start_blkd(&["--socket", &bs, "--export", &export(&bf)]);
    let c = ReplicatedClient::connect(
        &[&primary.uri("disk"), &backup.uri("disk")],
        &ConnectOptions::default(),
    )
    .expect("connect");
    // Chunk i holds pattern(seed + i): seed 1000 everywhere first, then 2000 over [200, 600)
    // while the backup is away (it dies with writes in flight), then 3000 over [500, 700) while
    // it resyncs or after.
    write_all(&c, 0..1024, 1000);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        let _ = backup.child.kill();
        let _ = backup.child.wait();
        backup
    });
    write_all(&c, 200..600, 2000);
    let _dead = killer.join().expect("killer");
    wait_state(&c, 1, ReplicaState::Failed);
    assert_eq!(c.status().state, "degraded");
    assert!(c.status().replicas[1].dirty_bytes > 0);
    write_all(&c, 300..400, 2000); // while it is away (same data: idempotent)
    let backup = start_blkd(&["--socket", &bs, "--export", &export(&bf)]);
    write_all(&c, 500..700, 3000);
    wait_state(&c, 1, ReplicaState::Healthy);
    let st = c.status();
    assert_eq!(
        (st.state, st.resyncs, st.failovers),
        ("healthy", 1, 1),
        "{st:?}"
    );
    assert!(st.degraded_ms > 0);
    c.flush().expect("flush both");
    // The primary dies: every read is served by the resynced backup.
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    let want = |i: u64| {
        let seed = match i {
            500..700 => 3000,
            200..500 => 2000,
            _ => 1000,
        };
        pattern(seed + i, 65536)
    };
    let mut buf = vec![0u8; 65536];
    for i in 0..1024u64 {
        c.read_at(&mut buf, i * 65536)
            .expect("read from the backup");
        assert!(buf == want(i), "chunk {i} differs on the backup");
    }
    let st = c.status();
    assert_eq!((st.state, st.failovers), ("degraded", 2), "{st:?}");
    assert_eq!(st.replicas[0].state, ReplicaState::Failed);
    // And the backup's file itself.
    let file = std::fs::read(&bf).expect("backup file");
    for i in 0..1024u64 {
        let at = (i * 65536) as usize;
        assert!(file[at..at + 65536] == want(i), "chunk {i} of the file");
    }
    drop(c);
    drop(backup);
}
