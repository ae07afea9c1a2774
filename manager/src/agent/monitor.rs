//! The per-process monitor (like podman's conmon): `vnode-agent monitor --dir D -- PROGRAM ARGS`
//! starts PROGRAM in its own session, writes its pid to `D/pid`, waits for it and writes how it
//! ended to `D/exit` (atomically). The agent starts one per vNode (and per NBD export), so a
//! process outlives an agent restart and its exit status is never lost: the restarted agent
//! reads `D/exit`, or finds the process still running by `D/pid`.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// How a monitored process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Ended {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "ended, status unknown".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for the child")]
    Wait(#[source] std::io::Error),
}

/// Writes `body` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<(), MonitorError> {
    let tmp = path.with_extension("tmp");
    let w = |p: &Path| MonitorError::Write {
        path: p.to_owned(),
        source: std::io::Error::last_os_error(),
    };
    std::fs::write(&tmp, body).map_err(|_| w(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|_| w(path))
}

/// Runs `program args` with stdout/stderr to `dir/log`, until it ends; records pid and end.
pub fn run(dir: &Path, program: &Path, args: &[String]) -> Result<Ended, MonitorError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .map_err(|source| MonitorError::Write {
            path: dir.join("log"),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| MonitorError::Write {
        path: dir.join("log"),
        source,
    })?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent; it only makes
    // the child a session leader, so a signal to the agent's process group does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| MonitorError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    write_atomic(&dir.join("pid"), child.id().to_string().as_bytes())?;
    let st = child.wait().map_err(MonitorError::Wait)?;
    let ended = Ended {
        code: st.code(),
        signal: st.signal(),
    };
    let body = serde_json::to_vec(&ended).expect("plain data serializes");
    write_atomic(&dir.join("exit"), &body)?;
    Ok(ended)
}

/// How the process monitored in `dir` ended, if it has.
pub fn ended(dir: &Path) -> Option<Ended> {
    let b = std::fs::read(dir.join("exit")).ok()?;
    serde_json::from_slice(&b).ok()
}

/// The pid of the process monitored in `dir`, if it is alive.
pub fn alive_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A zombie counts as gone: its monitor is about to write `exit`.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
    (state != 'Z' && state != 'X').then_some(pid)
}

/// Starts `vnode-agent monitor` (this executable) for `program args` in `dir`, detached.
pub fn start(dir: &Path, program: &Path, args: &[String]) -> Result<(), MonitorError> {
    let me = std::env::current_exe().map_err(|source| MonitorError::Spawn {
        program: "vnode-agent".into(),
        source,
    })?;
    let mut cmd = Command::new(&me);
    cmd.arg("monitor")
        .arg("--dir")
        .arg(dir)
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: as in `run`: setsid() only, so the monitor outlives the agent and its group.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| MonitorError::Spawn {
        program: me.clone(),
        source,
    })?;
    // Reap the monitor when it ends, so it does not linger as a zombie of the agent.
    std::thread::Builder::new()
        .name("reap-monitor".into())
        .spawn(move || {
            let _ = child.wait();
        })
        .map_err(|source| MonitorError::Spawn {
            program: me,
            source,
        })?;
    Ok(())
}
