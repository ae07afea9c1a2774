//! Shared by the manager tests: starting `vnode-manager` and etcd as real processes, raw HTTP
//! (for bodies no client would send), and a host that heartbeats through the real API.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vnode_manager_client::types::{Capacity, Heartbeat, HostKind, RegisterHost, Size};
use vnode_manager_client::Client;

/// A child killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory, deleted when dropped (etcd's WAL alone preallocates 64 MiB).
pub struct Scratch(pub PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(tag: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("vnode-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

fn wait_file(p: &Path, what: &str, child: &mut Child) -> String {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(s) = std::fs::read_to_string(p) {
            if !s.trim().is_empty() {
                return s.trim().to_owned();
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what} exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not become ready");
}

/// Starts a manager on a free port with `store`; returns it and its URL.
pub fn manager(dir: &Path, name: &str, store: &str, port: u16) -> (Proc, String) {
    let ready = dir.join(format!("{name}.addr"));
    let _ = std::fs::remove_file(&ready);
    let key = dir.join("cluster.key");
    if !key.exists() {
        std::fs::write(&key, "test-cluster-key").unwrap();
    }
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut child = Command::new(vnode_tests::bin("vnode-manager"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--store", store])
        .args(["--advertise", &format!("http://127.0.0.1:{port}")])
        .arg("--cluster-key-file")
        .arg(&key)
        .args(["--heartbeat-ms", "300", "--ready-file"])
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn vnode-manager");
    let addr = wait_file(&ready, "vnode-manager", &mut child);
    (Proc(child), format!("http://{addr}"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts etcd on free ports; returns it and its client URL.
pub fn etcd(dir: &Path) -> (Proc, String) {
    let (c, p) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{c}");
    let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{p}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{p}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn etcd (Debian's etcd-server)");
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", c)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "etcd did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc(child), url)
}

/// One raw HTTP/1.1 request; returns (status, body).
pub fn raw(url: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let hostport = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

pub fn compute(vcpus: u32, local: &str) -> RegisterHost {
    RegisterHost {
        kind: HostKind::Compute,
        addr: "127.0.0.1".into(),
        capacity: Capacity {
            vcpus,
            local_mem: Size(vnode_common::size::parse_size(local).unwrap()),
            ..Default::default()
        },
    }
}

pub fn server(kind: HostKind, cap: &str) -> RegisterHost {
    let n = Size(vnode_common::size::parse_size(cap).unwrap());
    let mut c = Capacity::default();
    match kind {
        HostKind::Memory => c.mem = n,
        HostKind::Storage => c.disk = n,
        HostKind::Compute => unreachable!(),
    }
    RegisterHost {
        kind,
        addr: "127.0.0.1:1".into(),
        capacity: c,
    }
}

/// Registers `id` and heartbeats for it every 200 ms on a thread, for as long as the test runs.
pub fn keep_alive(urls: &str, id: &str, reg: RegisterHost) {
    let mut b = vnode_manager_client::heartbeat::Beater::new(Client::new(urls), id, reg);
    std::thread::spawn(move || loop {
        let _ = b.beat(&Heartbeat::default());
        std::thread::sleep(Duration::from_millis(200));
    });
}

/// `vnodectl ARGS`, which must succeed; returns stdout.
pub fn vnodectl(args: &[&str]) -> String {
    let out = Command::new(vnode_tests::bin("vnodectl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn vnodectl");
    assert!(
        out.status.success(),
        "vnodectl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vnodectl ARGS -o json`, parsed.
pub fn vnodectl_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let s = vnodectl(&a);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Polls `f` every 200 ms until it returns Some, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A cluster from `vnodectl up`, brought down when dropped.
pub struct Cluster {
    pub dir: Scratch,
}

impl Cluster {
    pub fn up(tag: &str, extra: &[&str]) -> Cluster {
        let dir = tempdir(tag);
        let d = dir.0.display().to_string();
        let mut args = vec!["up", "--dir", &d, "--heartbeat-ms", "300"];
        args.extend(extra);
        let c = Cluster { dir };
        vnodectl(&args);
        c
    }

    pub fn d(&self) -> String {
        self.dir.display().to_string()
    }

    pub fn file(&self) -> vnode_manager_client::ctl::up::ClusterFile {
        vnode_manager_client::ctl::up::ClusterFile::load(&self.dir).unwrap()
    }

    /// `kill -9` the process named `name` and start it again with the same command line.
    pub fn restart(&self, name: &str) {
        let mut cf = self.file();
        let i = cf.procs.iter().position(|p| p.name == name).unwrap();
        let p = cf.procs[i].clone();
        // SAFETY: kill(2) has no memory effects; the pid is this cluster's process.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        wait_for("the old process to die", Duration::from_secs(10), || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).unwrap_or_default();
            (stat.is_empty() || stat.contains(") Z")).then_some(())
        });
        let np = vnode_manager_client::ctl::up::spawn(&self.dir, name, p.netns.as_deref(), &p.argv)
            .unwrap();
        cf.procs[i] = np;
        std::fs::write(
            self.dir.join("cluster.json"),
            serde_json::to_vec(&cf).unwrap(),
        )
        .unwrap();
    }

    pub fn vnode(&self, name: &str) -> serde_json::Value {
        vnodectl_json(&["show", name, "--dir", &self.d()])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let d = self.d();
        let _ = Command::new(vnode_tests::bin("vnodectl"))
            .args(["down", "--dir", &d])
            .output();
    }
}
