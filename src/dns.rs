//! The one DNS resolver of a running server, from `[dns]`: reverse DNS for
//! the Received header, SPF, DKIM keys, DMARC records and DNSBL queries
//! all go through it and share its cache (the outbound queue will too).
//!
//! It is hickory's resolver inside a [`MessageAuthenticator`], the entry
//! point of the `mail-auth` crate, which is built on the same hickory
//! version, so there is no second resolver or cache.
//!
//! What a failed lookup means is decided here once: "no such name" and
//! "no such record" (NXDOMAIN, NODATA) are answers; anything else (a
//! timeout, SERVFAIL, REFUSED, no server reachable) is a temporary
//! failure, which a check that enforces must never read as an accept.

use std::net::SocketAddr;

use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::{ResolveError, ResolveErrorKind, TokioResolver};
use mail_auth::MessageAuthenticator;

use crate::config::DnsConfig;

/// The shared resolver. Cheap to clone: clones share the connections and
/// the cache.
#[derive(Clone)]
pub struct Dns {
    authenticator: MessageAuthenticator,
    /// Which servers are asked, for `letterbox check` and logs.
    describe: String,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("servers", &self.describe)
            .finish()
    }
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("no DNS resolver: {0} (set [dns] servers)")]
pub struct DnsError(String);

/// How one lookup ended, as the checks need to tell it apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    /// The records.
    Found(T),
    /// The name or the record type does not exist (NXDOMAIN, NODATA).
    Missing,
    /// No answer that can be trusted: try again later.
    Failed(String),
}

impl Dns {
    /// The resolver `[dns]` describes: the listed servers, or the system's
    /// configuration when the list is empty. Reads `/etc/resolv.conf` in
    /// that case (a small local file, once at start).
    pub fn new(config: &DnsConfig) -> Result<Dns, DnsError> {
        let (resolver_config, mut opts, describe) = if config.servers.is_empty() {
            let (c, o) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| DnsError(format!("/etc/resolv.conf: {e}")))?;
            let servers: Vec<String> = c
                .name_servers()
                .iter()
                .map(|n| n.socket_addr.to_string())
                .collect();
            let mut servers = servers;
            servers.dedup();
            (c, o, format!("system resolver {}", servers.join(", ")))
        } else {
            let group = servers_group(&config.servers);
            let describe = config
                .servers
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            // Servers named on purpose answer everything, /etc/hosts too.
            let mut opts = ResolverOpts::default();
            opts.use_hosts_file = ResolveHosts::Never;
            (
                ResolverConfig::from_parts(None, Vec::new(), group),
                opts,
                describe,
            )
        };
        opts.timeout = config.timeout.0;
        // One retry: two tries in all, as `dns.timeout` says.
        opts.attempts = 1;
        let resolver =
            TokioResolver::builder_with_config(resolver_config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        Ok(Dns {
            authenticator: MessageAuthenticator(resolver),
            describe,
        })
    }

    /// The resolver itself, for lookups of our own (reverse DNS, DNSBLs).
    pub fn resolver(&self) -> &TokioResolver {
        &self.authenticator.0
    }

    /// The same resolver as `mail-auth`'s entry point (SPF, DKIM, DMARC, ARC).
    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.authenticator
    }

    /// Which servers are asked.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// IPv4 addresses of `name` (a fully qualified name; a final dot is
    /// added when missing, so no search domain is appended).
    pub async fn ipv4(&self, name: &str) -> Lookup<Vec<std::net::Ipv4Addr>> {
        match self.resolver().ipv4_lookup(fqdn(name)).await {
            Ok(found) => Lookup::Found(found.iter().map(|a| a.0).collect()),
            Err(e) => classify(&e),
        }
    }

    /// Whether the servers answer, for `letterbox check`: asks for
    /// `name`'s TXT records, which no hosts file can answer for them. "No
    /// such name" is an answer too.
    pub async fn probe(&self, name: &str) -> Result<String, String> {
        match self.resolver().txt_lookup(fqdn(name)).await {
            Ok(_) => Ok(format!("{} answers", self.describe)),
            Err(e) => match classify::<()>(&e) {
                Lookup::Failed(why) => Err(format!("{} does not answer: {why}", self.describe)),
                _ => Ok(format!("{} answers", self.describe)),
            },
        }
    }
}

/// The resolver's error, as an answer or a temporary failure.
pub fn classify<T>(e: &ResolveError) -> Lookup<T> {
    match negative_code(e) {
        Some(ResponseCode::NXDomain | ResponseCode::NoError) => Lookup::Missing,
        _ => Lookup::Failed(e.to_string()),
    }
}

/// The response code of an answer without records, if the error is one.
fn negative_code(e: &ResolveError) -> Option<ResponseCode> {
    match e.kind() {
        ResolveErrorKind::Proto(p) => match p.kind() {
            ProtoErrorKind::NoRecordsFound { response_code, .. } => Some(*response_code),
            _ => None,
        },
        _ => None,
    }
}

/// `name` with a final dot: never completed with a search domain.
pub fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Each server over UDP, with TCP for truncated answers.
fn servers_group(servers: &[SocketAddr]) -> NameServerConfigGroup {
    let mut group = NameServerConfigGroup::new();
    for addr in servers {
        let one = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
        group.merge(one);
    }
    group
}

/// A resolver with no name servers, for a server whose `[dns]` could not
/// be set up and that needs no sender checks: every lookup fails, which
/// mail treats as a temporary failure, never as an answer.
pub fn unreachable() -> TokioResolver {
    use hickory_resolver::config::NameServerConfig;
    TokioResolver::builder_with_config(
        ResolverConfig::from_parts(None, Vec::new(), Vec::<NameServerConfig>::new()),
        TokioConnectionProvider::default(),
    )
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_final_dot_keeps_search_domains_away() {
        assert_eq!(fqdn("a.example"), "a.example.");
        assert_eq!(fqdn("a.example."), "a.example.");
    }

    #[tokio::test]
    async fn configured_servers_are_described_in_order() {
        let config = DnsConfig {
            servers: vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ],
            timeout: crate::units::Duration::from_secs(1),
        };
        let dns = Dns::new(&config).unwrap();
        assert_eq!(dns.describe(), "127.0.0.1:5353, [::1]:53");
    }
}
