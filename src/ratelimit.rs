//! Rate limits per client (laitos's "PerIPLimit"): new connections,
//! accepted recipients and accepted messages per client per window,
//! written `N/DURATION` in `[limits]` (`"60/1m"`).
//!
//! - **Who is counted.** A client is its address, or its /64 for IPv6
//!   ([`client_key`]). Clients of a unix socket (local LMTP) and of the
//!   `limits.exempt` networks (loopback by default) are never counted.
//! - **What is counted, and when.** A connection when it is accepted (the
//!   listener answers `421 4.7.0` and closes over the limit, before the
//!   greeting); a recipient when its RCPT is answered 250 (over the limit
//!   RCPT is answered `450 4.7.1`); a message when the end of its data is
//!   answered 250 (over the limit the next MAIL is answered `450 4.7.1`).
//!   Refused attempts are not counted: a client that waits gets through.
//!   MAIL and RCPT look before they count (the count comes with the 250),
//!   so concurrent sessions of one client may together overshoot a limit by
//!   at most one per session.
//! - **The window** is a sliding-window counter, anchored at the client's
//!   first event: the count of the current window plus the previous
//!   window's count weighted by how much of it still overlaps the sliding
//!   window ending now. Never more than N in one window; a client that hit
//!   the limit gets through again, one at a time, once a window has passed.
//!   Two counters per client and counter kind, whatever the rate.
//! - **Memory** is bounded: [`MemoryStore`] holds at most [`MAX_ENTRIES`]
//!   (client, kind) entries, at most about 8 MiB
//!   (64-byte entries in power-of-two tables). A full shard first forgets the
//!   expired entries, then the tenth least recently used; never a panic,
//!   never growth. A forgotten client starts again at zero, so a flood of
//!   more distinct clients than that loosens the limits for the idle ones
//!   rather than growing memory.
//! - **Where the counts live** is a [`RateStore`]: in memory now, one per
//!   server. The trait is async so that a store shared by several
//!   instances (SQL, Redis) can replace it.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::net::Network;
use crate::pipeline::{Check, CheckState, Facts, Stage, Verdict};
use crate::reply::Reply;
use crate::units;

/// At most this many (client, kind) entries are kept in memory.
pub const MAX_ENTRIES: usize = 65_536;
/// Independent locks, so sessions of different clients rarely meet.
const SHARDS: usize = 16;

/// `N/DURATION`: at most N events per window of DURATION (`"60/1m"`,
/// `"3/5s"`). N is at least 1 and DURATION at least one second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    window: units::Duration,
}

/// Why a string is not a [`Rate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate {input:?}: {why}")]
pub struct RateError {
    input: String,
    why: String,
}

impl Rate {
    /// `count` per `window`; None for a zero count or a window under 1s.
    pub fn new(count: u32, window: StdDuration) -> Option<Rate> {
        (count > 0 && window.as_secs() > 0).then(|| Rate {
            count,
            window: units::Duration::from_secs(window.as_secs()),
        })
    }

    /// Events allowed per window.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The window.
    pub fn window(&self) -> StdDuration {
        self.window.0
    }

    fn window_ms(&self) -> u64 {
        self.window.as_secs().saturating_mul(1000)
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let err = |why: String| RateError {
            input: s.to_string(),
            why,
        };
        let (n, window) = s
            .split_once('/')
            .ok_or_else(|| err("expected COUNT/DURATION, such as \"60/1m\"".into()))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| err(format!("{:?} is not a whole number of events", n.trim())))?;
        if count == 0 {
            return Err(err(
                "a rate of 0 would refuse everything; write \"\" to turn the limit off".into(),
            ));
        }
        let window: units::Duration = window.trim().parse().map_err(|e| err(format!("{e}")))?;
        if window.as_secs() == 0 {
            return Err(err("the window must be at least 1s".into()));
        }
        Ok(Rate { count, window })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.window)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A limit that may be off, written as a [`Rate`] or as `""` for off: use
/// with `#[serde(with = "crate::ratelimit::optional")]` on an
/// `Option<Rate>`.
pub mod optional {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Rate;

    pub fn serialize<S: Serializer>(rate: &Option<Rate>, s: S) -> Result<S::Ok, S::Error> {
        match rate {
            Some(r) => s.collect_str(r),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// New connections, at accept.
    Connections,
    /// Recipients, when RCPT is answered 250.
    Recipients,
    /// Messages, when the end of data is answered 250.
    Messages,
}

/// The group a client is counted under: its address if IPv4, its /64 if
/// IPv6 (an IPv4-mapped IPv6 address counts as IPv4).
pub fn client_key(ip: IpAddr) -> Network {
    Network::of(ip, 32, 64)
}

/// Where counts live. Every method is one round trip to the store; a
/// store that cannot answer should allow (a rate limit must not take the
/// server down with it) and log why.
pub trait RateStore: Send + Sync + 'static {
    /// Whether one more event of `counter` under `key` fits `rate` now;
    /// counts nothing.
    fn allows(&self, counter: Counter, key: Network, rate: Rate) -> BoxFuture<'_, bool>;
    /// Counts one event.
    fn count(&self, counter: Counter, key: Network, rate: Rate) -> BoxFuture<'_, ()>;
    /// Counts one event if it fits, and says whether it did.
    fn admit(&self, counter: Counter, key: Network, rate: Rate) -> BoxFuture<'_, bool>;
}

/// The counts of one server, in memory; see the module's documentation.
pub struct MemoryStore {
    /// A std mutex each: held for a few hash operations, never across an
    /// `.await`.
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: RandomState,
    /// Time 0 of the store's clock; tokio's clock, so tests can pause it.
    epoch: tokio::time::Instant,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<(Counter, Network), Window>,
    /// Stamps each touch, so the least recently used are known.
    clock: u64,
}

/// The two counts of one (client, kind), in milliseconds of the store.
struct Window {
    /// The start of the first window; windows are `len` long from here.
    anchor: u64,
    len: u64,
    /// Which window `cur` counts, from the anchor.
    index: u64,
    /// Events in window `index - 1`.
    prev: u32,
    /// Events in window `index`.
    cur: u32,
    /// When last touched, in the shard's clock.
    used: u64,
}

/// What one call does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Look,
    Count,
    Admit,
}

impl Window {
    fn new(now: u64, len: u64) -> Window {
        Window {
            anchor: now,
            len: len.max(1),
            index: 0,
            prev: 0,
            cur: 0,
            used: 0,
        }
    }

    /// Moves the counts to the window `now` falls in.
    fn advance(&mut self, now: u64) {
        let index = now.saturating_sub(self.anchor) / self.len;
        if index == self.index + 1 {
            self.prev = self.cur;
            self.cur = 0;
        } else if index > self.index + 1 {
            self.prev = 0;
            self.cur = 0;
        }
        self.index = self.index.max(index);
    }

    /// Whether the sliding window ending `now` holds fewer than `limit`:
    /// `prev × overlap / len + cur < limit`, in integers.
    fn below(&self, now: u64, limit: u32) -> bool {
        let into = now.saturating_sub(self.anchor) % self.len;
        let overlap = u128::from(self.len - into);
        let weighted =
            u128::from(self.prev) * overlap + u128::from(self.cur) * u128::from(self.len);
        weighted < u128::from(limit) * u128::from(self.len)
    }

    /// Whether nothing of this entry can count any more.
    fn expired(&self, now: u64) -> bool {
        now.saturating_sub(self.anchor) / self.len > self.index + 1
            || (self.prev == 0 && self.cur == 0)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_capacity(MAX_ENTRIES)
    }
}

impl MemoryStore {
    /// A store of at most `capacity` entries (rounded to the shards, at
    /// least one each).
    pub fn with_capacity(capacity: usize) -> MemoryStore {
        let per_shard = (capacity / SHARDS).max(1);
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard,
            hasher: RandomState::new(),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// The most entries kept.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// Entries kept now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The one operation under the lock, at store time `now` (ms).
    fn apply(&self, op: Op, counter: Counter, key: Network, rate: Rate, now: u64) -> bool {
        let k = (counter, key);
        let shard = &self.shards[self.hasher.hash_one(k) as usize % SHARDS];
        let mut shard = shard.lock().unwrap();
        shard.clock += 1;
        let clock = shard.clock;
        if !shard.entries.contains_key(&k) {
            if op == Op::Look {
                // Nothing counted yet: any rate allows one; remember nothing.
                return true;
            }
            if shard.entries.len() >= self.per_shard {
                shard.make_room(now, self.per_shard);
            }
        }
        let w = shard
            .entries
            .entry(k)
            .or_insert_with(|| Window::new(now, rate.window_ms()));
        if w.expired(now) {
            *w = Window::new(now, rate.window_ms());
        }
        w.advance(now);
        w.used = clock;
        let below = w.below(now, rate.count);
        if op == Op::Count || (op == Op::Admit && below) {
            w.cur = w.cur.saturating_add(1);
        }
        below
    }
}

impl Shard {
    /// Frees room for one entry: the expired go, and if that is not a
    /// tenth of the shard, the least recently used go until it is.
    fn make_room(&mut self, now: u64, cap: usize) {
        self.entries.retain(|_, w| !w.expired(now));
        let keep = cap - (cap / 10).max(1);
        if self.entries.len() <= keep {
            return;
        }
        let excess = self.entries.len() - keep;
        let mut used: Vec<u64> = self.entries.values().map(|w| w.used).collect();
        // Stamps are unique, so exactly `excess` entries are at or below it.
        let cutoff = *used.select_nth_unstable(excess - 1).1;
        self.entries.retain(|_, w| w.used > cutoff);
    }
}

impl RateStore for MemoryStore {
    fn allows(&self, counter: Counter, key: Network, rate: Rate) -> BoxFuture<'_, bool> {
        let r = self.apply(Op::Look, counter, key, rate, self.now());
        Box::pin(std::future::ready(r))
    }

    fn count(&self, counter: Counter, key: Network, rate: Rate) -> BoxFuture<'_, ()> {
        self.apply(Op::Count, counter, key, rate, self.now());
        Box::pin(std::future::ready(()))
    }

    fn admit(&self, counter: Counter, key: Network, rate: Rate) -> BoxFuture<'_, bool> {
        let r = self.apply(Op::Admit, counter, key, rate, self.now());
        Box::pin(std::future::ready(r))
    }
}

/// The configured limits of a running server and the store they count in;
/// one for every listener (the connection limit) and the pipeline's
/// [`RateLimitCheck`] (messages and recipients).
pub struct RateLimits {
    pub connections: Option<Rate>,
    pub recipients: Option<Rate>,
    pub messages: Option<Rate>,
    /// Networks never counted.
    exempt: Vec<Network>,
    store: Arc<dyn RateStore>,
}

impl RateLimits {
    /// The limits of `config`, counted in memory.
    pub fn new(config: &crate::config::LimitsConfig) -> RateLimits {
        RateLimits::with_store(config, Arc::new(MemoryStore::default()))
    }

    /// The limits of `config`, counted in `store`.
    pub fn with_store(
        config: &crate::config::LimitsConfig,
        store: Arc<dyn RateStore>,
    ) -> RateLimits {
        RateLimits {
            connections: config.connections_per_ip,
            recipients: config.recipients_per_ip,
            messages: config.messages_per_ip,
            exempt: config.exempt.clone(),
            store,
        }
    }

    /// What `ip` is counted under, or None when it is not limited: a unix
    /// socket's client (`ip` None) or one in an exempt network.
    pub fn key(&self, ip: Option<IpAddr>) -> Option<Network> {
        let ip = ip?;
        (!self.exempt.iter().any(|n| n.contains(ip))).then(|| client_key(ip))
    }

    /// Counts a new connection from `ip` (None for a unix socket), or says
    /// it is over `limits.connections_per_ip`.
    pub async fn admit_connection(&self, ip: Option<IpAddr>) -> bool {
        match (self.connections, self.key(ip)) {
            (Some(rate), Some(key)) => self.store.admit(Counter::Connections, key, rate).await,
            _ => true,
        }
    }

    /// The pipeline check for messages and recipients, or None when both
    /// are off (then no stage pays for it).
    pub fn check(self: &Arc<Self>) -> Option<Arc<dyn Check>> {
        (self.messages.is_some() || self.recipients.is_some()).then(|| {
            Arc::new(RateLimitCheck {
                limits: self.clone(),
            }) as Arc<dyn Check>
        })
    }
}

/// The messages and recipients limits as a pipeline check: it looks at
/// MAIL and RCPT and counts what the session accepted.
pub struct RateLimitCheck {
    limits: Arc<RateLimits>,
}

impl Check for RateLimitCheck {
    fn name(&self) -> &str {
        "ratelimit"
    }

    fn open(&self) -> Box<dyn CheckState> {
        Box::new(RateLimitState {
            limits: self.limits.clone(),
            key: None,
        })
    }
}

struct RateLimitState {
    limits: Arc<RateLimits>,
    /// The connection's key once known; its inner None: not limited.
    key: Option<Option<Network>>,
}

impl RateLimitState {
    /// The rate and key `counter` is limited by here, if it is.
    fn limit(&self, counter: Counter) -> Option<(Rate, Network)> {
        let rate = match counter {
            Counter::Messages => self.limits.messages?,
            Counter::Recipients => self.limits.recipients?,
            Counter::Connections => return None,
        };
        Some((rate, self.key.flatten()?))
    }
}

impl CheckState for RateLimitState {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        if self.key.is_none() {
            self.key = Some(self.limits.key((!facts.local).then_some(facts.ip)));
        }
        // A message is judged when the next one would start, a recipient
        // when it is named.
        let counter = match stage {
            Stage::Mail => Counter::Messages,
            Stage::Rcpt => Counter::Recipients,
            _ => return Box::pin(std::future::ready(Verdict::Continue)),
        };
        let Some((rate, key)) = self.limit(counter) else {
            return Box::pin(std::future::ready(Verdict::Continue));
        };
        Box::pin(async move {
            if self.limits.store.allows(counter, key, rate).await {
                return Verdict::Continue;
            }
            tracing::info!(client = %key, ?counter, %rate, "rate limit reached");
            Verdict::TempFail(match counter {
                Counter::Messages => Reply::message_rate_exceeded(),
                _ => Reply::recipient_rate_exceeded(),
            })
        })
    }

    fn accepted(&mut self, stage: Stage) -> BoxFuture<'_, ()> {
        let counter = match stage {
            Stage::Rcpt => Counter::Recipients,
            Stage::Data => Counter::Messages,
            _ => return Box::pin(std::future::ready(())),
        };
        match self.limit(counter) {
            Some((rate, key)) => self.limits.store.count(counter, key, rate),
            None => Box::pin(std::future::ready(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn rates_parse_and_print() {
        assert_eq!(rate("60/1m").count(), 60);
        assert_eq!(rate("60/1m").window(), StdDuration::from_secs(60));
        assert_eq!(rate("3/5s").to_string(), "3/5s");
        assert_eq!(rate(" 300 / 60 ").to_string(), "300/1m");
        assert_eq!(Rate::new(2, StdDuration::from_secs(1)), Some(rate("2/1s")));
        assert_eq!(Rate::new(0, StdDuration::from_secs(1)), None);
        let err = |s: &str| s.parse::<Rate>().unwrap_err().to_string();
        assert_eq!(
            err("60"),
            "invalid rate \"60\": expected COUNT/DURATION, such as \"60/1m\""
        );
        assert_eq!(
            err("x/1m"),
            "invalid rate \"x/1m\": \"x\" is not a whole number of events"
        );
        assert_eq!(
            err("0/1m"),
            "invalid rate \"0/1m\": a rate of 0 would refuse everything; write \"\" to turn the limit off"
        );
        assert_eq!(
            err("5/1w"),
            "invalid rate \"5/1w\": invalid duration \"1w\": unit must be s, m, h or d"
        );
        assert_eq!(
            err("5/0s"),
            "invalid rate \"5/0s\": the window must be at least 1s"
        );
    }

    #[test]
    fn the_limits_section_reads_rates_and_empty_means_off() {
        use figment::Figment;
        use figment::providers::{Format, Serialized, Toml};

        use crate::config::Config;

        let defaults = Config::default();
        assert_eq!(defaults.limits.messages_per_ip, Some(rate("60/1m")));
        assert_eq!(defaults.limits.recipients_per_ip, Some(rate("300/1m")));
        assert_eq!(defaults.limits.connections_per_ip, Some(rate("30/1m")));
        let load = |toml: &str| {
            Figment::from(Serialized::defaults(Config::default()))
                .merge(Toml::string(toml))
                .extract::<Config>()
                .map_err(|e| e.to_string())
        };
        let c =
            load("[limits]\nmessages_per_ip = \"3/5s\"\nconnections_per_ip = \"\"\nexempt = []\n")
                .unwrap();
        assert_eq!(c.limits.messages_per_ip, Some(rate("3/5s")));
        assert_eq!(c.limits.recipients_per_ip, Some(rate("300/1m")));
        assert_eq!(c.limits.connections_per_ip, None);
        assert!(c.limits.exempt.is_empty());
        let e = load("[limits]\nrecipients_per_ip = \"0/1m\"\n").unwrap_err();
        assert!(
            e.contains("invalid rate \"0/1m\"") && e.contains("limits.recipients_per_ip"),
            "{e}"
        );
    }

    #[test]
    fn ipv6_clients_are_grouped_by_their_64() {
        let a = client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"));
        assert_eq!(a, client_key(ip("2001:db8:1:2::1")));
        assert_ne!(a, client_key(ip("2001:db8:1:3::1")));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        // IPv4 clients are counted one address each, mapped or not.
        assert_eq!(client_key(ip("192.0.2.1")).to_string(), "192.0.2.1/32");
        assert_eq!(
            client_key(ip("::ffff:192.0.2.1")),
            client_key(ip("192.0.2.1"))
        );
        assert_ne!(client_key(ip("192.0.2.1")), client_key(ip("192.0.2.2")));

        let store = MemoryStore::default();
        let r = rate("2/1m");
        let admit = |s: &str| store.apply(Op::Admit, Counter::Messages, client_key(ip(s)), r, 0);
        assert!(admit("2001:db8:1:2::1"));
        assert!(admit("2001:db8:1:2::ffff"));
        assert!(!admit("2001:db8:1:2:1234::9"));
        assert!(admit("2001:db8:1:3::1"));
    }

    #[test]
    fn a_sliding_window_refuses_past_the_limit_and_recovers() {
        let store = MemoryStore::default();
        let key = client_key(ip("192.0.2.1"));
        let r = rate("2/10s");
        let admit = |now| store.apply(Op::Admit, Counter::Connections, key, r, now);
        let look = |now| store.apply(Op::Look, Counter::Connections, key, r, now);
        assert!(admit(1_000));
        assert!(admit(5_000));
        assert!(!look(9_000));
        assert!(!admit(10_999));
        // The sliding window [1.5s, 11.5s] holds one event; the estimate,
        // the previous window's two weighted by their overlap (95%), is 1.9.
        assert!(admit(11_500));
        assert!(!admit(11_501));
        // 2 × 50% + 1.
        assert!(!admit(16_000));
        // 2 × 10% + 1.
        assert!(admit(20_000));
        assert!(!admit(20_001));
        // Two idle windows forget everything.
        assert!(admit(40_000));
        assert!(admit(40_001));
        assert!(!admit(40_002));
        // Counting (what the session accepted) goes past the limit but
        // never wraps; looking still says no.
        store.apply(Op::Count, Counter::Connections, key, r, 40_003);
        assert!(!look(40_004));
        // Other kinds and other clients have counts of their own.
        assert!(store.apply(Op::Look, Counter::Messages, key, r, 40_005));
        let other = client_key(ip("192.0.2.2"));
        assert!(store.apply(Op::Admit, Counter::Connections, other, r, 40_006));
    }

    #[test]
    fn looking_remembers_nothing() {
        let store = MemoryStore::default();
        for i in 0..1000u32 {
            let key = client_key(IpAddr::from(i.to_be_bytes()));
            assert!(store.apply(Op::Look, Counter::Messages, key, rate("1/1m"), 0));
        }
        assert!(store.is_empty());
    }

    #[test]
    fn a_flood_of_a_million_addresses_stays_at_the_cap() {
        let store = MemoryStore::default();
        assert_eq!(store.capacity(), MAX_ENTRIES);
        // 64 bytes an entry; each shard's table rounds up to 8,192 slots.
        assert!(std::mem::size_of::<((Counter, Network), Window)>() <= 64);
        let r = rate("1/1h");
        // A busy client that keeps coming back while the flood goes on.
        let busy = client_key(ip("2001:db8::1"));
        assert!(store.apply(Op::Admit, Counter::Messages, busy, r, 0));
        for i in 0..1_000_000u32 {
            // 10.0.0.0 and up: all distinct, all within one window.
            let key = client_key(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
            store.apply(Op::Admit, Counter::Messages, key, r, u64::from(i / 1000));
            if i % 1000 == 0 {
                assert!(!store.apply(Op::Admit, Counter::Messages, busy, r, 1000));
            }
            if i % 100_000 == 0 {
                assert!(store.len() <= MAX_ENTRIES, "{} at {i}", store.len());
            }
        }
        let len = store.len();
        assert!((MAX_ENTRIES * 8 / 10..=MAX_ENTRIES).contains(&len), "{len}");
        // The busy client was never forgotten: it is still over its limit.
        assert!(!store.apply(Op::Admit, Counter::Messages, busy, r, 1000));
    }

    #[test]
    fn expired_entries_make_room_before_recent_ones() {
        let store = MemoryStore::with_capacity(SHARDS * 10);
        let r = rate("1/1s");
        let key = |i: u32| client_key(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
        for i in 0..1000 {
            store.apply(Op::Count, Counter::Recipients, key(i), r, 0);
        }
        assert!(store.len() <= store.capacity());
        // Much later, everything there is expired and goes first.
        for i in 1000..1000 + 50 {
            store.apply(Op::Count, Counter::Recipients, key(i), r, 60_000);
        }
        let recent = (1000..1050)
            .filter(|&i| !store.apply(Op::Look, Counter::Recipients, key(i), r, 60_000))
            .count();
        assert!(recent >= 40, "{recent} of 50 recent entries kept");
    }
}
