//! Prometheus metrics for every server, written once: the `prometheus-client` registry and its
//! OpenMetrics text, a lock-free latency histogram (also what `vnode --stats` takes its
//! percentiles from), counters and gauges sampled from a server's own state at scrape time, and a
//! small HTTP listener for `--metrics-listen ADDR` (`GET /metrics`; 404 for any other path).
//!
//! Names: `vnode_memd_*`, `vnode_blkd_*`, `vnode_*` (the VMM); counters get OpenMetrics' `_total`
//! from the encoder; latencies are histograms in seconds (`*_seconds`). Help texts end without a
//! period: the encoder adds one.

mod histogram;
mod http;
mod sampled;

pub use histogram::{LatencyFamily, LatencyHistogram};
pub use http::{router, serve, MetricsError, MetricsServer};
pub use prometheus_client;
pub use prometheus_client::registry::Registry;
pub use sampled::{Sampled, SampledFamily};

/// The content type of `encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry's metrics in the OpenMetrics text format (ends with `# EOF`).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a metric's own bug.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}
