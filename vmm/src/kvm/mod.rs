//! The only module that speaks kvm-ioctls: the VM, its vCPUs, and the dispatch of VM exits.
mod exit;
pub mod persist;
mod vcpu;
mod vm;

pub use exit::{handle_exit, ExitAction};
pub use vcpu::{
    install_kick_handler, kick_signal, Vcpu, VcpuBoot, VcpuControl, VcpuWant,
    RUN_TIME_IOCTLS as VCPU_RUN_TIME_IOCTLS,
};
pub use vm::Vm;

use std::path::PathBuf;

/// What failed while talking to KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open KVM device {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable KVM device")]
    NotKvm {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not the expected 12")]
    ApiVersion(i32),
    #[error("saved vCPU state is inconsistent: {0}")]
    BadState(&'static str),
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub(crate) fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}
