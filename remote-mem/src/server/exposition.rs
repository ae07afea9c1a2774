//! `vnode-memd --metrics-listen`: the server's counters, open connections, per-request service
//! time histograms, capacity, and what it stores (regions and bytes, in all and per vNode) as
//! one Prometheus registry (`vnode_common::metrics`), read at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vnode_common::metrics::{LatencyFamily, Registry, Sampled, SampledFamily};

use super::metrics::Metrics;
use super::{Server, Shared};
use crate::protocol::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

fn counter(
    r: &mut Registry,
    shared: &Arc<Shared>,
    name: &str,
    help: &str,
    pick: fn(&Metrics) -> &AtomicU64,
) {
    let s = Arc::clone(shared);
    Sampled::counter(r, name, help, move || {
        pick(&s.metrics).load(Ordering::Relaxed)
    });
}

fn counters(r: &mut Registry, s: &Arc<Shared>) {
    counter(
        r,
        s,
        "vnode_memd_connections",
        "Connections accepted",
        |m| &m.connections,
    );
    counter(
        r,
        s,
        "vnode_memd_auth_failures",
        "Connections refused for a wrong credential",
        |m| &m.auth_failures,
    );
    counter(
        r,
        s,
        "vnode_memd_bad_frames",
        "Connections closed on a malformed frame",
        |m| &m.bad_frames,
    );
    counter(
        r,
        s,
        "vnode_memd_requests_refused",
        "Requests answered with an error",
        |m| &m.requests_refused,
    );
    counter(
        r,
        s,
        "vnode_memd_pages_read",
        "Pages sent to clients",
        |m| &m.pages_read,
    );
    counter(
        r,
        s,
        "vnode_memd_pages_written",
        "Pages written by clients",
        |m| &m.pages_written,
    );
    counter(
        r,
        s,
        "vnode_memd_regions_migrated",
        "Regions moved to another server",
        |m| &m.regions_migrated,
    );
}

fn store_gauges(r: &mut Registry, shared: &Arc<Shared>) {
    let s = Arc::clone(shared);
    Sampled::gauge(
        r,
        "vnode_memd_open_connections",
        "Connections served now",
        move || s.live.load(Ordering::Relaxed) as u64,
    );
    let cap = shared.store.capacity_pages() * PAGE;
    Sampled::gauge(
        r,
        "vnode_memd_capacity_bytes",
        "Memory this server hands out (--capacity)",
        move || cap,
    );
    let s = Arc::clone(shared);
    Sampled::gauge(
        r,
        "vnode_memd_stored_bytes",
        "Memory allocated to regions",
        move || {
            (s.store
                .capacity_pages()
                .saturating_sub(s.store.free_pages()))
                * PAGE
        },
    );
    let s = Arc::clone(shared);
    Sampled::gauge(r, "vnode_memd_regions", "Regions held", move || {
        s.store.usage_by_vnode().iter().map(|u| u.1).sum()
    });
    let s = Arc::clone(shared);
    SampledFamily::gauge(
        r,
        "vnode_memd_vnode_regions",
        "Regions held per vNode",
        "vnode",
        move || {
            s.store
                .usage_by_vnode()
                .into_iter()
                .map(|(v, regions, _)| (v.to_string(), regions))
                .collect()
        },
    );
    let s = Arc::clone(shared);
    SampledFamily::gauge(
        r,
        "vnode_memd_vnode_stored_bytes",
        "Memory allocated per vNode",
        "vnode",
        move || {
            s.store
                .usage_by_vnode()
                .into_iter()
                .map(|(v, _, pages)| (v.to_string(), pages * PAGE))
                .collect()
        },
    );
}

impl Server {
    /// The server's metrics, for `--metrics-listen`.
    pub fn metrics_registry(&self) -> Registry {
        let mut r = Registry::default();
        counters(&mut r, &self.shared);
        store_gauges(&mut r, &self.shared);
        let lat = &self.shared.metrics.latency;
        LatencyFamily::register(
            &mut r,
            "vnode_memd_request_duration",
            "Service time of requests by kind, until the reply is ready to send",
            "op",
            vec![
                ("read", lat.read.clone()),
                ("write", lat.write.clone()),
                ("alloc", lat.alloc.clone()),
                ("open", lat.open.clone()),
                ("free", lat.free.clone()),
                ("migrate", lat.migrate.clone()),
            ],
        );
        r
    }
}
