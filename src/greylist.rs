//! Greylisting, as postgrey does it for Postfix and maddy and Stalwart do
//! it themselves: the first attempt of an unknown (client network, sender,
//! recipient) triplet is deferred at RCPT with `450 4.7.1`. A real MTA
//! retries; a retry after `greylist.delay` (and before `greylist.expire`)
//! passes, and the triplet then passes without delay for
//! `greylist.pass_for` after it last passed. Much spam is sent once and
//! never retried.
//!
//! - The triplet is the client's /24 (IPv4) or /64 (IPv6), since big
//!   senders retry from another address of the same pool; the sender
//!   normalized (empty for `<>`); the recipient normalized.
//! - Not greylisted: unix-socket clients, clients in `greylist.allow`
//!   (loopback by default), and clients whose SPF passed
//!   ([`Facts::spf_pass`]) for a domain that passed greylisting before.
//! - The state is in the SQL directory (`directory/greylist.rs`), shared
//!   by every instance on the same database. A directory error is
//!   `451 4.3.0`, never an accept.
//! - Old triplets are removed by a background task every `expire` (at
//!   most hourly, [`Greylist::purge_interval`]); until then a triplet that
//!   ran out is treated as new when it comes back, so the purge only
//!   bounds the table.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::GreylistConfig;
use crate::directory::{Directory, GreylistTimes, Greylisting, Triplet};
use crate::net::Network;
use crate::pipeline::{Check, CheckState, Facts, Stage, Verdict};
use crate::reply::Reply;

/// The purge runs at least this often, however long `expire` is.
const MAX_PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// The greylisting check; cheap to clone (one per connection).
#[derive(Clone)]
pub struct Greylist {
    directory: Directory,
    times: GreylistTimes,
    allow: Arc<[Network]>,
}

/// The network a triplet names: the client's /24, or its /64 for IPv6.
pub fn network(ip: IpAddr) -> Network {
    Network::of(ip, 24, 64)
}

/// Now, in milliseconds since the Unix epoch: the time every instance
/// shares (keep their clocks in sync).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Greylist {
    pub fn new(config: &GreylistConfig, directory: Directory) -> Greylist {
        Greylist {
            directory,
            times: GreylistTimes {
                delay: config.delay.0,
                expire: config.expire.0,
                passed_for: config.pass_for.0,
            },
            allow: config.allow.clone().into(),
        }
    }

    /// How often old triplets are removed: every `expire`, at least hourly
    /// and at most every second.
    pub fn purge_interval(&self) -> Duration {
        self.times
            .expire
            .clamp(Duration::from_secs(1), MAX_PURGE_INTERVAL)
    }

    /// Removes old triplets every [`Greylist::purge_interval`] (the first
    /// time at once) until `shutdown`.
    pub async fn purge_until(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.purge_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            match self.directory.greylist_purge(now_ms(), &self.times).await {
                Ok(0) => {}
                Ok(removed) => tracing::debug!(removed, "greylist: old triplets removed"),
                Err(e) => tracing::warn!(error = %e, "greylist: purging old triplets failed"),
            }
        }
    }

    /// Whether greylisting leaves this client alone whatever it sends.
    fn allowed(&self, facts: &Facts<'_>) -> bool {
        facts.local || self.allow.iter().any(|n| n.contains(facts.ip))
    }

    /// The verdict on one recipient (the rcpt stage).
    pub async fn decide(&self, facts: Facts<'_>) -> Verdict {
        let (Some(sender), Some(rcpt)) = (facts.sender, facts.rcpt) else {
            return Verdict::Continue;
        };
        if self.allowed(&facts) {
            return Verdict::Continue;
        }
        let now = now_ms();
        if let Some(domain) = facts.spf_pass {
            match self
                .directory
                .greylist_domain_passed(domain, now, self.times.passed_for)
                .await
            {
                Ok(true) => return Verdict::Continue,
                Ok(false) => {}
                Err(e) => return unavailable(&e),
            }
        }
        let t = Triplet::new(network(facts.ip), sender, &rcpt.address);
        match self.directory.greylist(&t, now, &self.times).await {
            Ok(g) if g.passes() => {
                if g == Greylisting::Passed {
                    tracing::info!(network = %t.network, from = %t.sender, rcpt = %t.recipient, "greylisting passed");
                }
                Verdict::Continue
            }
            Ok(g) => {
                tracing::info!(network = %t.network, from = %t.sender, rcpt = %t.recipient, state = ?g, "greylisted");
                Verdict::TempFail(Reply::greylisted())
            }
            Err(e) => unavailable(&e),
        }
    }
}

fn unavailable(e: &crate::directory::DirectoryError) -> Verdict {
    tracing::error!(error = %e, "greylist: directory lookup failed");
    Verdict::TempFail(Reply::directory_unavailable())
}

impl Check for Greylist {
    fn name(&self) -> &str {
        "greylist"
    }

    fn open(&self) -> Box<dyn CheckState> {
        Box::new(self.clone())
    }
}

impl CheckState for Greylist {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        if stage != Stage::Rcpt {
            return Box::pin(std::future::ready(Verdict::Continue));
        }
        Box::pin(self.decide(facts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triplets_name_the_24_or_the_64() {
        let n = |s: &str| network(s.parse().unwrap()).to_string();
        assert_eq!(n("198.51.100.77"), "198.51.100.0/24");
        assert_eq!(n("::ffff:198.51.100.77"), "198.51.100.0/24");
        assert_eq!(n("2001:db8:5:6:7::8"), "2001:db8:5:6::/64");
    }
}
