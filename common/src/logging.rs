//! Logging for every binary, set up the same way: `tracing` events on stderr, filtered by one
//! variable, `VNODE_LOG` (an `EnvFilter` string: `info`, `debug`, `vmm=debug,remote_mem=info`),
//! as text or one JSON object per line (`--log-format json`), with ANSI colours only when stderr is
//! a terminal and `NO_COLOR` is not set. `cli::main` calls `init` after parsing the arguments.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The one log variable.
pub const LOG_ENV: &str = "VNODE_LOG";

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("{LOG_ENV}={value:?} is not a valid log filter")]
    Filter {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("logging is already set up")]
    AlreadySet,
}

/// The filter: `VNODE_LOG` when set (and not empty), else `default` (e.g. "info").
pub fn filter(var: Option<&str>, default: &str) -> Result<EnvFilter, LoggingError> {
    let value = var.filter(|v| !v.trim().is_empty()).unwrap_or(default);
    EnvFilter::try_new(value).map_err(|source| LoggingError::Filter {
        value: value.to_owned(),
        source,
    })
}

/// Colours only on a terminal, and never with `NO_COLOR` set to anything but "" (no-color.org).
pub fn want_ansi(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. `default` is the filter when `VNODE_LOG` is unset.
pub fn init(format: LogFormat, default: &str) -> Result<(), LoggingError> {
    let var = std::env::var(LOG_ENV).ok();
    let filter = filter(var.as_deref(), default)?;
    let ansi = want_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let r = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    r.map_err(|_| LoggingError::AlreadySet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn filter_from_the_variable_or_the_default() {
        assert_eq!(filter(None, "info").unwrap().to_string(), "info");
        assert_eq!(filter(Some(""), "warn").unwrap().to_string(), "warn");
        assert_eq!(filter(Some("debug"), "warn").unwrap().to_string(), "debug");
        let e = filter(Some("vmm=notalevel"), "warn").unwrap_err();
        assert!(
            e.to_string().starts_with("VNODE_LOG=\"vmm=notalevel\""),
            "{e}"
        );
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(want_ansi(true, None));
        assert!(want_ansi(true, Some(OsStr::new(""))));
        assert!(!want_ansi(true, Some(OsStr::new("1"))));
        assert!(!want_ansi(false, None));
    }
}
