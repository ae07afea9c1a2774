//! What every vNode binary (vnode, vnode-memd, vnode-blkd, the manager, the agent, vnodectl)
//! does the same way, written once: size parsing, secret loading, per-vNode credentials (`cred`),
//! the CLI contract (`cli`: error line, exit codes, `--generate`), logging set-up, `--version`
//! with the commit, metrics exposition, and the readiness line servers print (with the helper
//! tests use to wait for it). Links no KVM.

pub mod cli;
pub mod cred;
pub mod deadline;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod ready;
pub mod secret;
pub mod size;
pub mod version;

/// Environment variable holding the cluster key when no `--secret-file` is given.
pub const CLUSTER_KEY_ENV: &str = "VNODE_SECRET";
