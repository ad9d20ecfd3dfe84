//! The log: tracing output on stderr, as text for people or JSON for log
//! collectors. Colour only on a terminal, and never under `NO_COLOR`: a
//! file, a pipe or journald gets plain text.

use std::ffi::OsStr;
use std::io::IsTerminal;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber (`RUST_LOG` overrides `log.level`), then
/// logs what loading the configuration warned about. A second call leaves
/// the first subscriber in place.
pub fn init(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
}

/// Whether to colour the log: only on a terminal, and not when `NO_COLOR`
/// holds a non-empty value (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(true, Some(OsStr::new("0"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
    }
}
