//! The listener side: accepts connections under global and per-IP limits,
//! runs a session per connection, upgrades to TLS when a session asks, and
//! stops accepting on shutdown while sessions finish their transaction.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::reply::Reply;
use super::session::{Connection, Outcome, Session};
use crate::address;
use crate::config::Config;
use crate::delivery::Maildirs;
use crate::directory::Directory;
use crate::sink::Sink;
use crate::tls::TlsError;

/// Everything a session needs, shared by all of them.
pub struct Context {
    pub config: Arc<Config>,
    pub hostname: String,
    pub directory: Directory,
    pub maildirs: Maildirs,
    pub sink: Sink,
    pub delimiter: Option<char>,
    /// Sink rules from the config file, normalized.
    pub static_rules: Arc<Vec<(String, Duration)>>,
    /// Replaced on SIGHUP; sessions take a clone when they upgrade.
    tls: RwLock<Option<TlsAcceptor>>,
    resolver: Option<hickory_resolver::TokioResolver>,
}

impl Context {
    pub fn new(
        config: Arc<Config>,
        directory: Directory,
        maildirs: Maildirs,
        sink: Sink,
    ) -> anyhow::Result<Context> {
        let static_rules = config
            .sink
            .rules
            .iter()
            .map(|r| {
                let pattern = address::sink_pattern(&r.pattern)
                    .map_err(|e| anyhow::anyhow!("sink.rules: {e}"))?;
                Ok((pattern, r.ttl.unwrap_or(config.sink.default_ttl).0))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let resolver = if config.smtp.reverse_dns {
            match hickory_resolver::TokioResolver::builder_tokio() {
                Ok(b) => Some(b.build()),
                Err(e) => {
                    tracing::warn!(error = %e, "no system DNS configuration; reverse DNS is off");
                    None
                }
            }
        } else {
            None
        };
        let ctx = Context {
            hostname: config.hostname.clone(),
            delimiter: config.subaddress_delimiter(),
            static_rules: Arc::new(static_rules),
            tls: RwLock::new(None),
            resolver,
            config,
            directory,
            maildirs,
            sink,
        };
        ctx.reload_tls()?;
        Ok(ctx)
    }

    /// (Re)loads the certificate and key named in the config. On error the
    /// previous ones stay in use.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        let (Some(cert), Some(key)) = (&self.config.tls.cert, &self.config.tls.key) else {
            return Ok(false);
        };
        let acceptor = TlsAcceptor::from(crate::tls::server_config(cert, key)?);
        *self.tls.write().unwrap() = Some(acceptor);
        Ok(true)
    }

    pub fn tls_available(&self) -> bool {
        self.tls.read().unwrap().is_some()
    }

    fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.read().unwrap().clone()
    }

    fn start_rdns(&self, ip: IpAddr) -> Option<tokio::task::JoinHandle<Option<String>>> {
        let resolver = self.resolver.clone()?;
        Some(tokio::spawn(async move {
            let names = resolver.reverse_lookup(ip).await.ok()?;
            let name = names.iter().next()?.to_utf8();
            // Only a well-formed host name may reach the Received header.
            address::domain_name(name.trim_end_matches('.')).ok()
        }))
    }
}

/// Counts connections, globally and per client IP.
#[derive(Default)]
struct Limits {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    total: Mutex<usize>,
}

/// Releases a connection's slots when the connection ends.
struct Slot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.limits.total.lock().unwrap() -= 1;
        let mut per_ip = self.limits.per_ip.lock().unwrap();
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Limits {
    /// Takes a slot for `ip`, or says which limit refused it.
    fn acquire(self: &Arc<Self>, ip: IpAddr, config: &Config) -> Result<Slot, Reply> {
        let mut total = self.total.lock().unwrap();
        if *total >= config.smtp.max_connections {
            return Err(Reply::too_many_connections());
        }
        let mut per_ip = self.per_ip.lock().unwrap();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= config.smtp.max_connections_per_ip {
            return Err(Reply::too_many_from_ip());
        }
        *n += 1;
        *total += 1;
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }
}

/// One listening socket and the sessions it spawns.
pub struct Server {
    ctx: Arc<Context>,
    listener: TcpListener,
    limits: Arc<Limits>,
}

impl Server {
    pub fn new(ctx: Arc<Context>, listener: TcpListener) -> Server {
        Server {
            ctx,
            listener,
            limits: Arc::default(),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown`; sessions are spawned on `tracker` so the
    /// caller can wait for them.
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(10);
                    a
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let ip = peer.ip().to_canonical();
            match self.limits.acquire(ip, &self.ctx.config) {
                Ok(slot) => {
                    let ctx = self.ctx.clone();
                    let shutdown = shutdown.clone();
                    tracker.spawn(async move {
                        if let Err(e) = serve_connection(ctx, stream, ip, shutdown).await {
                            tracing::debug!(%ip, error = %e, "connection ended with an error");
                        }
                        drop(slot);
                    });
                }
                Err(reply) => {
                    tracing::info!(%ip, reply = %reply.to_wire().trim_end(), "connection refused");
                    tracker.spawn(refuse(stream, reply));
                }
            }
        }
    }
}

/// Tells an over-limit client why, without holding a slot.
async fn refuse(mut stream: TcpStream, reply: Reply) {
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        stream.write_all(reply.to_wire().as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// Runs one connection: a plaintext session, and a TLS one if it asks.
pub async fn serve_connection(
    ctx: Arc<Context>,
    stream: TcpStream,
    ip: IpAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut conn = Connection::new(ip);
    conn.rdns = ctx.start_rdns(ip);
    let session = Session::new(stream, ctx.clone(), conn, shutdown.clone());
    let (outcome, mut conn) = session.run(true).await?;
    let Outcome::StartTls(stream) = outcome else {
        return Ok(());
    };
    let Some(acceptor) = ctx.tls_acceptor() else {
        return Ok(());
    };
    let handshake =
        tokio::time::timeout(ctx.config.smtp.command_timeout.0, acceptor.accept(stream)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%ip, error = %e, "TLS handshake failed");
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    let (_, state) = tls.get_ref();
    conn.tls = Some(format!(
        "{}:{}",
        state.protocol_version().map(tls_version).unwrap_or("TLS"),
        state
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown"),
    ));
    Session::new(tls, ctx, conn, shutdown).run(false).await?;
    Ok(())
}

fn tls_version(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "TLS",
    }
}
