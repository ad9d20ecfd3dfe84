//! DNS blocklists and allowlists (RFC 5782), asked about each SMTP client.
//!
//! Every list in `[[dnsbl]]` is asked at connect, all at once, on the
//! shared resolver: the query for 192.0.2.1 in `zen.spamhaus.org` is
//! `1.2.0.192.zen.spamhaus.org` (IPv6: the 32 nibbles of the address,
//! reversed). The answers are awaited at the first RCPT, so a clean
//! client waits for no extra round trip. A list that names the client
//! adds its weight to the client's score; an allowlist has a negative
//! weight and cancels a listing. At or above `smtp.dnsbl_threshold` every
//! RCPT is refused with `554 5.7.1` naming the list, except mail to
//! `postmaster@` a served domain (RFC 5321 §4.5.1), so a listed sender can
//! still reach a person.
//!
//! A list that does not answer (timeout, SERVFAIL) is logged and counted
//! as not naming the client: a DNSBL outage must not stop all mail, and a
//! list that cannot be asked has said nothing.
//!
//! By default any answer in 127.0.0.0/8 counts as a listing, except
//! 127.255.255.0/24, which lists such as Spamhaus use to report errors
//! (a query through a public resolver, say); `codes` narrows it further.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures_util::future::{BoxFuture, join_all};
use tokio::task::JoinHandle;

use crate::config::DnsblConfig;
use crate::dns::{Dns, Lookup};
use crate::pipeline::{Check, CheckState, Facts, Stage, Verdict};
use crate::reply::Reply;
use crate::runtime::Runtime;

/// The configured lists, as one check.
pub struct Dnsbl {
    shared: Arc<Shared>,
}

struct Shared {
    dns: Dns,
    lists: Vec<DnsblConfig>,
    threshold: i32,
}

/// What the lists said about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The sum of the weights of the lists that named the client.
    pub score: i32,
    /// Zones that named the client, in configuration order.
    pub zones: Vec<String>,
}

impl Dnsbl {
    /// The check, or None when no list is configured.
    pub fn check(runtime: &Runtime) -> Option<Arc<dyn Check>> {
        let config = &runtime.config;
        if config.dnsbl.is_empty() {
            return None;
        }
        let dns = runtime.dns.clone()?;
        let lists = config
            .dnsbl
            .iter()
            .map(|l| DnsblConfig {
                zone: l.zone.trim_end_matches('.').to_ascii_lowercase(),
                ..l.clone()
            })
            .collect();
        Some(Arc::new(Dnsbl {
            shared: Arc::new(Shared {
                dns,
                lists,
                threshold: config.smtp.dnsbl_threshold,
            }),
        }))
    }
}

impl Check for Dnsbl {
    fn name(&self) -> &str {
        "dnsbl"
    }

    fn open(&self) -> Box<dyn CheckState> {
        Box::new(State {
            shared: self.shared.clone(),
            pending: None,
            refusal: None,
        })
    }
}

/// One connection: the lookups in flight, then the verdict, kept for
/// every transaction of the connection.
struct State {
    shared: Arc<Shared>,
    pending: Option<JoinHandle<Listing>>,
    /// Decided at the first RCPT: Some(reply) when the client is listed.
    refusal: Option<Option<Reply>>,
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(h) = &self.pending {
            h.abort();
        }
    }
}

impl State {
    fn start(&mut self, ip: IpAddr) {
        let shared = self.shared.clone();
        self.pending = Some(tokio::spawn(async move { shared.ask(ip).await }));
    }

    async fn refusal(&mut self, ip: IpAddr) -> Option<Reply> {
        if let Some(r) = &self.refusal {
            return r.clone();
        }
        if self.pending.is_none() {
            self.start(ip);
        }
        let handle = self.pending.take().expect("started above");
        let listing = handle.await.unwrap_or_else(|e| {
            tracing::warn!(%ip, error = %e, "DNSBL lookups failed; counted as not listed");
            Listing {
                score: 0,
                zones: Vec::new(),
            }
        });
        let refusal = (listing.score >= self.shared.threshold).then(|| {
            tracing::info!(%ip, score = listing.score, zones = ?listing.zones, "client listed by DNSBL");
            let zone = listing.zones.first().map_or("a DNSBL", String::as_str);
            Reply::dnsbl_listed(ip.to_canonical(), zone)
        });
        self.refusal = Some(refusal.clone());
        refusal
    }
}

impl CheckState for State {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            match stage {
                Stage::Connect => {
                    self.start(facts.ip);
                    Verdict::Continue
                }
                Stage::Rcpt => {
                    let Some(reply) = self.refusal(facts.ip).await else {
                        return Verdict::Continue;
                    };
                    // RFC 5321 §4.5.1: postmaster must reach a person. The
                    // recipient resolved, so its domain is one we serve.
                    if facts.rcpt.is_some_and(|r| is_postmaster(&r.address)) {
                        return Verdict::Continue;
                    }
                    Verdict::Reject(reply)
                }
                _ => Verdict::Continue,
            }
        })
    }
}

impl Shared {
    /// Asks every list at once and adds up the weights of those that name
    /// `ip`.
    async fn ask(&self, ip: IpAddr) -> Listing {
        let answers = join_all(self.lists.iter().map(|l| {
            let name = query_name(ip, &l.zone);
            async move { self.dns.ipv4(&name).await }
        }))
        .await;
        let mut listing = Listing {
            score: 0,
            zones: Vec::new(),
        };
        for (list, answer) in self.lists.iter().zip(answers) {
            match answer {
                Lookup::Found(addrs) if addrs.iter().any(|a| counts(list, *a)) => {
                    listing.score += list.weight;
                    if list.weight > 0 {
                        listing.zones.push(list.zone.clone());
                    }
                    tracing::debug!(%ip, zone = %list.zone, ?addrs, weight = list.weight, "named by DNS list");
                }
                Lookup::Found(_) | Lookup::Missing => {}
                Lookup::Failed(why) => {
                    tracing::warn!(%ip, zone = %list.zone, error = %why, "DNS list did not answer; counted as not naming the client");
                }
            }
        }
        listing
    }
}

/// Whether an answer from `list` is a listing.
fn counts(list: &DnsblConfig, a: Ipv4Addr) -> bool {
    if !list.codes.is_empty() {
        return list.codes.contains(&a);
    }
    let [first, second, third, _] = a.octets();
    first == 127 && !(second == 255 && third == 255)
}

/// `local@domain` names postmaster (addresses are normalized lowercase).
fn is_postmaster(address: &str) -> bool {
    address
        .rsplit_once('@')
        .is_some_and(|(local, _)| local == "postmaster")
}

/// The name to look up for `ip` in `zone` (RFC 5782 §2.1, §2.4).
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}.")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len() + 1);
            for byte in v6.octets().iter().rev() {
                name.push(char::from_digit(u32::from(byte & 0xf), 16).expect("a nibble"));
                name.push('.');
                name.push(char::from_digit(u32::from(byte >> 4), 16).expect("a nibble"));
                name.push('.');
            }
            name.push_str(zone);
            name.push('.');
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_asked_by_reversed_octets() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "zen.spamhaus.org"),
            "99.2.0.192.zen.spamhaus.org."
        );
        // An IPv4 client on an IPv6 socket is still asked as IPv4.
        assert_eq!(
            query_name("::ffff:192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test."
        );
    }

    #[test]
    fn ipv6_is_asked_by_reversed_nibbles() {
        // RFC 5782 §2.4's example.
        assert_eq!(
            query_name(
                "2001:db8:1:2:3:4:567:89ab".parse().unwrap(),
                "ugly.example.com"
            ),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
    }

    #[test]
    fn which_answers_are_listings() {
        let any = DnsblConfig {
            zone: "bl.test".into(),
            weight: 1,
            codes: Vec::new(),
        };
        assert!(counts(&any, Ipv4Addr::new(127, 0, 0, 2)));
        assert!(counts(&any, Ipv4Addr::new(127, 0, 0, 10)));
        // Spamhaus's error answers are not listings.
        assert!(!counts(&any, Ipv4Addr::new(127, 255, 255, 254)));
        assert!(!counts(&any, Ipv4Addr::new(10, 0, 0, 2)));
        let only = DnsblConfig {
            codes: vec![Ipv4Addr::new(127, 0, 0, 4)],
            ..any
        };
        assert!(!counts(&only, Ipv4Addr::new(127, 0, 0, 2)));
        assert!(counts(&only, Ipv4Addr::new(127, 0, 0, 4)));
    }

    #[test]
    fn postmaster_is_recognized_by_its_local_part() {
        assert!(is_postmaster("postmaster@example.org"));
        assert!(!is_postmaster("postmaster.x@example.org"));
        assert!(!is_postmaster("alice@postmaster.example"));
    }
}
