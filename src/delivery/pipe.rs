//! Delivery into a pipe command (Postfix local(8)'s "pipe to procmail"): an
//! alias destination `|/path/to/program args` gets each copy on its stdin.
//!
//! What the program sees:
//! - argv as stored (split on whitespace; no shell, see
//!   `directory/pipe.rs`), `/` as working directory;
//! - stdin: `Return-Path:`, `Delivered-To:` (the address whose alias holds
//!   the pipe), `X-Original-To:` (when another address led here), our
//!   `Received:`, the fields checks added, then the message, all with LF
//!   line endings: the same bytes a maildir copy holds. No mbox `From `
//!   line: procmail and maildrop need none (procmail writes its own where
//!   a mailbox format wants one);
//! - local(8)'s environment, each value filtered as local(8) does (every
//!   character outside its `command_expansion_filter` becomes `_`):
//!   `SENDER`, `RECIPIENT` (the owner address, with `+EXTENSION` when
//!   given), `ORIGINAL_RECIPIENT` (the RCPT address), `USER` and `LOGNAME`
//!   (the owner's local part), `LOCAL` (with the extension), `DOMAIN`,
//!   `EXTENSION`, `HOME` (of the user the program runs as), `CLIENT_ADDRESS`,
//!   `CLIENT_HELO`, `CLIENT_HOSTNAME`, `CLIENT_PROTOCOL`, and the fixed
//!   `PATH`. Nothing of the server's own environment.
//!
//! It runs as `delivery.pipe_user` (default: the server's own user), for at
//! most `delivery.pipe_timeout`. Its exit status decides, as sysexits(3)
//! says: 0 delivered, 75 (EX_TEMPFAIL) a temporary failure, any other a
//! permanent one whose reply quotes the first line of its stderr. Death by
//! a signal and the timeout are temporary failures, as in local(8).

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use super::lf;
use crate::config::DeliveryConfig;
use crate::directory::Pipe;
use crate::envelope::Envelope;
use crate::process::{self, Output, PastKeep, Program, RunError};
use crate::spool::Spool;

/// sysexits(3): "temporary failure; the user is invited to retry".
const EX_TEMPFAIL: i32 = 75;

/// Stderr kept, for the first line of a refusal.
const STDERR_KEPT: usize = 4096;

/// The longest stderr line quoted in a reply.
const DETAIL_MAX: usize = 200;

/// local(8)'s default `command_expansion_filter`.
const ENV_SAFE: &str = "1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// How pipe commands run, resolved once at start.
#[derive(Debug, Clone)]
pub struct Pipes {
    /// uid and gid to switch to; None when the server's own user is meant.
    user: Option<(u32, u32)>,
    /// The home directory of the user the commands run as: their `HOME`.
    home: String,
    timeout: Duration,
}

/// Why a pipe delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipeError {
    /// Exit 75, or killed by a signal: try again later.
    TempFail,
    /// Killed at `delivery.pipe_timeout`: try again later.
    TimedOut,
    /// Any other exit status: the first line of stderr, or the status.
    Refused(String),
    /// It could not be started, or its input could not be read.
    Local,
}

impl Pipes {
    /// Resolves `delivery.pipe_user` with the system's user database. An
    /// unknown user is an error, and so is another user than our own when
    /// we cannot switch to it (not root).
    pub async fn new(config: &DeliveryConfig) -> anyhow::Result<Pipes> {
        let name = config.pipe_user.clone();
        let entry = crate::blocking::run("looking up delivery.pipe_user", move || {
            match name.as_deref() {
                Some(n) => passwd_by_name(n),
                // SAFETY: getuid() cannot fail.
                None => passwd_by_uid(unsafe { libc::getuid() }),
            }
        })
        .await??;
        // SAFETY: geteuid() cannot fail.
        let euid = unsafe { libc::geteuid() };
        let (user, home) = match (&config.pipe_user, entry) {
            (Some(name), None) => {
                anyhow::bail!("delivery.pipe_user: no user named {name:?} on this system")
            }
            (Some(name), Some(e)) => {
                if e.uid != euid && euid != 0 {
                    anyhow::bail!(
                        "delivery.pipe_user = {name:?}: running pipe commands as another user needs root (letterbox runs as uid {euid})"
                    );
                }
                (Some((e.uid, e.gid)), e.home)
            }
            // A server user without a passwd entry (a bare container uid)
            // still delivers; its commands get `/` as their home.
            (None, e) => (None, e.map_or_else(|| "/".to_string(), |e| e.home)),
        };
        Ok(Pipes {
            user,
            home,
            timeout: config.pipe_timeout.0,
        })
    }

    /// Runs `pipe` once with the message on its stdin. `rcpt` is the
    /// recipient, as given, for whom it runs (named by our Received field).
    pub async fn deliver(
        &self,
        envelope: &Envelope,
        spool: &Spool,
        pipe: &Pipe,
        rcpt: &str,
        delimiter: Option<char>,
    ) -> Result<(), PipeError> {
        let prefix = trace_headers(envelope, pipe, rcpt);
        let env = self.environment(envelope, pipe, rcpt, delimiter);
        let program = &pipe.command[0];
        let run = process::run(Program {
            argv: &pipe.command,
            env: &env,
            stdin: Some(process::Input {
                prefix: &prefix,
                content: spool,
                lf: true,
            }),
            timeout: self.timeout,
            user: self.user,
            output: Output {
                keep: STDERR_KEPT,
                past_keep: PastKeep::Drain,
            },
        })
        .await;
        let id = &envelope.id;
        let owner = pipe.owner.to_string();
        let finished = match run {
            Ok(f) => f,
            Err(RunError::TimedOut(t)) => {
                tracing::warn!(id, program, %owner, timeout = ?t, "pipe command timed out; killed, delivery deferred");
                return Err(PipeError::TimedOut);
            }
            Err(e) => {
                tracing::error!(id, program, %owner, error = %e, "pipe command failed to run");
                return Err(PipeError::Local);
            }
        };
        let stderr = first_line(&finished.stderr);
        match (finished.status.code(), finished.status.signal()) {
            (Some(0), _) => {
                tracing::debug!(id, program, %owner, "delivered to a pipe command");
                Ok(())
            }
            (Some(EX_TEMPFAIL), _) => {
                tracing::info!(id, program, %owner, stderr, "pipe command deferred the delivery (exit 75)");
                Err(PipeError::TempFail)
            }
            (Some(code), _) => {
                tracing::info!(id, program, %owner, code, stderr, "pipe command refused the message");
                Err(PipeError::Refused(if stderr.is_empty() {
                    format!("exit status {code}")
                } else {
                    stderr
                }))
            }
            (None, signal) => {
                tracing::warn!(id, program, %owner, ?signal, stderr, "pipe command died of a signal; delivery deferred");
                Err(PipeError::TempFail)
            }
        }
    }

    /// local(8)'s variables for this delivery.
    fn environment(
        &self,
        envelope: &Envelope,
        pipe: &Pipe,
        rcpt: &str,
        delimiter: Option<char>,
    ) -> Vec<(&'static str, String)> {
        let user = &pipe.owner.local;
        let extension = pipe.extension.as_deref().unwrap_or("");
        let local = match (pipe.extension.as_deref(), delimiter) {
            (Some(ext), Some(d)) => format!("{user}{d}{ext}"),
            _ => user.clone(),
        };
        let recipient = format!("{local}@{}", pipe.owner.domain);
        let r = &envelope.received;
        let ip = r.ip.to_string();
        let vars: [(&'static str, &str); 12] = [
            ("SENDER", envelope.sender.as_str()),
            ("RECIPIENT", recipient.as_str()),
            (
                "ORIGINAL_RECIPIENT",
                pipe.original.as_deref().unwrap_or(rcpt),
            ),
            ("USER", user.as_str()),
            ("LOGNAME", user.as_str()),
            ("LOCAL", local.as_str()),
            ("DOMAIN", pipe.owner.domain.as_str()),
            ("EXTENSION", extension),
            ("CLIENT_ADDRESS", ip.as_str()),
            ("CLIENT_HELO", r.helo.as_str()),
            ("CLIENT_HOSTNAME", r.rdns.as_deref().unwrap_or("unknown")),
            ("CLIENT_PROTOCOL", r.with.as_str()),
        ];
        let mut env: Vec<(&'static str, String)> =
            vars.iter().map(|(k, v)| (*k, filtered(v))).collect();
        env.push(("HOME", self.home.clone()));
        env
    }
}

/// `Return-Path`, `Delivered-To`, `X-Original-To` when another address led
/// here, the Received field for `rcpt`, and the fields checks added; LF.
fn trace_headers(envelope: &Envelope, pipe: &Pipe, rcpt: &str) -> Vec<u8> {
    let mut h = format!(
        "Return-Path: <{}>\nDelivered-To: {}\n",
        envelope.sender, pipe.owner
    );
    if let Some(original) = &pipe.original {
        h.push_str(&format!("X-Original-To: {original}\n"));
    }
    let mut h = h.into_bytes();
    h.extend_from_slice(&lf::to_lf(envelope.received_header(rcpt).as_bytes()));
    h.extend_from_slice(&lf::to_lf(envelope.headers.as_bytes()));
    h
}

/// A value as local(8) exports it: unsafe characters become `_`.
fn filtered(value: &str) -> String {
    value
        .chars()
        .map(|c| if ENV_SAFE.contains(c) { c } else { '_' })
        .collect()
}

/// The first non-empty line of a program's stderr, as printable ASCII,
/// bounded: fit for a reply.
fn first_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(DETAIL_MAX)
        .collect::<String>()
        .trim()
        .to_string()
}

/// A passwd entry's parts that matter here.
struct Passwd {
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd_by_name(name: &str) -> io::Result<Option<Passwd>> {
    let Ok(c) = CString::new(name) else {
        return Ok(None);
    };
    // SAFETY: getpwnam_r writes only into the buffers it is given.
    passwd(|pw, buf, len, out| unsafe { libc::getpwnam_r(c.as_ptr(), pw, buf, len, out) })
}

fn passwd_by_uid(uid: u32) -> io::Result<Option<Passwd>> {
    // SAFETY: getpwuid_r writes only into the buffers it is given.
    passwd(|pw, buf, len, out| unsafe { libc::getpwuid_r(uid, pw, buf, len, out) })
}

/// Calls a getpw*_r function, growing its buffer on ERANGE.
fn passwd(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<Passwd>> {
    crate::blocking::assert_off_runtime("reading the user database");
    let mut size = 4096;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: an all-zero passwd is a valid value for the call to fill.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        match call(&mut pw, buf.as_mut_ptr(), buf.len(), &mut out) {
            0 if out.is_null() => return Ok(None),
            0 => {
                // SAFETY: on success pw_dir points into `buf`, NUL-terminated.
                let home = unsafe { CStr::from_ptr(pw.pw_dir) }
                    .to_string_lossy()
                    .into_owned();
                return Ok(Some(Passwd {
                    uid: pw.pw_uid,
                    gid: pw.pw_gid,
                    home,
                }));
            }
            libc::ERANGE if size < 1 << 20 => size *= 2,
            // Not found is 0 with a null result, but some systems say ENOENT.
            libc::ENOENT | libc::ESRCH => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_values_are_filtered_as_local8_does() {
        assert_eq!(filtered("a.b+c@example.org"), "a.b+c@example.org");
        assert_eq!(filtered("$(rm -rf ~)@x"), "__rm_-rf___@x");
        assert_eq!(filtered("jörg"), "j_rg");
    }

    #[test]
    fn the_quoted_stderr_line_is_printable_and_bounded() {
        assert_eq!(
            first_line(b"\n  unknown project web \nmore\n"),
            "unknown project web"
        );
        assert_eq!(first_line(b"caf\xc3\xa9\x1b[1m"), "caf??[1m");
        assert_eq!(first_line(&[b'x'; 500]).len(), DETAIL_MAX);
        assert_eq!(first_line(b""), "");
    }

    #[test]
    fn users_resolve_from_the_system_database() {
        let root = passwd_by_name("root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(passwd_by_name("no-such-user-here").unwrap().is_none());
        assert_eq!(passwd_by_uid(0).unwrap().unwrap().home, root.home);
    }
}
