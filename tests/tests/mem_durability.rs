//! What a memory server keeps when processes die: the memory log across a kill -9 and restart,
//! reads failing over to the backup when the primary is killed, and a region migrated from
//! one server to another while its client switches over.

mod mem_support;

use mem_support::{auth, pattern, temp_dir, Memd};
use remote_mem::{ClientError, ErrorCode, MemClient, ReplicatedRegion, Role, PAGE_SIZE};

#[test]
fn mem_contents_survive_kill9_and_restart() {
    let dir = temp_dir("data");
    let d = dir.to_str().expect("utf-8 path");
    let mut srv = Memd::start(&["--data-dir", d]);
    let pages: Vec<u64> = (0..300).map(|i| i * 3).collect();
    let data = pattern(42, &pages);
    {
        let mut c = MemClient::connect(&srv.addr, &auth(11)).expect("connect");
        c.alloc_region(7, 1024).expect("alloc");
        c.alloc_region(8, 4).expect("alloc");
        c.write_pages(7, &pages, &data).expect("write");
        c.free_region(8).expect("free");
    }
    srv.kill9();
    // Same data dir, same port is not needed: the client reconnects to the new address.
    let srv = Memd::start(&["--data-dir", d]);
    assert!(srv.stderr().contains("restored"), "{}", srv.stderr());
    let mut c = MemClient::connect(&srv.addr, &auth(11)).expect("connect");
    let mut out = vec![0u8; data.len()];
    c.read_pages(7, &pages, &mut out)
        .expect("read after restart");
    assert_eq!(out, data);
    let mut z = vec![1u8; PAGE_SIZE];
    c.read_pages(7, &[1], &mut z).expect("unwritten page");
    assert!(z.iter().all(|&b| b == 0));
    let err = c
        .read_pages(8, &[0], &mut z)
        .expect_err("freed before the crash");
    assert_eq!(err.code(), Some(ErrorCode::NoRegion));
    // Capacity accounting includes the restored region: 64M = 16384 pages, 1024 in use.
    assert_eq!(c.server_pages(), (16384, 16384 - 1024));
    let _ = std::fs::remove_dir_all(&dir);
}

fn replicated(primary: &Memd, backup: &Memd, region: u64) -> ReplicatedRegion {
    let p = MemClient::connect(&primary.addr, &auth(3)).expect("primary");
    let b = MemClient::connect(&backup.addr, &auth(3)).expect("backup");
    ReplicatedRegion::new(region, p, b)
}

#[test]
fn mem_replicated_reads_fail_over_when_the_primary_dies() {
    let mut primary = Memd::start(&[]);
    let mut backup = Memd::start(&[]);
    let mut r = replicated(&primary, &backup, 5);
    r.alloc(512).expect("alloc on both");
    let pages: Vec<u64> = (0..512).collect();
    let data = pattern(5, &pages);
    r.write_pages(&pages, &data).expect("write to both");
    let mut out = vec![0u8; data.len()];
    r.read_pages(&pages, &mut out).expect("read");
    assert_eq!(out, data);
    assert_eq!(r.read_server(), Some(primary.addr.as_str()));

    // A prefetch in flight when the primary dies completes from the backup.
    let prefetch = r.submit_read(&pages[..16]).expect("submit");
    primary.kill9();
    let mut pf = vec![0u8; 16 * PAGE_SIZE];
    r.complete_read(prefetch, &pages[..16], &mut pf)
        .expect("prefetch completes from the backup");
    assert_eq!(pf, &data[..16 * PAGE_SIZE]);
    out.fill(0);
    r.read_pages(&pages, &mut out)
        .expect("read fails over to the backup");
    assert_eq!(out, data);
    assert!(r.degraded());
    assert_eq!(r.read_server(), Some(backup.addr.as_str()));
    // Writes go on to the backup alone.
    let new = pattern(6, &[10]);
    r.write_pages(&[10], &new).expect("degraded write");
    let mut one = vec![0u8; PAGE_SIZE];
    r.read_pages(&[10], &mut one).expect("read");
    assert_eq!(one, new);

    backup.kill9();
    let err = r.read_pages(&[10], &mut one).expect_err("no replica left");
    assert!(matches!(err, ClientError::BothFailed { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&primary.addr) && msg.contains(&backup.addr),
        "names both: {msg}"
    );
}

#[test]
fn mem_replicated_writes_survive_backup_death() {
    let primary = Memd::start(&[]);
    let mut backup = Memd::start(&[]);
    let mut r = replicated(&primary, &backup, 6);
    r.alloc(8).expect("alloc");
    backup.kill9();
    let data = pattern(8, &[0, 7]);
    r.write_pages(&[0, 7], &data)
        .expect("primary alone takes the write");
    assert!(r.degraded());
    let mut out = vec![0u8; data.len()];
    r.read_pages(&[0, 7], &mut out).expect("read");
    assert_eq!(out, data);
}

#[test]
fn mem_replicated_reads_fail_over_from_a_hung_primary_with_a_timeout() {
    let primary = Memd::start(&[]);
    let backup = Memd::start(&[]);
    let mut p = MemClient::connect(&primary.addr, &auth(3)).expect("primary");
    p.set_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("timeout");
    let b = MemClient::connect(&backup.addr, &auth(3)).expect("backup");
    let mut r = ReplicatedRegion::new(9, p, b);
    r.alloc(4).expect("alloc");
    let data = pattern(9, &[3]);
    r.write_pages(&[3], &data).expect("write");
    primary.freeze();
    let mut out = vec![0u8; PAGE_SIZE];
    let t = std::time::Instant::now();
    // A prefetch sent to the hung primary times out and is served by the backup.
    let prefetch = r.submit_read(&[3]).expect("submit");
    r.complete_read(prefetch, &[3], &mut out)
        .expect("prefetch fails over after the timeout");
    assert_eq!(out, data);
    out.fill(0);
    r.read_pages(&[3], &mut out)
        .expect("fails over after the timeout");
    assert_eq!(out, data);
    assert!(r.degraded());
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn mem_region_migrates_between_servers() {
    let src = Memd::start(&[]);
    let dst = Memd::start(&[]);
    let mut c = MemClient::connect(&src.addr, &auth(21)).expect("connect");
    let n = 600u64;
    c.alloc_region(4, n).expect("alloc");
    let pages: Vec<u64> = (0..n).step_by(2).collect();
    let data = pattern(4, &pages);
    c.write_pages(4, &pages, &data).expect("write");
    // Another connection of the same vNode (another fault thread) is on the source too.
    let mut other = MemClient::connect(&src.addr, &auth(21)).expect("connect");

    c.migrate_region(4, &dst.addr).expect("migrate");

    // The source now refuses the region, naming where it went.
    let mut one = vec![0u8; PAGE_SIZE];
    let err = other.read_pages(4, &[0], &mut one).expect_err("moved");
    assert_eq!(err.code(), Some(ErrorCode::Moved));
    assert!(err.to_string().contains(&dst.addr), "{err}");
    let err = other
        .write_pages(4, &[0], &pattern(1, &[0]))
        .expect_err("no write lands on the stale copy");
    assert_eq!(err.code(), Some(ErrorCode::Moved));
    // The source gave the capacity back.
    assert_eq!(
        MemClient::connect(&src.addr, &auth(21))
            .expect("connect")
            .server_pages()
            .1,
        16384
    );
    // The client switches over: same data on the target, unwritten pages still zero.
    let mut c = MemClient::connect(&dst.addr, &auth(21)).expect("connect to target");
    let mut out = vec![0u8; data.len()];
    c.read_pages(4, &pages, &mut out).expect("read on target");
    assert_eq!(out, data);
    c.read_pages(4, &[1], &mut one).expect("read");
    assert!(one.iter().all(|&b| b == 0));
    // A migration that cannot reach its target fails and leaves the region where it is.
    let err = c
        .migrate_region(4, "127.0.0.1:1")
        .expect_err("nobody listens on port 1");
    assert_eq!(err.code(), Some(ErrorCode::Internal), "{err}");
    c.read_pages(4, &pages, &mut out)
        .expect("region still served");
    assert_eq!(out, data);
}

#[test]
fn mem_replicated_region_migrates_and_other_handles_follow() {
    let a = Memd::start(&[]);
    let b = Memd::start(&[]);
    let mut c = Memd::start(&[]);
    let mut r1 = replicated(&a, &b, 12);
    // Another fault thread's handle on the same region.
    let mut r2 = replicated(&a, &b, 12);
    r1.alloc(64).expect("alloc");
    let pages: Vec<u64> = (0..64).collect();
    let data = pattern(12, &pages);
    r1.write_pages(&pages, &data).expect("write");

    r1.migrate(Role::Primary, &c.addr)
        .expect("migrate primary a -> c");
    assert_eq!(r1.server(Role::Primary), Some(c.addr.as_str()));
    let mut out = vec![0u8; data.len()];
    r1.read_pages(&pages, &mut out)
        .expect("read from the new primary");
    assert_eq!(out, data);

    // r2 still talks to a: it gets Moved and follows to c by itself.
    out.fill(0);
    r2.read_pages(&pages, &mut out).expect("r2 follows");
    assert_eq!(out, data);
    assert_eq!(r2.server(Role::Primary), Some(c.addr.as_str()));
    assert!(!r2.degraded());
    let new = pattern(13, &[1]);
    r2.write_pages(&[1], &new)
        .expect("write through r2 to c and b");

    // The old server no longer holds the region.
    let mut direct = MemClient::connect(&a.addr, &auth(3)).expect("connect");
    let mut one = vec![0u8; PAGE_SIZE];
    let err = direct.read_pages(12, &[1], &mut one).expect_err("moved");
    assert_eq!(err.moved_to(), Some(c.addr.as_str()));

    // The new primary dies: the backup has every write, including r2's.
    c.kill9();
    r1.read_pages(&[1], &mut one).expect("fail over to b");
    assert_eq!(one, new);
    assert_eq!(r1.read_server(), Some(b.addr.as_str()));
}

#[test]
fn mem_sync_mode_survives_restart_too() {
    let dir = temp_dir("sync");
    let d = dir.to_str().expect("utf-8 path");
    let mut srv = Memd::start(&["--data-dir", d, "--sync"]);
    let data = pattern(77, &[0, 5]);
    {
        let mut c = MemClient::connect(&srv.addr, &auth(1)).expect("connect");
        c.alloc_region(2, 8).expect("alloc");
        c.write_pages(2, &[0, 5], &data).expect("write");
    }
    srv.kill9();
    let srv = Memd::start(&["--data-dir", d, "--sync"]);
    let mut c = MemClient::connect(&srv.addr, &auth(1)).expect("connect");
    let mut out = vec![0u8; data.len()];
    c.read_pages(2, &[0, 5], &mut out).expect("read");
    assert_eq!(out, data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mem_migration_under_concurrent_writes_loses_no_acknowledged_write() {
    let src = Memd::start(&[]);
    let dst = Memd::start(&[]);
    let n = 2048u64;
    let mut c = MemClient::connect(&src.addr, &auth(40)).expect("connect");
    c.alloc_region(1, n).expect("alloc");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let addr = src.addr.clone();
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            // Writes page i % n with generation i; remembers the last acknowledged generation.
            let mut w = MemClient::connect(&addr, &auth(40)).expect("connect");
            let mut acked = vec![None; n as usize];
            let mut followed = false;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || !followed {
                let page = i % n;
                let data = pattern(i, &[page]);
                match w.write_pages(1, &[page], &data) {
                    Ok(()) => {
                        acked[page as usize] = Some(i);
                        i += 1;
                    }
                    Err(e) => {
                        let target = e.moved_to().expect("only Moved is expected").to_string();
                        w = w.connect_like(&target).expect("connect to target");
                        followed = true;
                    }
                }
            }
            acked
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    c.migrate_region(1, &dst.addr)
        .expect("migrate while writes go on");
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().expect("writer");
    let mut c = MemClient::connect(&dst.addr, &auth(40)).expect("connect");
    let mut out = vec![0u8; PAGE_SIZE];
    for (page, gen) in acked.iter().enumerate() {
        c.read_pages(1, &[page as u64], &mut out).expect("read");
        match gen {
            Some(g) => assert_eq!(out, pattern(*g, &[page as u64]), "page {page}"),
            None => assert!(out.iter().all(|&b| b == 0), "page {page}"),
        }
    }
}

#[test]
fn mem_log_reports_a_corrupt_page_serves_its_previous_version_and_is_reattached() {
    let dir = temp_dir("log-corrupt");
    let d = dir.to_str().expect("utf-8 path");
    let mut srv = Memd::start(&["--data-dir", d, "--sync"]);
    let (v1, v2) = (pattern(1, &[5, 6]), pattern(2, &[5, 6]));
    {
        let mut c = MemClient::connect(&srv.addr, &auth(12)).expect("connect");
        c.alloc_region(3, 64).expect("alloc");
        c.write_pages(3, &[5, 6], &v1).expect("first versions");
        c.write_pages(3, &[5, 6], &v2).expect("second versions");
    }
    srv.kill9();
    // Bit rot in page 5's latest version (slot 1: the second write) while the server is down.
    let file = dir.join(format!("{:016x}-{:016x}.mlog", 12, 3));
    let mut img = std::fs::read(&file).expect("region file");
    let at = remote_mem::server::pagefile::slot_offset(64, 5, 1) as usize + 100;
    img[at] ^= 0x40;
    std::fs::write(&file, &img).expect("corrupt");
    let srv = Memd::start(&["--data-dir", d]);
    // Without the terminal colours tracing may add.
    let mut log = String::new();
    let mut esc = false;
    for ch in srv.stderr().chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    assert!(log.contains("torn or corrupt record"), "{log}");
    assert!(log.contains("page=5"), "{log}");
    // The vNode reattaches its recovered region by id and credential.
    let mut c = MemClient::connect(&srv.addr, &auth(12)).expect("connect");
    assert_eq!(c.open_region(3, 64).expect("reattach"), 64);
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    c.read_pages(3, &[5, 6], &mut out).expect("read");
    assert_eq!(
        &out[..PAGE_SIZE],
        &v1[..PAGE_SIZE],
        "page 5: its previous version, never the corrupt one"
    );
    assert_eq!(&out[PAGE_SIZE..], &v2[PAGE_SIZE..], "page 6: intact");
    // Another vNode cannot attach it.
    let mut other = MemClient::connect(&srv.addr, &auth(13)).expect("connect");
    assert_eq!(
        other.open_region(3, 64).expect_err("not its region").code(),
        Some(ErrorCode::NoRegion)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
