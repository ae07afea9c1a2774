//! `vnode-cred`: derives a vNode's credential from the cluster key, for scripts and tests (the
//! manager calls `vnode_common::cred` directly).
//!
//! ```text
//! vnode-cred mem --vnode-id 0x1f2e3d4c5b6a7988 --secret-file cluster.key > vnode.cred
//! vnode-cred blk --export disk0 > disk0.cred        # cluster key from $VNODE_SECRET
//! ```
//! Prints the credential as 64 hex digits, the form `--mem-credential-file` and
//! `credential-file=` read.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vnode_common::cli::{self, Exit, ExitTable, Failure, Program, ResultExt};
use vnode_common::{cred, secret, CLUSTER_KEY_ENV};

#[derive(Debug, Parser)]
#[command(
    name = "vnode-cred",
    version,
    about = "Derive a vNode credential from the cluster key"
)]
struct Args {
    /// File holding the cluster key (else $VNODE_SECRET).
    #[arg(long, global = true)]
    secret_file: Option<PathBuf>,
    #[command(subcommand)]
    kind: Kind,
}

#[derive(Debug, Subcommand)]
enum Kind {
    /// The memory credential of one vNode.
    Mem {
        /// The vNode id: decimal, or hex with 0x.
        #[arg(long, value_parser = parse_id)]
        vnode_id: u64,
    },
    /// The credential of one NBD export.
    Blk {
        #[arg(long)]
        export: String,
    },
}

fn parse_id(s: &str) -> std::result::Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("bad vNode id {s:?}: {e}"))
}

fn run(args: Args) -> Result<Exit, Failure> {
    let key = secret::load(args.secret_file.as_deref(), CLUSTER_KEY_ENV)
        .usage()?
        .with_context(|| {
            format!("no cluster key: give --secret-file PATH or set {CLUSTER_KEY_ENV}")
        })
        .usage()?;
    let c = match args.kind {
        Kind::Mem { vnode_id } => cred::mem_credential(&key, vnode_id),
        Kind::Blk { export } => cred::blk_credential(&key, &export),
    };
    println!("{}", c.to_hex());
    Ok(Exit::Success)
}

fn main() -> ExitCode {
    let program = Program {
        default_log: "warn",
        exits: ExitTable::Standard,
    };
    cli::main(program, run)
}
