//! Placement benchmark: 10,000 vNodes over 1,000 simulated servers (400 compute, 400 memory,
//! 200 storage), in-process, placed one after another by the manager's least-allocated strategy
//! and by a first-fit baseline in the same run. Prints decisions per second and the resulting
//! balance (max/min utilisation of each resource); `cargo bench -p vnode-manager` runs it, and
//! with `--save` (`cargo bench -p vnode-manager -- --save`) writes docs/bench/placement.txt.

use std::fmt::Write as _;
use std::time::Instant;

use vnode_manager::placement::{imbalance, Cluster, Node, Request, Strategy};

const G: u64 = 1 << 30;
const VNODES: usize = 10_000;
const ROUNDS: usize = 5;

/// xorshift64*: a deterministic stream, so every run places the same vNodes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn cluster() -> Cluster {
    Cluster {
        compute: (0..400)
            .map(|i| Node::new(format!("c{i}"), [160, 320 * G]))
            .collect(),
        memory: (0..400)
            .map(|i| Node::new(format!("m{i}"), [2048 * G, 0]))
            .collect(),
        storage: (0..200)
            .map(|i| Node::new(format!("s{i}"), [8192 * G, 0]))
            .collect(),
    }
}

fn requests() -> Vec<Request> {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    (0..VNODES)
        .map(|_| {
            let local = r.range(1, 16);
            Request {
                vcpus: r.range(1, 8),
                local_mem: local * G,
                mem: local * r.range(2, 4) * G,
                disk: r.range(20, 200) * G,
            }
        })
        .collect()
}

/// Places every request; returns the final cluster, the seconds taken and how many fitted.
fn run(strategy: Strategy, reqs: &[Request]) -> (Cluster, f64, usize) {
    let mut c = cluster();
    let t = Instant::now();
    let mut placed = 0;
    for r in reqs {
        if let Ok(d) = c.place(r, strategy) {
            c.apply(r, &d);
            placed += 1;
        }
    }
    (c, t.elapsed().as_secs_f64(), placed)
}

fn report(name: &str, strategy: Strategy, reqs: &[Request], out: &mut String) {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..ROUNDS {
        let (c, secs, placed) = run(strategy, reqs);
        best = best.min(secs);
        last = Some((c, placed));
    }
    let (c, placed) = last.expect("ROUNDS > 0");
    let fmt = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "inf (some server empty)".into()
        }
    };
    let _ = writeln!(
        out,
        "{name:<16} {:>9.0} decisions/s  ({placed}/{} placed, best of {ROUNDS}: {:.1} ms)",
        reqs.len() as f64 / best,
        reqs.len(),
        best * 1e3
    );
    let _ = writeln!(
        out,
        "{:<16} max/min utilisation: vCPUs {}, ExCache memory {}, remote memory {}, disk {}",
        "",
        fmt(imbalance(&c.compute, 0)),
        fmt(imbalance(&c.compute, 1)),
        fmt(imbalance(&c.memory, 0)),
        fmt(imbalance(&c.storage, 0)),
    );
    let mean = |n: &[Node], i| n.iter().map(|n| n.utilisation(i)).sum::<f64>() / n.len() as f64;
    let _ = writeln!(
        out,
        "{:<16} mean utilisation: vCPUs {:.1}%, ExCache memory {:.1}%, remote memory {:.1}%, disk {:.1}%",
        "",
        100.0 * mean(&c.compute, 0),
        100.0 * mean(&c.compute, 1),
        100.0 * mean(&c.memory, 0),
        100.0 * mean(&c.storage, 0),
    );
}

fn main() {
    let reqs = requests();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "placement: {VNODES} vNodes (1-8 vCPUs, 1-16 GiB ExCache, 2-4x that of guest RAM on a primary and a backup, 20-200 GiB disk)\n\
         over 1000 servers (400 compute: 160 vCPUs, 320 GiB; 400 memory: 2 TiB; 200 storage: 8 TiB), one thread, in-process"
    );
    report("least-allocated", Strategy::LeastAllocated, &reqs, &mut out);
    report("first-fit", Strategy::FirstFit, &reqs, &mut out);
    print!("{out}");
    if std::env::args().any(|a| a == "--save") {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bench/placement.txt");
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let text = format!(
            "# cargo bench -p vnode-manager -- --save\n# machine: 2 cores shared with other engineers' builds (noisy); loadavg at the end: {}\n{out}",
            load.trim()
        );
        std::fs::write(path, text).expect("write docs/bench/placement.txt");
    }
}
