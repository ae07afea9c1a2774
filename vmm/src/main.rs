//! `vnode`: run one guest as one vNode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vnode_common::cli::{self, Exit, ExitTable, Failure, Program, ResultExt};

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm::api::ApiServer;
use vmm::config::{self, SerialOut, VmConfig};
use vmm::vm::{self, Outcome, RunningVm};

#[derive(Parser)]
#[command(
    name = "vnode",
    version,
    about = "Run an unmodified guest as a vNode on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it exits. vnode exits with the guest's status (0 = success;
    /// 250-253 are vnode's own: 253 when stopped through the API or by SIGTERM/SIGINT).
    Run(Box<RunArgs>),
    /// Restore a snapshot (`PUT /vm/snapshot`) in this new process and let the guest go on: on
    /// the snapshot's memory servers (attaching the region it left there), disks and TAPs.
    Restore(RestoreArgs),
    /// Print the control API's OpenAPI document (JSON).
    Openapi,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an ELF (vmlinux, the test guest) or a bzImage.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Initial ramdisk loaded below 4 GiB.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest RAM, e.g. 512M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: String,
    /// Allocate all of local guest RAM before the guest starts, so that its first touch costs
    /// only KVM's own mapping, not a host page fault (not with --mem-server: the ExCache decides
    /// what is resident).
    #[arg(long, conflicts_with = "mem_server")]
    mem_prealloc: bool,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Where the guest's serial console (COM1) goes: a file path; stdout if not given.
    #[arg(long, value_name = "PATH")]
    serial: Option<PathBuf>,
    /// Print the VM's counters as JSON on stderr when it stops.
    #[arg(long)]
    stats: bool,
    /// KVM device to use.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/dev/kvm",
        env = "VNODE_KVM_DEVICE"
    )]
    kvm_device: PathBuf,
    /// Test hook: flip one byte of guest RAM at GPA when the guest reports PHASE on port 0xf5.
    #[arg(long, value_name = "GPA@PHASE", hide_short_help = true)]
    debug_corrupt: Option<String>,
    /// A virtio-blk disk (repeatable; the first is slot 0):
    /// PATH | nbd://HOST:PORT/EXPORT | nbd+unix:///EXPORT?socket=PATH, then optionally ,readonly.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio-net device on a host TAP (repeatable; slots follow the disks):
    /// tap=NAME[,mac=52:54:00:xx:xx:xx]. The default MAC is derived from NAME. If no interface
    /// NAME exists, a transient TAP is created (needs CAP_NET_ADMIN; down until configured,
    /// e.g. `ip link set NAME up`) and disappears when vnode exits.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<String>,
    /// Put guest RAM on memory servers: ADDR (vnode-memd), or PRIMARY,BACKUP for a replicated
    /// region; `local` keeps pages in this process (the fault path without a network).
    #[arg(long, value_name = "ADDR[,ADDR]", value_delimiter = ',')]
    mem_server: Vec<String>,
    /// Spare memory servers for replicated guest RAM (PRIMARY,BACKUP): when a replica fails, a
    /// new copy is made on the first spare that takes it, in the background while the guest
    /// runs (more can be added through the API: PUT /vm/mem/spare).
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    mem_spare: Vec<String>,
    /// ExCache capacity: how much guest RAM may be resident here (default: all of --mem).
    #[arg(long, value_name = "SIZE", requires = "mem_server")]
    local_mem: Option<String>,
    /// ExCache eviction policy: fifo, or clock (an LRU approximation).
    #[arg(
        long,
        value_name = "POLICY",
        default_value = "clock",
        requires = "mem_server"
    )]
    excache_policy: String,
    /// Largest prefetch window in pages for sequential/strided faults (0: no prefetching).
    #[arg(long, value_name = "PAGES", default_value_t = 64)]
    prefetch: u32,
    /// The vNode id presented to memory servers, decimal or 0x-hex (default: a random 64-bit
    /// id, logged at start-up and shown in the stats).
    #[arg(long, value_name = "ID", value_parser = parse_vnode_id)]
    vnode_id: Option<u64>,
    /// The ExCache's fault thread busy-polls for faults (lower latency, one busy core).
    #[arg(long, requires = "mem_server")]
    excache_spin: bool,
    /// Evict between faults with the reclaimer (write-backs pipelined, kept off the fault
    /// path) instead of on the fault path. Experimental: correct, but measured 10-13% slower
    /// than the default so far (docs/bench/excache.txt).
    #[arg(long, requires = "mem_server")]
    excache_reclaim: bool,
    /// File holding this vNode's memory credential, 64 hex digits from the manager or
    /// `vnode-cred mem --vnode-id ID` (else $VNODE_MEM_CREDENTIAL). Bound to one vNode id, so
    /// --vnode-id is required with it.
    #[arg(long, value_name = "FILE")]
    mem_credential_file: Option<PathBuf>,
    /// Single machine: a file holding the cluster key itself (else $VNODE_SECRET); vnode derives
    /// its own credential from it. Used only when no credential is given.
    #[arg(long, value_name = "FILE")]
    mem_secret_file: Option<PathBuf>,
    /// Serve the control API (HTTP/JSON, `vnode openapi`) on this Unix socket. A stale socket
    /// file is replaced; one a live process listens on is refused. Removed at exit.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Tests only: serve the API on this TCP address too (e.g. 127.0.0.1:0; no access control).
    #[arg(long, value_name = "ADDR", hide = true)]
    api_listen_tcp: Option<String>,
    /// FOR DEBUGGING ONLY: run without the seccomp filters (capabilities are still dropped).
    /// By default every thread runs under a seccomp filter of its kind, and a system call
    /// outside it kills vnode by SIGSYS with a line naming the thread kind and the call.
    #[arg(long)]
    no_seccomp: bool,
    /// Test hook: a thread of KIND (vcpu, device, ...) makes a forbidden call (socket) right
    /// after entering its sandbox.
    #[arg(long, value_name = "KIND", hide = true)]
    debug_syscall_probe: Option<String>,
}

/// Turns the sandbox on before anything starts a thread: `--no-seccomp` leaves the filters
/// out, `VNODE_SECCOMP=log` only logs what they would refuse (how the lists were drawn up).
fn init_sandbox(no_seccomp: bool, probe: Option<&str>) -> anyhow::Result<()> {
    use remote_blk::threads::ClientThread;
    use vmm::sandbox::{self, Mode, ThreadKind};
    let mode = if no_seccomp {
        Mode::Off
    } else if std::env::var("VNODE_SECCOMP").as_deref() == Ok("log") {
        Mode::Log
    } else {
        Mode::Enforce
    };
    let probe = probe
        .map(|k| ThreadKind::parse(k).with_context(|| format!("no thread kind {k}")))
        .transpose()?;
    sandbox::init(mode, probe)?;
    remote_blk::threads::on_thread_start(|t| {
        sandbox::enter_thread(match t {
            ClientThread::Reader => ThreadKind::NbdReader,
            ClientThread::Resync => ThreadKind::DiskResync,
        })
    });
    Ok(())
}

const MEM_CREDENTIAL_ENV: &str = "VNODE_MEM_CREDENTIAL";

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot file.
    #[arg(long, value_name = "FILE")]
    snapshot: PathBuf,
    /// Where the guest's serial console (COM1) goes from now on: a file path; stdout if not
    /// given.
    #[arg(long, value_name = "PATH")]
    serial: Option<PathBuf>,
    /// Print the VM's counters as JSON on stderr when it stops.
    #[arg(long)]
    stats: bool,
    /// KVM device to use.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/dev/kvm",
        env = "VNODE_KVM_DEVICE"
    )]
    kvm_device: PathBuf,
    /// The ExCache's fault thread busy-polls for faults.
    #[arg(long)]
    excache_spin: bool,
    /// File holding the snapshot's vNode's memory credential (else $VNODE_MEM_CREDENTIAL).
    #[arg(long, value_name = "FILE")]
    mem_credential_file: Option<PathBuf>,
    /// Single machine: a file holding the cluster key (else $VNODE_SECRET).
    #[arg(long, value_name = "FILE")]
    mem_secret_file: Option<PathBuf>,
    /// Serve the control API on this Unix socket (as `vnode run --api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Tests only: serve the API on this TCP address too.
    #[arg(long, value_name = "ADDR", hide = true)]
    api_listen_tcp: Option<String>,
    /// FOR DEBUGGING ONLY: run without the seccomp filters (as `vnode run --no-seccomp`).
    #[arg(long)]
    no_seccomp: bool,
}

/// The key a restored vNode proves to its memory servers: its credential, else the cluster key.
fn restore_key(args: &RestoreArgs) -> anyhow::Result<Option<remote_mem::VnodeKey>> {
    use vnode_common::{cred::Credential, secret};
    if let Some(c) = Credential::load(args.mem_credential_file.as_deref(), MEM_CREDENTIAL_ENV)? {
        return Ok(Some(remote_mem::VnodeKey::Credential(c)));
    }
    Ok(secret::load(
        args.mem_secret_file.as_deref(),
        vnode_common::CLUSTER_KEY_ENV,
    )?
    .map(remote_mem::VnodeKey::ClusterKey))
}

/// `vnode restore`: the snapshot is checked whole (magic, version, checksum) before anything
/// is created or any server is contacted; a bad file or missing key is a usage error (250).
fn restore(args: RestoreArgs) -> Result<Exit, Failure> {
    init_sandbox(args.no_seccomp, None)?;
    let what = || format!("cannot restore {}", args.snapshot.display());
    let (snapshot, reader) =
        vmm::snapshot::file::SnapshotReader::open::<vmm::snapshot::Snapshot>(&args.snapshot)
            .with_context(what)
            .usage()?;
    let opts = vmm::snapshot::restore::RestoreOptions {
        serial: args
            .serial
            .clone()
            .map_or(SerialOut::Stdout, SerialOut::File),
        kvm_device: args.kvm_device.clone(),
        mem_key: restore_key(&args).usage()?,
        excache_spin: args.excache_spin,
    };
    let cfg = vmm::snapshot::restore::restored_config(&snapshot, &opts)
        .with_context(what)
        .usage()?;
    install_signals()?;
    let vmm = vmm::snapshot::restore::restore(&snapshot, reader, &opts).with_context(what)?;
    tracing::info!(snapshot = %args.snapshot.display(), "VM restored");
    let run_opts = RunOptions {
        stats: args.stats,
        api_socket: args.api_socket,
        api_listen_tcp: args.api_listen_tcp,
    };
    serve(vmm, &cfg, Ok(snapshot.config), run_opts)
}

fn parse_vnode_id(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("bad vNode id {s:?}: {e}"))
}

/// Who this vNode is to its memory servers: its own credential (which needs its id), or the
/// cluster key to derive one from (any id, random by default).
fn mem_auth(args: &RunArgs, local: bool) -> anyhow::Result<remote_mem::ClientAuth> {
    use vnode_common::{cred::Credential, secret};
    let cred = Credential::load(args.mem_credential_file.as_deref(), MEM_CREDENTIAL_ENV)?;
    if let Some(cred) = cred {
        let id = args
            .vnode_id
            .context("a memory credential is bound to one vNode id: give --vnode-id with it")?;
        return Ok(remote_mem::VnodeKey::Credential(cred).auth(id));
    }
    let id = match args.vnode_id {
        Some(id) => id,
        None => vnode_common::cred::random_id()?,
    };
    match secret::load(args.mem_secret_file.as_deref(), vnode_common::CLUSTER_KEY_ENV)? {
        Some(key) => Ok(remote_mem::VnodeKey::ClusterKey(key).auth(id)),
        None if local => Ok(remote_mem::ClientAuth::insecure(id)),
        None => anyhow::bail!(
            "no memory credential: give --mem-credential-file (or {MEM_CREDENTIAL_ENV}), or the cluster key with --mem-secret-file (or VNODE_SECRET)"
        ),
    }
}

fn remote_mem_config(
    args: &RunArgs,
    mem_size: u64,
) -> anyhow::Result<Option<vmm::memory::RemoteMemConfig>> {
    if args.mem_server.is_empty() {
        return Ok(None);
    }
    if args.mem_server.len() > 2 {
        anyhow::bail!(
            "--mem-server takes one server or a primary and a backup, not {}",
            args.mem_server.len()
        );
    }
    if !args.mem_spare.is_empty() && args.mem_server.len() != 2 {
        anyhow::bail!("--mem-spare needs replicated guest RAM: --mem-server PRIMARY,BACKUP");
    }
    let local_mem = args
        .local_mem
        .as_deref()
        .map(config::parse_size)
        .transpose()?
        .unwrap_or(mem_size);
    // Checked here too (the builder checks it again) so that it is a usage error (250).
    if !(1 << 20..=mem_size).contains(&local_mem) {
        anyhow::bail!("--local-mem {local_mem} must be at least 1 MiB and at most --mem");
    }
    let local = args.mem_server == ["local"];
    let auth = mem_auth(args, local)?;
    tracing::info!(vnode_id = %format_args!("{:#018x}", auth.vnode_id()), "vNode id");
    Ok(Some(vmm::memory::RemoteMemConfig {
        servers: args.mem_server.clone(),
        local_mem,
        policy: args.excache_policy.parse().map_err(anyhow::Error::msg)?,
        prefetch_max: args.prefetch,
        auth,
        spin: args.excache_spin,
        reclaim: args.excache_reclaim,
        spares: args.mem_spare.clone(),
    }))
}

/// What `vm_config` takes from the flags besides the VM's configuration.
struct RunOptions {
    stats: bool,
    api_socket: Option<PathBuf>,
    api_listen_tcp: Option<String>,
}

fn vm_config(args: RunArgs) -> anyhow::Result<(VmConfig, RunOptions)> {
    let mem_size = config::parse_size(&args.mem)?;
    config::validate(mem_size, args.vcpus, config::host_mem_bytes())?;
    let corrupt = args
        .debug_corrupt
        .as_deref()
        .map(config::parse_corrupt)
        .transpose()?;
    let remote_mem = remote_mem_config(&args, mem_size)?;
    let disks = args
        .disk
        .iter()
        .map(|d| config::parse_disk(d))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = args
        .net
        .iter()
        .map(|n| config::parse_net(n))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_size,
        vcpus: args.vcpus,
        serial: args.serial.map_or(SerialOut::Stdout, SerialOut::File),
        kvm_device: args.kvm_device,
        corrupt,
        disks,
        nets,
        remote_mem,
        mem_prealloc: args.mem_prealloc,
    };
    let opts = RunOptions {
        stats: args.stats,
        api_socket: args.api_socket,
        api_listen_tcp: args.api_listen_tcp,
    };
    Ok((cfg, opts))
}

/// The signal (SIGTERM, SIGINT) that asked for a graceful stop, 0 if none.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STATS_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(num, Ordering::Relaxed);
}

extern "C" fn on_sigusr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STATS_REQUESTED.store(true, Ordering::Relaxed);
}

/// SIGTERM and SIGINT stop the VM gracefully (guest RAM freed on the servers, stats printed);
/// SIGUSR1 prints the counters on stderr while the VM runs.
fn install_signals() -> anyhow::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .with_context(|| format!("cannot handle signal {sig}"))?;
    }
    vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_sigusr1)
        .context("cannot handle SIGUSR1")?;
    Ok(())
}

/// Configuration errors exit 250, set-up errors 251, a fatal VM error 252; otherwise the guest's
/// status (`vnode_common::cli`).
fn run(args: RunArgs) -> Result<Exit, Failure> {
    init_sandbox(args.no_seccomp, args.debug_syscall_probe.as_deref())?;
    let (cfg, opts) = vm_config(args).usage()?;
    install_signals()?;
    let vmm = vmm::builder::build(&cfg).context("cannot build the VM")?;
    let saved = vmm::snapshot::SavedConfig::from_config(&cfg).map_err(|e| e.to_string());
    serve(vmm, &cfg, saved, opts)
}

/// Runs a built (or restored) VM with its API until it ends.
fn serve(
    vmm: vmm::builder::Vmm,
    cfg: &VmConfig,
    saved: Result<vmm::snapshot::SavedConfig, String>,
    opts: RunOptions,
) -> Result<Exit, Failure> {
    let info = vnode_api::VmInfo {
        id: cfg
            .remote_mem
            .as_ref()
            .map_or(u64::from(std::process::id()), |r| r.auth.vnode_id()),
        state: vnode_api::VmState::Created,
        config: cfg.summary(),
        api_socket: opts
            .api_socket
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let running = RunningVm::start(vmm, info)?;
    running.set_snapshot_config(saved);
    let api = if opts.api_socket.is_some() || opts.api_listen_tcp.is_some() {
        let server = ApiServer::start(
            opts.api_socket.as_deref(),
            opts.api_listen_tcp.as_deref(),
            Arc::clone(&running),
        );
        match server {
            Ok(s) => Some(s),
            Err(e) => {
                running.stop_and_wait("the API could not start", Duration::from_secs(10));
                let _ = running.wait(|| {});
                return Err(anyhow::Error::from(e).into());
            }
        }
    } else {
        None
    };
    // Every thread is started: the main thread closes its own sandbox last.
    vmm::sandbox::enter_thread(vmm::sandbox::ThreadKind::Main);
    let tick = || {
        let sig = STOP_SIGNAL.load(Ordering::Relaxed);
        if sig != 0 {
            let name = if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            running
                .stop_signal()
                .stop(vmm::devices::StopReason::Requested(format!(
                    "stopped by {name}"
                )));
        }
        if STATS_REQUESTED.swap(false, Ordering::Relaxed) {
            eprintln!("{}", vm::stats_json());
        }
    };
    let outcome = running.wait(tick);
    if let Some(api) = api {
        // Let the answer to a `PUT /vm/stop` that ended the VM go out.
        api.stop(Duration::from_secs(2));
    }
    if opts.stats {
        eprintln!("{}", vm::stats_json());
    }
    match outcome {
        Outcome::Guest(status) => Ok(Exit::Guest(status)),
        Outcome::Stopped(why) => {
            tracing::info!("{why}");
            Ok(Exit::Stopped)
        }
        Outcome::Fatal(msg) => Err(Failure::new(Exit::Runtime, anyhow::anyhow!(msg))),
    }
}

fn main() -> ExitCode {
    let program = Program {
        default_log: "warn",
        exits: ExitTable::Guest,
    };
    cli::main(program, |cli: Cli| match cli.command {
        Command::Run(args) => run(*args),
        Command::Restore(args) => restore(args),
        Command::Openapi => {
            println!("{}", vmm::api::openapi_json());
            Ok(Exit::Success)
        }
    })
}
