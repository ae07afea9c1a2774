//! `Open`: a new connection of the same vNode attaches to guest RAM a previous one allocated (how
//! a restored VMM takes its region over), with its size checked; other vNodes, wrong sizes and
//! freed regions are refused with an error that names the server.

mod mem_support;

use mem_support::{auth, pattern, Memd};
use remote_mem::protocol::ErrorCode;
use remote_mem::{MemClient, ReplicatedRegion, PAGE_SIZE};

#[test]
fn mem_open_attaches_to_a_region_left_by_an_earlier_connection() {
    let srv = Memd::start(&[]);
    let data = pattern(9, &[0, 5]);
    {
        let mut c = MemClient::connect(&srv.addr, &auth(42)).expect("connect");
        c.alloc_region(0, 8).expect("alloc");
        c.write_pages(0, &[0, 5], &data).expect("write");
    } // the first VMM goes away; its region stays
    let mut c = MemClient::connect(&srv.addr, &auth(42)).expect("connect again");
    let err = c
        .alloc_region(0, 8)
        .expect_err("alloc of an existing region");
    assert_eq!(err.code(), Some(ErrorCode::Exists));
    assert_eq!(c.open_region(0, 8).expect("open"), 8);
    assert_eq!(c.open_region(0, 0).expect("open any size"), 8);
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    c.read_pages(0, &[0, 5], &mut out).expect("read");
    assert_eq!(out, data, "the earlier connection's pages are there");

    let err = c.open_region(0, 9).expect_err("wrong size");
    assert_eq!(err.code(), Some(ErrorCode::SizeMismatch), "{err}");
    assert!(
        err.to_string().contains(&srv.addr),
        "names the server: {err}"
    );
    assert!(err.to_string().contains("has 8 pages"), "{err}");
    // The connection is still usable after a refused open.
    c.read_pages(0, &[5], &mut out[..PAGE_SIZE])
        .expect("read after refusal");

    let mut other = MemClient::connect(&srv.addr, &auth(43)).expect("connect");
    let err = other.open_region(0, 8).expect_err("another vNode's region");
    assert_eq!(err.code(), Some(ErrorCode::NoRegion), "{err}");

    c.free_region(0).expect("free");
    let err = c.open_region(0, 8).expect_err("freed region");
    assert_eq!(err.code(), Some(ErrorCode::NoRegion), "{err}");
    assert!(
        err.to_string().contains(&srv.addr),
        "names the server: {err}"
    );
}

#[test]
fn mem_open_of_a_replicated_region_attaches_on_both_servers() {
    let (a, b) = (Memd::start(&[]), Memd::start(&[]));
    let data = pattern(3, &[1]);
    {
        let mut r = ReplicatedRegion::new(
            0,
            MemClient::connect(&a.addr, &auth(7)).expect("primary"),
            MemClient::connect(&b.addr, &auth(7)).expect("backup"),
        );
        r.alloc(4).expect("alloc");
        r.write_pages(&[1], &data).expect("write");
    }
    let mut r = ReplicatedRegion::new(
        0,
        MemClient::connect(&a.addr, &auth(7)).expect("primary"),
        MemClient::connect(&b.addr, &auth(7)).expect("backup"),
    );
    r.open(4).expect("open on both");
    let mut out = vec![0u8; PAGE_SIZE];
    r.read_pages(&[1], &mut out).expect("read");
    assert_eq!(out, data);
    let mut backup = MemClient::connect(&b.addr, &auth(7)).expect("backup alone");
    backup.read_pages(0, &[1], &mut out).expect("read backup");
    assert_eq!(out, data, "the backup holds the page too");
    let err = r.open(5).expect_err("size mismatch");
    assert_eq!(err.code(), Some(ErrorCode::SizeMismatch), "{err}");
}
