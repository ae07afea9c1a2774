//! `vnode`: run one guest as one vNode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use vmm::config::{self, SerialOut, VmConfig};
use vmm::runner::{self, Outcome};

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
    /// Boot a guest and run it until it exits. vnode exits with the guest's status (0 = success).
    Run(RunArgs),
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
}

fn vm_config(args: RunArgs) -> anyhow::Result<(VmConfig, bool)> {
    let mem_size = config::parse_size(&args.mem)?;
    config::validate(mem_size, args.vcpus, config::host_mem_bytes())?;
    let corrupt = args
        .debug_corrupt
        .as_deref()
        .map(config::parse_corrupt)
        .transpose()?;
    let disks = args
        .disk
        .iter()
        .map(|d| config::parse_disk(d))
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
    };
    Ok((cfg, args.stats))
}

fn run(args: RunArgs) -> anyhow::Result<Outcome> {
    let (cfg, stats) = vm_config(args)?;
    let vmm = vmm::builder::build(&cfg).context("cannot build the VM")?;
    let outcome = runner::run(vmm)?;
    if stats {
        eprintln!("{}", runner::stats_json());
    }
    Ok(outcome)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VNODE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(Outcome::Guest(status)) => ExitCode::from(status),
            Ok(Outcome::Fatal(msg)) => {
                eprintln!("vnode: error: {msg}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("vnode: error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}
