//! `letterbox serve`: raises the open files limit, builds the runtime
//! objects from the config (pools, maildirs, sink, TLS) and the pipeline,
//! binds every listener (SMTP, LMTP, submission, the sink's page), starts
//! delivery of the outbound queue, and runs until SIGTERM or SIGINT. SIGHUP
//! reloads the TLS certificate and key; SIGUSR1 makes the queue be read
//! again.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::delivery::Maildirs;
use crate::directory::Directory;
use crate::dnsbl::Dnsbl;
use crate::greylist::Greylist;
use crate::hooks::Hooks;
use crate::milter::MilterCheck;
use crate::pipeline::{Check, Pipeline};
use crate::policy::PolicyCheck;
use crate::runtime::Runtime;
use crate::sink::Sink;
use crate::smtp::server::{Bound, Server};
use crate::smtp::session::Protocol;

/// A started server: its bound addresses and the handles to stop it.
pub struct Running {
    /// Where SMTP listens (port 0 in the config becomes the real port).
    pub smtp_addrs: Vec<SocketAddr>,
    /// Where LMTP listens, when configured.
    pub lmtp: Vec<Bound>,
    /// Where submission with STARTTLS listens (`submission.listen`).
    pub submission_addrs: Vec<SocketAddr>,
    /// Where submission over implicit TLS listens (`submission.listen_tls`).
    pub submissions_addrs: Vec<SocketAddr>,
    /// Where the sink's web page and API listen, when enabled.
    pub http_addr: Option<SocketAddr>,
    pub runtime: Arc<Runtime>,
    pub pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    grace: std::time::Duration,
}

impl Running {
    /// Stops accepting and tells idle sessions 421.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for every session, up to the grace period after shutdown.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining sessions");
        }
        self.runtime.directory.close().await;
    }
}

/// Builds everything and binds the listeners; sessions run in the background.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let config = Arc::new(config);
    let directory = Directory::connect(
        &config.database.url,
        config.database.max_connections,
        config.database.cache_ttl.0,
    )
    .await?;
    directory.migrate().await?;
    let maildirs = Maildirs::new(&config.maildir, &config.hostname)
        .with_context(|| format!("maildir root {}", config.maildir.root.display()))?;
    let sweeper = maildirs.clone();
    match tokio::task::spawn_blocking(move || sweeper.clean_tmp()).await? {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed stale files from tmp/"),
        Err(e) => tracing::warn!(error = %e, "could not sweep tmp/ directories"),
    }
    let sink = Sink::new(&config.sink, config.smtp.max_message_size.0);
    let runtime = Arc::new(Runtime::new(config.clone(), directory, maildirs, sink).await?);
    // Checks for every listener, in the order their verdicts are merged.
    let mut checks: Vec<Arc<dyn Check>> = Vec::new();
    checks.extend(runtime.rate_limits.check());
    let greylist = (config.greylist.enabled)
        .then(|| Greylist::new(&config.greylist, runtime.directory.clone()));
    checks.extend(greylist.clone().map(|g| Arc::new(g) as Arc<dyn Check>));
    checks.extend(filters(&config)?);
    // Only when configured: without hooks no stage pays for them.
    if !config.hooks.is_empty() {
        checks.push(Arc::new(Hooks::new(&config.hooks)?));
        tracing::info!(hooks = config.hooks.len(), "command hooks configured");
    }
    // Checks of a client from the internet, first: its DNSBL listings and
    // its sender authentication. LMTP clients are trusted local MTAs; what
    // they hand over was checked (or not) where it arrived, and checking it
    // here would judge their address instead of the sender's.
    let trust = [Dnsbl::check(&runtime), Auth::check(&runtime)]
        .into_iter()
        .flatten();
    let smtp_checks = trust.chain(checks.iter().cloned()).collect();
    let pipeline = Arc::new(Pipeline::new(runtime.clone(), smtp_checks));
    let lmtp_pipeline = Arc::new(Pipeline::new(runtime.clone(), checks));

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some(g) = greylist {
        tracker.spawn(g.purge_until(shutdown.clone()));
    }
    // Delivery of the outbound queue, from what an earlier run left on.
    let outbound = crate::outbound::Outbound::new(pipeline.clone()).await?;
    tracker.spawn(outbound.run(shutdown.clone(), tracker.clone()));
    let mut smtp_addrs = Vec::new();
    for addr in &config.smtp.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for SMTP on {addr}"))?;
        smtp_addrs.push(listener.local_addr()?);
        let server = Server::new(pipeline.clone(), listener);
        tracing::info!(local = %server.bound()?, "SMTP listening");
        tracker.spawn(server.run(shutdown.clone(), tracker.clone()));
    }
    let mut lmtp = Vec::new();
    for addr in &config.lmtp.listen {
        let socket = crate::lmtp::bind(addr, config.lmtp.socket_group.as_deref()).await?;
        let server = Server::with_protocol(lmtp_pipeline.clone(), socket, Protocol::Lmtp);
        let bound = server.bound()?;
        tracing::info!(local = %bound, "LMTP listening");
        lmtp.push(bound);
        tracker.spawn(server.run(shutdown.clone(), tracker.clone()));
    }
    let mut submission_addrs = Vec::new();
    let mut submissions_addrs = Vec::new();
    for (addrs, bound, implicit_tls) in [
        (&config.submission.listen, &mut submission_addrs, false),
        (&config.submission.listen_tls, &mut submissions_addrs, true),
    ] {
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for submission on {addr}"))?;
            bound.push(listener.local_addr()?);
            let server = Server::submission(pipeline.clone(), listener, implicit_tls);
            tracing::info!(local = %server.bound()?, implicit_tls, "submission listening");
            tracker.spawn(server.run(shutdown.clone(), tracker.clone()));
        }
    }
    let http_addr = if config.sink.enabled {
        let addr = config.sink.http_listen;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for the sink's web page on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "sink web page listening");
        let rt = &runtime;
        let router = rt
            .sink
            .router(rt.directory.clone(), rt.delimiter, rt.static_rules.clone());
        let sink = rt.sink.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = sink.serve(listener, router, stop).await {
                tracing::error!(error = %e, "sink web server failed");
            }
        });
        Some(local)
    } else {
        None
    };
    Ok(Running {
        smtp_addrs,
        lmtp,
        submission_addrs,
        submissions_addrs,
        http_addr,
        runtime,
        pipeline,
        shutdown,
        tracker,
        grace: config.smtp.shutdown_grace.0,
    })
}

/// The configured filters, in the order their verdicts are merged: milters
/// as in Postfix's smtpd_milters, then policy servers. None by default, so
/// the default path consults none.
fn filters(config: &Config) -> anyhow::Result<Vec<Arc<dyn Check>>> {
    let mut checks: Vec<Arc<dyn Check>> = Vec::new();
    for m in &config.milters {
        crate::endpoint::Endpoint::parse(&m.address).context("milters.address")?;
        checks.push(Arc::new(MilterCheck::new(m.clone(), &config.hostname)));
    }
    for p in &config.policy {
        checks.push(Arc::new(PolicyCheck::new(p).context("policy.address")?));
    }
    Ok(checks)
}

/// `letterbox serve`.
pub async fn run(config: Config) -> anyhow::Result<()> {
    crate::logging::init(&config);
    raise_open_files_limit(&config);
    let running = start(config).await?;
    // Installed before "ready": a SIGHUP sent as soon as the server says it
    // is ready must reload TLS, not meet the default action (exit).
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    for a in &running.smtp_addrs {
        println!("letterbox: smtp listening on {a}");
    }
    for a in &running.lmtp {
        println!("letterbox: lmtp listening on {a}");
    }
    for a in &running.submission_addrs {
        println!("letterbox: submission listening on {a}");
    }
    // RFC 8314 §7.3 names implicit-TLS submission "submissions".
    for a in &running.submissions_addrs {
        println!("letterbox: submissions listening on {a}");
    }
    if let Some(a) = running.http_addr {
        println!("letterbox: sink web page on http://{a}/");
    }
    // Scripts and tests wait for this line: every listener is bound.
    println!("letterbox: ready");
    let rt = running.runtime.clone();
    let shutdown = running.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => match rt.reload_tls().await {
                    Ok(true) => tracing::info!("TLS certificate reloaded"),
                    Ok(false) => tracing::info!("SIGHUP: no TLS configured"),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate"),
                },
            }
        }
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    running.wait().await;
    Ok(())
}

/// Descriptors needed besides one per SMTP connection: listeners, the
/// database pool (counted separately), the log, the sink's web clients,
/// and the spool and maildir files of transactions in progress.
const FD_HEADROOM: u64 = 256;

/// Raises the soft limit on open files to the hard limit. Every connection
/// is a descriptor, and the usual soft default (1024) is far below what
/// `smtp.max_connections` allows; past the limit accept() fails (EMFILE)
/// and so do spool files and deliveries.
fn raise_open_files_limit(config: &Config) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot read the open files limit");
        return;
    }
    let soft = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads only the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, soft, hard = limit.rlim_max, "cannot raise the open files limit");
        }
    }
    let open_files: u64 = limit.rlim_cur;
    tracing::info!(open_files, was = soft, "open files limit");
    let needed = config.smtp.max_connections as u64
        + u64::from(config.database.max_connections)
        + FD_HEADROOM;
    if open_files < needed {
        tracing::warn!(
            open_files,
            needed,
            max_connections = config.smtp.max_connections,
            "open files limit is below smtp.max_connections plus headroom; raise the hard limit (LimitNOFILE=) or lower smtp.max_connections"
        );
    }
}
