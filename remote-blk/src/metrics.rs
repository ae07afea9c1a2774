//! `vnode-blkd --metrics-listen`: the server's counters, its open connections, per-command
//! service-time histograms, and each export's size and allocated bytes, in one Prometheus
//! registry (`vnode_common::metrics`).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vnode_common::metrics::{LatencyFamily, Registry, Sampled, SampledFamily};

use crate::nbd::server::Server;

/// An export as the metrics see it: its name and the file behind it.
#[derive(Debug, Clone)]
pub struct ExportFile {
    pub name: String,
    pub path: PathBuf,
}

fn counter(
    r: &mut Registry,
    server: &Arc<Server>,
    name: &str,
    help: &str,
    pick: fn(&Server) -> &AtomicU64,
) {
    let s = Arc::clone(server);
    Sampled::counter(r, name, help, move || pick(&s).load(Ordering::Relaxed));
}

/// The registry for one server and its exports.
pub fn registry(server: &Arc<Server>, exports: Vec<ExportFile>) -> Registry {
    let mut r = Registry::default();
    counter(
        &mut r,
        server,
        "vnode_blkd_connections",
        "Connections accepted",
        |s| &s.stats().connections,
    );
    counter(
        &mut r,
        server,
        "vnode_blkd_requests",
        "NBD requests served",
        |s| &s.stats().requests,
    );
    counter(
        &mut r,
        server,
        "vnode_blkd_request_errors",
        "Requests answered with an error",
        |s| &s.stats().errors,
    );
    counter(
        &mut r,
        server,
        "vnode_blkd_read_bytes",
        "Bytes read by clients",
        |s| &s.stats().bytes_read,
    );
    counter(
        &mut r,
        server,
        "vnode_blkd_written_bytes",
        "Bytes written by clients",
        |s| &s.stats().bytes_written,
    );
    let s = Arc::clone(server);
    Sampled::gauge(
        &mut r,
        "vnode_blkd_open_connections",
        "Connections open now",
        move || s.stats().open_connections.load(Ordering::Relaxed),
    );
    let n = exports.len() as u64;
    Sampled::gauge(&mut r, "vnode_blkd_exports", "Exports served", move || n);
    let files = Arc::new(exports);
    let f = Arc::clone(&files);
    SampledFamily::gauge(
        &mut r,
        "vnode_blkd_export_size_bytes",
        "Size of each export",
        "export",
        move || {
            f.iter()
                .map(|e| {
                    (
                        e.name.clone(),
                        std::fs::metadata(&e.path).map_or(0, |m| m.len()),
                    )
                })
                .collect()
        },
    );
    SampledFamily::gauge(
        &mut r,
        "vnode_blkd_export_allocated_bytes",
        "Bytes each export's file takes on its file system",
        "export",
        move || {
            files
                .iter()
                .map(|e| {
                    let used = std::fs::metadata(&e.path).map_or(0, |m| m.blocks() * 512);
                    (e.name.clone(), used)
                })
                .collect()
        },
    );
    let lat = &server.stats().latency;
    LatencyFamily::register(
        &mut r,
        "vnode_blkd_request_duration",
        "Service time of NBD requests by command",
        "op",
        vec![
            ("read", lat.read.clone()),
            ("write", lat.write.clone()),
            ("flush", lat.flush.clone()),
            ("trim", lat.trim.clone()),
            ("write_zeroes", lat.write_zeroes.clone()),
        ],
    );
    r
}
