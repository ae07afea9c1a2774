//! `vnodectl up` and `down`: a whole cluster on one machine. A manager, a compute agent, two
//! memory servers and two storage hosts, every file under `--dir`; with `--hosts N`, each host
//! is a network namespace with its own address on a bridge (veth pairs), so vNodes reach their
//! memory and disks over real network hops. The manager runs in the root namespace on the
//! bridge's address. `DIR/cluster.json` records every process (its pid and command line, so a
//! test can restart one) and the namespaces, for `down`.

use std::fmt::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::types::HostView;
use crate::Client;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{0}")]
    Timeout(String),
    #[error("{0} has no cluster.json: was it started by `vnodectl up --dir`?")]
    NoCluster(PathBuf),
    #[error("--hosts must be 0 (all on loopback) to 50, not {0}")]
    Hosts(u32),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpError {
    let what = what.into();
    move |source| UpError::Io { what, source }
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for every file of the cluster (state, logs, disks, the cluster key).
    #[arg(long)]
    pub dir: PathBuf,
    /// Put each host in its own network namespace (N hosts: the compute agent on the first,
    /// memory and storage servers spread over the others). 0: everything on 127.0.0.1.
    #[arg(long, default_value_t = 0)]
    pub hosts: u32,
    /// The manager's port (0: a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// vCPUs the compute agent offers.
    #[arg(long, default_value_t = 4)]
    pub vcpus: u32,
    /// Local memory the compute agent offers to ExCaches.
    #[arg(long, default_value = "2G")]
    pub local_mem: String,
    /// Capacity of each memory server.
    #[arg(long, default_value = "4G")]
    pub mem_capacity: String,
    /// Disk space of each storage host.
    #[arg(long, default_value = "8G")]
    pub disk_capacity: String,
    /// Heartbeat interval in milliseconds (a host is down after three missed).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Where the binaries are (default: next to vnodectl).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The directory given to `vnodectl up`.
    #[arg(long)]
    pub dir: PathBuf,
}

/// One process of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    /// The namespace it runs in, if any.
    pub netns: Option<String>,
    /// Program and arguments (without the `ip netns exec` prefix).
    pub argv: Vec<String>,
}

/// `DIR/cluster.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The manager's URL from this (root) namespace.
    pub manager_url: String,
    /// The manager's URL from the hosts.
    pub manager_url_hosts: String,
    pub procs: Vec<Proc>,
    pub netns: Vec<String>,
    pub bridge: Option<String>,
}

impl ClusterFile {
    pub fn load(dir: &Path) -> Result<ClusterFile, UpError> {
        let b = std::fs::read(dir.join("cluster.json"))
            .map_err(|_| UpError::NoCluster(dir.to_owned()))?;
        serde_json::from_slice(&b).map_err(|_| UpError::NoCluster(dir.to_owned()))
    }

    fn save(&self, dir: &Path) -> Result<(), UpError> {
        let body = serde_json::to_vec_pretty(self).expect("plain data serializes");
        std::fs::write(dir.join("cluster.json"), body).map_err(io("cannot write cluster.json"))
    }
}

/// Starts `argv` (in `netns` if given), detached in its own session, output in `DIR/logs/NAME.log`.
pub fn spawn(
    dir: &Path,
    name: &str,
    netns: Option<&str>,
    argv: &[String],
) -> Result<Proc, UpError> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io("cannot create logs/"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{name}.log")))
        .map_err(io(format!("cannot open logs/{name}.log")))?;
    let err = log.try_clone().map_err(io("cannot open log"))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: setsid() only: the process leaves vnodectl's session so it outlives it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(io(format!("cannot start {}", argv[0])))?;
    // `ip netns exec` execs the program, so the pid is the program's; nobody waits for it
    // (it is not a zombie for long: vnodectl exits and init reaps it).
    Ok(Proc {
        name: name.to_owned(),
        pid: child.id(),
        netns: netns.map(str::to_owned),
        argv: argv.to_vec(),
    })
}

fn ip(args: &[&str]) -> Result<(), UpError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(io("cannot run ip (iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(UpError::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A short tag unique to `dir`, for interface and namespace names (15 characters at most).
fn tag(dir: &Path) -> u32 {
    dir.display()
        .to_string()
        .bytes()
        .fold(2_166_136_261u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(16_777_619)
        })
}

/// Creates the bridge and `n` namespaces (named from `dir`, recorded in `cf` as they are made,
/// so [`teardown_network`] undoes a partial set-up too); returns the bridge and the addresses:
/// the bridge's (the root namespace's), then each namespace's. The fault tests use it too.
pub fn network(n: u32, dir: &Path, cf: &mut ClusterFile) -> Result<(String, Vec<String>), UpError> {
    let t = tag(dir);
    let (a, b) = (100 + (t % 100), (t >> 8) % 250);
    let bridge = format!("vnb{:04x}", t & 0xffff);
    let _ = ip(&["link", "del", &bridge]);
    ip(&["link", "add", &bridge, "type", "bridge"])?;
    cf.bridge = Some(bridge.clone());
    ip(&["addr", "add", &format!("10.{a}.{b}.1/24"), "dev", &bridge])?;
    ip(&["link", "set", &bridge, "up"])?;
    let mut addrs = vec![format!("10.{a}.{b}.1")];
    for i in 1..=n {
        let ns = format!("vn{:04x}h{i}", t & 0xffff);
        let veth = format!("vnv{:04x}-{i}", t & 0xffff);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        cf.netns.push(ns.clone());
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &veth, "master", &bridge, "up"])?;
        let addr = format!("10.{a}.{b}.{}", 10 + i);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        addrs.push(addr);
    }
    Ok((bridge, addrs))
}

fn free_port() -> Result<u16, UpError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("cannot find a free port"))?;
    Ok(l.local_addr()
        .map_err(io("cannot find a free port"))?
        .port())
}

fn cluster_key(dir: &Path) -> Result<PathBuf, UpError> {
    let path = dir.join("cluster.key");
    if path.exists() {
        return Ok(path);
    }
    let mut key = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").map_err(io("cannot read /dev/urandom"))?;
    std::io::Read::read_exact(&mut f, &mut key).map_err(io("cannot read /dev/urandom"))?;
    let hex = key.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("cannot write cluster.key"))?;
    std::io::Write::write_all(&mut f, hex.as_bytes()).map_err(io("cannot write cluster.key"))?;
    Ok(path)
}

fn progress(msg: &str) -> indicatif::ProgressBar {
    let p = indicatif::ProgressBar::new_spinner();
    p.enable_steady_tick(Duration::from_millis(120));
    p.set_message(msg.to_owned());
    p
}

/// `vnodectl up`.
pub fn up(a: &UpArgs) -> Result<(), UpError> {
    if a.hosts > 50 {
        return Err(UpError::Hosts(a.hosts));
    }
    std::fs::create_dir_all(&a.dir).map_err(io(format!("cannot create {}", a.dir.display())))?;
    let dir = std::path::absolute(&a.dir).map_err(io("cannot resolve --dir"))?;
    let bins = a.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_default()
    });
    let bin = |n: &str| bins.join(n).display().to_string();
    let d = |n: &str| dir.join(n).display().to_string();
    let key = cluster_key(&dir)?;
    let mut cf = ClusterFile::default();
    let p = progress("creating the network");
    let (ns, addrs): (Vec<Option<String>>, Vec<String>) = if a.hosts == 0 {
        (vec![None], vec!["127.0.0.1".into(), "127.0.0.1".into()])
    } else {
        let (_, addrs) = network(a.hosts, &dir, &mut cf)?;
        let mut ns = vec![None];
        ns.extend(cf.netns.iter().cloned().map(Some));
        (ns, addrs)
    };
    cf.save(&dir)?;
    // Host slots: index 0 is the root namespace (the manager); compute on 1; servers on 2.. .
    let servers: Vec<usize> = if a.hosts >= 2 {
        (2..=a.hosts as usize).collect()
    } else {
        vec![a.hosts.min(1) as usize]
    };
    let compute = a.hosts.min(1) as usize;
    let port = if a.port == 0 { free_port()? } else { a.port };
    let listen = if a.hosts == 0 { "127.0.0.1" } else { "0.0.0.0" };
    cf.manager_url = format!("http://127.0.0.1:{port}");
    cf.manager_url_hosts = format!("http://{}:{port}", addrs[0]);
    let murl = cf.manager_url_hosts.clone();
    p.set_message("starting the manager");
    let manager = vec![
        bin("vnode-manager"),
        "--listen".into(),
        format!("{listen}:{port}"),
        "--store".into(),
        format!("sqlite:{}", d("manager.db")),
        "--cluster-key-file".into(),
        key.display().to_string(),
        "--heartbeat-ms".into(),
        a.heartbeat_ms.to_string(),
    ];
    cf.procs.push(spawn(&dir, "manager", None, &manager)?);
    let mut plan: Vec<(String, usize, Vec<String>)> = Vec::new();
    for i in 1..=2usize {
        let h = servers[(i - 1) % servers.len()];
        plan.push((
            format!("mem{i}"),
            h,
            vec![
                bin("vnode-memd"),
                "--listen".into(),
                format!("{}:0", addrs[h]),
                "--capacity".into(),
                a.mem_capacity.clone(),
                "--data-dir".into(),
                d(&format!("mem{i}")),
                "--secret-file".into(),
                key.display().to_string(),
                "--manager".into(),
                murl.clone(),
                "--host-id".into(),
                format!("mem{i}"),
            ],
        ));
        let h = servers[i % servers.len()];
        plan.push((
            format!("stor{i}"),
            h,
            vec![
                bin("vnode-agent"),
                "--role".into(),
                "storage".into(),
                "--manager".into(),
                murl.clone(),
                "--host-id".into(),
                format!("stor{i}"),
                "--state-dir".into(),
                d(&format!("stor{i}")),
                "--addr".into(),
                addrs[h].clone(),
                "--disk".into(),
                a.disk_capacity.clone(),
                "--blkd".into(),
                bin("vnode-blkd"),
                "--cluster-key-file".into(),
                key.display().to_string(),
            ],
        ));
    }
    plan.push((
        "compute1".into(),
        compute,
        vec![
            bin("vnode-agent"),
            "--manager".into(),
            murl.clone(),
            "--host-id".into(),
            "compute1".into(),
            "--state-dir".into(),
            d("compute1"),
            "--addr".into(),
            addrs[compute].clone(),
            "--vcpus".into(),
            a.vcpus.to_string(),
            "--local-mem".into(),
            a.local_mem.clone(),
            "--vnode".into(),
            bin("vnode"),
        ],
    ));
    for (name, h, argv) in &plan {
        std::fs::create_dir_all(dir.join(name)).map_err(io(format!("cannot create {name}/")))?;
        p.set_message(format!("starting {name}"));
        cf.procs.push(spawn(&dir, name, ns[*h].as_deref(), argv)?);
    }
    cf.save(&dir)?;
    std::fs::write(dir.join("manager.url"), &cf.manager_url)
        .map_err(io("cannot write manager.url"))?;
    p.set_message("waiting for every host to register");
    wait_hosts(
        &Client::new(&cf.manager_url),
        plan.len(),
        Duration::from_secs(60),
    )?;
    p.finish_and_clear();
    println!(
        "cluster up: manager {} ({} hosts{}), files in {}",
        cf.manager_url,
        plan.len(),
        if a.hosts > 0 {
            format!(" in {} network namespaces", a.hosts)
        } else {
            String::new()
        },
        dir.display()
    );
    Ok(())
}

/// Waits until `n` hosts are registered and up.
pub fn wait_hosts(c: &Client, n: usize, timeout: Duration) -> Result<(), UpError> {
    let start = Instant::now();
    let mut last = String::from("the manager did not answer");
    while start.elapsed() < timeout {
        match c.get::<Vec<HostView>>("/hosts") {
            Ok(h) if h.iter().filter(|h| h.up).count() >= n => return Ok(()),
            Ok(h) => {
                last = format!(
                    "{} of {n} hosts up: {:?}",
                    h.iter().filter(|h| h.up).count(),
                    h.iter().map(|h| &h.id).collect::<Vec<_>>()
                )
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(UpError::Timeout(format!(
        "the cluster did not come up in {timeout:?}: {last} (see the logs/ directory)"
    )))
}

/// Signals `pid` if it still runs a program whose command line contains `expect` (a pid from
/// a file may have been reused by now).
fn kill(pid: u32, expect: &str, sig: i32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(expect);
    if pid > 1 && ours {
        // SAFETY: kill(2) has no memory effects; the pids are the cluster's own processes.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// Pids of the processes the agents started (vnode, vnode-blkd), from their state dirs.
fn agent_children(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for host in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for sub in ["vnodes", "exports"] {
            for e in std::fs::read_dir(host.path().join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Some(pid) = std::fs::read_to_string(e.path().join("pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// Deletes the namespaces and the bridge [`network`] made (best effort).
pub fn teardown_network(cf: &ClusterFile) {
    for ns in &cf.netns {
        let _ = ip(&["netns", "del", ns]);
    }
    if let Some(b) = &cf.bridge {
        let _ = ip(&["link", "del", b]);
    }
}

/// `vnodectl down`.
pub fn down(a: &DownArgs) -> Result<(), UpError> {
    let dir = std::path::absolute(&a.dir).map_err(io("cannot resolve --dir"))?;
    let cf = ClusterFile::load(&dir)?;
    let p = progress("stopping the cluster");
    // Agents first, so nothing restarts what is being stopped; then what they started.
    for pr in &cf.procs {
        kill(pr.pid, &pr.argv[0], libc::SIGTERM);
    }
    for pid in agent_children(&dir) {
        kill(pid, "vnode", libc::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(300));
    for pr in &cf.procs {
        kill(pr.pid, &pr.argv[0], libc::SIGKILL);
    }
    teardown_network(&cf);
    p.finish_and_clear();
    println!(
        "cluster down: {} processes stopped; files kept in {}",
        cf.procs.len(),
        dir.display()
    );
    Ok(())
}
