//! What every vNode binary (vnode, vnode-memd, vnode-blkd, the manager, the agent, vnodectl)
//! does the same way, written once: size parsing, secret loading, and (as they are added) the
//! CLI contract, logging set-up, metrics exposition and readiness. Links no KVM.

pub mod deadline;
pub mod secret;
pub mod size;
