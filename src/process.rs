//! External programs run on a message's behalf: command hooks (`hooks/`)
//! and pipe deliveries (`delivery/pipe.rs`). One way to run them, with the
//! rules both need:
//! - no shell: the argv as configured, a clean environment (a fixed `PATH`
//!   and what the caller sets, nothing of the server's), `/` as working
//!   directory;
//! - never blocking the runtime: tokio's child processes, and a spool on
//!   disk is read on the blocking pool, 64 KiB at a time;
//! - the message is written to stdin while stdout and stderr are read, so a
//!   program that writes much before it reads cannot deadlock with us; one
//!   that stops reading (exits early) just ends the feeding;
//! - bounded output: at most [`Output::keep`] bytes of each stream are
//!   kept; past that the stream is either closed (a hook's verdict is
//!   bad output anyway) or drained (a delivery agent must not die of
//!   SIGPIPE for chattering);
//! - a timeout that kills the whole process group: the program is started
//!   in a group of its own, so a shell script's children die with it. The
//!   program is always reaped, and its group is killed too if the caller
//!   stops waiting (the session went away).

use std::io;
use std::os::unix::fs::FileExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;

use crate::delivery::lf::LfConverter;
use crate::spool::Spool;

/// The only `PATH` a program sees.
pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The message goes to stdin in pieces of this size.
const CHUNK: usize = 64 * 1024;

/// How long a killed program may take to be reaped before we leave it to
/// tokio's orphan reaper (SIGKILL cannot be ignored; only a process stuck
/// in the kernel takes longer).
const REAP_GRACE: Duration = Duration::from_secs(5);

/// A program to run once.
pub struct Program<'a> {
    /// The program and its arguments; `argv[0]` is a path or a name looked
    /// up in [`PATH`].
    pub argv: &'a [String],
    /// The environment besides `PATH`.
    pub env: &'a [(&'static str, String)],
    /// What goes to stdin; None: `/dev/null`.
    pub stdin: Option<Input<'a>>,
    /// Killed (with its whole group) after this long.
    pub timeout: Duration,
    /// Run as this uid and gid (no supplementary groups); None: as the
    /// server's own user.
    pub user: Option<(u32, u32)>,
    /// How much of stdout and stderr to keep.
    pub output: Output,
}

/// What a program reads on stdin: `prefix`, then the content.
pub struct Input<'a> {
    /// Bytes written first (trace header fields), as they are.
    pub prefix: &'a [u8],
    /// The message as received (CRLF, dots unstuffed).
    pub content: &'a Spool,
    /// Convert the content's CRLF to LF (a mailbox-format message), as the
    /// maildir copies are.
    pub lf: bool,
}

/// How much output is kept, per stream.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub keep: usize,
    pub past_keep: PastKeep,
}

/// What happens to a stream past [`Output::keep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PastKeep {
    /// Stop reading and close it: the program's next write fails (EPIPE or
    /// SIGPIPE).
    Close,
    /// Read the rest and throw it away.
    Drain,
}

/// A program that ran to its end.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// At most `keep` bytes of each.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// A stream had more than `keep` bytes.
    pub overflowed: bool,
}

/// Why a program did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start it: {0}")]
    Spawn(io::Error),
    #[error("timed out after {0:?}; its process group was killed")]
    TimedOut(Duration),
    /// Reading the spool failed: the program saw a truncated message.
    #[error("reading the message for its stdin failed: {0}")]
    Input(io::Error),
    #[error("waiting for it failed: {0}")]
    Wait(io::Error),
}

/// Kills a process group when dropped while armed: a caller that stops
/// waiting (a dropped future) must not leave the program running.
struct Group {
    pgid: libc::pid_t,
    armed: bool,
}

impl Group {
    fn kill(&self) {
        // SAFETY: kill() only sends a signal. The group is ours: its leader
        // is our child, not yet reaped, or some member still lives (Linux
        // never hands out a pid still in use as a process group id).
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Runs a program to its end or its timeout.
pub async fn run(p: Program<'_>) -> Result<Finished, RunError> {
    let mut cmd = tokio::process::Command::new(&p.argv[0]);
    cmd.args(&p.argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(if p.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so that a timeout kills its children too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some((uid, gid)) = p.user {
        // std sets the gid, drops supplementary groups, then sets the uid.
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let pgid = child.id().map_or(0, |id| id as libc::pid_t);
    let mut group = Group {
        pgid,
        armed: pgid > 0,
    };
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let work = async {
        let (fed, (out, out_over), (err, err_over)) = tokio::join!(
            feed(stdin, p.stdin),
            capture(stdout, p.output),
            capture(stderr, p.output),
        );
        let status = child.wait().await;
        (fed, out, err, out_over || err_over, status)
    };
    let done = tokio::time::timeout(p.timeout, work).await;
    let Ok((fed, stdout, stderr, overflowed, status)) = done else {
        group.kill();
        group.armed = false;
        if tokio::time::timeout(REAP_GRACE, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(program = %p.argv[0], "killed program not reaped yet; left to the orphan reaper");
        }
        return Err(RunError::TimedOut(p.timeout));
    };
    // The leader is reaped; its pid may be reused from here on.
    group.armed = false;
    let status = status.map_err(RunError::Wait)?;
    fed.map_err(RunError::Input)?;
    Ok(Finished {
        status,
        stdout,
        stderr,
        overflowed,
    })
}

/// Writes the input to the program's stdin and closes it. Only reading
/// the spool can fail: a program that stops reading ends the feeding.
async fn feed(stdin: Option<ChildStdin>, input: Option<Input<'_>>) -> io::Result<()> {
    let (Some(stdin), Some(input)) = (stdin, input) else {
        return Ok(());
    };
    let mut w = Writer {
        stdin,
        open: true,
        lf: input.lf.then(LfConverter::default),
        buf: Vec::new(),
    };
    w.raw(input.prefix).await;
    let spool = input.content;
    match spool.as_memory() {
        Some(content) => {
            for piece in content.chunks(CHUNK) {
                if !w.open {
                    break;
                }
                w.put(piece).await;
            }
        }
        None => {
            let file = Arc::new(
                spool
                    .try_clone_file()?
                    .expect("a spool not in memory is on disk"),
            );
            let len = spool.len();
            let mut piece = vec![0u8; CHUNK];
            let mut offset = 0u64;
            while offset < len && w.open {
                let f = file.clone();
                let read =
                    crate::blocking::run("reading a spool for a program's stdin", move || {
                        let want = CHUNK.min((len - offset) as usize);
                        let n = read_full_at(&f, &mut piece[..want], offset);
                        (piece, n)
                    })
                    .await
                    .map_err(io::Error::other)?;
                piece = read.0;
                let n = read.1?;
                w.put(&piece[..n]).await;
                offset += n as u64;
            }
        }
    }
    w.finish().await;
    Ok(())
}

/// Fills `buf` from `offset`; an early end of file is an error (the spool
/// knows its length).
fn read_full_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "spool file shorter than its content",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The program's stdin, optionally converting CRLF to LF.
struct Writer {
    stdin: ChildStdin,
    /// False once a write failed: the program closed its end.
    open: bool,
    lf: Option<LfConverter>,
    buf: Vec<u8>,
}

impl Writer {
    async fn raw(&mut self, bytes: &[u8]) {
        if self.open && !bytes.is_empty() && self.stdin.write_all(bytes).await.is_err() {
            self.open = false;
        }
    }

    async fn put(&mut self, piece: &[u8]) {
        match self.lf.as_mut() {
            None => self.raw(piece).await,
            Some(c) => {
                let mut out = std::mem::take(&mut self.buf);
                out.clear();
                c.push(piece, &mut out);
                self.raw(&out).await;
                self.buf = out;
            }
        }
    }

    async fn finish(mut self) {
        if let Some(c) = self.lf.as_mut() {
            let mut out = Vec::new();
            c.finish(&mut out);
            self.raw(&out).await;
        }
        if self.open {
            let _ = self.stdin.shutdown().await;
        }
    }
}

/// Reads a stream to its end, keeping at most `keep` bytes; returns them
/// and whether there were more.
async fn capture(mut r: impl AsyncRead + Unpin, output: Output) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mut over = false;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let room = output.keep.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        if n > room {
            over = true;
            if output.past_keep == PastKeep::Close {
                break;
            }
        }
    }
    (kept, over)
}
