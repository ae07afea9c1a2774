//! The tables `vnodectl` prints for people.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use crate::types::{HostKind, HostView, VnodeView};

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

/// Bytes for people: "512M", "1.5G".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn state(v: &VnodeView) -> String {
    let mut s = format!("{:?}", v.state).to_lowercase();
    if let Some(c) = v.exit_code {
        s.push_str(&format!(" ({c})"));
    }
    if !v.hosts_down.is_empty() {
        s.push_str(&format!(", down: {}", v.hosts_down.join(",")));
    }
    s
}

pub fn vnodes(list: &[VnodeView]) -> Table {
    let mut t = table(&[
        "ID",
        "NAME",
        "STATE",
        "VCPUS",
        "MEM",
        "EXCACHE",
        "COMPUTE",
        "MEMORY (primary, backup)",
        "DISK",
    ]);
    for v in list {
        let mem = v
            .placement
            .regions
            .iter()
            .map(|r| format!("{}, {}", r.primary, r.backup))
            .collect::<Vec<_>>()
            .join("; ");
        let disk = v.placement.disk.as_ref().map_or("-".to_string(), |d| {
            format!("{} on {}", bytes(d.size.0), d.storage)
        });
        t.add_row(vec![
            v.id.to_string(),
            v.name.clone(),
            state(v),
            v.spec.vcpus.to_string(),
            bytes(v.spec.mem.0),
            bytes(v.spec.local_mem.0),
            v.placement.compute.clone(),
            mem,
            disk,
        ]);
    }
    t
}

pub fn vnode(v: &VnodeView) -> Table {
    let mut t = table(&["FIELD", "VALUE"]);
    let rows: Vec<(&str, String)> = vec![
        ("id", v.id.to_string()),
        ("name", v.name.clone()),
        ("state", state(v)),
        ("vcpus", v.spec.vcpus.to_string()),
        ("mem", bytes(v.spec.mem.0)),
        ("excache", bytes(v.spec.local_mem.0)),
        ("kernel", v.spec.kernel.clone()),
        ("cmdline", v.spec.cmdline.clone()),
        ("compute", v.placement.compute.clone()),
        (
            "memory",
            v.placement
                .regions
                .iter()
                .map(|r| {
                    format!(
                        "region {}: {} on {} (backup {})",
                        r.region,
                        bytes(r.size.0),
                        r.primary,
                        r.backup
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        (
            "disk",
            v.placement.disk.as_ref().map_or("-".into(), |d| {
                format!("{} export {} on {}", bytes(d.size.0), d.export, d.storage)
            }),
        ),
        ("console", v.console.clone().unwrap_or_default()),
        ("message", v.message.clone().unwrap_or_default()),
    ];
    for (k, val) in rows {
        t.add_row(vec![k.to_string(), val]);
    }
    t
}

fn counter(v: &VnodeView, key: &str) -> String {
    v.counters
        .as_ref()
        .and_then(|c| c.get("excache"))
        .and_then(|e| e.get(key))
        .and_then(|x| x.as_u64())
        .map_or("-".into(), |n| n.to_string())
}

/// Each vNode's ExCache figures, as its agent last read them through the vNode's API.
pub fn excache(list: &[VnodeView]) -> Table {
    let mut t = table(&[
        "ID",
        "NAME",
        "STATE",
        "EXCACHE",
        "RESIDENT",
        "FAULTS",
        "FETCHED",
        "EVICTIONS",
        "WRITEBACKS",
        "PREFETCHED",
        "FAULT P50 US",
    ]);
    for v in list {
        let resident = v
            .counters
            .as_ref()
            .and_then(|c| c.get("excache"))
            .and_then(|e| e.get("resident_pages"))
            .and_then(|x| x.as_u64())
            .map_or("-".into(), |p| bytes(p * 4096));
        t.add_row(vec![
            v.id.to_string(),
            v.name.clone(),
            state(v),
            bytes(v.spec.local_mem.0),
            resident,
            counter(v, "faults"),
            counter(v, "fetched"),
            counter(v, "evictions"),
            counter(v, "writebacks"),
            counter(v, "prefetched"),
            counter(v, "fault_p50_us"),
        ]);
    }
    t
}

pub fn hosts(list: &[HostView]) -> Table {
    let mut t = table(&[
        "HOST",
        "KIND",
        "ADDR",
        "UP",
        "CAPACITY",
        "ALLOCATED",
        "USED",
        "VNODES",
    ]);
    for h in list {
        let (cap, alloc) = match h.kind {
            HostKind::Compute => (
                format!(
                    "{} vCPUs, {}",
                    h.capacity.vcpus,
                    bytes(h.capacity.local_mem.0)
                ),
                format!(
                    "{} vCPUs, {}",
                    h.allocated.vcpus,
                    bytes(h.allocated.local_mem.0)
                ),
            ),
            HostKind::Memory => (bytes(h.capacity.mem.0), bytes(h.allocated.mem.0)),
            HostKind::Storage => (bytes(h.capacity.disk.0), bytes(h.allocated.disk.0)),
        };
        t.add_row(vec![
            h.id.clone(),
            h.kind.to_string(),
            h.addr.clone(),
            if h.up {
                "yes".into()
            } else {
                format!("no ({} ms)", h.last_seen_ms)
            },
            cap,
            alloc,
            h.used.map_or("-".into(), bytes),
            h.vnodes
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    t
}
