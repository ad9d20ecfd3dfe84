//! Where a recipient domain's mail goes: its MX hosts by preference (equal
//! preferences in random order), each with its addresses; without MX
//! records the domain itself (the implicit MX, RFC 5321 §5.1); a null MX
//! (RFC 7505) means the domain takes no mail. A smarthost or a configured
//! route replaces all of this with one host.

use std::net::IpAddr;

use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;

/// One host to try, with its addresses in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The name to present in SNI and to check the certificate against.
    pub name: String,
    pub addrs: Vec<IpAddr>,
    pub port: u16,
}

/// Why no host could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxError {
    /// A permanent answer: the domain does not exist, has a null MX, or
    /// has neither MX nor address. (enhanced status, text)
    Permanent(&'static str, String),
    /// DNS did not answer; try again later.
    Temporary(String),
}

/// The MX hosts of `domain` with their addresses, or why there are none.
/// Hosts whose addresses cannot be found are left out; when that leaves
/// nothing, the failure is temporary.
pub async fn mx_hosts(
    resolver: &TokioResolver,
    domain: &str,
    port: u16,
) -> Result<Vec<Host>, MxError> {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let names: Vec<String> = match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(mx) => {
            let mut records: Vec<(u16, String)> = mx
                .iter()
                .map(|r| {
                    (
                        r.preference(),
                        r.exchange()
                            .to_ascii()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                    )
                })
                .collect();
            // RFC 7505 §3: a single MX with an empty exchange: no mail.
            if records.len() == 1 && records[0].1.is_empty() {
                return Err(MxError::Permanent(
                    "5.1.10",
                    format!("{domain} accepts no mail (null MX, RFC 7505)"),
                ));
            }
            records.retain(|(_, n)| !n.is_empty());
            records.shuffle(&mut rand::thread_rng());
            records.sort_by_key(|(p, _)| *p);
            records.into_iter().map(|(_, n)| n).collect()
        }
        Err(e) if e.is_nx_domain() => {
            return Err(MxError::Permanent(
                "5.1.2",
                format!("domain {domain} does not exist"),
            ));
        }
        Err(e) if e.is_no_records_found() => vec![domain.to_string()],
        Err(e) => {
            return Err(MxError::Temporary(format!(
                "MX lookup for {domain} failed: {e}"
            )));
        }
    };
    let implicit = names.len() == 1 && names[0] == domain;
    let mut hosts = Vec::new();
    let mut last = String::new();
    for name in names {
        match addresses(resolver, &name).await {
            Ok(addrs) if !addrs.is_empty() => hosts.push(Host { name, addrs, port }),
            Ok(_) => last = format!("{name} has no address"),
            Err(e) if implicit && (e.is_no_records_found() || e.is_nx_domain()) => {
                return Err(MxError::Permanent(
                    "5.1.2",
                    format!("{domain} has neither MX nor address records"),
                ));
            }
            Err(e) => last = format!("address lookup for {name} failed: {e}"),
        }
    }
    if hosts.is_empty() {
        return Err(MxError::Temporary(last));
    }
    Ok(hosts)
}

/// One configured next hop (`host`, `host:port`, `[v6]:port`, `ip:port`),
/// resolved now.
pub async fn hop_host(
    resolver: &TokioResolver,
    hop: &str,
    default_port: u16,
) -> Result<Host, MxError> {
    let (name, port) = split_host_port(hop, default_port)
        .ok_or_else(|| MxError::Temporary(format!("next hop {hop:?} is not host:port")))?;
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(Host {
            name,
            addrs: vec![ip],
            port,
        });
    }
    let addrs = addresses(resolver, &name)
        .await
        .map_err(|e| MxError::Temporary(format!("address lookup for {name} failed: {e}")))?;
    if addrs.is_empty() {
        return Err(MxError::Temporary(format!("{name} has no address")));
    }
    Ok(Host { name, addrs, port })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((ip.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_ascii_lowercase(), p.parse().ok()?)),
        Some(_) => Some((s.to_string(), default_port)), // a bare IPv6 address
        None if !s.is_empty() => Some((s.to_ascii_lowercase(), default_port)),
        None => None,
    }
}

async fn addresses(
    resolver: &TokioResolver,
    name: &str,
) -> Result<Vec<IpAddr>, hickory_resolver::ResolveError> {
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    Ok(resolver.lookup_ip(fqdn.as_str()).await?.iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(
            split_host_port("smtp.Provider.net:587", 25),
            Some(("smtp.provider.net".into(), 587))
        );
        assert_eq!(
            split_host_port("10.0.0.5", 25),
            Some(("10.0.0.5".into(), 25))
        );
        assert_eq!(
            split_host_port("[::1]:2525", 25),
            Some(("::1".into(), 2525))
        );
        assert_eq!(split_host_port("::1", 25), Some(("::1".into(), 25)));
        assert_eq!(split_host_port("host:x", 25), None);
        assert_eq!(split_host_port("", 25), None);
    }
}
