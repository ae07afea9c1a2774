//! Runs a built VM: one named thread per vCPU, an event loop for serial input, and the wait for
//! the VM to stop. Returns the process exit status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::builder::Vmm;
use crate::devices::serial::StdinInput;
use crate::devices::StopReason;
use crate::metrics::METRICS;
use crate::sandbox::{self, ThreadKind};

/// How the VM ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest ended itself: its status (debug-exit) or 0 (reset / power-off).
    Guest(u8),
    /// vNode stopped the VM on a fatal condition.
    Fatal(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start thread {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    Events(String),
}

/// Starts the vCPUs and waits until the VM stops.
pub fn run(vmm: Vmm) -> Result<Outcome, RunError> {
    let Vmm {
        vm,
        mem,
        vcpus,
        buses,
        stop,
        serial,
        boot: _,
        remote,
        virtio: _,
    } = vmm;
    for mut vcpu in vcpus {
        let name = format!("vcpu{}", vcpu.index());
        let (buses, mem, stop) = (buses.clone(), mem.clone(), stop.clone());
        thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                sandbox::enter_thread(ThreadKind::Vcpu);
                vcpu.run(&buses, &mem, &stop)
            })
            .map_err(|source| RunError::Spawn { name, source })?;
    }
    start_event_loop(serial.clone(), stop.clone())?;
    install_stats_signal();
    // Every thread is started: the main thread closes its own sandbox last.
    sandbox::enter_thread(ThreadKind::Main);
    let reason = loop {
        if let Some(r) = stop.wait_timeout(Duration::from_millis(200)) {
            break r;
        }
        if STATS_REQUESTED.swap(false, Ordering::Relaxed) {
            eprintln!("{}", stats_json());
        }
    };
    if let Some(remote) = &remote {
        remote.stop();
    }
    if let Err(e) = serial.lock().expect("serial lock poisoned").flush() {
        tracing::warn!("cannot flush serial output: {e}");
    }
    drop(vm);
    Ok(match reason {
        StopReason::GuestExit(status) => Outcome::Guest(status),
        StopReason::Reset => Outcome::Guest(0),
        StopReason::Fatal(msg) => Outcome::Fatal(msg),
    })
}

fn start_event_loop(
    serial: Arc<Mutex<crate::devices::serial::SerialDevice>>,
    stop: crate::devices::StopSignal,
) -> Result<(), RunError> {
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| RunError::Events(format!("{e:?}")))?;
    events.add_subscriber(Arc::new(Mutex::new(StdinInput::new(serial))));
    let name = "vmm-events".to_owned();
    thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            sandbox::enter_thread(ThreadKind::Events);
            while stop.reason().is_none() {
                if let Err(e) = events.run_with_timeout(500) {
                    tracing::warn!("event loop: {e:?}");
                    return;
                }
            }
        })
        .map_err(|source| RunError::Spawn { name, source })?;
    Ok(())
}

static STATS_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STATS_REQUESTED.store(true, Ordering::Relaxed);
}

/// SIGUSR1 asks for the counters on stderr while the VM runs.
fn install_stats_signal() {
    if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_sigusr1) {
        tracing::warn!("cannot handle SIGUSR1: {e}");
    }
}

/// The VM's counters as one JSON object: `vmm`, `excache` when guest RAM is remote (with
/// `replication` when it is replicated), and `replicated_disks` (one entry per replicated disk).
pub fn stats_json() -> String {
    let excache = crate::memory::fault::EXCACHE_STATS
        .get()
        .map(|s| s.to_json());
    let vnode_id = crate::memory::VNODE_ID
        .get()
        .map(|id| format!("{id:#018x}"));
    let disks = crate::devices::virtio::block::backend::replication_json();
    serde_json::json!({ "vmm": &METRICS, "vnode_id": vnode_id, "excache": excache, "replicated_disks": disks })
        .to_string()
}
