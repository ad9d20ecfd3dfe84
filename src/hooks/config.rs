//! `[[hooks]]` as the operator writes it:
//!
//! ```toml
//! [[hooks]]
//! stage = "data"                         # connect | helo | mail | rcpt | data
//! command = ["/etc/letterbox/hooks/spam", "--strict"]   # argv; no shell
//! timeout = "30s"
//! on_failure = "tempfail"                # or "accept"
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::pipeline::Stage;
use crate::units::Duration;

/// One configured hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// When it runs.
    pub stage: Stage,
    /// The program and its arguments, run without a shell.
    pub command: Argv,
    /// Killed (with its children) after this long.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// What a crash, a timeout or bad output means.
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// A hook's default timeout: long enough for a content scanner on a big
/// message, well inside the 10 minutes a client waits for the answer to
/// the end of data (RFC 5321 §4.5.3.2.6).
pub fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// What a hook that crashed (a signal), timed out or wrote what is not a
/// verdict means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Answer `451 4.3.0`: the client tries again later. Nothing passes a
    /// check that did not run.
    #[default]
    Tempfail,
    /// Go on as if the hook had said nothing.
    Accept,
}

/// A command line: a program and its arguments. The program is an
/// absolute path or a bare name looked up in the hook's fixed `PATH`; a
/// relative path would depend on a working directory (hooks run in `/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Argv(pub Vec<String>);

impl Argv {
    /// Why `argv` cannot be run, if it cannot.
    fn check(argv: &[String]) -> Result<(), String> {
        let Some(program) = argv.first() else {
            return Err("a command needs at least the program".into());
        };
        if program.is_empty() || (program.contains('/') && !program.starts_with('/')) {
            return Err(format!(
                "{program:?} must be an absolute path or a program name found in PATH"
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err("an argument contains a NUL byte".into());
        }
        Ok(())
    }

    /// The program, for logs.
    pub fn program(&self) -> &str {
        &self.0[0]
    }
}

impl fmt::Display for Argv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let argv = Vec::<String>::deserialize(deserializer)?;
        Argv::check(&argv).map_err(serde::de::Error::custom)?;
        Ok(Argv(argv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        hooks: Vec<HookConfig>,
    }

    fn parse(toml: &str) -> Result<Vec<HookConfig>, String> {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        Figment::from(Toml::string(toml))
            .extract::<File>()
            .map(|f| f.hooks)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_every_key() {
        let hooks = parse(
            "[[hooks]]\nstage = \"data\"\ncommand = [\"/etc/letterbox/hooks/spam\", \"--strict\"]\n\
             [[hooks]]\nstage = \"rcpt\"\ncommand = [\"check-rcpt\"]\ntimeout = \"5s\"\non_failure = \"accept\"\n",
        )
        .unwrap();
        assert_eq!(
            hooks,
            [
                HookConfig {
                    stage: Stage::Data,
                    command: Argv(vec!["/etc/letterbox/hooks/spam".into(), "--strict".into()]),
                    timeout: Duration::from_secs(30),
                    on_failure: OnFailure::Tempfail,
                },
                HookConfig {
                    stage: Stage::Rcpt,
                    command: Argv(vec!["check-rcpt".into()]),
                    timeout: Duration::from_secs(5),
                    on_failure: OnFailure::Accept,
                },
            ]
        );
    }

    #[test]
    fn bad_hooks_are_refused_by_key() {
        let err = parse("[[hooks]]\nstage = \"data\"\ncommand = []\n").unwrap_err();
        assert!(
            err.contains("a command needs at least the program"),
            "{err}"
        );
        let err = parse("[[hooks]]\nstage = \"data\"\ncommand = [\"hooks/spam\"]\n").unwrap_err();
        assert!(
            err.contains("must be an absolute path or a program name found in PATH"),
            "{err}"
        );
        let err = parse("[[hooks]]\nstage = \"queue\"\ncommand = [\"/x\"]\n").unwrap_err();
        assert!(err.contains("queue"), "{err}");
        let err =
            parse("[[hooks]]\nstage = \"data\"\ncommand = [\"/x\"]\non_failure = \"reject\"\n")
                .unwrap_err();
        assert!(err.contains("reject"), "{err}");
        let err =
            parse("[[hooks]]\nstage = \"data\"\ncommand = [\"/x\"]\nshell = true\n").unwrap_err();
        assert!(err.contains("shell"), "{err}");
    }
}
