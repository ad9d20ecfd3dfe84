//! The shared parts of a running server, outside any protocol: the
//! directory, the maildirs, pipe commands, the outbound queue, the sink,
//! TLS, DNS, the connection limits and the rate limits.
//! Built once from the [`Config`] (ripgrep's "hiargs": resolved objects,
//! not values); every listener and every pipeline stage reads them here.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use tokio_rustls::TlsAcceptor;

use crate::address;
use crate::config::Config;
use crate::delivery::Maildirs;
use crate::delivery::pipe::Pipes;
use crate::directory::Directory;
use crate::dns::Dns;
use crate::limits::Connections;
use crate::queue::Queue;
use crate::ratelimit::RateLimits;
use crate::sink::Sink;
use crate::submission::Logins;
use crate::tls::TlsError;

/// Everything shared by the sessions of every listener.
pub struct Runtime {
    pub config: Arc<Config>,
    /// Our name in greetings and trace headers.
    pub hostname: String,
    pub directory: Directory,
    pub maildirs: Maildirs,
    /// How pipe commands (`|…` alias destinations) run.
    pub pipes: Pipes,
    pub sink: Sink,
    /// The subaddress delimiter, if subaddressing is on.
    pub delimiter: Option<char>,
    /// Sink rules from the config file, normalized.
    pub static_rules: Arc<Vec<(String, Duration)>>,
    /// One count of open connections across all listeners.
    pub connections: Arc<Connections>,
    /// Password checks and failed-login counts of the submission ports.
    pub logins: Logins,
    /// Replaced on SIGHUP; sessions take a clone when they upgrade.
    tls: RwLock<Option<TlsAcceptor>>,
    /// The one DNS resolver (reverse DNS, SPF, DKIM, DMARC, DNSBLs; later
    /// the outbound queue). None only when it could not be built and
    /// nothing configured needs it.
    pub dns: Option<Dns>,
    /// What lookups use when `dns` could not be built: no name servers,
    /// every lookup fails.
    no_dns: TokioResolver,
    /// The outbound queue, where mail for remote recipients waits.
    pub queue: Queue,
    /// Connections, recipients and messages per client per window, one
    /// count across all listeners (`[limits]`).
    pub rate_limits: Arc<RateLimits>,
    /// SRS for forwarded mail (`[srs]`); None when `srs.secret_file` is
    /// empty.
    pub srs: Option<crate::srs::Srs>,
}

impl Runtime {
    pub async fn new(
        config: Arc<Config>,
        directory: Directory,
        maildirs: Maildirs,
        sink: Sink,
    ) -> anyhow::Result<Runtime> {
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
        let dns = match Dns::new(&config.dns) {
            Ok(dns) => Some(dns),
            // Sender authentication and DNSBLs cannot run without DNS, and
            // running without them would accept what they would refuse.
            Err(e) if config.auth.any() || !config.dnsbl.is_empty() => return Err(e.into()),
            Err(e) => {
                if config.smtp.reverse_dns {
                    tracing::warn!(error = %e, "reverse DNS is off");
                }
                None
            }
        };
        let queue_dir = config.queue_dir();
        let queue = crate::blocking::run("opening the queue", move || {
            Queue::open(&queue_dir, true)
                .map_err(|e| anyhow::anyhow!("queue directory {}: {e}", queue_dir.display()))
        })
        .await??;
        let pipes = Pipes::new(&config.delivery).await?;
        let srs = if config.srs.secret_file.as_os_str().is_empty() {
            tracing::info!(
                "SRS is off (srs.secret_file is empty): mail an alias forwards keeps its original envelope sender"
            );
            None
        } else {
            let path = config.srs.secret_file.clone();
            let secret = crate::blocking::run("reading srs.secret_file", move || {
                crate::srs::read_secret(&path)
            })
            .await?
            .map_err(|e| anyhow::anyhow!(e))?;
            let domain = config.srs_domain();
            tracing::info!(domain = %domain, "SRS on for forwarded mail");
            Some(crate::srs::Srs::new(&secret, &domain, config.srs.max_age.0))
        };
        let rt = Runtime {
            srs,
            pipes,
            hostname: config.hostname.clone(),
            delimiter: config.subaddress_delimiter(),
            static_rules: Arc::new(static_rules),
            connections: Arc::default(),
            logins: Logins::new(config.limits.auth_failures, config.submission.auth_slots()),
            tls: RwLock::new(None),
            dns,
            no_dns: crate::dns::unreachable(),
            queue,
            rate_limits: Arc::new(RateLimits::new(&config.limits)),
            config,
            directory,
            maildirs,
            sink,
        };
        rt.reload_tls().await?;
        Ok(rt)
    }

    /// (Re)loads the certificate and key named in the config, reading the
    /// files off the runtime. On error the previous ones stay in use.
    pub async fn reload_tls(&self) -> Result<bool, TlsError> {
        let (Some(cert), Some(key)) = (self.config.tls.cert.clone(), self.config.tls.key.clone())
        else {
            return Ok(false);
        };
        let loaded = crate::blocking::run("reading the TLS certificate", move || {
            crate::tls::server_config(&cert, &key)
        })
        .await
        .map_err(|e| TlsError::Load(e.to_string()))??;
        *self.tls.write().unwrap() = Some(TlsAcceptor::from(loaded));
        Ok(true)
    }

    /// The DNS resolver built from `[dns]`, shared by every lookup.
    pub fn resolver(&self) -> &TokioResolver {
        self.dns.as_ref().map_or(&self.no_dns, Dns::resolver)
    }

    pub fn tls_available(&self) -> bool {
        self.tls.read().unwrap().is_some()
    }

    pub fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.read().unwrap().clone()
    }

    /// Starts the client's reverse DNS lookup in the background; it is
    /// awaited only when a trace header needs the name.
    pub fn start_rdns(&self, ip: IpAddr) -> Option<tokio::task::JoinHandle<Option<String>>> {
        if !self.config.smtp.reverse_dns {
            return None;
        }
        let resolver = self.dns.as_ref()?.resolver().clone();
        Some(tokio::spawn(async move {
            let names = resolver.reverse_lookup(ip).await.ok()?;
            let name = names.iter().next()?.to_utf8();
            // Only a well-formed host name may reach the Received header.
            address::domain_name(name.trim_end_matches('.')).ok()
        }))
    }
}
