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
//! A list that does not answer (timeout, SERVFAIL) is logged, and decides
//! only where it could: the client is refused when the lists that did
//! answer reach the threshold even if every silent allowlist had named it,
//! accepted when every silent blocklist together could not bring it there,
//! and otherwise told `451 4.4.3`, try later. A DNS failure is never an
//! accept where this check enforces, and an outage of one list among
//! several that cannot reach the threshold alone stops nothing.
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
    /// The weights of the lists that did not answer (a timeout, SERVFAIL):
    /// blocklists' (positive) and allowlists' (negative), kept apart, so the
    /// score they might have made is known.
    pub unknown_up: i32,
    pub unknown_down: i32,
}

/// What the lists say of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decided {
    Clean,
    /// Listed at or above the threshold whatever the silent lists say.
    Listed(Reply),
    /// The silent lists could decide either way: try again later. A DNS
    /// failure is never an accept where a check enforces.
    Unknown(Reply),
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
    /// Decided at the first RCPT, for the whole connection.
    refusal: Option<Decided>,
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

    async fn refusal(&mut self, ip: IpAddr) -> Decided {
        if let Some(r) = &self.refusal {
            return r.clone();
        }
        if self.pending.is_none() {
            self.start(ip);
        }
        let handle = self.pending.take().expect("started above");
        let decided = match handle.await {
            Ok(listing) => decide(ip, self.shared.threshold, &listing),
            Err(e) => {
                tracing::warn!(%ip, error = %e, "DNSBL lookups failed; try again later");
                Decided::Unknown(Reply::dnsbl_unavailable())
            }
        };
        // A temporary failure is not remembered: the next RCPT asks again.
        if !matches!(decided, Decided::Unknown(_)) {
            self.refusal = Some(decided.clone());
        }
        decided
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
                    let decided = self.refusal(facts.ip).await;
                    // RFC 5321 §4.5.1: postmaster must reach a person. The
                    // recipient resolved, so its domain is one we serve.
                    if facts.rcpt.is_some_and(|r| is_postmaster(&r.address)) {
                        return Verdict::Continue;
                    }
                    match decided {
                        Decided::Clean => Verdict::Continue,
                        Decided::Listed(reply) => Verdict::Reject(reply),
                        Decided::Unknown(reply) => Verdict::TempFail(reply),
                    }
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
            unknown_up: 0,
            unknown_down: 0,
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
                    tracing::warn!(%ip, zone = %list.zone, error = %why, "DNS list did not answer");
                    if list.weight > 0 {
                        listing.unknown_up += list.weight;
                    } else {
                        listing.unknown_down += list.weight;
                    }
                }
            }
        }
        listing
    }
}

/// Listed when even the lists that did not answer could not save the
/// client; clean when even they could not list it; else unknown.
fn decide(ip: IpAddr, threshold: i32, listing: &Listing) -> Decided {
    let least = listing.score + listing.unknown_down;
    let most = listing.score + listing.unknown_up;
    if least >= threshold {
        tracing::info!(%ip, score = listing.score, zones = ?listing.zones, "client listed by DNSBL");
        let zone = listing.zones.first().map_or("a DNSBL", String::as_str);
        Decided::Listed(Reply::dnsbl_listed(ip.to_canonical(), zone))
    } else if most < threshold {
        Decided::Clean
    } else {
        tracing::warn!(%ip, score = listing.score, "DNS lists that did not answer could list this client; try again later");
        Decided::Unknown(Reply::dnsbl_unavailable())
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

    fn listing(score: i32, unknown_up: i32, unknown_down: i32) -> Listing {
        Listing {
            score,
            zones: vec!["bl.test".into()],
            unknown_up,
            unknown_down,
        }
    }

    #[test]
    fn silent_lists_decide_only_where_they_could() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let d = |score, up, down| decide(ip, 2, &listing(score, up, down));
        // Nothing silent: the score alone.
        assert!(matches!(d(2, 0, 0), Decided::Listed(_)));
        assert_eq!(d(1, 0, 0), Decided::Clean);
        // A silent blocklist that could reach the threshold: try later.
        assert_eq!(d(1, 1, 0), Decided::Unknown(Reply::dnsbl_unavailable()));
        assert_eq!(d(0, 2, 0), Decided::Unknown(Reply::dnsbl_unavailable()));
        // One that could not reach it alone changes nothing.
        assert_eq!(d(0, 1, 0), Decided::Clean);
        // A silent allowlist that could cancel a listing: try later;
        // one that could not: still listed.
        assert_eq!(d(2, 0, -1), Decided::Unknown(Reply::dnsbl_unavailable()));
        assert!(matches!(d(4, 0, -1), Decided::Listed(_)));
    }

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
