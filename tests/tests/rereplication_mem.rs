//! Re-replication of guest RAM with real processes: a write-heavy test guest (working set eight
//! times its ExCache) runs on a primary and a backup `vnode-memd`; the backup is `kill -9`ed;
//! vnode makes a new copy on a spare server (`--mem-spare`) while the guest runs; the backup
//! comes back with its memory log and vnode frees the stale copy there; then the ORIGINAL
//! primary is killed too, before the guest's final verify phase, and the guest still verifies
//! every page and ends `ok:true`: the new copy holds every byte.
//! The second test adds the spare through the control API instead (`PUT /vm/mem/spare`).

mod mem_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mem_support::{temp_dir, Memd, SECRET_STR};
use vnode_api::client::Client;
use vnode_tests::{vnode_testguest, wait_deadline, Finished};

const DEADLINE: Duration = Duration::from_secs(120);

/// A vnode running the test guest with its API socket and its serial console in a file.
struct Run {
    child: Child,
    api: Client,
    serial: PathBuf,
    _dir: PathBuf,
}

impl Run {
    /// `vnode_id`: distinct per test (tests run in parallel, a server's port may be reused by
    /// another test's server, and a stale copy is freed by address and vNode).
    fn start(servers: &str, spares: Option<&str>, vnode_id: u64) -> Run {
        let dir = temp_dir("rerepl");
        let serial = dir.join("serial.out");
        let sock = dir.join("api.sock");
        let mut args = vec![
            "--mem-server".to_string(),
            servers.to_string(),
            "--local-mem".into(),
            "12M".into(),
            "--vnode-id".into(),
            vnode_id.to_string(),
            "--serial".into(),
            serial.display().to_string(),
            "--api-socket".into(),
            sock.display().to_string(),
            "--stats".into(),
        ];
        if let Some(s) = spares {
            args.extend(["--mem-spare".to_string(), s.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmdline = "test=mem bytes=96M pattern=random seed=11 writes=70 passes=2";
        let mut cmd = vnode_testguest("128M", 1, cmdline, &args);
        cmd.env("VNODE_SECRET", SECRET_STR);
        cmd.env("VNODE_LOG", "remote_mem=info,vmm=info");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vnode");
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < DEADLINE, "no API socket");
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "vnode exited early"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let api = Client::new(&sock).expect("API client");
        Run {
            child,
            api,
            serial: serial.clone(),
            _dir: dir,
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until `cond` holds for guest RAM's replication record (from `GET /vm/counters`).
    fn wait_replication(&mut self, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
        let start = Instant::now();
        loop {
            let c = self.api.counters().expect("counters");
            let r = serde_json::to_value(c.excache.and_then(|e| e.replication)).expect("json");
            if cond(&r) {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: never happened: {r}\n{}",
                self.console()
            );
            assert!(
                self.child.try_wait().expect("try_wait").is_none(),
                "vnode exited while waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_console(&mut self, needle: &str) {
        let start = Instant::now();
        while !self.console().contains(needle) {
            assert!(start.elapsed() < DEADLINE, "no {needle} on the console");
            assert!(
                self.child.try_wait().expect("try_wait").is_none(),
                "vnode exited early"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> Finished {
        let status = wait_deadline(&mut self.child, DEADLINE);
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().expect("stderr"), &mut stderr)
            .expect("read stderr");
        Finished {
            status,
            stdout: self.console(),
            stderr,
        }
    }
}

fn replica<'a>(r: &'a serde_json::Value, role: &str) -> &'a serde_json::Value {
    r["replicas"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["role"] == role))
        .unwrap_or_else(|| panic!("no {role}: {r}"))
}

/// The memory-log files of `dir` (one per region held).
fn mlogs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "mlog"))
                .count()
        })
        .unwrap_or(0)
}

/// The scenario: `add_spare` gives vnode the spare (on its command line already, or through
/// the API).
fn rereplicate_then_lose_the_other(spare_on_cli: bool) {
    let mut primary = Memd::start(&["--capacity", "1G"]);
    let backup_dir = temp_dir("rerepl-backup");
    let dir_arg = backup_dir.display().to_string();
    let mut backup = Memd::start(&["--capacity", "1G", "--data-dir", &dir_arg]);
    let spare = Memd::start(&["--capacity", "1G"]);
    let servers = format!("{},{}", primary.addr, backup.addr);
    let backup_addr = backup.addr.clone();
    let vnode_id = if spare_on_cli { 0x5e1 } else { 0x5e2 };
    let t0 = Instant::now();
    let mut run = Run::start(
        &servers,
        spare_on_cli.then_some(spare.addr.as_str()),
        vnode_id,
    );
    if !spare_on_cli {
        run.api
            .add_mem_spare(&spare.addr)
            .expect("PUT /vm/mem/spare");
    }

    // Once the fill has pushed pages out to both servers, the backup dies.
    run.wait_console("\"phase\":\"fill\"");
    eprintln!("{:?} fill done", t0.elapsed());
    backup.kill9();
    assert_eq!(
        mlogs(&backup_dir),
        1,
        "the dead backup's copy is on its disk"
    );
    run.wait_replication("re-replication", |r| {
        r["rereplications"] == 1 && r["state"] == "healthy"
    });
    eprintln!("{:?} re-replicated", t0.elapsed());
    let r = serde_json::to_value(run.api.counters().expect("counters").excache).expect("json");
    let r = &r["replication"];
    assert_eq!(replica(r, "backup")["server"], spare.addr.as_str(), "{r}");
    assert_eq!(replica(r, "backup")["state"], "healthy", "{r}");
    assert_eq!(
        replica(r, "primary")["server"],
        primary.addr.as_str(),
        "{r}"
    );
    assert_eq!(r["failovers"], 1, "{r}");
    assert_eq!(r["stale_copies"][0], backup_addr.as_str(), "{r}");
    let metrics = run.api.metrics_text().expect("metrics");
    assert!(
        metrics.contains("vnode_excache_replication_state{state=\"healthy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vnode_excache_replication_rereplications_total 1"),
        "{metrics}"
    );

    // The old backup comes back with its memory log (its region recovered). The guest is
    // paused (so it has not verified its pages yet when the primary dies below, and vnode's
    // fault thread is idle, when it frees stale copies): vnode frees the stale copy.
    let _back = Memd::start_on(&backup_addr, &["--capacity", "1G", "--data-dir", &dir_arg]);
    run.api.pause().expect("pause");
    let console = run.console();
    assert!(
        !console.contains("\"phase\":\"passes\""),
        "the guest finished too early for the test: {console}"
    );
    run.wait_replication("stale copy freed", |r| {
        r["stale_copies"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(
        mlogs(&backup_dir),
        0,
        "the stale copy is freed on the server"
    );
    eprintln!("{:?} stale copy freed", t0.elapsed());

    // Now the original primary dies, before the guest is done with its passes and verifies
    // its pages: every page it reads from here on comes from the new copy.
    primary.kill9();
    run.api.resume().expect("resume");
    let f = run.finish();
    eprintln!("{:?} finished", t0.elapsed());

    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line:\n{}\n{}", f.stdout, f.stderr));
    assert_eq!(done["ok"], true, "{}\n{}", f.stdout, f.stderr);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    assert_eq!(f.last_with("test").expect("test report")["errors"], 0);
    let line = f
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{') && l.contains("\"excache\""))
        .unwrap_or_else(|| panic!("no stats line:\n{}", f.stderr));
    let s: serde_json::Value = serde_json::from_str(line).expect("stats JSON");
    let s = &s["excache"];
    assert!(
        s["fetched"].as_u64().unwrap() > 20_000,
        "pages came back: {s}"
    );
    let r = &s["replication"];
    assert_eq!(r["state"], "degraded", "{r}");
    assert_eq!(r["rereplications"], 1, "{r}");
    assert_eq!(r["failovers"], 2, "{r}");
    assert_eq!(replica(r, "primary")["state"], "failed", "{r}");
    assert_eq!(replica(r, "backup")["server"], spare.addr.as_str(), "{r}");
    assert_eq!(replica(r, "backup")["state"], "healthy", "{r}");
    let _ = std::fs::remove_dir_all(&backup_dir);
}

#[test]
fn rereplication_mem_to_a_cli_spare_survives_losing_both_originals() {
    rereplicate_then_lose_the_other(true);
}

#[test]
fn rereplication_mem_to_an_api_spare_survives_losing_both_originals() {
    rereplicate_then_lose_the_other(false);
}
