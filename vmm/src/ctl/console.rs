//! The guest console protocol of our Linux images (guest-images/scripts/linux-guest-init.sh and
//! linux-initramfs-init.sh), parsed line by line as vnode streams the serial console:
//!
//! ```text
//! VNODE-INITRAMFS-UP uptime=4.70 ...       the initramfs runs (the kernel booted)
//! VNODE-INIT-UP uptime=6.42 ... job=NAME   the root filesystem's /sbin/init runs
//! VNODE-JSON-BEGIN
//! {"job":"...", ...}                       one JSON object a line; a serving job prints
//! {"job":"...","ready":true,...}           one with "ready":true when the host may start
//! VNODE-JSON-END                           its load, then waits for "stop" on the console
//! VNODE-EXIT rc=N                          then the guest powers off
//! ```
//!
//! Anything else (kernel messages, a shell's echo, a test guest's own output) is noise. A line
//! between the markers that is not a JSON object is kept as noise too, not fatal: a kernel message
//! can land in the middle of the results.

use serde_json::Value;

/// One console line, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    InitramfsUp {
        uptime_s: Option<f64>,
    },
    InitUp {
        uptime_s: Option<f64>,
    },
    JsonBegin,
    /// A JSON object between the markers.
    Json(Value),
    /// A JSON object with `"ready": true`: the guest serves and waits for the host.
    Ready(Value),
    JsonEnd,
    Exit {
        rc: Option<i32>,
    },
    Noise,
}

/// What the console said so far.
#[derive(Debug, Default, Clone)]
pub struct Console {
    pub initramfs_up_s: Option<f64>,
    pub init_up_s: Option<f64>,
    pub began: bool,
    pub ended: bool,
    pub objects: Vec<Value>,
    pub exit_rc: Option<i32>,
    /// Lines between the markers that were not JSON objects.
    pub bad_lines: Vec<String>,
    /// The last lines seen (for error messages), at most [`TAIL_LINES`].
    pub tail: Vec<String>,
}

/// How many trailing console lines an error message quotes.
pub const TAIL_LINES: usize = 15;

/// `key=value` from a marker line, e.g. `uptime=4.70`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl Console {
    /// Feeds one console line (without its newline; a trailing `\r` is ignored).
    pub fn feed(&mut self, raw: &str) -> Event {
        let line = raw.trim_end_matches(['\r', '\n']);
        if self.tail.len() == TAIL_LINES {
            self.tail.remove(0);
        }
        self.tail.push(line.to_owned());
        // Markers may follow other output on the same line (a kernel message without its newline).
        let marker = |m: &str| line.find(m).map(|i| &line[i..]);
        if let Some(l) = marker("VNODE-INITRAMFS-UP") {
            self.initramfs_up_s = field(l, "uptime").and_then(|v| v.parse().ok());
            return Event::InitramfsUp {
                uptime_s: self.initramfs_up_s,
            };
        }
        if let Some(l) = marker("VNODE-INIT-UP") {
            self.init_up_s = field(l, "uptime").and_then(|v| v.parse().ok());
            return Event::InitUp {
                uptime_s: self.init_up_s,
            };
        }
        if marker("VNODE-JSON-BEGIN").is_some() {
            self.began = true;
            return Event::JsonBegin;
        }
        if marker("VNODE-JSON-END").is_some() {
            self.ended = true;
            return Event::JsonEnd;
        }
        if let Some(l) = marker("VNODE-EXIT") {
            self.exit_rc = field(l, "rc").and_then(|v| v.parse().ok());
            return Event::Exit { rc: self.exit_rc };
        }
        if !self.began || self.ended {
            return Event::Noise;
        }
        match serde_json::from_str::<Value>(line.trim()) {
            Ok(v) if v.is_object() => {
                self.objects.push(v.clone());
                if v["ready"] == true {
                    Event::Ready(v)
                } else {
                    Event::Json(v)
                }
            }
            _ => {
                if !line.trim().is_empty() {
                    self.bad_lines.push(line.to_owned());
                }
                Event::Noise
            }
        }
    }

    /// The result objects of job `name` (all objects whose "job" is `name`).
    pub fn job<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Value> {
        self.objects.iter().filter(move |v| v["job"] == name)
    }

    /// Why the guest's results are not usable, if they are not: no results at all, results cut
    /// short, or a failed job (the summary's rc, VNODE-EXIT's rc, an "error" or "ok":false).
    pub fn verdict(&self) -> Result<(), Failure> {
        if !self.began {
            return Err(if self.init_up_s.is_some() {
                Failure::NoResults("the guest's init started but printed no VNODE-JSON block")
            } else if self.initramfs_up_s.is_some() {
                Failure::NoResults(
                    "the guest's initramfs ran but its /sbin/init never started and no VNODE-JSON block came",
                )
            } else {
                Failure::NoResults(
                    "no VNODE-JSON block on the console: the guest never reached its init (not one of our Linux images, or it did not boot)",
                )
            });
        }
        if !self.ended {
            return Err(Failure::NoResults(
                "the console ended inside the VNODE-JSON block (the guest stopped before VNODE-JSON-END)",
            ));
        }
        if let Some(v) = self
            .objects
            .iter()
            .find(|v| v.get("error").is_some_and(|e| !e.is_number() || e != 0))
        {
            return Err(Failure::Job(format!(
                "the guest job reported an error: {v}"
            )));
        }
        if let Some(v) = self
            .objects
            .iter()
            .find(|v| v["ok"] == false || v["verified"] == false || v["ready"] == false)
        {
            return Err(Failure::Job(format!("the guest job failed: {v}")));
        }
        if let Some(s) = self.job("summary").last() {
            if s["rc"] != 0 {
                return Err(Failure::Job(format!("the guest job failed: {s}")));
            }
        }
        match self.exit_rc {
            Some(0) => Ok(()),
            Some(rc) => Err(Failure::Job(format!(
                "the guest reported VNODE-EXIT rc={rc}"
            ))),
            None => Err(Failure::NoResults(
                "the guest printed its results but no VNODE-EXIT line",
            )),
        }
    }
}

/// Why a guest run gave no usable results.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    NoResults(&'static str),
    #[error("{0}")]
    Job(String),
}

/// The JSON document vnode prints with `--stats`: the last stderr line that starts with '{'.
pub fn stats_line(stderr: &str) -> Option<Value> {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
}

/// vnode's own error line (`vnode: error: ...`), if it printed one.
pub fn vnode_error(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("vnode: error:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(text: &str) -> (Console, Vec<Event>) {
        let mut c = Console::default();
        let ev = text.lines().map(|l| c.feed(l)).collect();
        (c, ev)
    }

    const GOOD: &str = "[    0.000000] Linux version 6.1.0\r
VNODE-INITRAMFS-UP uptime=4.70 kernel=6.1.0-56-cloud-amd64 cpus=2
vnode-initramfs: modules loaded: virtio
VNODE-INIT-UP uptime=6.42 kernel=6.1.0-56-cloud-amd64 cpus=2 mem_kb=996612 job=fio-randread
VNODE-JSON-BEGIN
{\"job\":\"fio-randread\",\"rc\":0,\"iops\":1234.5,\"error\":0}
{\"job\":\"summary\",\"name\":\"fio-randread\",\"rc\":0}
VNODE-JSON-END
VNODE-EXIT rc=0
reboot: Power down";

    #[test]
    fn a_complete_run_parses() {
        let (c, ev) = feed_all(GOOD);
        assert_eq!(c.initramfs_up_s, Some(4.70));
        assert_eq!(c.init_up_s, Some(6.42));
        assert!(c.began && c.ended);
        assert_eq!(c.objects.len(), 2);
        assert_eq!(c.job("fio-randread").next().unwrap()["iops"], 1234.5);
        assert_eq!(c.exit_rc, Some(0));
        assert_eq!(c.verdict(), Ok(()));
        assert_eq!(ev[0], Event::Noise);
        assert_eq!(ev[4], Event::JsonBegin);
        assert!(matches!(ev[5], Event::Json(_)));
        assert_eq!(ev[8], Event::Exit { rc: Some(0) });
    }

    #[test]
    fn json_outside_the_markers_is_ignored() {
        let (c, _) = feed_all("{\"job\":\"x\"}\nVNODE-JSON-BEGIN\nVNODE-JSON-END\n{\"job\":\"y\"}");
        assert!(c.objects.is_empty());
    }

    #[test]
    fn noise_inside_the_block_is_kept_aside() {
        let (c, _) = feed_all(
            "VNODE-JSON-BEGIN\n[   12.3] random: crng init done\n{\"job\":\"boot\"}\n{broken\n\nVNODE-JSON-END\nVNODE-EXIT rc=0",
        );
        assert_eq!(c.objects.len(), 1);
        assert_eq!(c.bad_lines, ["[   12.3] random: crng init done", "{broken"]);
        assert_eq!(c.verdict(), Ok(()));
    }

    #[test]
    fn a_marker_after_other_output_on_the_same_line_counts() {
        let (c, _) = feed_all("[ 5.0] eth0: link up VNODE-INIT-UP uptime=7.5 job=x");
        assert_eq!(c.init_up_s, Some(7.5));
    }

    #[test]
    fn ready_is_its_own_event() {
        let mut c = Console::default();
        c.feed("VNODE-JSON-BEGIN");
        let ev = c.feed("{\"job\":\"memcached-serve\",\"ready\":true,\"ip\":\"10.0.0.2\"}");
        match ev {
            Event::Ready(v) => assert_eq!(v["ip"], "10.0.0.2"),
            other => panic!("{other:?}"),
        }
        // ready:false is a result (a failure), not a go-ahead
        let ev = c.feed("{\"job\":\"memcached-serve\",\"ready\":false,\"error\":\"x\"}");
        assert!(matches!(ev, Event::Json(_)));
    }

    #[test]
    fn no_markers_at_all_says_the_guest_never_reached_init() {
        let (c, _) = feed_all("testguest: cpu test\nresult 42\n");
        let e = c.verdict().unwrap_err();
        assert!(e.to_string().contains("no VNODE-JSON"), "{e}");
        assert!(e.to_string().contains("never reached its init"), "{e}");
    }

    #[test]
    fn initramfs_only_is_named() {
        let (c, _) = feed_all("VNODE-INITRAMFS-UP uptime=3.0\nvnode-initramfs: ERROR: x");
        let e = c.verdict().unwrap_err();
        assert!(e.to_string().contains("/sbin/init never started"), "{e}");
    }

    #[test]
    fn a_block_cut_short_is_an_error() {
        let (c, _) = feed_all("VNODE-INIT-UP uptime=1\nVNODE-JSON-BEGIN\n{\"job\":\"a\"}");
        let e = c.verdict().unwrap_err();
        assert!(e.to_string().contains("inside the VNODE-JSON block"), "{e}");
    }

    #[test]
    fn failed_jobs_are_errors() {
        for (body, want) in [
            (
                "{\"job\":\"fio-verify\",\"rc\":1,\"error\":84,\"verified\":false}",
                "error",
            ),
            (
                "{\"job\":\"fio-verify\",\"rc\":0,\"error\":0,\"verified\":false}",
                "failed",
            ),
            (
                "{\"job\":\"fio-randread\",\"error\":\"no such block device\"}",
                "error",
            ),
            ("{\"job\":\"memcached-check\",\"ok\":false}", "failed"),
            ("{\"job\":\"summary\",\"rc\":2}", "failed"),
        ] {
            let (c, _) = feed_all(&format!(
                "VNODE-JSON-BEGIN\n{body}\nVNODE-JSON-END\nVNODE-EXIT rc=0"
            ));
            let e = c.verdict().unwrap_err();
            assert!(matches!(e, Failure::Job(_)), "{body}: {e:?}");
            assert!(e.to_string().contains(want), "{body}: {e}");
        }
        let (c, _) = feed_all("VNODE-JSON-BEGIN\n{\"job\":\"a\"}\nVNODE-JSON-END\nVNODE-EXIT rc=3");
        assert!(c.verdict().unwrap_err().to_string().contains("rc=3"));
        let (c, _) = feed_all("VNODE-JSON-BEGIN\n{\"job\":\"a\"}\nVNODE-JSON-END");
        assert!(c
            .verdict()
            .unwrap_err()
            .to_string()
            .contains("no VNODE-EXIT"));
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let (c, _) = feed_all(&text);
        assert_eq!(c.tail.len(), TAIL_LINES);
        assert_eq!(c.tail.last().unwrap(), "line 39");
    }

    #[test]
    fn stats_and_errors_from_vnode_stderr() {
        let err = "warn: x\n{\"vmm\":{\"exits\":1}}\nsomething\n{\"vmm\":{\"exits\":7},\"excache\":null}\n";
        assert_eq!(stats_line(err).unwrap()["vmm"]["exits"], 7);
        assert!(stats_line("no json\n{broken").is_none());
        assert_eq!(
            vnode_error("x\nvnode: error: cannot build the VM: no such file\n"),
            Some("vnode: error: cannot build the VM: no such file")
        );
        assert_eq!(vnode_error("fine"), None);
    }
}
