//! Registration and heartbeats, the same for every kind of host: register (again whenever the
//! manager forgets the host), then every interval send a [`Heartbeat`] and act on the
//! [`HeartbeatReply`]. The compute/storage agent drives [`Beater`] from its own loop;
//! vnode-memd runs [`spawn`] on a thread.

use std::time::Duration;

use crate::client::{Client, ClientError};
use crate::types::{Heartbeat, HeartbeatReply, HostView, RegisterHost};

/// One host's registration and heartbeats.
pub struct Beater {
    client: Client,
    id: String,
    reg: RegisterHost,
    registered: bool,
    failures: u64,
}

impl Beater {
    pub fn new(client: Client, id: impl Into<String>, reg: RegisterHost) -> Beater {
        Beater {
            client,
            id: id.into(),
            reg,
            registered: false,
            failures: 0,
        }
    }

    /// Registers if needed, then sends `hb`. A 404 (the manager does not know this host) makes
    /// the next call register again.
    pub fn beat(&mut self, hb: &Heartbeat) -> Result<HeartbeatReply, ClientError> {
        if !self.registered {
            let _: HostView = self.client.put(&format!("/hosts/{}", self.id), &self.reg)?;
            self.registered = true;
            tracing::info!(host = %self.id, kind = %self.reg.kind, "registered with the manager");
        }
        let r = self
            .client
            .post(&format!("/hosts/{}/heartbeat", self.id), hb);
        match &r {
            Err(e) if e.status() == Some(404) => self.registered = false,
            Err(e) => {
                // Log the first failure and then one in 30, not one a second.
                if self.failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                self.failures += 1;
            }
            Ok(_) => self.failures = 0,
        }
        r
    }
}

/// Beats forever on a thread named `heartbeat`: `report` builds each heartbeat, `apply` acts on
/// each reply.
pub fn spawn(
    mut beater: Beater,
    mut report: impl FnMut() -> Heartbeat + Send + 'static,
    mut apply: impl FnMut(HeartbeatReply) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            let mut wait = Duration::from_secs(1);
            if let Ok(reply) = beater.beat(&report()) {
                wait = Duration::from_millis(reply.interval_ms.clamp(50, 10_000));
                apply(reply);
            }
            std::thread::sleep(wait);
        })
}
