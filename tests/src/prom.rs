//! Checking `/metrics` output with a real Prometheus parser: the OpenMetrics parser of the
//! Python client (`python3-prometheus-client`, installed by scripts/setup.sh), which rejects
//! anything the format does not allow (a missing `# EOF`, a counter without `_total`, buckets out
//! of order, a unit that is not the name's suffix). Also a plain HTTP GET for the tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "unit": f.unit, "help": f.documentation,
                   "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
print(json.dumps(out))
"#;

/// Parses OpenMetrics text; panics with the parser's complaint if it is not valid. Returns
/// `{family: {type, unit, help, samples: [{name, labels, value}]}}`.
pub fn parse_openmetrics(text: &str) -> serde_json::Value {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3 (scripts/setup.sh installs python3-prometheus-client)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected the exposition: {}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser JSON")
}

/// The value of the sample `name` whose labels include `labels` (`None` if there is none).
pub fn sample(parsed: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parsed.as_object()?.values().find_map(|f| {
        f["samples"].as_array()?.iter().find_map(|s| {
            let ok = s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v));
            ok.then(|| s["value"].as_f64()).flatten()
        })
    })
}

/// `GET path` over HTTP/1.1 on `addr`: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP reply");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_owned())
}
