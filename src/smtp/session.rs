//! One SMTP or LMTP session over any stream. Only the loop in
//! [`Session::run`] writes replies, counts errors and decides to close; the
//! verb handlers return [`Reply`]s (see ehlo.rs, mail.rs, rcpt.rs,
//! data.rs). What is decided about a message (recipients, checks, storage,
//! delivery) is the [`Pipeline`]'s: a test can hand a session a pipeline of
//! its own and drive it over an in-memory stream.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::command::{self, Command};
use crate::auth::SpfSlot;
use crate::config::Config;
use crate::envelope::Recipient;
use crate::pipeline::{Checks, Decision, Effects, Facts, Pipeline, Stage};
use crate::reply::Reply;

/// Which protocol a session speaks. They differ in the greeting verb and
/// in the answer to the end of data: SMTP gives one for the transaction,
/// LMTP one per recipient (RFC 2033 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Lmtp,
}

/// How a session ended.
#[derive(Debug)]
pub enum Outcome<S> {
    /// The conversation is over; the stream is closed or to be dropped.
    Closed,
    /// The client asked for STARTTLS and got 220: the caller runs the TLS
    /// handshake on the stream and starts a fresh session inside it.
    StartTls(S),
}

/// Facts about the connection that outlive a STARTTLS upgrade.
#[derive(Debug)]
pub struct Connection {
    /// The client's address; 127.0.0.1 for a unix socket.
    pub ip: IpAddr,
    /// A unix socket's local client (`ip` is then a stand-in).
    pub local: bool,
    /// TLS version and cipher once TLS is active.
    pub tls: Option<String>,
    /// The reverse DNS lookup started at connect, awaited when first needed.
    pub rdns: Option<tokio::task::JoinHandle<Option<String>>>,
    /// Its result, once awaited.
    pub rdns_name: Option<Option<String>>,
    /// The pipeline's check states for this connection; opened by the
    /// first session when the caller did not.
    pub checks: Option<Checks>,
    /// What checks at connect or helo asked for, for every message of
    /// this connection (a discard, fields to add).
    pub effects: Effects,
    /// The client came to a submission port (RFC 6409): AUTH is offered
    /// once TLS is on, MAIL needs it, and a logged-in client may relay
    /// (`crate::submission`).
    pub submission: bool,
}

impl Connection {
    pub fn new(ip: IpAddr) -> Connection {
        Connection {
            ip,
            local: false,
            tls: None,
            rdns: None,
            rdns_name: None,
            checks: None,
            effects: Effects::default(),
            submission: false,
        }
    }

    /// A local client on a unix socket: no reverse lookup to wait for.
    pub fn local() -> Connection {
        let mut c = Connection::new(IpAddr::from([127, 0, 0, 1]));
        c.local = true;
        c.rdns_name = Some(Some("localhost".into()));
        c
    }

    /// The reverse DNS name, waiting at most a few seconds for the lookup.
    pub async fn rdns_name(&mut self) -> Option<String> {
        if self.rdns_name.is_none() {
            let name = match self.rdns.take() {
                Some(h) => tokio::time::timeout(Duration::from_secs(5), h)
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .flatten(),
                None => None,
            };
            self.rdns_name = Some(name);
        }
        self.rdns_name.clone().flatten()
    }
}

/// A mail transaction in progress (between MAIL and the end of data).
#[derive(Debug)]
pub(super) struct Transaction {
    pub started: Instant,
    /// Named at MAIL, so checks and logs can refer to it; it reaches the
    /// client only when the message is accepted.
    pub id: String,
    pub sender: String,
    pub smtputf8: bool,
    /// Distinct recipients, in the order they were accepted.
    pub recipients: Vec<Recipient>,
    /// For each RCPT answered 250, its recipient's index: LMTP answers
    /// each of them after the data, duplicates included (RFC 2033 §4.2).
    pub accepted: Vec<usize>,
    /// Every RCPT and its reply code, for the transaction's log line.
    pub rcpt_log: Vec<(String, u16)>,
    /// What checks asked for so far: the connection's, then this
    /// message's.
    pub effects: Effects,
    /// BDAT in progress.
    pub bdat: Option<super::data::Bdat>,
    /// The SPF result, once the auth check starts it at MAIL; dropping
    /// the transaction stops a lookup still running.
    pub spf: SpfSlot,
}

/// What reading a line produced.
pub(super) enum Read {
    Line(Vec<u8>),
    TooLong,
    Closed,
    TimedOut,
    Shutdown,
}

pub struct Session<S> {
    pub(super) stream: S,
    /// Bytes read but not yet consumed: at most one line plus one read.
    pub(super) rbuf: BytesMut,
    /// Replies not yet flushed; pipelined replies go out together.
    pub(super) wbuf: Vec<u8>,
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) conn: Connection,
    pub(super) protocol: Protocol,
    pub(super) shutdown: CancellationToken,
    /// The EHLO/HELO argument, once given.
    pub(super) helo: Option<String>,
    /// EHLO (not HELO) was used.
    pub(super) esmtp: bool,
    /// The user logged in as (AUTH), its canonical address. A session
    /// inside TLS starts without one; AUTH is only accepted there.
    pub(super) auth: Option<String>,
    pub(super) tx: Option<Transaction>,
    errors: u32,
    /// While discarding the rest of an over-long line.
    discarding: bool,
}

/// What a handler wants after its reply.
pub(super) enum Next {
    Continue,
    Close,
    StartTls,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// An SMTP session.
    pub fn new(
        stream: S,
        pipeline: Arc<Pipeline>,
        conn: Connection,
        shutdown: CancellationToken,
    ) -> Session<S> {
        Session::with_protocol(stream, pipeline, conn, shutdown, Protocol::Smtp)
    }

    pub fn with_protocol(
        stream: S,
        pipeline: Arc<Pipeline>,
        mut conn: Connection,
        shutdown: CancellationToken,
        protocol: Protocol,
    ) -> Session<S> {
        if conn.checks.is_none() {
            conn.checks = Some(pipeline.open());
        }
        Session {
            stream,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: Vec::with_capacity(256),
            pipeline,
            conn,
            protocol,
            shutdown,
            helo: None,
            esmtp: false,
            auth: None,
            tx: None,
            errors: 0,
            discarding: false,
        }
    }

    /// Runs the dialogue. `greet` is false after STARTTLS, where the
    /// client speaks first (RFC 3207 §4.2).
    pub async fn run(mut self, greet: bool) -> std::io::Result<(Outcome<S>, Connection)> {
        if greet {
            // A client locked out for failed logins is told so at once.
            if self.conn.submission && self.runtime().logins.locked(self.conn.ip) {
                self.send_now(&Reply::auth_locked_out()).await?;
                let _ = self.stream.shutdown().await;
                return Ok((Outcome::Closed, self.conn));
            }
            // LMTP clients are local MTAs that wait for the greeting, and
            // so do mail clients on a submission port; pregreeting is a
            // spambot's habit at an MX.
            if self.protocol == Protocol::Smtp
                && !self.conn.submission
                && self.talked_first().await?
            {
                self.send_now(&Reply::pregreet()).await?;
                return Ok((Outcome::Closed, self.conn));
            }
            let decision = self.stage(Stage::Connect, None, None).await;
            if let Err(reply) = decision.apply(&mut self.conn.effects) {
                self.send_now(&reply).await?;
                let _ = self.stream.shutdown().await;
                return Ok((Outcome::Closed, self.conn));
            }
            let greeting = match self.protocol {
                Protocol::Smtp => Reply::greeting(&self.runtime().hostname),
                Protocol::Lmtp => Reply::greeting_lmtp(&self.runtime().hostname),
            };
            self.send_now(&greeting).await?;
        }
        loop {
            let timeout = self.config().smtp.command_timeout.0;
            let line = match self.read_line(timeout).await? {
                Read::Line(line) => line,
                Read::TooLong => {
                    if self.reply(Reply::line_too_long()) {
                        break;
                    }
                    continue;
                }
                Read::Closed => break,
                Read::TimedOut => {
                    self.send_now(&Reply::timeout()).await?;
                    break;
                }
                Read::Shutdown => {
                    self.send_now(&Reply::shutting_down()).await?;
                    break;
                }
            };
            let (replies, next) = match command::parse(&line) {
                Ok(cmd) => self.dispatch(cmd).await?,
                Err(reply) => (vec![reply], Next::Continue),
            };
            // 421 is "closing transmission channel" (RFC 5321 §3.8,
            // §4.2.3): whoever chose it (a milter's shutdown, a policy
            // server's action), the session ends after saying it.
            let closing = replies.iter().any(|r| r.code == 421);
            let mut too_many = false;
            for reply in replies {
                too_many |= self.reply(reply);
            }
            match next {
                _ if too_many || closing => break,
                Next::Continue => {}
                Next::Close => break,
                Next::StartTls => {
                    self.flush().await?;
                    if !self.rbuf.is_empty() {
                        // Plaintext pipelined behind STARTTLS must never be
                        // read as if it came over TLS (CVE-2011-0411).
                        tracing::warn!(ip = %self.conn.ip, bytes = self.rbuf.len(), "discarding plaintext pipelined after STARTTLS");
                        self.rbuf.clear();
                    }
                    self.log_abandoned("STARTTLS");
                    return Ok((Outcome::StartTls(self.stream), self.conn));
                }
            }
        }
        self.log_abandoned("connection closed");
        self.flush().await?;
        let _ = self.stream.shutdown().await;
        Ok((Outcome::Closed, self.conn))
    }

    /// Runs one command; its replies, in order (several only for LMTP's
    /// end of data).
    async fn dispatch(&mut self, cmd: Command) -> std::io::Result<(Vec<Reply>, Next)> {
        let lmtp = self.protocol == Protocol::Lmtp;
        let reply = match cmd {
            Command::Ehlo(host) if !lmtp => self.ehlo(host, true).await,
            Command::Helo(host) if !lmtp => self.ehlo(host, false).await,
            Command::Lhlo(host) if lmtp => self.ehlo(host, true).await,
            Command::Ehlo(_) | Command::Helo(_) => Reply::wrong_greeting_verb("LHLO"),
            Command::Lhlo(_) => Reply::not_implemented(),
            Command::StartTls => {
                let (reply, next) = self.starttls();
                return Ok((vec![reply], next));
            }
            Command::Auth { .. } if !self.conn.submission => Reply::not_implemented(),
            Command::Auth { mechanism, initial } => return self.auth(mechanism, initial).await,
            Command::Mail(from) => self.mail(from).await,
            Command::Rcpt(to) => self.rcpt(to).await,
            Command::Data => return self.data().await,
            Command::Bdat { size, last } => return self.bdat(size, last).await,
            Command::Rset => {
                self.log_abandoned("RSET");
                Reply::ok()
            }
            Command::Noop => Reply::ok(),
            Command::Help => Reply::help(),
            Command::Vrfy => Reply::vrfy(),
            Command::Expn => Reply::expn_refused(),
            Command::NotImplemented => Reply::not_implemented(),
            Command::Quit => {
                let reply = Reply::closing(&self.runtime().hostname);
                return Ok((vec![reply], Next::Close));
            }
        };
        Ok((vec![reply], Next::Continue))
    }

    pub(super) fn runtime(&self) -> &crate::runtime::Runtime {
        &self.pipeline.runtime
    }

    pub(super) fn config(&self) -> &Config {
        &self.pipeline.runtime.config
    }

    /// Consults the pipeline's checks at `stage`, with what is known now.
    pub(super) async fn stage(
        &mut self,
        stage: Stage,
        rcpt: Option<&Recipient>,
        content: Option<&crate::spool::Spool>,
    ) -> Decision {
        let Session {
            conn,
            helo,
            tx,
            auth,
            ..
        } = self;
        let Some(checks) = conn.checks.as_mut() else {
            return Decision::Pass(Effects::default());
        };
        // From RCPT on, checks (greylisting, hooks) see whether SPF passed;
        // the lookup began at MAIL and is usually done by now.
        let spf_pass = match (stage, tx.as_ref()) {
            (Stage::Rcpt | Stage::Data, Some(t)) => t.spf.passed().await,
            _ => None,
        };
        let facts = Facts {
            ip: conn.ip,
            helo: helo.as_deref(),
            tls: conn.tls.as_deref(),
            id: tx.as_ref().map(|t| t.id.as_str()),
            sender: tx.as_ref().map(|t| t.sender.as_str()),
            recipients: tx.as_ref().map_or(&[], |t| t.recipients.as_slice()),
            rcpt,
            content,
            local: conn.local,
            spf_pass: spf_pass.as_deref(),
            spf: tx.as_ref().map(|t| &t.spf),
            auth: auth.as_deref(),
        };
        checks.run(stage, facts).await
    }

    /// Tells the checks the session accepted what `stage` decided.
    pub(super) async fn accepted(&mut self, stage: Stage) {
        if let Some(checks) = self.conn.checks.as_mut() {
            checks.accepted(stage).await;
        }
    }

    /// Ends the transaction, if any, and lets every check forget it.
    pub(super) fn end_transaction(&mut self) -> Option<Transaction> {
        if let Some(checks) = self.conn.checks.as_mut() {
            checks.reset();
        }
        self.tx.take()
    }

    /// Queues a reply and counts it if it is an error. Returns true when the
    /// error limit is reached; the 421 is then queued too.
    pub(super) fn reply(&mut self, reply: Reply) -> bool {
        reply.write_to(&mut self.wbuf);
        if reply.is_error() {
            self.errors += 1;
            if self.errors >= self.config().smtp.max_errors {
                Reply::too_many_errors().write_to(&mut self.wbuf);
                return true;
            }
        }
        false
    }

    pub(super) async fn send_now(&mut self, reply: &Reply) -> std::io::Result<()> {
        reply.write_to(&mut self.wbuf);
        self.flush().await
    }

    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Whether the client sent anything before our greeting (within the
    /// configured delay, or already waiting at connect).
    async fn talked_first(&mut self) -> std::io::Result<bool> {
        let delay = self.config().smtp.greeting_delay.0;
        let mut byte = [0u8; 1];
        let read = self.stream.read(&mut byte);
        if delay.is_zero() {
            // Only what is already there counts; never wait.
            return Ok(matches!(futures_now(read), Some(Ok(n)) if n > 0));
        }
        Ok(matches!(tokio::time::timeout(delay, read).await, Ok(Ok(n)) if n > 0))
    }

    /// Reads more input into `rbuf`, flushing pending replies first.
    /// Returns Ok(false) at end of stream.
    pub(super) async fn fill(
        &mut self,
        timeout: Duration,
        watch_shutdown: bool,
    ) -> std::io::Result<Result<bool, Read>> {
        self.flush().await?;
        if self.rbuf.capacity() - self.rbuf.len() < 512 {
            self.rbuf.reserve(4096);
        }
        let shutdown = self.shutdown.clone();
        let read = tokio::time::timeout(timeout, self.stream.read_buf(&mut self.rbuf));
        let result = if watch_shutdown {
            tokio::select! {
                r = read => r,
                _ = shutdown.cancelled() => return Ok(Err(Read::Shutdown)),
            }
        } else {
            read.await
        };
        match result {
            Err(_) => Ok(Err(Read::TimedOut)),
            Ok(Ok(0)) => Ok(Ok(false)),
            Ok(Ok(_)) => Ok(Ok(true)),
            Ok(Err(e)) if is_disconnect(&e) => Ok(Ok(false)),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Reads one command line, bounded by `smtp.max_line_length`. An
    /// over-long line is discarded up to its end and reported once.
    pub(super) async fn read_line(&mut self, timeout: Duration) -> std::io::Result<Read> {
        let max = self.config().smtp.max_line_length;
        loop {
            if let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                let line = self.rbuf.split_to(pos + 1);
                if std::mem::take(&mut self.discarding) {
                    return Ok(Read::TooLong);
                }
                if line.len() > max {
                    return Ok(Read::TooLong);
                }
                return Ok(Read::Line(line.to_vec()));
            }
            if self.rbuf.len() > max {
                // Keep memory bounded: drop what we have and skip to the LF.
                self.rbuf.clear();
                self.discarding = true;
            }
            // Shutdown interrupts only between commands, never a line.
            let idle = self.rbuf.is_empty() && !self.discarding;
            match self.fill(timeout, idle).await? {
                Ok(true) => {}
                Ok(false) => return Ok(Read::Closed),
                Err(r) => return Ok(r),
            }
        }
    }

    /// Consumes up to `n` buffered bytes.
    pub(super) fn take_buffered(&mut self, n: usize) -> bytes::Bytes {
        let n = n.min(self.rbuf.len());
        self.rbuf.split_to(n).freeze()
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.rbuf.advance(n);
    }

    /// Logs a transaction that ended without data being accepted.
    fn log_abandoned(&mut self, why: &str) {
        if let Some(tx) = self.end_transaction() {
            tracing::info!(
                ip = %self.conn.ip,
                helo = self.helo.as_deref().unwrap_or(""),
                tls = self.conn.tls.as_deref().unwrap_or("no"),
                from = %tx.sender,
                rcpts = ?tx.rcpt_log,
                duration_ms = tx.started.elapsed().as_millis() as u64,
                result = why,
                "transaction abandoned"
            );
        }
    }
}

/// Polls a future once: Some(output) if it is ready now.
fn futures_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}
