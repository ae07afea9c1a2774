//! `vnodectl`: run a benchmark inside a vNode guest and print one JSON document; control a
//! running vnode through its API.
//!
//! ```text
//! vnodectl vm --api-socket PATH [-o table|json] info|counters|metrics|pause|resume|shutdown|stop|resize-excache SIZE
//! vnodectl bench fio-randread|fio|fio-verify|memcached|memtier|JOB [--runtime S]
//!     [--guest-ip ADDR[/PREFIX] --net-host-ip ADDR/PREFIX] [--json-out FILE] -- <vnode run args>
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vnode_common::cli::{self, Exit, ExitTable, Failure, Program};

// The ctl modules are a client of the `vnode` binary, not part of the VMM library: this binary
// includes them itself (their unit tests run with `cargo test -p vmm --bin vnodectl`).
#[path = "../ctl/mod.rs"]
mod ctl;

use ctl::bench::{self, Job, Spec};
use ctl::memload::ClientKind;

#[derive(Parser)]
#[command(name = "vnodectl", version, about = "Control and benchmark vNodes")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest (one of guest-images' Linux images) with a benchmark job, print the guest's
    /// results and vnode's --stats as one JSON document; exit 252 if the job failed or the guest
    /// never reached its init, 251 if it could not be started.
    ///
    /// JOB: fio-randread (alias fio): 4 KiB random reads, QD32, on the guest's /dev/vdb;
    /// fio-verify: random writes with crc32c verification; memcached (alias memtier): the guest
    /// serves memcached on its TAP network and vnodectl runs the load client; any other name is
    /// passed to the guest's init as vnode.job=NAME.
    Bench(BenchArgs),
    /// Control one running vnode through its API socket (`vnode run --api-socket PATH`).
    Vm(ctl::vmcmd::VmArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The benchmark.
    job: String,
    /// Seconds: fio's time-based runtime (vnode.fio_runtime), or the memcached load's duration.
    #[arg(long, value_name = "S")]
    runtime: Option<u64>,
    /// The guest's address on its TAP network (vnode.ip=; the prefix defaults to the host's).
    #[arg(long, value_name = "ADDR[/PREFIX]")]
    guest_ip: Option<String>,
    /// Give the host side of the TAP (--net tap=NAME in the vnode arguments) this address,
    /// creating the TAP if it does not exist; undone at the end.
    #[arg(long, value_name = "ADDR/PREFIX")]
    net_host_ip: Option<String>,
    /// A further guest option, KEY=VALUE, passed as vnode.KEY=VALUE (repeatable), e.g.
    /// fio_target=/dev/vdc or fio_size=8M.
    #[arg(long = "guest-arg", value_name = "KEY=VALUE")]
    guest_args: Vec<String>,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Keep the guest console in FILE, each line as "[ms since vnode started] line".
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Copy the guest console to stderr as it arrives.
    #[arg(short, long)]
    verbose: bool,
    /// Kill vnode and fail after this many seconds.
    #[arg(long, value_name = "S", default_value_t = 900)]
    timeout: u64,
    /// The vnode binary (default: vnode next to vnodectl, else on PATH).
    #[arg(long, value_name = "PATH")]
    vnode: Option<PathBuf>,
    /// memcached load client: auto = memtier_benchmark if on PATH, else memaslap/memcaslap, else
    /// the built-in client (which verifies every value it reads).
    #[arg(long, value_enum, default_value_t = ClientKind::Auto)]
    client: ClientKind,
    /// memcached load: connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// memcached load (built-in client): keys per connection.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// memcached load: value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// The `vnode run` arguments (without `run`), after `--`.
    #[arg(last = true, required = true, value_name = "VNODE_RUN_ARGS")]
    vnode_args: Vec<String>,
}

fn bench(a: BenchArgs) -> Result<Exit, Failure> {
    for kv in &a.guest_args {
        if !kv.contains('=') {
            return Err(Failure::usage(format!("--guest-arg {kv}: not KEY=VALUE")));
        }
    }
    let spec = Spec {
        job: Job::resolve(&a.job),
        runtime: a.runtime,
        guest_ip: a.guest_ip,
        host_ip: a.net_host_ip,
        guest_args: a.guest_args,
        vnode: ctl::launch::vnode_binary(a.vnode),
        vnode_args: a.vnode_args,
        timeout: Duration::from_secs(a.timeout),
        console_log: a.console_log,
        echo: a.verbose,
        client: a.client,
        connections: a.connections.max(1),
        keys: a.keys.max(1),
        value_size: a.value_size,
    };
    let out = bench::run(&spec)?;
    let text = serde_json::to_string_pretty(&out.doc)?;
    println!("{text}");
    if let Some(f) = &a.json_out {
        std::fs::write(f, format!("{text}\n"))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", f.display()))?;
    }
    match out.error {
        // The document is out; the failure is the run's, not the set-up's.
        Some(e) => Err(Failure::new(Exit::Runtime, anyhow::anyhow!(e))),
        None => Ok(Exit::Success),
    }
}

fn main() -> ExitCode {
    let program = Program {
        default_log: "warn",
        exits: ExitTable::Standard,
    };
    cli::main(program, |c: Cli| match c.command {
        Cmd::Bench(a) => bench(a),
        Cmd::Vm(a) => {
            let text = ctl::vmcmd::run(&a)
                .map_err(|e| Failure::new(Exit::Runtime, anyhow::Error::from(e)))?;
            println!("{}", text.trim_end());
            Ok(Exit::Success)
        }
    })
}
