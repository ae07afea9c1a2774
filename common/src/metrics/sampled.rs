//! Counters and gauges read from a server's own state when Prometheus scrapes: the server keeps
//! its plain atomics (or computes a value from its store) and registers a closure here, so the
//! hot path needs no change and every value is current.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

type Read = Box<dyn Fn() -> u64 + Send + Sync>;
type ReadFamily = Box<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

/// One counter or gauge whose value a closure returns at each scrape.
pub struct Sampled {
    name: String,
    help: String,
    kind: MetricType,
    read: Read,
}

impl std::fmt::Debug for Sampled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampled").field("name", &self.name).finish()
    }
}

impl Sampled {
    /// A counter (monotonic; `_total` is added to `name`).
    pub fn counter(
        registry: &mut Registry,
        name: &str,
        help: &str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        Self::register(registry, name, help, MetricType::Counter, Box::new(read));
    }

    /// A gauge (goes up and down).
    pub fn gauge(
        registry: &mut Registry,
        name: &str,
        help: &str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        Self::register(registry, name, help, MetricType::Gauge, Box::new(read));
    }

    fn register(registry: &mut Registry, name: &str, help: &str, kind: MetricType, read: Read) {
        registry.register_collector(Box::new(Sampled {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            read,
        }));
    }
}

fn encode_value(
    kind: MetricType,
    v: u64,
    enc: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(enc),
        _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(enc),
    }
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let v = (self.read)();
        let enc = encoder.encode_descriptor(&self.name, &self.help, None, self.kind)?;
        encode_value(self.kind, v, enc)
    }
}

/// A gauge with one label (e.g. bytes stored per vNode): the closure returns (label value,
/// value) pairs at each scrape.
pub struct SampledFamily {
    name: String,
    help: String,
    label: String,
    read: ReadFamily,
}

impl std::fmt::Debug for SampledFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampledFamily")
            .field("name", &self.name)
            .finish()
    }
}

impl SampledFamily {
    pub fn gauge(
        registry: &mut Registry,
        name: &str,
        help: &str,
        label: &str,
        read: impl Fn() -> Vec<(String, u64)> + Send + Sync + 'static,
    ) {
        registry.register_collector(Box::new(SampledFamily {
            name: name.to_owned(),
            help: help.to_owned(),
            label: label.to_owned(),
            read: Box::new(read),
        }));
    }
}

impl Collector for SampledFamily {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values = (self.read)();
        let mut enc = encoder.encode_descriptor(&self.name, &self.help, None, MetricType::Gauge)?;
        for (label, v) in values {
            let labels = [(self.label.as_str(), label.as_str())];
            let family = enc.encode_family(&labels)?;
            encode_value(MetricType::Gauge, v, family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::metrics::{encode, LatencyFamily, LatencyHistogram};

    #[test]
    fn sampled_values_are_read_at_each_scrape() {
        let mut r = Registry::default();
        let n = Arc::new(AtomicU64::new(3));
        let n2 = n.clone();
        Sampled::counter(&mut r, "demo_pages_read", "Pages read", move || {
            n2.load(Ordering::Relaxed)
        });
        Sampled::gauge(&mut r, "demo_connections", "Open connections", || 2);
        SampledFamily::gauge(&mut r, "demo_bytes", "Bytes per vNode", "vnode", || {
            vec![("7".into(), 4096), ("9".into(), 0)]
        });
        let h = LatencyHistogram::new();
        h.record_us(40);
        r.register("demo_read_seconds", "Read service time", h.clone());
        LatencyFamily::register(&mut r, "demo_op", "Per op", "op", vec![("read", h)]);
        let text = encode(&r);
        assert!(text.contains("# TYPE demo_pages_read counter\n"), "{text}");
        assert!(text.contains("\ndemo_pages_read_total 3\n"), "{text}");
        assert!(text.contains("\ndemo_connections 2\n"), "{text}");
        assert!(text.contains("\ndemo_bytes{vnode=\"7\"} 4096\n"), "{text}");
        assert!(text.contains("demo_read_seconds_count 1\n"), "{text}");
        assert!(text.contains("# UNIT demo_op_seconds seconds\n"), "{text}");
        assert!(
            text.contains("demo_op_seconds_count{op=\"read\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        n.store(5, Ordering::Relaxed);
        assert!(encode(&r).contains("\ndemo_pages_read_total 5\n"));
    }
}
