//! Command hooks: programs the operator configures to run at a stage of
//! each transaction and decide about it (qpsmtpd's and Postmaster's idea,
//! with chasquid's contract, so chasquid's published hook scripts run
//! unmodified).
//!
//! Every configured hook lives in one pipeline [`Check`]: at each stage it
//! runs that stage's hooks one after another, in configuration order, and
//! the first refusal ends the stage (a later hook is not run). Each hook is
//! a process per stage and message: that is its whole cost, and nothing at
//! all is spent when no hook is configured (`serve.rs` adds the check only
//! then).
//!
//! A hook runs as the server's user, without a shell, in `/`, with a clean
//! environment: `PATH=/usr/local/bin:/usr/bin:/bin` and chasquid's
//! variables (see [`environment`]). At the data stage the message is on its
//! stdin, as received (CRLF line endings, dots unstuffed); at the others
//! stdin is empty. What it says:
//! - exit 0: accept; each stdout line `Name: value` (a line starting with
//!   a space or tab continues the one before) is added to every copy,
//!   below our Received field;
//! - exit 20: refuse permanently; any other exit: refuse for now. The last
//!   line of stdout may be a whole reply (`550 5.7.1 text`, `451 4.7.1
//!   text`) of the right class; otherwise `550 5.7.1` or `451 4.7.1` with
//!   our text;
//! - a crash (death by a signal), the timeout, or bad output (a line that
//!   is not a header field, more than 64 KiB on stdout or on stderr) is a
//!   failure, logged with the hook's program, the stage and why, and
//!   answered as `on_failure` says: `451 4.3.0`, or go on.

mod config;

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use config::{Argv, HookConfig, OnFailure, default_timeout};

use crate::pipeline::{Check, CheckState, Facts, Header, Stage, Verdict};
use crate::process::{self, Output, PastKeep, Program, RunError};
use crate::reply::Reply;

/// Exit status of a permanent refusal (chasquid's).
const EXIT_REJECT: i32 = 20;

/// Stdout and stderr kept per hook; more is bad output.
const OUTPUT_MAX: usize = 64 * 1024;

/// RFC 5322 §2.1.1: a line is at most 998 characters.
const FIELD_MAX: usize = 998;

/// Every configured hook, as one check.
#[derive(Debug)]
pub struct Hooks {
    hooks: Arc<[HookConfig]>,
}

impl Hooks {
    /// The check for `hooks`, in configuration order.
    pub fn new(hooks: &[HookConfig]) -> anyhow::Result<Hooks> {
        for (i, h) in hooks.iter().enumerate() {
            if h.timeout.0.is_zero() {
                anyhow::bail!("hooks[{i}] ({}): timeout must be at least 1s", h.command);
            }
        }
        Ok(Hooks {
            hooks: hooks.into(),
        })
    }
}

impl Check for Hooks {
    fn name(&self) -> &str {
        "hooks"
    }

    fn open(&self) -> Box<dyn CheckState> {
        Box::new(HooksState {
            hooks: self.hooks.clone(),
        })
    }
}

/// Hooks keep nothing between stages; each run starts clean.
struct HooksState {
    hooks: Arc<[HookConfig]>,
}

impl CheckState for HooksState {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let mut headers = Vec::new();
            for hook in self.hooks.iter().filter(|h| h.stage == stage) {
                match run(hook, stage, &facts).await {
                    Verdict::Continue => {}
                    Verdict::AddHeaders(h) => headers.extend(h),
                    refusal => return refusal,
                }
            }
            if headers.is_empty() {
                Verdict::Continue
            } else {
                Verdict::AddHeaders(headers)
            }
        })
    }
}

/// Runs one hook; its verdict: Continue, AddHeaders, Reject or TempFail.
async fn run(hook: &HookConfig, stage: Stage, facts: &Facts<'_>) -> Verdict {
    let env = environment(stage, facts);
    let stdin = match (stage, facts.content) {
        (Stage::Data, Some(content)) => Some(process::Input {
            prefix: b"",
            content,
            lf: false,
        }),
        _ => None,
    };
    let result = process::run(Program {
        argv: &hook.command.0,
        env: &env,
        stdin,
        timeout: hook.timeout.0,
        user: None,
        output: Output {
            keep: OUTPUT_MAX,
            past_keep: PastKeep::Close,
        },
    })
    .await;
    let program = hook.command.program();
    let id = facts.id.unwrap_or("-");
    let stage_name = stage.name();
    let (why, stderr) = match result {
        Err(RunError::TimedOut(t)) => (format!("timed out after {t:?}; killed"), String::new()),
        Err(e) => (e.to_string(), String::new()),
        Ok(f) => {
            let stderr = first_line(&f.stderr);
            if f.overflowed {
                (
                    format!("bad output: more than {OUTPUT_MAX} bytes on stdout or stderr"),
                    stderr,
                )
            } else {
                match (f.status.code(), f.status.signal()) {
                    (Some(0), _) => match headers(&f.stdout) {
                        Ok(h) if h.is_empty() => return Verdict::Continue,
                        Ok(h) => return Verdict::AddHeaders(h),
                        Err(e) => (format!("bad output: {e}"), stderr),
                    },
                    (Some(code), _) => {
                        let reply = last_line(&f.stdout).and_then(Reply::from_program);
                        let verdict = if code == EXIT_REJECT {
                            Verdict::reject(reply)
                        } else {
                            Verdict::tempfail(reply)
                        };
                        tracing::info!(
                            hook = program,
                            stage = stage_name,
                            id,
                            code,
                            stderr,
                            "hook refused"
                        );
                        return verdict;
                    }
                    (None, signal) => (format!("crashed (signal {})", signal.unwrap_or(0)), stderr),
                }
            }
        }
    };
    let on_failure = hook.on_failure;
    tracing::warn!(
        hook = program,
        stage = stage_name,
        id,
        why,
        stderr,
        ?on_failure,
        "hook failed"
    );
    match on_failure {
        OnFailure::Tempfail => Verdict::TempFail(Reply::hook_failed()),
        OnFailure::Accept => Verdict::Continue,
    }
}

/// A hook's environment, under chasquid's names (besides `PATH`):
/// - `STAGE`: connect, helo, mail, rcpt or data;
/// - `MESSAGE_ID`: the transaction's id (the one in Received and in the
///   final 250), from the mail stage on; empty before;
/// - `REMOTE_ADDR`: the client's IP address (chasquid adds `:port`);
/// - `EHLO_DOMAIN`: the EHLO/HELO argument, only `a-zA-Z0-9-.:[]` kept, as
///   chasquid does (empty before the greeting);
/// - `MAIL_FROM`: the reverse-path (empty for `<>` and before MAIL);
/// - `RCPT_TO`: the recipients accepted so far, space-separated; at the
///   rcpt stage the one being checked is last;
/// - `AUTH_AS`: the address the client logged in as on a submission
///   port, else empty;
/// - `ON_TLS`: `1` inside TLS, else `0`;
/// - `SPF_PASS`: `1` when the sender's SPF passed (the auth check's
///   result, once the rcpt stage is reached), else `0`.
pub fn environment(stage: Stage, facts: &Facts<'_>) -> Vec<(&'static str, String)> {
    let mut rcpt_to = String::new();
    for r in facts.recipients.iter().chain(facts.rcpt) {
        if !rcpt_to.is_empty() {
            rcpt_to.push(' ');
        }
        rcpt_to.push_str(&r.address);
    }
    let ehlo = facts
        .helo
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'))
        .collect();
    vec![
        ("STAGE", stage.name().to_string()),
        ("MESSAGE_ID", facts.id.unwrap_or("").to_string()),
        ("REMOTE_ADDR", facts.ip.to_string()),
        ("EHLO_DOMAIN", ehlo),
        ("MAIL_FROM", facts.sender.unwrap_or("").to_string()),
        ("RCPT_TO", rcpt_to),
        ("AUTH_AS", facts.auth.unwrap_or("").to_string()),
        (
            "ON_TLS",
            if facts.tls.is_some() { "1" } else { "0" }.to_string(),
        ),
        (
            "SPF_PASS",
            if facts.spf_pass.is_some() { "1" } else { "0" }.to_string(),
        ),
    ]
}

/// The header fields a hook that accepted wrote: `Name: value` lines, a
/// line starting with a space or tab continuing the one before (unfolded
/// into it), LF or CRLF endings, the last line ended too. Anything else is
/// bad output: an empty line, a line without a colon, a continuation
/// first, invalid UTF-8, a field no [`Header`] accepts, or one longer than
/// a line may be.
fn headers(stdout: &[u8]) -> Result<Vec<Header>, String> {
    if stdout.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::str::from_utf8(stdout).map_err(|_| "stdout is not UTF-8".to_string())?;
    let Some(body) = text.strip_suffix('\n') else {
        return Err("the last line does not end".into());
    };
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in body.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return Err("an empty line".into());
        }
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = fields.last_mut() else {
                return Err(format!("a continuation line comes first: {line:?}"));
            };
            value.push_str(line);
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("not a header field: {line:?}"));
        };
        fields.push((name.to_string(), value.to_string()));
    }
    fields
        .iter()
        .map(|(name, value)| {
            let h = Header::new(name, value)
                .ok_or_else(|| format!("not a valid header field: {name:?}"))?;
            if h.render().len() - 2 > FIELD_MAX {
                return Err(format!(
                    "header field {name:?} is longer than {FIELD_MAX} characters"
                ));
            }
            Ok(h)
        })
        .collect()
}

/// The last non-empty line of stdout, where a refusing hook may put its reply.
fn last_line(stdout: &[u8]) -> Option<&str> {
    std::str::from_utf8(stdout)
        .ok()?
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .rfind(|l| !l.trim().is_empty())
}

/// The first line of stderr, for the log: printable, bounded.
fn first_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &str) -> Header {
        Header::new(name, value).unwrap()
    }

    #[test]
    fn accepted_output_is_header_fields() {
        assert_eq!(headers(b"").unwrap(), vec![]);
        assert_eq!(
            headers(b"X-Spam-Score: 1.5\nX-Post-Data: success\r\n").unwrap(),
            vec![h("X-Spam-Score", "1.5"), h("X-Post-Data", "success")]
        );
        // chasquid's own test hook folds a field; it is unfolded.
        assert_eq!(
            headers(b"X-Post-Data-Multiline: multiline\n  header for testing.\n").unwrap(),
            vec![h("X-Post-Data-Multiline", "multiline  header for testing.")]
        );
    }

    #[test]
    fn anything_else_is_bad_output() {
        // chasquid's bad hooks, and a few more.
        for (out, why) in [
            (
                &b"This is not a header\n"[..],
                "not a header field: \"This is not a header\"",
            ),
            (
                b"X-Post-DATA: This starts like a header\n\nBut then is not\n",
                "an empty line",
            ),
            (b"\n", "an empty line"),
            (
                b"X-Post-DATA: valid header with no newline at the end",
                "the last line does not end",
            ),
            (
                b" folded: first\n",
                "a continuation line comes first: \" folded: first\"",
            ),
            (b"X Spam: yes\n", "not a valid header field: \"X Spam\""),
            (b"X-Spam: \xff\n", "stdout is not UTF-8"),
        ] {
            assert_eq!(headers(out).unwrap_err(), why, "{out:?}");
        }
        let long = format!("X-Long: {}\n", "x".repeat(991));
        assert_eq!(
            headers(long.as_bytes()).unwrap_err(),
            "header field \"X-Long\" is longer than 998 characters"
        );
        assert!(headers(format!("X-Long: {}\n", "x".repeat(990)).as_bytes()).is_ok());
    }

    #[test]
    fn the_reply_is_on_the_last_line() {
        assert_eq!(
            last_line(b"checking\n550 5.7.1 spam\n\n"),
            Some("550 5.7.1 spam")
        );
        assert_eq!(last_line(b"spam detected"), Some("spam detected"));
        assert_eq!(last_line(b"\n \n"), None);
        assert_eq!(last_line(b"\xff\n"), None);
    }
}
