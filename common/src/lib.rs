//! What every vNode binary (vnode, vnode-memd, vnode-blkd, the manager, the agent, vnodectl)
//! does the same way, written once: size parsing, secret loading, the CLI contract (`cli`: error
//! line, exit codes, `--generate`), logging set-up, `--version` with the commit, metrics
//! exposition, and the readiness line servers print (with the helper tests use to wait for it).
//! Links no KVM.

pub mod cli;
pub mod deadline;
pub mod logging;
pub mod metrics;
pub mod ready;
pub mod secret;
pub mod size;
pub mod version;
