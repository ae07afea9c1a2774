//! `GET /metrics`: the VM's counters and the ExCache's fault-latency histograms in the Prometheus
//! text format, through prometheus-client. The counters are read at each scrape from the same
//! atomics `GET /vm/counters` reads, so both always agree.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::memory::stats::EXCACHE_STATS;

/// ExCache values that are levels, not running totals.
const GAUGES: [&str; 3] = ["resident_pages", "max_resident_pages", "limit_pages"];

/// The exposition text.
pub fn exposition() -> String {
    let mut reg = Registry::with_prefix("vnode");
    let counters = crate::metrics::counters();
    let vmm = serde_json::to_value(&counters.vmm).expect("counters always serialize");
    add_counters(&mut reg, "vmm", "VMM counter", &vmm);
    if let (Some(ex), Some(stats)) = (&counters.excache, EXCACHE_STATS.get()) {
        let ex = serde_json::to_value(ex).expect("counters always serialize");
        let sub = reg.sub_registry_with_prefix("excache");
        add_counters(sub, "", "ExCache counter", &ex);
        add_counters(
            sub,
            "time_us",
            "fault thread time by phase, microseconds",
            &ex["time_us"],
        );
        for g in GAUGES {
            let v = ex[g].as_u64().unwrap_or(0);
            sub.register(g, format!("ExCache {g}"), ConstGauge::new(v as i64));
        }
        if let Some(r) = &ex.get("replication").filter(|r| !r.is_null()) {
            add_replication(sub, r);
        }
        let (all, fetched) = stats.latency_histograms();
        sub.register(
            "fault_latency_seconds",
            "service time of missing-page faults",
            all,
        );
        sub.register(
            "fetch_fault_latency_seconds",
            "service time of missing-page faults that fetched their page from a server",
            fetched,
        );
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// Replicated guest RAM: one gauge per state (1 for the current one), the repair's counters
/// and levels.
fn add_replication(reg: &mut Registry, r: &serde_json::Value) {
    let reg = reg.sub_registry_with_prefix("replication");
    for state in ["healthy", "re-replicating", "degraded"] {
        let on = i64::from(r["state"] == state);
        let reg = reg.sub_registry_with_label((
            std::borrow::Cow::Borrowed("state"),
            std::borrow::Cow::Borrowed(state),
        ));
        reg.register(
            "state",
            "guest RAM's replication state (1: current)",
            ConstGauge::new(on),
        );
    }
    for k in ["failovers", "rereplications", "degraded_ms"] {
        let v = r[k].as_u64().unwrap_or(0);
        reg.register(
            k,
            format!("guest RAM replication {k}"),
            ConstCounter::new(v),
        );
    }
    let copied = r["copied_pages"].as_u64().unwrap_or(0) as i64;
    reg.register(
        "copied_pages",
        "pages copied to the copy being filled",
        ConstGauge::new(copied),
    );
    let stale = r["stale_copies"].as_array().map_or(0, Vec::len) as i64;
    reg.register(
        "stale_copies",
        "failed servers whose stale copy is not freed yet",
        ConstGauge::new(stale),
    );
}

/// Every integer field of `obj` but the gauges and percentiles, as a counter `prefix_field`.
fn add_counters(reg: &mut Registry, prefix: &str, help: &str, obj: &serde_json::Value) {
    let Some(map) = obj.as_object() else { return };
    for (k, v) in map {
        let Some(v) = v.as_u64() else { continue };
        if GAUGES.contains(&k.as_str()) || k.ends_with("_us") {
            continue;
        }
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}_{k}")
        };
        reg.register(name, format!("{help} {k}"), ConstCounter::new(v));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exposition_has_vmm_counters() {
        crate::metrics::METRICS.exits_hlt.inc();
        let text = super::exposition();
        assert!(
            text.contains("# TYPE vnode_vmm_exits_hlt counter"),
            "{text}"
        );
        assert!(text.contains("vnode_vmm_exits_hlt_total "), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
