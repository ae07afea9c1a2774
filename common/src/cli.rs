//! The CLI contract every vNode binary follows, written once:
//!
//! - errors are one line on stderr, `NAME: error: MESSAGE`, the error's causes joined with ": ";
//! - exit codes never overlap a guest's own status (`vnode run` exits with its guest's status):
//!
//!   | code   | meaning |
//!   |--------|---------|
//!   | 0      | success (`vnode run`: the guest exited 0, powered off or reset) |
//!   | 1-249  | `vnode run` only: the guest's own status; a guest status >= 250 is reported as 249 with a warning |
//!   | 250    | usage or configuration error (clap's own too): nothing was started or created |
//!   | 251    | could not set up: KVM, files, data directory, a port, servers unreachable |
//!   | 252    | failed while running: the VM stopped on a fatal error, a server stopped on an error, a job failed |
//!   | 253    | `vnode run`: stopped by a signal or the API before the guest gave a status |
//!
//! - `--version` shows the commit (`version.rs`), `--log-format text|json` and `VNODE_LOG` set up
//!   logging (`logging.rs`), and a hidden `--generate SHELL|man` prints shell completions or a man
//!   page generated from the binary's clap definition.
//!
//! `main` is the wrapper every binary's `fn main` calls. It is the one place outside `main.rs`
//! files that handles `anyhow::Error`: it is the shared tail of every `main.rs`.

use std::ffi::OsString;
use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

use crate::logging::{self, LogFormat};

/// Highest guest status `vnode run` passes through unchanged.
pub const GUEST_MAX: u8 = 249;
/// Usage or configuration error: nothing was started or created.
pub const USAGE: u8 = 250;
/// Could not set up: KVM, files, a port, servers unreachable.
pub const SETUP: u8 = 251;
/// Failed while running.
pub const RUNTIME: u8 = 252;
/// Stopped by a signal or the API before the guest gave a status.
pub const STOPPED: u8 = 253;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success,
    /// The guest's own status (`vnode run`): 0..=249 as is, higher ones as 249.
    Guest(u8),
    Usage,
    Setup,
    Runtime,
    Stopped,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Guest(s) => s.min(GUEST_MAX),
            Exit::Usage => USAGE,
            Exit::Setup => SETUP,
            Exit::Runtime => RUNTIME,
            Exit::Stopped => STOPPED,
        }
    }
}

/// An error, and the exit code it ends the program with.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            exit,
            error: error.into(),
        }
    }

    /// A usage or configuration error with this message.
    pub fn usage(msg: impl Display) -> Self {
        Failure::new(Exit::Usage, anyhow::anyhow!("{msg}"))
    }
}

/// A bare `?` on an error is a set-up failure (251); say `.usage()` or `.runtime()` otherwise.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::new(Exit::Setup, e)
    }
}

/// Classifies an error by the exit code it should end the program with.
pub trait ResultExt<T> {
    fn or_exit(self, exit: Exit) -> Result<T, Failure>;
    /// A usage or configuration error (250).
    fn usage(self) -> Result<T, Failure>
    where
        Self: Sized,
    {
        self.or_exit(Exit::Usage)
    }
    /// A set-up failure (251).
    fn setup(self) -> Result<T, Failure>
    where
        Self: Sized,
    {
        self.or_exit(Exit::Setup)
    }
    /// A failure while running (252).
    fn runtime(self) -> Result<T, Failure>
    where
        Self: Sized,
    {
        self.or_exit(Exit::Runtime)
    }
}

impl<T, E: Into<anyhow::Error>> ResultExt<T> for Result<T, E> {
    fn or_exit(self, exit: Exit) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(exit, e))
    }
}

/// The one error line: `NAME: error: MESSAGE`, causes joined with ": ", on one line.
pub fn error_line(name: &str, error: &anyhow::Error) -> String {
    let msg = format!("{error:#}");
    format!("{name}: error: {}", one_line(&msg))
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which exit-code table a binary documents in its `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitTable {
    /// `vnode run`: the guest's status passes through.
    Guest,
    /// Every other binary.
    Standard,
}

/// What differs between binaries.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The log filter when `VNODE_LOG` is not set ("info" for servers, "warn" for vnode).
    pub default_log: &'static str,
    pub exits: ExitTable,
}

const GUEST_EXITS: &str = "\
Exit status:
  0-249  the guest's own status (0 also when it powers off or resets); 250 or more shows as 249
  250    usage or configuration error: nothing was started
  251    could not set up: KVM, files, memory or storage servers unreachable
  252    the VM stopped on a fatal error while running
  253    stopped by a signal or the API before the guest gave a status";

const STANDARD_EXITS: &str = "\
Exit status:
  0    success
  250  usage or configuration error: nothing was started or created
  251  could not set up: files, data directory, address in use, servers unreachable
  252  failed while running";

const LOG_HELP: &str = "\
Logs go to stderr, filtered by VNODE_LOG (e.g. info, debug, remote_mem=debug); colours only on
a terminal without NO_COLOR. Errors are one line: NAME: error: MESSAGE.";

/// What to generate instead of running (`--generate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Generate {
    Bash,
    Zsh,
    Fish,
    Elvish,
    Powershell,
    /// A man page (roff) on stdout.
    Man,
}

const GENERATE: &str = "generate";
const LOG_FORMAT: &str = "log-format";

/// The binary's clap command with the contract's flags, version and help text added.
pub fn command<C: CommandFactory>(program: Program) -> Command {
    let table = match program.exits {
        ExitTable::Guest => GUEST_EXITS,
        ExitTable::Standard => STANDARD_EXITS,
    };
    let mut cmd = with_after_help(C::command(), table);
    // `vnode run --help` shows the table too.
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in subs {
        cmd = cmd.mut_subcommand(name, |s| with_after_help(s, table));
    }
    cmd.version(crate::version::VERSION)
        .arg(
            Arg::new(LOG_FORMAT)
                .long(LOG_FORMAT)
                .value_name("FORMAT")
                .value_parser(clap::value_parser!(LogFormat))
                .default_value("text")
                .env("VNODE_LOG_FORMAT")
                .global(true)
                .help("Log lines on stderr as text or one JSON object per line"),
        )
        .arg(
            Arg::new(GENERATE)
                .long(GENERATE)
                .value_name("SHELL|man")
                .value_parser(clap::value_parser!(Generate))
                .action(ArgAction::Set)
                .exclusive(true)
                .hide(true)
                .help("Print shell completions or a man page and exit"),
        )
}

fn with_after_help(cmd: Command, table: &str) -> Command {
    let after = match cmd.get_after_help() {
        Some(own) => format!("{own}\n\n{table}\n\n{LOG_HELP}"),
        None => format!("{table}\n\n{LOG_HELP}"),
    };
    cmd.after_help(after)
}

/// What the command line asks for.
pub enum Action<C> {
    Run(C, LogFormat),
    Generate(Generate),
}

/// Parses `args` (program name first) against the augmented command.
pub fn parse<C: CommandFactory + FromArgMatches>(
    cmd: Command,
    args: impl IntoIterator<Item = OsString>,
) -> Result<Action<C>, clap::Error> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut m: ArgMatches = match cmd.clone().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(strict) => {
            // `--generate` alone must work where arguments, a group or a subcommand are
            // required (clap's `exclusive` lifts required arguments only).
            return match relaxed(cmd).try_get_matches_from(&args) {
                Ok(m) => match m.get_one::<Generate>(GENERATE) {
                    Some(g) => Ok(Action::Generate(*g)),
                    None => Err(strict),
                },
                Err(_) => Err(strict),
            };
        }
    };
    if let Some(g) = m.get_one::<Generate>(GENERATE) {
        return Ok(Action::Generate(*g));
    }
    let format = m
        .get_one::<LogFormat>(LOG_FORMAT)
        .copied()
        .unwrap_or_default();
    Ok(Action::Run(C::from_arg_matches_mut(&mut m)?, format))
}

/// `cmd` with nothing required, to recognise `--generate` alone.
fn relaxed(mut cmd: Command) -> Command {
    let groups: Vec<_> = cmd.get_groups().map(|g| g.get_id().clone()).collect();
    for g in groups {
        cmd = cmd.mut_group(g, |g| g.required(false));
    }
    cmd.subcommand_required(false).arg_required_else_help(false)
}

/// Writes completions for `shell` or the man page of `cmd` to `out`.
pub fn generate(mut cmd: Command, what: Generate, out: &mut dyn Write) -> std::io::Result<()> {
    use clap_complete::Shell;
    let name = cmd.get_name().to_owned();
    let shell = match what {
        Generate::Bash => Shell::Bash,
        Generate::Zsh => Shell::Zsh,
        Generate::Fish => Shell::Fish,
        Generate::Elvish => Shell::Elvish,
        Generate::Powershell => Shell::PowerShell,
        Generate::Man => return clap_mangen::Man::new(cmd).render(out),
    };
    clap_complete::generate(shell, &mut cmd, name, out);
    Ok(())
}

/// A clap error as the contract's one line (its first line, without clap's own "error: ").
pub fn usage_line(name: &str, e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return format!("{name}: error: a command is required (see --help)");
    }
    // clap's message is its first paragraph (a list of missing arguments may follow on
    // indented lines); tips and usage come after a blank line.
    let text = e.render().to_string();
    let para: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = para.join(" ");
    let first = msg.strip_prefix("error: ").unwrap_or(&msg);
    format!("{name}: error: {first} (see --help)")
}

fn print_err(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Every binary's `main`: parse the arguments (usage errors exit 250), set up logging, run, and
/// turn the outcome into the documented exit code with one error line.
pub fn main<C: CommandFactory + FromArgMatches>(
    program: Program,
    run: impl FnOnce(C) -> Result<Exit, Failure>,
) -> ExitCode {
    let cmd = command::<C>(program);
    let name = cmd.get_name().to_owned();
    let (args, format) = match parse::<C>(cmd.clone(), std::env::args_os()) {
        Ok(Action::Run(args, format)) => (args, format),
        Ok(Action::Generate(what)) => {
            let mut out = std::io::stdout().lock();
            return match generate(cmd, what, &mut out).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    print_err(&format!("{name}: error: cannot write to stdout: {e}"));
                    ExitCode::from(SETUP)
                }
            };
        }
        Err(e) if !e.use_stderr() => {
            // --help, --version: clap prints them (on stdout) and they are a success.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            print_err(&usage_line(&name, &e));
            return ExitCode::from(USAGE);
        }
    };
    if let Err(e) = logging::init(format, program.default_log) {
        print_err(&format!("{name}: error: {e}"));
        return ExitCode::from(USAGE);
    }
    finish(&name, run(args))
}

/// The exit code for an outcome, printing the error line for a failure.
pub fn finish(name: &str, outcome: Result<Exit, Failure>) -> ExitCode {
    match outcome {
        Ok(exit) => {
            if let Exit::Guest(s) = exit {
                if s > GUEST_MAX {
                    tracing::warn!(
                        status = s,
                        "the guest's status is {s}, reported as {GUEST_MAX}: 250 and above are vnode's own"
                    );
                }
            }
            ExitCode::from(exit.code())
        }
        Err(f) => {
            print_err(&error_line(name, &f.error));
            ExitCode::from(f.exit.code())
        }
    }
}

#[cfg(test)]
mod tests;
