//! RDMA transport (cargo feature `rdma`, over rdma-sys / libibverbs).
//!
//! The protocol is transport-neutral (a [`super::Conn`] is all the client and server need), so
//! an RDMA connection slots in as another `Conn`: frames sent with RDMA SEND into pre-posted
//! receive buffers, with pages later moving by RDMA READ/WRITE into registered memory.
//! These machines have no RDMA device, so what is built and tested here is the device probe
//! that runs at start-up and refuses clearly; the verbs data path is not written yet.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RdmaError {
    #[error("no RDMA device: libibverbs lists none on this machine; use --transport tcp")]
    NoDevice,
    #[error("cannot list RDMA devices")]
    DeviceList(#[source] std::io::Error),
    #[error("this binary was built without the `rdma` cargo feature; use --transport tcp")]
    NotBuilt,
    #[error(
        "RDMA device(s) {0} found, but the RDMA data path is not implemented; use --transport tcp"
    )]
    DataPathMissing(String),
}

/// Names of the RDMA devices libibverbs can open.
#[cfg(feature = "rdma")]
pub fn probe_devices() -> Result<Vec<String>, RdmaError> {
    let mut n: std::os::raw::c_int = 0;
    // SAFETY: ibv_get_device_list only writes the device count through the valid pointer we
    // pass, and returns either NULL or an array of `n` device pointers that we free below.
    let list = unsafe { rdma_sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        // ENOSYS/ENODEV: no verbs provider or no device; both mean "no device" to the operator.
        return match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::ENODEV) | Some(0) | None => Err(RdmaError::NoDevice),
            _ => Err(RdmaError::DeviceList(e)),
        };
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: `list` holds `n` valid device pointers (libibverbs contract), i < n.
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a device from the list, alive until the list is freed; the name
        // is a NUL-terminated string owned by the device.
        let name = unsafe { std::ffi::CStr::from_ptr(rdma_sys::ibv_get_device_name(dev)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once; no pointer into it is
    // kept (names were copied above).
    unsafe { rdma_sys::ibv_free_device_list(list) };
    if names.is_empty() {
        return Err(RdmaError::NoDevice);
    }
    Ok(names)
}

/// Without the feature there is nothing to probe.
#[cfg(not(feature = "rdma"))]
pub fn probe_devices() -> Result<Vec<String>, RdmaError> {
    Err(RdmaError::NotBuilt)
}

/// Start-up check for a server or client asked to use RDMA: fails with a clear reason.
pub fn check_available() -> Result<(), RdmaError> {
    let names = probe_devices()?;
    Err(RdmaError::DataPathMissing(names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_start_up_check_fails_clearly_here() {
        let err = check_available().expect_err("no usable RDMA on this machine");
        let msg = err.to_string();
        assert!(msg.contains("RDMA") || msg.contains("rdma"), "{msg}");
    }
}
