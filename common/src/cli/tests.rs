use super::*;

#[derive(clap::Parser, Debug)]
#[command(name = "toy")]
struct Toy {
    #[command(subcommand)]
    cmd: ToyCmd,
}

#[derive(clap::Subcommand, Debug)]
enum ToyCmd {
    Run {
        #[arg(long)]
        listen: String,
    },
}

#[derive(clap::Parser, Debug)]
#[command(name = "flat")]
#[command(group = clap::ArgGroup::new("addr").required(true).args(["listen", "socket"]))]
struct Flat {
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    socket: Option<String>,
    #[arg(long)]
    size: String,
}

const P: Program = Program {
    default_log: "info",
    exits: ExitTable::Standard,
};

fn args(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

#[test]
fn exit_codes_never_overlap_a_guest_status() {
    assert_eq!(Exit::Guest(0).code(), 0);
    assert_eq!(Exit::Guest(1).code(), 1);
    assert_eq!(Exit::Guest(249).code(), 249);
    assert_eq!(Exit::Guest(250).code(), 249);
    assert_eq!(Exit::Guest(255).code(), 249);
    let own = [Exit::Usage, Exit::Setup, Exit::Runtime, Exit::Stopped].map(Exit::code);
    assert_eq!(own, [250, 251, 252, 253]);
}

#[test]
fn errors_are_one_line_with_their_causes() {
    let e = anyhow::anyhow!("connection refused")
        .context("cannot reach 10.0.0.1:7000")
        .context("cannot build the VM");
    assert_eq!(
        error_line("vnode", &e),
        "vnode: error: cannot build the VM: cannot reach 10.0.0.1:7000: connection refused"
    );
    let e = anyhow::anyhow!("two\nlines\n");
    assert_eq!(error_line("x", &e), "x: error: two lines");
}

#[test]
fn bare_question_mark_is_a_setup_failure() {
    fn f() -> Result<(), Failure> {
        std::fs::read("/nonexistent/vnode-test")?;
        Ok(())
    }
    assert_eq!(f().unwrap_err().exit, Exit::Setup);
    let r: Result<(), std::io::Error> = Err(std::io::Error::other("x"));
    assert_eq!(r.usage().unwrap_err().exit, Exit::Usage);
}

#[test]
fn usage_errors_are_one_line() {
    let cmd = command::<Flat>(P);
    let Err(e) = parse::<Flat>(cmd, args(&["flat", "--bogus"])) else {
        panic!("--bogus accepted");
    };
    let line = usage_line("flat", &e);
    assert!(
        line.starts_with("flat: error: unexpected argument '--bogus'"),
        "{line}"
    );
    assert!(!line.contains('\n'));
}

#[test]
fn log_format_is_global_and_parsed() {
    let cmd = command::<Toy>(P);
    match parse::<Toy>(
        cmd,
        args(&["toy", "run", "--listen", "x", "--log-format", "json"]),
    ) {
        Ok(Action::Run(t, f)) => {
            assert_eq!(f, LogFormat::Json);
            let ToyCmd::Run { listen } = t.cmd;
            assert_eq!(listen, "x");
        }
        _ => panic!("not parsed"),
    }
}

#[test]
fn generate_needs_no_other_argument_and_builds_everything() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell", "man"] {
        for (cmd, name) in [(command::<Toy>(P), "toy"), (command::<Flat>(P), "flat")] {
            let what = match parse::<Flat>(cmd.clone(), args(&[name, "--generate", shell])) {
                Ok(Action::Generate(g)) => g,
                Ok(Action::Run(..)) => panic!("{name} --generate {shell} ran"),
                Err(e) => panic!("{name} --generate {shell}: {e}"),
            };
            let mut out = Vec::new();
            generate(cmd, what, &mut out).expect("generate");
            let text = String::from_utf8(out).expect("utf-8");
            assert!(text.contains(name), "{shell}: {text}");
            if shell == "man" {
                assert!(text.starts_with(".ie") || text.contains(".TH"), "{text}");
                assert!(text.contains("250"), "the exit table is in the man page");
            }
        }
    }
    // Not with anything else.
    let cmd = command::<Flat>(P);
    assert!(parse::<Flat>(cmd, args(&["flat", "--listen", "x", "--generate", "man"])).is_err());
    let cmd = command::<Flat>(P);
    assert!(matches!(
        parse::<Flat>(cmd, args(&["flat", "--listen", "x", "--size", "1"])),
        Ok(Action::Run(..))
    ));
}

#[test]
fn help_has_the_exit_table_and_version_the_commit() {
    let mut cmd = command::<Flat>(P);
    let help = cmd.render_long_help().to_string();
    assert!(help.contains("250  usage or configuration error"), "{help}");
    assert!(help.contains("VNODE_LOG"), "{help}");
    let v = cmd.render_version();
    assert!(v.contains(crate::version::COMMIT), "{v}");
}

#[test]
fn a_missing_subcommand_is_still_a_usage_error() {
    let cmd = command::<Toy>(P);
    let Err(e) = parse::<Toy>(cmd, args(&["toy"])) else {
        panic!("no subcommand accepted");
    };
    assert!(e.use_stderr());
    let line = usage_line("toy", &e);
    assert_eq!(line, "toy: error: a command is required (see --help)");
}
