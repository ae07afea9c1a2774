//! `--metrics-listen` on vnode-memd and vnode-blkd: after real client traffic, `GET /metrics`
//! is valid OpenMetrics for a real parser (the Python client's), and its values match what the
//! clients did: pages and bytes moved, regions and bytes held per vNode and export, and one
//! latency observation per request.

use std::process::{Command, Stdio};
use std::time::Duration;

use remote_blk::nbd::client::{ConnectOptions, NbdClient};
use remote_mem::{ClientAuth, MemClient};
use vnode_common::ready::{spawn_and_wait, Started};
use vnode_common::secret::Secret;
use vnode_tests::bin;
use vnode_tests::prom::{http_get, parse_openmetrics, sample};

const SECRET: &str = "metrics-test-secret";

fn auth(vnode: u64, key: &str) -> ClientAuth {
    let key = Secret::from_bytes(key.as_bytes().to_vec()).expect("a valid key");
    ClientAuth::from_cluster_key(vnode, &key)
}

fn start(name: &str, args: &[&str]) -> Started {
    let mut c = Command::new(bin(name));
    c.args(args)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("VNODE_SECRET", SECRET)
        .env("VNODE_LOG", "warn")
        .stdin(Stdio::null());
    let s = spawn_and_wait(&mut c, Duration::from_secs(30)).expect("server starts");
    assert!(
        s.metrics_addr.is_some(),
        "no `metrics on` line: {:?}",
        s.printed
    );
    s
}

fn scrape(s: &Started) -> serde_json::Value {
    let addr = s.metrics_addr.as_deref().expect("metrics address");
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(addr, "/other").0, 404);
    parse_openmetrics(&body)
}

#[test]
fn memd_metrics_count_what_clients_did() {
    let s = start(
        "vnode-memd",
        &["--listen", "127.0.0.1:0", "--capacity", "16M"],
    );
    let mut c = MemClient::connect(&s.addr, &auth(42, SECRET)).expect("connect");
    c.alloc_region(0, 256).expect("alloc");
    let data = vec![7u8; 4096 * 8];
    c.write_pages(0, &[0, 1, 2, 3, 4, 5, 6, 7], &data)
        .expect("write");
    let mut back = vec![0u8; 4096 * 3];
    c.read_pages(0, &[1, 2, 3], &mut back).expect("read");
    assert_eq!(back, data[..4096 * 3]);
    let m = scrape(&s);
    let v = |n: &str, l: &[(&str, &str)]| {
        sample(&m, n, l).unwrap_or_else(|| panic!("no {n} {l:?}: {m}"))
    };
    assert_eq!(v("vnode_memd_pages_written_total", &[]), 8.0);
    assert_eq!(v("vnode_memd_pages_read_total", &[]), 3.0);
    assert_eq!(v("vnode_memd_connections_total", &[]), 1.0);
    assert_eq!(v("vnode_memd_open_connections", &[]), 1.0);
    assert_eq!(v("vnode_memd_capacity_bytes", &[]), (16 << 20) as f64);
    assert_eq!(v("vnode_memd_stored_bytes", &[]), (256 * 4096) as f64);
    assert_eq!(v("vnode_memd_regions", &[]), 1.0);
    assert_eq!(v("vnode_memd_vnode_regions", &[("vnode", "42")]), 1.0);
    assert_eq!(
        v("vnode_memd_vnode_stored_bytes", &[("vnode", "42")]),
        (256 * 4096) as f64
    );
    let hist = &m["vnode_memd_request_duration_seconds"];
    assert_eq!(hist["type"], "histogram");
    assert_eq!(hist["unit"], "seconds");
    for (op, n) in [("alloc", 1.0), ("write", 1.0), ("read", 1.0), ("free", 0.0)] {
        let count = v("vnode_memd_request_duration_seconds_count", &[("op", op)]);
        assert_eq!(count, n, "{op}");
        let inf = v(
            "vnode_memd_request_duration_seconds_bucket",
            &[("op", op), ("le", "+Inf")],
        );
        assert_eq!(inf, n, "{op}");
    }
    // A wrong credential is counted.
    assert!(MemClient::connect(&s.addr, &auth(1, "wrong-key")).is_err());
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let m = scrape(&s);
    assert_eq!(sample(&m, "vnode_memd_auth_failures_total", &[]), Some(1.0));
    assert_eq!(sample(&m, "vnode_memd_open_connections", &[]), Some(0.0));
    drop(s);
}

#[test]
fn blkd_metrics_count_what_clients_did() {
    let dir = std::env::temp_dir().join(format!("vnode-blkd-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let img = dir.join("d.img");
    let export = format!("d={}:4M", img.display());
    let s = start(
        "vnode-blkd",
        // --public: the export is open to any client (the metrics, not the auth, are tested).
        &[
            "--listen",
            "127.0.0.1:0",
            "--export",
            &export,
            "--public",
            "d",
        ],
    );
    let uri = format!("nbd://{}/d", s.addr);
    let c = NbdClient::connect(&uri, &ConnectOptions::default()).expect("connect");
    let data = vec![0x5au8; 64 << 10];
    c.write_at(&data, 0, false).expect("write");
    c.write_at(&data, 1 << 20, true).expect("write fua");
    c.flush().expect("flush");
    let mut back = vec![0u8; 64 << 10];
    c.read_at(&mut back, 1 << 20).expect("read");
    assert_eq!(back, data);
    let m = scrape(&s);
    let v = |n: &str, l: &[(&str, &str)]| {
        sample(&m, n, l).unwrap_or_else(|| panic!("no {n} {l:?}: {m}"))
    };
    assert_eq!(v("vnode_blkd_written_bytes_total", &[]), (128 << 10) as f64);
    assert_eq!(v("vnode_blkd_read_bytes_total", &[]), (64 << 10) as f64);
    assert_eq!(v("vnode_blkd_requests_total", &[]), 4.0);
    assert_eq!(v("vnode_blkd_request_errors_total", &[]), 0.0);
    assert_eq!(v("vnode_blkd_open_connections", &[]), 1.0);
    assert_eq!(v("vnode_blkd_exports", &[]), 1.0);
    assert_eq!(
        v("vnode_blkd_export_size_bytes", &[("export", "d")]),
        (4 << 20) as f64
    );
    assert!(v("vnode_blkd_export_allocated_bytes", &[("export", "d")]) >= (128 << 10) as f64);
    for (op, n) in [("write", 2.0), ("flush", 1.0), ("read", 1.0), ("trim", 0.0)] {
        assert_eq!(
            v("vnode_blkd_request_duration_seconds_count", &[("op", op)]),
            n,
            "{op}"
        );
    }
    drop(c);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
