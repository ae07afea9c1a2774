//! Readiness, written once: every server prints `listening on ADDR` on stdout (flushed) once it
//! accepts connections, after `metrics on ADDR` when it has `--metrics-listen`, and can also write
//! ADDR to a `--ready-file` (atomically). Scripts and tests bind port 0 and wait for the line
//! instead of sleeping; `spawn_and_wait` is that wait for tests and tools.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The line a server prints when it accepts connections: `listening on ADDR`.
pub const LISTENING: &str = "listening on ";
/// The line before it when the server serves metrics: `metrics on ADDR`.
pub const METRICS: &str = "metrics on ";

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("cannot write the readiness line")]
    Stdout(#[source] std::io::Error),
    #[error("cannot write {path}")]
    ReadyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} exited ({status}) before it was listening; it printed: {printed:?}")]
    Exited {
        program: String,
        status: String,
        printed: Vec<String>,
    },
    #[error("{program} was not listening after {waited:?}; it printed: {printed:?}")]
    Timeout {
        program: String,
        waited: Duration,
        printed: Vec<String>,
    },
}

fn print_line(line: &str) -> Result<(), ReadyError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(ReadyError::Stdout)
}

/// Prints `listening on ADDR` and writes ADDR to `ready_file` if given.
pub fn announce(addr: &str, ready_file: Option<&Path>) -> Result<(), ReadyError> {
    if let Some(path) = ready_file {
        write_ready_file(path, addr)?;
    }
    print_line(&format!("{LISTENING}{addr}"))
}

/// Prints `metrics on ADDR` (before `announce`).
pub fn announce_metrics(addr: &str) -> Result<(), ReadyError> {
    print_line(&format!("{METRICS}{addr}"))
}

/// Writes `ADDR\n` to `path` through a temporary file and a rename, so a reader never sees half.
pub fn write_ready_file(path: &Path, addr: &str) -> Result<(), ReadyError> {
    let err = |source| ReadyError::ReadyFile {
        path: path.display().to_string(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{addr}\n")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// A server started by `spawn_and_wait`.
#[derive(Debug)]
pub struct Started {
    pub child: Child,
    /// ADDR from `listening on ADDR`.
    pub addr: String,
    /// ADDR from `metrics on ADDR`, if it printed one.
    pub metrics_addr: Option<String>,
    /// Everything it printed on stdout up to its readiness line.
    pub printed: Vec<String>,
    /// Its later stdout lines (stdout is drained, so the server never blocks on it).
    pub later: Receiver<String>,
}

/// A server a test started is killed when the test ends, passed or not.
impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` with stdout piped (stdin null unless set) and waits up to `timeout` for its
/// `listening on ADDR` line. On failure the child is killed and reaped.
pub fn spawn_and_wait(cmd: &mut Command, timeout: Duration) -> Result<Started, ReadyError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| ReadyError::Spawn {
            program: program.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        let spawned = std::thread::Builder::new()
            .name("ready-stdout".into())
            .spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    // The receiver may be gone: keep draining anyway.
                    let _ = tx.send(line);
                }
            });
        if let Err(source) = spawned {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ReadyError::Spawn { program, source });
        }
    }
    let deadline = Instant::now() + timeout;
    let mut printed = Vec::new();
    let mut metrics_addr = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let t = line.trim();
                if let Some(a) = t.strip_prefix(METRICS) {
                    metrics_addr = Some(a.to_owned());
                }
                if let Some(a) = t.strip_prefix(LISTENING) {
                    let addr = a.to_owned();
                    printed.push(line);
                    return Ok(Started {
                        child,
                        addr,
                        metrics_addr,
                        printed,
                        later: rx,
                    });
                }
                printed.push(line);
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = reap(&mut child, Duration::from_secs(5));
                return Err(ReadyError::Exited {
                    program,
                    status,
                    printed,
                });
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ReadyError::Timeout {
                    program,
                    waited: timeout,
                    printed,
                });
            }
        }
    }
}

/// Waits for a child whose stdout closed (it is exiting), killing it after `grace`.
fn reap(child: &mut Child, grace: Duration) -> String {
    let until = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return describe(st),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                return child.wait().map_or_else(|e| e.to_string(), describe);
            }
        }
    }
}

fn describe(st: ExitStatus) -> String {
    st.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_line_and_keeps_what_came_before() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo hello; echo 'metrics on 127.0.0.1:9'; sleep 0.2; echo 'listening on 127.0.0.1:7'; echo after; sleep 5",
        ]);
        let mut s = spawn_and_wait(&mut cmd, Duration::from_secs(10)).expect("ready");
        assert_eq!(s.addr, "127.0.0.1:7");
        assert_eq!(s.metrics_addr.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(s.printed[0], "hello");
        assert_eq!(
            s.later.recv_timeout(Duration::from_secs(5)).as_deref(),
            Ok("after")
        );
        let _ = s.child.kill();
        let _ = s.child.wait();
    }

    #[test]
    fn a_server_that_exits_or_hangs_is_an_error() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops; exit 3"]);
        let e = spawn_and_wait(&mut cmd, Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(&e, ReadyError::Exited { printed, .. } if printed == &["oops"]),
            "{e}"
        );
        assert!(e.to_string().contains("exit status: 3"), "{e}");
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let t = Instant::now();
        let e = spawn_and_wait(&mut cmd, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ReadyError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn ready_file_is_written_whole() {
        let dir = std::env::temp_dir().join(format!("vnode-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("ready");
        write_ready_file(&p, "127.0.0.1:5").expect("write");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "127.0.0.1:5\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
