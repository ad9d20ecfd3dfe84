//! The listener side: accepts connections on a TCP or unix socket under
//! the runtime's global and per-IP limits and its connection rate limit,
//! runs a session per connection in the listener's protocol, upgrades SMTP
//! to TLS when a session asks (or at once, on an implicit-TLS submission
//! port), and stops accepting on shutdown while sessions finish their
//! transaction.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::{Connection, Outcome, Protocol, Session};
use crate::limits::Refused;
use crate::pipeline::Pipeline;
use crate::reply::Reply;

/// A bound socket.
pub enum Socket {
    Tcp(TcpListener),
    /// A unix socket and its path, removed when the server stops.
    Unix(UnixListener, PathBuf),
}

/// Where a listener is bound, as logged and printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Tcp(a) => write!(f, "{a}"),
            Bound::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What a listener's connections are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SMTP (an MX) or LMTP, as the listener's protocol says.
    Plain,
    /// Submission (RFC 6409) with STARTTLS, port 587.
    Submission,
    /// Submission over implicit TLS (RFC 8314), port 465: the TLS
    /// handshake comes before the greeting.
    SubmissionTls,
}

/// One listening socket and the sessions it spawns.
pub struct Server {
    pipeline: Arc<Pipeline>,
    socket: Socket,
    protocol: Protocol,
    kind: Kind,
}

impl Server {
    /// An SMTP listener.
    pub fn new(pipeline: Arc<Pipeline>, listener: TcpListener) -> Server {
        Server::with_protocol(pipeline, Socket::Tcp(listener), Protocol::Smtp)
    }

    pub fn with_protocol(pipeline: Arc<Pipeline>, socket: Socket, protocol: Protocol) -> Server {
        Server {
            pipeline,
            socket,
            protocol,
            kind: Kind::Plain,
        }
    }

    /// A submission listener: STARTTLS, or TLS from the first byte when
    /// `implicit_tls`.
    pub fn submission(
        pipeline: Arc<Pipeline>,
        listener: TcpListener,
        implicit_tls: bool,
    ) -> Server {
        Server {
            kind: if implicit_tls {
                Kind::SubmissionTls
            } else {
                Kind::Submission
            },
            ..Server::new(pipeline, listener)
        }
    }

    pub fn bound(&self) -> std::io::Result<Bound> {
        Ok(match &self.socket {
            Socket::Tcp(l) => Bound::Tcp(l.local_addr()?),
            Socket::Unix(_, path) => Bound::Unix(path.clone()),
        })
    }

    /// Accepts until `shutdown`; sessions are spawned on `tracker` so the
    /// caller can wait for them.
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                a = self.accept() => a,
                _ = shutdown.cancelled() => break,
            };
            match accepted {
                Ok((stream, ip)) => {
                    backoff = Duration::from_millis(10);
                    self.spawn(stream, ip, &shutdown, &tracker);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        if let Socket::Unix(_, path) = &self.socket {
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// The next connection and its client's address (None on a unix socket).
    async fn accept(&self) -> std::io::Result<(Stream, Option<IpAddr>)> {
        Ok(match &self.socket {
            Socket::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                (Stream::Tcp(stream), Some(peer.ip().to_canonical()))
            }
            Socket::Unix(l, _) => (Stream::Unix(l.accept().await?.0), None),
        })
    }

    /// Runs the connection's session under a slot of the global limits, or
    /// tells the client which limit refused it.
    fn spawn(
        &self,
        stream: Stream,
        ip: Option<IpAddr>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let rt = &self.pipeline.runtime;
        let limits = &rt.config.smtp;
        match rt
            .connections
            .acquire(ip, limits.max_connections, limits.max_connections_per_ip)
        {
            Ok(slot) => {
                let pipeline = self.pipeline.clone();
                let shutdown = shutdown.clone();
                let (protocol, kind) = (self.protocol, self.kind);
                tracker.spawn(async move {
                    // After the slot, so that a connection the caps refused
                    // is not counted; a slot is held only for this look.
                    let rates = &pipeline.runtime.rate_limits;
                    if !rates.admit_connection(ip).await {
                        drop(slot);
                        let reply = Reply::connection_rate_exceeded();
                        tracing::info!(?ip, reply = %reply.to_wire().trim_end(), "connection refused");
                        match stream {
                            Stream::Tcp(s) => refuse(s, reply).await,
                            Stream::Unix(s) => refuse(s, reply).await,
                        }
                        return;
                    }
                    let result = match stream {
                        Stream::Tcp(s) => serve(pipeline, s, ip, shutdown, protocol, kind).await,
                        Stream::Unix(s) => serve(pipeline, s, ip, shutdown, protocol, kind).await,
                    };
                    if let Err(e) = result {
                        tracing::debug!(?ip, error = %e, "connection ended with an error");
                    }
                    drop(slot);
                });
            }
            Err(refused) => {
                let reply = match refused {
                    Refused::Total => Reply::too_many_connections(),
                    Refused::PerIp => Reply::too_many_from_ip(),
                };
                tracing::info!(?ip, reply = %reply.to_wire().trim_end(), "connection refused");
                tracker.spawn(async move {
                    match stream {
                        Stream::Tcp(s) => refuse(s, reply).await,
                        Stream::Unix(s) => refuse(s, reply).await,
                    }
                });
            }
        }
    }
}

/// An accepted connection.
enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Tells an over-limit client why, without holding a slot.
async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, reply: Reply) {
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        stream.write_all(reply.to_wire().as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// Runs one connection: a plaintext session, and a TLS one if it asks.
/// `ip` is None for a unix socket's local client.
pub async fn serve_connection<S>(
    pipeline: Arc<Pipeline>,
    stream: S,
    ip: Option<IpAddr>,
    shutdown: CancellationToken,
    protocol: Protocol,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    serve(pipeline, stream, ip, shutdown, protocol, Kind::Plain).await
}

/// Runs one connection of a listener of `kind`.
async fn serve<S>(
    pipeline: Arc<Pipeline>,
    stream: S,
    ip: Option<IpAddr>,
    shutdown: CancellationToken,
    protocol: Protocol,
    kind: Kind,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let rt = pipeline.runtime.clone();
    let mut conn = match ip {
        Some(ip) => {
            let mut c = Connection::new(ip);
            c.rdns = rt.start_rdns(ip);
            c
        }
        None => Connection::local(),
    };
    conn.submission = kind != Kind::Plain;
    if kind == Kind::SubmissionTls {
        let Some((tls, facts)) = handshake(&pipeline, stream, ip).await else {
            return Ok(());
        };
        conn.tls = Some(facts);
        Session::with_protocol(tls, pipeline, conn, shutdown, protocol)
            .run(true)
            .await?;
        return Ok(());
    }
    let session =
        Session::with_protocol(stream, pipeline.clone(), conn, shutdown.clone(), protocol);
    let (outcome, mut conn) = session.run(true).await?;
    let Outcome::StartTls(stream) = outcome else {
        return Ok(());
    };
    let Some((tls, facts)) = handshake(&pipeline, stream, ip).await else {
        return Ok(());
    };
    conn.tls = Some(facts);
    Session::with_protocol(tls, pipeline, conn, shutdown, protocol)
        .run(false)
        .await?;
    Ok(())
}

/// The server side of a TLS handshake, bounded by the command timeout; the
/// stream and its `version:cipher`, or None (logged) when it failed.
async fn handshake<S>(
    pipeline: &Pipeline,
    stream: S,
    ip: Option<IpAddr>,
) -> Option<(tokio_rustls::server::TlsStream<S>, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rt = &pipeline.runtime;
    let acceptor = rt.tls_acceptor()?;
    let handshake =
        tokio::time::timeout(rt.config.smtp.command_timeout.0, acceptor.accept(stream)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(?ip, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => return None,
    };
    let (_, state) = tls.get_ref();
    let facts = format!(
        "{}:{}",
        state.protocol_version().map(tls_version).unwrap_or("TLS"),
        state
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown"),
    );
    Some((tls, facts))
}

fn tls_version(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "TLS",
    }
}
