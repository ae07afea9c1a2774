//! The vNode manager (LegoOS's GPM, GMM and GSM in one service): a registry of compute agents,
//! memory servers and storage hosts ([`registry`]), placement ([`placement`]), a REST API
//! ([`api`]) and durable state ([`store`]: SQLite, or etcd with leader election). Also the agent
//! ([`agent`]) that runs on compute and storage hosts. Links no KVM: the agent drives `vnode`
//! through its control API socket.

pub mod agent;
pub mod api;
pub mod credentials;
pub mod placement;
pub mod registry;
pub mod store;
