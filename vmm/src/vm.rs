//! A running VM and its lifecycle: created -> running <-> paused -> (shutting_down) -> stopped.
//!
//! [`RunningVm`] owns the vCPU threads (their handles are kept: a pause kicks each out of KVM_RUN
//! and waits until every one is parked; a stop kicks them and joins them), pauses and resumes the
//! device queue threads, and commands the ExCache's fault thread (resize, flush, stop with or
//! without freeing guest RAM on the servers). The control API (`api/`) and the signal handlers
//! drive it; the main thread waits in [`RunningVm::wait`] and tears the VM down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::signal::Killable;
use vnode_api::{VmInfo, VmState};

use crate::builder::{Transport, Vmm};
use crate::devices::power_button::PowerButton;
use crate::devices::serial::{SerialDevice, StdinInput};
use crate::devices::virtio::DEVICE_PAUSE;
use crate::devices::{StopReason, StopSignal};
use crate::kvm::persist::VcpuStateHandle;
use crate::kvm::{self, kick_signal, VcpuControl, VcpuWant};
use crate::memory::RemoteMemory;
use crate::sandbox::{self, ThreadKind};
use crate::snapshot::capture::{self, CaptureError};
use crate::snapshot::SavedConfig;

/// How the VM ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest ended itself: its status (debug-exit) or 0 (reset / power-off).
    Guest(u8),
    /// Stopped on request (the API's stop or shutdown deadline, SIGTERM, SIGINT).
    Stopped(String),
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
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
}

/// Why a lifecycle request was refused.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The request does not fit the VM's state (HTTP 409).
    #[error("the VM is {0}")]
    WrongState(VmState),
    /// The VM has no ExCache (guest RAM is local).
    #[error("the VM has no ExCache: guest RAM is local (no --mem-server)")]
    NoExCache,
    #[error(transparent)]
    Memory(#[from] crate::memory::RemoteMemError),
    /// Some vCPUs or devices did not stop in time; the VM is paused as far as it got.
    #[error("{0} did not pause within {PAUSE_TIMEOUT:?}")]
    PauseTimeout(&'static str),
    /// This VM cannot be snapshotted (HTTP 409).
    #[error("cannot snapshot this VM: {0}")]
    NotSnapshottable(String),
    #[error("snapshot failed: {0}")]
    Capture(#[from] CaptureError),
}

/// How long a snapshot waits for the ExCache to write its dirty pages to the memory servers.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a pause waits for every vCPU and device thread to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM whose vCPUs have started.
pub struct RunningVm {
    state: Mutex<VmState>,
    state_cv: Condvar,
    ctl: Arc<VcpuControl>,
    vcpus: Mutex<Vec<JoinHandle<()>>>,
    vcpu_count: usize,
    stop: StopSignal,
    remote: Option<RemoteMemory>,
    serial: Arc<Mutex<SerialDevice>>,
    info: Mutex<VmInfo>,
    /// Serializes lifecycle requests (pause, resume, resize, stop) against each other.
    op: Mutex<()>,
    /// Kept for the VM's life; closed after the vCPUs are joined.
    kvm_vm: Mutex<Option<kvm::Vm>>,
    /// What a snapshot reads while the VM is paused.
    vcpu_states: Vec<VcpuStateHandle>,
    virtio: Vec<Transport>,
    /// Leave guest RAM's region on the memory servers at stop (a snapshot or migration hands
    /// it over); freed otherwise.
    keep_region: AtomicBool,
    /// Guest RAM, which a snapshot writes into its file when it is local.
    mem: vm_memory::GuestMemoryMmap,
    /// The configuration a snapshot saves, or why this VM cannot be snapshotted.
    saved_config: Mutex<Result<SavedConfig, String>>,
    /// Pressed by a graceful shutdown.
    power_button: PowerButton,
}

/// What a snapshot of a paused VM reads (`snapshot::capture::Sources` takes these).
pub struct SnapshotParts<'a> {
    pub vm: &'a kvm::Vm,
    pub vcpus: &'a [VcpuStateHandle],
    pub serial: &'a Mutex<SerialDevice>,
    pub virtio: &'a [Transport],
}

impl RunningVm {
    /// Starts the vCPUs (one named thread each) and the serial input loop. `info` describes the
    /// VM for the API; its state is set here.
    pub fn start(vmm: Vmm, mut info: VmInfo) -> Result<Arc<Self>, RunError> {
        let Vmm {
            vm,
            mem,
            vcpus,
            buses,
            stop,
            serial,
            boot: _,
            remote,
            virtio,
            power_button,
        } = vmm;
        kvm::install_kick_handler()?;
        let vcpu_states = vcpus
            .iter()
            .map(|v| vm.state_handle(v))
            .collect::<Result<Vec<_>, _>>()?;
        let ctl = Arc::new(VcpuControl::default());
        let vcpu_count = vcpus.len();
        let mut handles = Vec::with_capacity(vcpu_count);
        for mut vcpu in vcpus {
            let name = format!("vcpu{}", vcpu.index());
            let (buses, mem, stop, ctl) = (buses.clone(), mem.clone(), stop.clone(), ctl.clone());
            let h = thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    sandbox::enter_thread(ThreadKind::Vcpu);
                    vcpu.run(&buses, &mem, &stop, &ctl)
                })
                .map_err(|source| RunError::Spawn { name, source })?;
            handles.push(h);
        }
        start_event_loop(serial.clone(), stop.clone())?;
        info.state = VmState::Running;
        Ok(Arc::new(Self {
            state: Mutex::new(VmState::Running),
            state_cv: Condvar::new(),
            ctl,
            vcpus: Mutex::new(handles),
            vcpu_count,
            stop,
            remote,
            serial,
            info: Mutex::new(info),
            op: Mutex::new(()),
            kvm_vm: Mutex::new(Some(vm)),
            vcpu_states,
            virtio,
            keep_region: AtomicBool::new(false),
            mem,
            saved_config: Mutex::new(Err("its configuration was not given".into())),
            power_button,
        }))
    }

    /// The configuration a snapshot saves (or why this VM cannot be snapshotted).
    pub fn set_snapshot_config(&self, config: Result<SavedConfig, String>) {
        *self.saved_config.lock().expect("snapshot lock poisoned") = config;
    }

    /// Pauses the VM (if it runs), writes its snapshot to `path` and leaves it paused. With
    /// remote RAM the ExCache's dirty pages go to the memory servers first, and from then on a
    /// stop keeps the region there for the restore (a resume gives it back to this VM).
    pub fn snapshot(
        &self,
        path: &std::path::Path,
    ) -> Result<vnode_api::SnapshotInfo, LifecycleError> {
        let started = std::time::Instant::now();
        let config = self
            .saved_config
            .lock()
            .expect("snapshot lock poisoned")
            .clone()
            .map_err(LifecycleError::NotSnapshottable)?;
        if self.state() == VmState::Running {
            self.pause()?;
        }
        let _op = self.op.lock().expect("op lock poisoned");
        match self.state() {
            VmState::Paused => {}
            s => return Err(LifecycleError::WrongState(s)),
        }
        let flushed = match &self.remote {
            Some(remote) => remote.flush_dirty(FLUSH_TIMEOUT)?,
            None => 0,
        };
        let vm = self.kvm_vm.lock().expect("vm lock poisoned");
        let vm = vm
            .as_ref()
            .ok_or(LifecycleError::WrongState(VmState::Stopped))?;
        let snapshot = capture::capture(&capture::Sources {
            vm,
            vcpus: &self.vcpu_states,
            serial: &self.serial,
            virtio: &self.virtio,
            config: &config,
        })?;
        let ram = self.remote.is_none().then_some(&self.mem);
        let bytes = capture::write_file(path, &snapshot, ram)?;
        if self.remote.is_some() {
            self.keep_region.store(true, Ordering::Release);
        }
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(path = %path.display(), bytes, flushed, took_ms, "snapshot written");
        Ok(vnode_api::SnapshotInfo {
            path: path.display().to_string(),
            bytes,
            ram: if self.remote.is_some() {
                "remote"
            } else {
                "local"
            }
            .to_owned(),
            flushed_pages: flushed as u64,
            took_ms,
        })
    }

    pub fn state(&self) -> VmState {
        *self.state.lock().expect("state lock poisoned")
    }

    fn set_state(&self, s: VmState) {
        *self.state.lock().expect("state lock poisoned") = s;
        self.info.lock().expect("info lock poisoned").state = s;
        self.state_cv.notify_all();
    }

    /// The VM's state and configuration now.
    pub fn info(&self) -> VmInfo {
        self.info.lock().expect("info lock poisoned").clone()
    }

    /// The stop signal everything that can end the VM shares.
    pub fn stop_signal(&self) -> &StopSignal {
        &self.stop
    }

    fn kick_vcpus(&self) {
        for h in self
            .vcpus
            .lock()
            .expect("vcpu handles lock poisoned")
            .iter()
        {
            if !h.is_finished() {
                if let Err(e) = h.kill(kick_signal()) {
                    tracing::warn!("cannot kick a vCPU thread: {e}");
                }
            }
        }
    }

    /// Pauses every vCPU (each out of KVM_RUN and parked) and every device queue thread.
    /// Returns once all are parked.
    pub fn pause(&self) -> Result<VmInfo, LifecycleError> {
        let _op = self.op.lock().expect("op lock poisoned");
        match self.state() {
            VmState::Running => {}
            s => return Err(LifecycleError::WrongState(s)),
        }
        self.ctl.set(VcpuWant::Pause);
        self.kick_vcpus();
        let vcpus_parked = self
            .ctl
            .wait_parked(self.vcpu_count, PAUSE_TIMEOUT, || self.kick_vcpus());
        let devices_parked = DEVICE_PAUSE.pause(PAUSE_TIMEOUT);
        // The faults the vCPUs and devices left behind are served before the pause returns, so
        // nothing moves while paused.
        let drained = self
            .remote
            .as_ref()
            .map_or(Ok(()), |r| r.drain(PAUSE_TIMEOUT));
        self.set_state(VmState::Paused);
        tracing::info!("VM paused");
        drained?;
        match (vcpus_parked, devices_parked) {
            (false, _) => Err(LifecycleError::PauseTimeout("some vCPUs")),
            (_, false) => Err(LifecycleError::PauseTimeout("some device threads")),
            _ => Ok(self.info()),
        }
    }

    /// Lets a paused VM go on.
    pub fn resume(&self) -> Result<VmInfo, LifecycleError> {
        let _op = self.op.lock().expect("op lock poisoned");
        match self.state() {
            VmState::Paused => {}
            s => return Err(LifecycleError::WrongState(s)),
        }
        // The VM goes on here: its guest RAM is its own again, not a snapshot's.
        self.keep_region.store(false, Ordering::Release);
        DEVICE_PAUSE.resume();
        self.ctl.set(VcpuWant::Run);
        self.set_state(VmState::Running);
        tracing::info!("VM resumed");
        Ok(self.info())
    }

    /// Presses the guest's ACPI power button (devices/power_button.rs), and stops the VM after
    /// `deadline` if the guest has not powered off by then. The test guest and a guest without
    /// ACPI (or without anything in user space acting on KEY_POWER) never react: for them the
    /// deadline is the stop.
    pub fn shutdown(self: &Arc<Self>, deadline: Duration) -> Result<VmInfo, LifecycleError> {
        {
            let _op = self.op.lock().expect("op lock poisoned");
            match self.state() {
                VmState::Running | VmState::Paused => {}
                s => return Err(LifecycleError::WrongState(s)),
            }
            if self.state() == VmState::Paused {
                // A paused guest cannot see the button: let it run to act on it (a snapshot
                // taken meanwhile is then stale, and its RAM this VM's again).
                self.keep_region.store(false, Ordering::Release);
                DEVICE_PAUSE.resume();
                self.ctl.set(VcpuWant::Run);
            }
            self.set_state(VmState::ShuttingDown);
        }
        tracing::info!(?deadline, "shutting the VM down: power button pressed");
        if let Err(e) = self.power_button.press() {
            tracing::warn!("{e}: the deadline will stop the VM");
        }
        let vm = self.clone();
        let timer = thread::Builder::new()
            .name("shutdown-deadline".into())
            .spawn(move || {
                if vm.stop.wait_timeout(deadline).is_none() {
                    tracing::info!("the guest did not power off within {deadline:?}: stopping it");
                    vm.stop.stop(StopReason::Requested(format!(
                        "shutdown deadline of {deadline:?} passed"
                    )));
                }
            });
        if let Err(e) = timer {
            tracing::warn!("cannot start the shutdown timer, stopping now: {e}");
            self.stop.stop(StopReason::Requested("shutdown".to_owned()));
        }
        Ok(self.info())
    }

    /// Stops the VM and waits until its vCPUs and devices are stopped (vnode then exits).
    pub fn stop_and_wait(&self, why: &str, timeout: Duration) -> VmInfo {
        self.stop.stop(StopReason::Requested(why.to_owned()));
        let guard = self.state.lock().expect("state lock poisoned");
        let _unused = self
            .state_cv
            .wait_timeout_while(guard, timeout, |s| *s != VmState::Stopped)
            .expect("state lock poisoned");
        self.info()
    }

    /// Grows or shrinks the ExCache to `bytes`.
    pub fn resize_excache(&self, bytes: u64) -> Result<VmInfo, LifecycleError> {
        let _op = self.op.lock().expect("op lock poisoned");
        match self.state() {
            VmState::Running | VmState::Paused => {}
            s => return Err(LifecycleError::WrongState(s)),
        }
        let remote = self.remote.as_ref().ok_or(LifecycleError::NoExCache)?;
        remote.set_limit(bytes)?;
        if let Some(ex) = &mut self.info.lock().expect("info lock poisoned").config.excache {
            ex.local_mem = bytes;
        }
        Ok(self.info())
    }

    /// Gives replicated guest RAM a spare memory server for re-replication.
    pub fn add_mem_spare(&self, server: &str) -> Result<VmInfo, LifecycleError> {
        let _op = self.op.lock().expect("op lock poisoned");
        match self.state() {
            VmState::Running | VmState::Paused => {}
            s => return Err(LifecycleError::WrongState(s)),
        }
        let remote = self.remote.as_ref().ok_or(LifecycleError::NoExCache)?;
        remote.add_spare(server)?;
        Ok(self.info())
    }

    /// Writes every dirty resident page of guest RAM to the memory servers.
    pub fn flush_excache(&self, timeout: Duration) -> Result<usize, LifecycleError> {
        let remote = self.remote.as_ref().ok_or(LifecycleError::NoExCache)?;
        Ok(remote.flush_dirty(timeout)?)
    }

    /// Runs `f` on what a snapshot reads, if the VM is paused (None otherwise).
    pub fn with_snapshot_parts<R>(&self, f: impl FnOnce(SnapshotParts<'_>) -> R) -> Option<R> {
        let _op = self.op.lock().expect("op lock poisoned");
        if self.state() != VmState::Paused {
            return None;
        }
        let vm = self.kvm_vm.lock().expect("vm lock poisoned");
        Some(f(SnapshotParts {
            vm: vm.as_ref()?,
            vcpus: &self.vcpu_states,
            serial: &self.serial,
            virtio: &self.virtio,
        }))
    }

    /// At stop, leave guest RAM's region on the memory servers for the next owner instead of
    /// freeing it.
    pub fn keep_region_at_stop(&self) {
        self.keep_region.store(true, Ordering::Release);
    }

    /// Waits until something stops the VM (the guest, a fatal error, a request), `tick` running
    /// every 200 ms meanwhile; then stops the vCPUs and devices, and the fault thread (freeing
    /// guest RAM on the servers unless [`RunningVm::keep_region_at_stop`] was called), and
    /// reports the outcome.
    pub fn wait(&self, tick: impl Fn()) -> Outcome {
        let reason = loop {
            if let Some(r) = self.stop.wait_timeout(Duration::from_millis(200)) {
                break r;
            }
            tick();
        };
        let keep = self.keep_region.load(Ordering::Acquire);
        if keep {
            tracing::info!("guest RAM stays on the memory servers for its next owner");
        }
        self.teardown(!keep);
        match reason {
            StopReason::GuestExit(status) => Outcome::Guest(status),
            StopReason::Reset => Outcome::Guest(0),
            StopReason::Requested(why) => Outcome::Stopped(why),
            StopReason::Fatal(msg) => Outcome::Fatal(msg),
        }
    }

    fn teardown(&self, free_region: bool) {
        let _op = self.op.lock().expect("op lock poisoned");
        DEVICE_PAUSE.resume();
        self.ctl.set(VcpuWant::Stop);
        self.kick_vcpus();
        let handles = std::mem::take(&mut *self.vcpus.lock().expect("vcpu handles lock poisoned"));
        for h in handles {
            // A vCPU blocked in a fault on a dead memory server would never return: give up on
            // it after a while (the process is about to exit).
            for _ in 0..500 {
                if h.is_finished() {
                    break;
                }
                let _ = h.kill(kick_signal());
                thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::warn!("a vCPU thread did not stop");
            }
        }
        if let Some(remote) = &self.remote {
            remote.stop(free_region);
        }
        if let Err(e) = self.serial.lock().expect("serial lock poisoned").flush() {
            tracing::warn!("cannot flush serial output: {e}");
        }
        drop(self.kvm_vm.lock().expect("vm lock poisoned").take());
        self.set_state(VmState::Stopped);
    }
}

fn start_event_loop(serial: Arc<Mutex<SerialDevice>>, stop: StopSignal) -> Result<(), RunError> {
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

/// The VM's counters as one JSON object (`--stats`, SIGUSR1): `vmm`, and `excache` when guest
/// RAM is remote. The same object as `GET /vm/counters`.
pub fn stats_json() -> String {
    serde_json::to_string(&crate::metrics::counters()).expect("counters always serialize")
}
