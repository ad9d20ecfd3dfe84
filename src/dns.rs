//! The one DNS resolver of a running server, built from `[dns]`: the name
//! servers of `/etc/resolv.conf`, or those the operator lists (a local
//! validating resolver, or a test's own server on a loopback port). Reverse
//! DNS, MX lookups for outbound mail, MTA-STS and the sender checks all ask
//! it, so they share its cache and its timeout.

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

use crate::config::DnsConfig;

/// A resolver for `config`. Without servers it reads the system's
/// configuration; when that cannot be read it warns and gets a resolver
/// with no name servers, whose every lookup fails (a temporary failure for
/// mail, never a wrong answer).
pub fn resolver(config: &DnsConfig) -> TokioResolver {
    let provider = TokioConnectionProvider::default();
    let mut builder = if config.servers.is_empty() {
        match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "no system DNS configuration; DNS lookups will fail");
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, Vec::new(), Vec::<NameServerConfig>::new()),
                    provider,
                )
            }
        }
    } else {
        let mut servers = Vec::with_capacity(config.servers.len() * 2);
        for &addr in &config.servers {
            servers.push(NameServerConfig::new(addr, Protocol::Udp));
            servers.push(NameServerConfig::new(addr, Protocol::Tcp));
        }
        let mut b = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            provider,
        );
        // Listed servers answer for everything: /etc/hosts must not
        // shadow them (a test's names, a split-horizon setup).
        b.options_mut().use_hosts_file = ResolveHosts::Never;
        b
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = config.timeout.0;
    // Mail domains are always fully qualified: never try search domains.
    opts.ndots = 0;
    builder.build()
}
