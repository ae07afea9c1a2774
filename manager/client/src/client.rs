//! A blocking client of the manager's REST API. Given several manager URLs (etcd HA), it sends
//! each request to the one that answered last; on a connection failure it tries the next, and on
//! a follower's 503 naming the leader it goes to the leader.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The manager answered with an error status and a message.
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
    #[error("no manager reachable at {urls}: {last}")]
    Unreachable { urls: String, last: String },
    #[error("bad reply from {url}: {detail}")]
    Decode { url: String, detail: String },
}

impl ClientError {
    /// The HTTP status, if the manager answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one manager or of several (the first that answers, the leader when redirected).
pub struct Client {
    urls: Vec<String>,
    current: AtomicUsize,
    agent: ureq::Agent,
}

impl Client {
    /// `urls`: one or more manager base URLs, e.g. `http://127.0.0.1:7700`, comma-separated
    /// lists accepted.
    pub fn new(urls: &str) -> Client {
        let urls = urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .map(|u| {
                if u.contains("://") {
                    u
                } else {
                    format!("http://{u}")
                }
            })
            .collect();
        Client {
            urls,
            current: AtomicUsize::new(0),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .build(),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call("POST", path, Some(body))
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call("PUT", path, Some(body))
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("DELETE", path, None::<&()>)
    }

    /// Sends one request, trying each manager once (and a named leader once).
    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let n = self.urls.len().max(1);
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no manager URL given");
        let mut redirect: Option<String> = None;
        let mut tries = 0;
        while tries < n + 1 {
            let (base, idx) = match redirect.take() {
                Some(leader) => (leader, None),
                None if tries < n => {
                    let i = (start + tries) % n;
                    tries += 1;
                    (self.urls[i].clone(), Some(i))
                }
                None => break,
            };
            match self.once(method, &base, path, body) {
                Ok(v) => {
                    if let Some(i) = idx {
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(Attempt::Follower(leader, msg)) => {
                    last = msg;
                    redirect = leader.filter(|l| *l != base);
                }
                Err(Attempt::Unreachable(msg)) => last = format!("{base}: {msg}"),
                Err(Attempt::Final(e)) => return Err(e),
            }
        }
        Err(ClientError::Unreachable {
            urls: self.urls.join(","),
            last,
        })
    }

    fn once<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        base: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Attempt> {
        let url = format!("{base}{path}");
        let req = self.agent.request(method, &url);
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| {
                    Attempt::Final(ClientError::Decode {
                        url: url.clone(),
                        detail: e.to_string(),
                    })
                })?;
                let text = if text.is_empty() { "null" } else { &text };
                serde_json::from_str(text).map_err(|e| {
                    Attempt::Final(ClientError::Decode {
                        url,
                        detail: e.to_string(),
                    })
                })
            }
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let (message, leader) = match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(b) => (b.error, b.leader),
                    Err(_) => (text, None),
                };
                if status == 503 {
                    return Err(Attempt::Follower(leader, message));
                }
                Err(Attempt::Final(ClientError::Status { status, message }))
            }
            Err(ureq::Error::Transport(t)) => Err(Attempt::Unreachable(t.to_string())),
        }
    }
}

enum Attempt {
    /// 503 from a follower (or a manager without a leader): try the named leader, or the next.
    Follower(Option<String>, String),
    Unreachable(String),
    Final(ClientError),
}
