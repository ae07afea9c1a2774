//! One benchmark run: start `vnode run` with the job, follow the guest console, drive a serving
//! job's load from the host, and build the result document.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::console::{self, Console, Event};
use super::launch::{self, LaunchError};
use super::memload::{self, ClientKind, Load, LoadError};
use super::tap::{self, HostTap, TapError};

/// What the guest runs, and whether the host drives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The name given on the command line.
    pub asked: String,
    /// The guest's job (`vnode.job=`).
    pub guest: String,
    /// The guest serves memcached and the host runs the load client.
    pub memcached_load: bool,
}

impl Job {
    /// `fio` is `fio-randread`; `memtier` and `memcached` are `memcached-serve` with a host load
    /// client; any other name is passed to the guest as it is.
    pub fn resolve(name: &str) -> Self {
        let (guest, load) = match name {
            "fio" | "fio-randread" => ("fio-randread", false),
            "memtier" | "memcached" | "memcached-serve" => ("memcached-serve", true),
            other => (other, false),
        };
        Self {
            asked: name.to_owned(),
            guest: guest.to_owned(),
            memcached_load: load,
        }
    }
}

/// A benchmark run as the command line asked for it.
#[derive(Debug, Clone)]
pub struct Spec {
    pub job: Job,
    /// Seconds: the fio jobs' `vnode.fio_runtime`, the memcached load's duration.
    pub runtime: Option<u64>,
    /// The guest's address (ADDR or ADDR/PREFIX): `vnode.ip=`.
    pub guest_ip: Option<String>,
    /// ADDR/PREFIX for the host side of the TAP named in `--net tap=NAME`.
    pub host_ip: Option<String>,
    /// Further `vnode.KEY=VALUE` words for the guest.
    pub guest_args: Vec<String>,
    pub vnode: PathBuf,
    pub vnode_args: Vec<String>,
    pub timeout: Duration,
    /// Keep the console here, each line as `[ms since vnode started] line`.
    pub console_log: Option<PathBuf>,
    /// Copy the console to stderr as it comes.
    pub echo: bool,
    pub client: ClientKind,
    pub connections: usize,
    pub keys: usize,
    pub value_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("--net-host-ip needs a TAP: give --net tap=NAME in the vnode arguments")]
    NoTap,
    #[error("{0} needs --guest-ip ADDR/PREFIX (the guest's eth0) and --net tap=NAME in the vnode arguments")]
    NoGuestIp(String),
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("cannot write the console log {0}")]
    ConsoleLog(PathBuf, #[source] std::io::Error),
}

/// How a run ended: the document is complete either way; `error` says why it failed.
pub struct Outcome {
    pub doc: Value,
    pub error: Option<String>,
}

/// The guest's kernel command line words for `spec`.
pub fn guest_words(spec: &Spec) -> Result<Vec<String>, BenchError> {
    let mut w = vec![format!("vnode.job={}", spec.job.guest)];
    if let (Some(r), false) = (spec.runtime, spec.job.memcached_load) {
        w.push(format!("vnode.fio_runtime={r}"));
    }
    if let Some(ip) = &spec.guest_ip {
        w.push(format!(
            "vnode.ip={}",
            guest_cidr(ip, spec.host_ip.as_deref())?
        ));
    } else if spec.job.memcached_load {
        return Err(BenchError::NoGuestIp(spec.job.asked.clone()));
    }
    if spec.job.memcached_load {
        // the guest serves until "stop"; this bounds it if vnodectl dies
        let serve = spec.runtime.unwrap_or(10) + spec.timeout.as_secs();
        w.push(format!("vnode.serve_time={serve}"));
    }
    w.extend(spec.guest_args.iter().map(|a| format!("vnode.{a}")));
    Ok(w)
}

/// `10.0.0.2` takes the host address's prefix (or /24); `10.0.0.2/24` stays.
fn guest_cidr(ip: &str, host: Option<&str>) -> Result<String, TapError> {
    if ip.contains('/') {
        tap::parse_cidr(ip)?;
        return Ok(ip.to_owned());
    }
    let prefix = host
        .map(tap::parse_cidr)
        .transpose()?
        .map_or(24, |(_, p)| p);
    let cidr = format!("{ip}/{prefix}");
    tap::parse_cidr(&cidr)?;
    Ok(cidr)
}

/// Messages from the threads that read vnode's output.
enum Msg {
    Line(String, u64),
    Eof,
}

/// Runs the benchmark. Errors before the guest starts are `Err`; afterwards everything ends in
/// an [`Outcome`] whose document has what was collected.
pub fn run(spec: &Spec) -> Result<Outcome, BenchError> {
    let words = guest_words(spec)?;
    let args = launch::vnode_args(&spec.vnode_args, &words)?;
    let tap_name = launch::tap_name(&spec.vnode_args);
    let _tap = match (&spec.host_ip, &tap_name) {
        (Some(ip), Some(name)) => Some(HostTap::setup(name, ip)?),
        (Some(_), None) => return Err(BenchError::NoTap),
        _ => None,
    };
    let mut log = match &spec.console_log {
        Some(p) => {
            Some(std::fs::File::create(p).map_err(|e| BenchError::ConsoleLog(p.clone(), e))?)
        }
        None => None,
    };
    let start = Instant::now();
    let mut child = Command::new(&spec.vnode)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::Spawn(spec.vnode.display().to_string(), e))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout was piped");
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).split(b'\n') {
            let Ok(l) = l else { break };
            let ms = start.elapsed().as_millis() as u64;
            if tx
                .send(Msg::Line(String::from_utf8_lossy(&l).into_owned(), ms))
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Msg::Eof);
    });
    let stderr = child.stderr.take().expect("stderr was piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = BufReader::new(stderr).read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let mut run = Running {
        spec,
        stdin: child.stdin.take(),
        console: Console::default(),
        times: json!({}),
        load: None,
        load_result: None,
        stop_sent: false,
    };
    let deadline = start + spec.timeout;
    let mut timed_out = false;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait.min(Duration::from_millis(100))) {
            Ok(Msg::Line(l, ms)) => {
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "[{ms:7} ms] {}", l.trim_end_matches('\r'));
                }
                if spec.echo {
                    eprintln!("[{ms:7} ms] {}", l.trim_end_matches('\r'));
                }
                run.line(&l, ms);
            }
            Ok(Msg::Eof) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        run.poll_load();
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    drop(run.stdin.take());
    let status = wait_bounded(&mut child, Duration::from_secs(10));
    let stderr = stderr_reader.join().unwrap_or_default();
    let load = run.finish_load();
    let wall = start.elapsed().as_secs_f64();
    Ok(outcome(
        spec, &args, run, load, status, &stderr, timed_out, wall,
    ))
}

/// Waits for `child`, killing it if it has not exited after `grace`.
fn wait_bounded(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                return child.wait().ok();
            }
            Err(_) => return None,
        }
    }
}

/// The state of a run while the console streams.
struct Running<'a> {
    spec: &'a Spec,
    stdin: Option<ChildStdin>,
    console: Console,
    times: Value,
    load: Option<JoinHandle<Result<Value, LoadError>>>,
    load_result: Option<Result<Value, String>>,
    stop_sent: bool,
}

impl Running<'_> {
    fn line(&mut self, l: &str, ms: u64) {
        match self.console.feed(l) {
            Event::InitramfsUp { .. } => self.times["initramfs_up_ms"] = json!(ms),
            Event::InitUp { .. } => self.times["init_up_ms"] = json!(ms),
            Event::JsonBegin => self.times["results_begin_ms"] = json!(ms),
            Event::Ready(v) => {
                self.times["ready_ms"] = json!(ms);
                self.start_load(&v);
            }
            Event::JsonEnd => self.times["results_end_ms"] = json!(ms),
            _ => {}
        }
    }

    /// The guest serves: start the host's load client, or stop the guest at once if there is
    /// none for this job or no address to reach it at.
    fn start_load(&mut self, ready: &Value) {
        if !self.spec.job.memcached_load || self.load.is_some() {
            return self.send_stop();
        }
        let ip = ready["ip"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| {
                self.spec
                    .guest_ip
                    .as_deref()
                    .map(|s| s.split('/').next().unwrap_or(s).to_owned())
            });
        let port = ready["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(11211);
        let Some(addr) = ip
            .and_then(|i| i.parse::<IpAddr>().ok())
            .map(|i| SocketAddr::new(i, port))
        else {
            self.load_result = Some(Err(format!(
                "the guest is ready but gave no usable address: {ready}"
            )));
            return self.send_stop();
        };
        let load = Load {
            addr,
            seconds: self.spec.runtime.unwrap_or(10),
            connections: self.spec.connections,
            keys: self.spec.keys,
            value_size: self.spec.value_size,
            gets_per_set: 4,
        };
        let kind = self.spec.client;
        self.load = Some(std::thread::spawn(move || memload::run(kind, &load)));
    }

    fn poll_load(&mut self) {
        if self.load.as_ref().is_some_and(JoinHandle::is_finished) {
            let h = self.load.take().expect("checked above");
            self.load_result = Some(match h.join() {
                Ok(r) => r.map_err(|e| error_chain(&e)),
                Err(_) => Err("the load client panicked".into()),
            });
            self.send_stop();
        }
    }

    fn send_stop(&mut self) {
        if self.stop_sent {
            return;
        }
        self.stop_sent = true;
        if let Some(s) = self.stdin.as_mut() {
            let _ = s.write_all(b"stop\n").and_then(|()| s.flush());
        }
    }

    /// The load's result, waiting for a client still running (the guest went away under it).
    fn finish_load(&mut self) -> Option<Result<Value, String>> {
        if let Some(h) = self.load.take() {
            self.load_result = Some(match h.join() {
                Ok(r) => r.map_err(|e| error_chain(&e)),
                Err(_) => Err("the load client panicked".into()),
            });
        }
        self.load_result.take()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// The result document, and the first reason the run failed.
#[allow(clippy::too_many_arguments)]
fn outcome(
    spec: &Spec,
    args: &[String],
    run: Running<'_>,
    load: Option<Result<Value, String>>,
    status: Option<ExitStatus>,
    stderr: &str,
    timed_out: bool,
    wall: f64,
) -> Outcome {
    let c = &run.console;
    let code = status.and_then(|s| s.code());
    let mut error = if timed_out {
        Some(format!(
            "timed out after {} s (vnode killed)",
            spec.timeout.as_secs()
        ))
    } else {
        None
    };
    if error.is_none() && !c.began {
        error = console::vnode_error(stderr).map(|e| format!("vnode failed: {e}"));
    }
    if error.is_none() {
        error = c.verdict().err().map(|f| f.to_string());
    }
    let load_doc = match &load {
        Some(Ok(v)) => {
            if error.is_none() && v["verified"] == false {
                error = Some(format!("the load client read back wrong values: {v}"));
            }
            v.clone()
        }
        Some(Err(e)) => {
            error.get_or_insert_with(|| format!("load client: {e}"));
            json!({ "error": e })
        }
        None => {
            if spec.job.memcached_load && error.is_none() {
                error = Some("the guest never said it was ready for the load".into());
            }
            Value::Null
        }
    };
    if error.is_none() && code != Some(0) {
        error = Some(format!(
            "vnode exited with {}",
            status.map_or("no status".into(), |s| s.to_string())
        ));
    }
    if let Some(e) = error.as_mut() {
        if !c.began {
            e.push_str(&format!("\nlast console lines:\n  {}", c.tail.join("\n  ")));
        }
    }
    let mut boot = run.times.clone();
    boot["initramfs_up_uptime_s"] = json!(c.initramfs_up_s);
    boot["init_up_uptime_s"] = json!(c.init_up_s);
    let doc = json!({
        "vnodectl": {
            "job": spec.job.asked,
            "guest_job": spec.job.guest,
            "ok": error.is_none(),
            "error": error,
            "wall_s": (wall * 1000.0).round() / 1000.0,
            "vnode_exit": code,
            "vnode_args": args,
        },
        "boot": boot,
        "guest": c.objects,
        "guest_exit_rc": c.exit_rc,
        "load": load_doc,
        "vnode_stats": console::stats_line(stderr),
    });
    Outcome { doc, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(job: &str) -> Spec {
        Spec {
            job: Job::resolve(job),
            runtime: Some(30),
            guest_ip: None,
            host_ip: None,
            guest_args: vec![],
            vnode: "vnode".into(),
            vnode_args: vec![],
            timeout: Duration::from_secs(600),
            console_log: None,
            echo: false,
            client: ClientKind::Builtin,
            connections: 1,
            keys: 10,
            value_size: 10,
        }
    }

    #[test]
    fn aliases() {
        assert_eq!(Job::resolve("fio").guest, "fio-randread");
        assert_eq!(Job::resolve("memtier").guest, "memcached-serve");
        assert!(Job::resolve("memcached").memcached_load);
        assert_eq!(Job::resolve("redis-bench").guest, "redis-bench");
        assert!(!Job::resolve("fio-verify").memcached_load);
    }

    #[test]
    fn words_for_fio_and_memcached() {
        assert_eq!(
            guest_words(&spec("fio-verify")).unwrap(),
            ["vnode.job=fio-verify", "vnode.fio_runtime=30"]
        );
        let mut s = spec("fio");
        s.runtime = None;
        s.guest_args = vec!["fio_target=/dev/vdc".into()];
        assert_eq!(
            guest_words(&s).unwrap(),
            ["vnode.job=fio-randread", "vnode.fio_target=/dev/vdc"]
        );
        let mut s = spec("memtier");
        assert!(matches!(guest_words(&s), Err(BenchError::NoGuestIp(_))));
        s.guest_ip = Some("10.0.0.2".into());
        s.host_ip = Some("10.0.0.1/16".into());
        assert_eq!(
            guest_words(&s).unwrap(),
            [
                "vnode.job=memcached-serve",
                "vnode.ip=10.0.0.2/16",
                "vnode.serve_time=630"
            ]
        );
        s.guest_ip = Some("10.0.0.2/40".into());
        assert!(matches!(guest_words(&s), Err(BenchError::Tap(_))));
    }

    fn finished(
        console_text: &str,
        stderr: &str,
        code: i32,
        load: Option<Result<Value, String>>,
        job: &str,
    ) -> Outcome {
        let s = spec(job);
        let mut run = Running {
            spec: &s,
            stdin: None,
            console: Console::default(),
            times: json!({}),
            load: None,
            load_result: None,
            stop_sent: true,
        };
        for (i, l) in console_text.lines().enumerate() {
            run.line(l, i as u64 * 10);
        }
        use std::os::unix::process::ExitStatusExt;
        let st = ExitStatus::from_raw(code << 8);
        outcome(&s, &[], run, load, Some(st), stderr, false, 1.0)
    }

    const FIO_OK: &str = "VNODE-INITRAMFS-UP uptime=2.5\nVNODE-INIT-UP uptime=3.5 job=fio-randread\nVNODE-JSON-BEGIN\n\
        {\"job\":\"fio-randread\",\"rc\":0,\"error\":0,\"iops\":900}\n{\"job\":\"summary\",\"rc\":0}\nVNODE-JSON-END\nVNODE-EXIT rc=0";

    #[test]
    fn a_good_run_makes_one_document() {
        let o = finished(FIO_OK, "{\"vmm\":{\"exits\":5}}\n", 0, None, "fio");
        assert_eq!(o.error, None);
        let d = &o.doc;
        assert_eq!(d["vnodectl"]["ok"], true);
        assert_eq!(d["guest"][0]["iops"], 900);
        assert_eq!(d["boot"]["init_up_ms"], 10);
        assert_eq!(d["boot"]["init_up_uptime_s"], 3.5);
        assert_eq!(d["vnode_stats"]["vmm"]["exits"], 5);
        assert_eq!(d["guest_exit_rc"], 0);
    }

    #[test]
    fn failures_are_named() {
        let o = finished("hello from the test guest\n", "", 0, None, "fio");
        let e = o.error.unwrap();
        assert!(e.contains("no VNODE-JSON"), "{e}");
        assert!(e.contains("hello from the test guest"), "{e}");
        assert_eq!(o.doc["vnodectl"]["ok"], false);

        let o = finished(
            "",
            "vnode: error: cannot build the VM: no such file\n",
            1,
            None,
            "fio",
        );
        assert!(o
            .error
            .unwrap()
            .contains("vnode failed: vnode: error: cannot build the VM"));

        let o = finished(FIO_OK, "", 3, None, "fio");
        assert!(o.error.unwrap().contains("vnode exited with"));

        let mc = "VNODE-JSON-BEGIN\n{\"job\":\"memcached-serve\",\"ready\":true,\"ip\":\"10.0.0.2\"}\n{\"job\":\"summary\",\"rc\":0}\nVNODE-JSON-END\nVNODE-EXIT rc=0";
        let o = finished(mc, "", 0, None, "memcached");
        assert!(o.error.unwrap().contains("never said it was ready"));
        let bad = json!({"client":"builtin","verified":false,"mismatches":3});
        let o = finished(mc, "", 0, Some(Ok(bad)), "memcached");
        assert!(o.error.unwrap().contains("wrong values"));
        let o = finished(mc, "", 0, Some(Err("cannot connect".into())), "memcached");
        assert!(o.error.unwrap().contains("load client: cannot connect"));
        let good = json!({"client":"builtin","verified":true});
        let o = finished(mc, "", 0, Some(Ok(good)), "memcached");
        assert_eq!(o.error, None);
        assert_eq!(o.doc["load"]["client"], "builtin");
    }
}
