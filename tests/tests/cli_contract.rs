//! The CLI contract every binary follows (README "CLI contract", `vnode_common::cli`), checked on
//! the real binaries: `--version` names the commit, errors are one `NAME: error:` line, exit
//! codes are as documented and never overlap a guest's status, options are checked before any
//! file or directory is created, `--generate` gives completions and man pages, logs have no
//! ANSI escapes off a terminal or with NO_COLOR, and `--log-format json` gives JSON lines.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vnode_common::ready::spawn_and_wait;
use vnode_tests::{bin, guest_image, run_with_deadline, Finished};

const BINARIES: [&str; 7] = [
    "vnode",
    "vnode-cred",
    "vnodectl",
    "vnode-memd",
    "vnode-blkd",
    "vnode-bench",
    "vnode-mem-bench",
];

fn run(name: &str, args: &[&str]) -> Finished {
    let mut c = Command::new(bin(name));
    c.args(args).env_remove("VNODE_SECRET");
    run_with_deadline(&mut c, Duration::from_secs(60))
}

fn scratch(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("vnode-cli-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// One `NAME: error: ...` line and nothing else on stderr.
fn one_error_line(name: &str, f: &Finished) -> String {
    let err = f.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
    assert!(
        err.starts_with(&format!("{name}: error: ")),
        "{name}: {err}"
    );
    err.to_owned()
}

#[test]
fn every_binary_shows_its_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(vnode_tests::repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success());
    for name in BINARIES {
        let f = run(name, &["--version"]);
        assert_eq!(f.status.code(), Some(0), "{name}: {}", f.stderr);
        let v = f.stdout.trim();
        let commit = v
            .strip_prefix(&format!("{name} {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name} --version: {v}"));
        let hash = commit.trim_end_matches("-dirty");
        if head.is_some() {
            // Built in this git tree: a real commit of it, not "unknown".
            assert_eq!(hash.len(), 12, "{name}: {v}");
            let known = Command::new("git")
                .args(["cat-file", "-e", &format!("{hash}^{{commit}}")])
                .current_dir(vnode_tests::repo_root())
                .status()
                .expect("git");
            assert!(known.success(), "{name}: {hash} is not a commit here");
        }
    }
}

#[test]
fn usage_errors_are_one_line_and_exit_250() {
    for name in BINARIES {
        let f = run(name, &["--no-such-option"]);
        assert_eq!(f.status.code(), Some(250), "{name}: {}", f.stderr);
        let line = one_error_line(name, &f);
        assert!(line.contains("--no-such-option"), "{line}");
    }
    // A subcommand-less call, and a missing required option.
    let f = run("vnode", &[]);
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    one_error_line("vnode", &f);
    let f = run("vnode-memd", &["--capacity", "1M"]);
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    assert!(one_error_line("vnode-memd", &f).contains("--listen"));
}

#[test]
fn help_documents_the_exit_codes() {
    for name in BINARIES {
        let f = run(name, &["--help"]);
        assert_eq!(f.status.code(), Some(0), "{name}: {}", f.stderr);
        assert!(f.stdout.contains("250"), "{name}: {}", f.stdout);
        assert!(f.stdout.contains("VNODE_LOG"), "{name}: {}", f.stdout);
    }
    let f = run("vnode", &["run", "--help"]);
    assert!(
        f.stdout.contains("0-249  the guest's own status"),
        "{}",
        f.stdout
    );
}

#[test]
fn completions_and_man_pages_are_generated() {
    for name in BINARIES {
        for (what, want) in [
            ("bash", format!("_{}", name.replace('-', "__"))),
            ("zsh", format!("#compdef {name}")),
            ("fish", format!("complete -c {name}")),
            ("man", format!(".TH {name}")),
        ] {
            let f = run(name, &["--generate", what]);
            assert_eq!(f.status.code(), Some(0), "{name} {what}: {}", f.stderr);
            assert!(f.stdout.contains(&want), "{name} {what}: want {want:?}");
        }
    }
}

#[test]
fn vnode_codes_tell_a_guest_status_from_its_own() {
    let tg = guest_image("testguest.elf");
    let tg = tg.to_str().expect("utf-8 path");
    // The test guest exits 2 on a command line it does not understand: vnode passes it on.
    let f = run(
        "vnode",
        &[
            "run",
            "--kernel",
            tg,
            "--mem",
            "64M",
            "--cmdline",
            "test=mem pattern=zigzag",
        ],
    );
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    // vnode's own: a bad value (250), a kernel that cannot be read (251).
    let f = run("vnode", &["run", "--kernel", tg, "--mem", "12Q"]);
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    one_error_line("vnode", &f);
    let f = run("vnode", &["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(f.status.code(), Some(251), "{}", f.stderr);
    assert!(one_error_line("vnode", &f).contains("/nonexistent/vmlinux"));
}

#[test]
fn blkd_creates_no_file_on_a_usage_error() {
    let dir = scratch("blkd");
    let img = dir.join("disk.img");
    let export = format!("d={}:1M", img.display());
    for args in [
        vec!["--export", export.as_str()],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--export",
            export.as_str(),
            "--threads",
            "pool:x",
        ],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--export",
            export.as_str(),
            "--secret",
            "other=s",
        ],
    ] {
        let f = run("vnode-blkd", &args);
        assert_eq!(f.status.code(), Some(250), "{args:?}: {}", f.stderr);
        one_error_line("vnode-blkd", &f);
        assert!(!img.exists(), "{args:?} created {}", img.display());
    }
    // An address it cannot bind is a set-up error, still before the file (--insecure: a
    // missing cluster key is itself a usage error, found first).
    let f = run(
        "vnode-blkd",
        &["--listen", "192.0.2.1:1", "--insecure", "--export", &export],
    );
    assert_eq!(f.status.code(), Some(251), "{}", f.stderr);
    assert!(!img.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memd_checks_data_dir_and_capacity_first() {
    let dir = scratch("memd");
    let nested = dir.join("missing/data");
    let f = run(
        "vnode-memd",
        &[
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "1M",
            "--insecure",
            "--data-dir",
        ],
    );
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    let mut c = Command::new(bin("vnode-memd"));
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "1M",
        "--insecure",
        "--data-dir",
    ])
    .arg(&nested);
    let f = run_with_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    assert!(f.stderr.contains("does not exist"), "{}", f.stderr);
    assert!(
        !dir.join("missing").exists(),
        "the missing parent was created"
    );
    // More than this host's memory, and more than the data dir's file system holds.
    let f = run(
        "vnode-memd",
        &[
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "100T",
            "--insecure",
        ],
    );
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    assert!(
        f.stderr
            .contains("--capacity 100 TiB is more than this host's RAM and swap ("),
        "{}",
        f.stderr
    );
    let mut c = Command::new(bin("vnode-memd"));
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "1000000T",
        "--insecure",
        "--data-dir",
    ])
    .arg(dir.join("new"));
    let f = run_with_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    assert!(
        f.stderr.contains("free there, two slots per page)"),
        "{}",
        f.stderr
    );
    assert!(!dir.join("new").exists());
    // A new last component under an existing parent is created.
    let mut c = Command::new(bin("vnode-memd"));
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "1M",
        "--insecure",
        "--data-dir",
    ])
    .arg(dir.join("new"))
    .stderr(Stdio::null());
    let s = spawn_and_wait(&mut c, Duration::from_secs(30)).expect("vnode-memd starts");
    assert!(dir.join("new").is_dir());
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts vnode-memd with `env` and `args`, lets it log for `secs`, and returns its stderr.
fn memd_stderr(env: &[(&str, &str)], args: &[&str], under_pty: bool, secs: f64) -> String {
    let dir = scratch("log");
    let log = dir.join("stderr");
    let memd = bin("vnode-memd");
    let cmdline = format!(
        "timeout -s INT {secs} {} --listen 127.0.0.1:0 --capacity 1M --insecure {} 2>{}",
        memd.display(),
        args.join(" "),
        log.display()
    );
    let mut c = if under_pty {
        // `script` gives the server a terminal; its stderr still goes to the file, so make
        // stderr the terminal instead and capture what `script` records.
        let mut c = Command::new("script");
        let inner = cmdline.replace(&format!(" 2>{}", log.display()), "");
        c.args(["-qfec", &inner]).arg(&log);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &cmdline]);
        c
    };
    c.env("VNODE_LOG", "info").env_remove("NO_COLOR");
    for (k, v) in env {
        c.env(k, v);
    }
    let _ = run_with_deadline(&mut c, Duration::from_secs(30));
    let s = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    s
}

#[test]
fn colours_only_on_a_terminal_without_no_color() {
    let piped = memd_stderr(&[], &[], false, 0.5);
    assert!(piped.contains("vnode-memd serving"), "{piped}");
    assert!(!piped.contains('\x1b'), "ANSI off a terminal: {piped:?}");
    let tty = memd_stderr(&[], &[], true, 0.5);
    assert!(tty.contains("vnode-memd serving"), "{tty}");
    assert!(tty.contains("\x1b["), "colours on a terminal: {tty:?}");
    let no_color = memd_stderr(&[("NO_COLOR", "1")], &[], true, 0.5);
    assert!(no_color.contains("vnode-memd serving"), "{no_color}");
    assert!(!no_color.contains("\x1b["), "NO_COLOR: {no_color:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let out = memd_stderr(
        &[],
        &["--log-format", "json", "--stats-interval", "1"],
        false,
        2.5,
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "vnode-memd serving" && v["level"] == "INFO"),
        "{out}"
    );
    // --stats-interval logs the counters periodically.
    let stats = lines
        .iter()
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("stats: connections="))
        })
        .count();
    assert!(stats >= 1, "{out}");
}
