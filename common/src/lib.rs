//! What every vNode binary (vnode, vnode-memd, vnode-blkd, the manager, the agent, vnodectl)
//! does the same way, written once: size parsing, secret loading, per-vNode credentials, and (as
//! they are added) the CLI contract, logging set-up, metrics exposition and readiness. Links no
//! KVM.

pub mod cred;
pub mod secret;
pub mod size;

/// Environment variable holding the cluster key when no `--secret-file` is given.
pub const CLUSTER_KEY_ENV: &str = "VNODE_SECRET";
