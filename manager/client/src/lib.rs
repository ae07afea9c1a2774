//! A client of the vNode manager: its REST API types ([`types`]) and a blocking HTTP client
//! ([`Client`]) that follows a follower's redirect to the leader and tries each given manager in
//! turn, so agents, servers and vnodectl work with one manager or several (etcd HA).

pub mod client;
#[cfg(feature = "ctl")]
pub mod ctl;
pub mod heartbeat;
pub mod types;

pub use client::{Client, ClientError};
