//! Recipient resolution at RCPT time, in the order the product promises:
//! mailbox, alias (expanded recursively), the domain's catch-all alias,
//! sink rule, else reject. Results are cached for `database.cache_ttl` so
//! the hot path rarely waits on the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Directory, Result, on_pool};
use crate::address::{self, Address};

/// How deep aliases may point at aliases before we stop following.
const MAX_ALIAS_DEPTH: usize = 8;
/// Entries kept before the cache is emptied; bounds its memory.
const MAX_CACHE_ENTRIES: usize = 65_536;

/// A mailbox that gets a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The mailbox's canonical address; its maildir is `<root>/<domain>/<local>`.
    pub address: Address,
    /// Bytes; 0 = unlimited.
    pub quota: u64,
    /// The subaddress tag when the recipient was `user+tag@domain`.
    pub tag: Option<String>,
    /// The recipient as given, when an alias expanded to this mailbox.
    pub original: Option<String>,
}

/// Where a recipient goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// One or more mailboxes (an alias may expand to several).
    Mailboxes(Vec<Mailbox>),
    /// The ephemeral sink, keeping messages this long.
    Sink { pattern: String, ttl: Duration },
    /// The domain is served but has no such recipient.
    UnknownUser,
    /// The domain is not ours: accepting would be relaying.
    NotServed,
    /// A domain we do not serve, accepted from an authenticated client on
    /// a submission port: the outbound queue delivers it to `address`.
    /// The directory itself never answers this.
    Remote { address: String },
}

/// A cached value and when it was fetched.
type Stamped<T> = (Instant, T);
/// Sink rules as (normalized pattern, TTL).
type SinkRules = Vec<(String, Duration)>;

/// The lookup cache; `ttl` zero disables it.
#[derive(Debug, Clone)]
pub(super) struct Cache {
    ttl: Duration,
    routes: Arc<Mutex<HashMap<String, Stamped<Arc<Route>>>>>,
    /// Sink rules from the database, loaded as a whole.
    rules: Arc<Mutex<Option<Stamped<Arc<SinkRules>>>>>,
}

impl Cache {
    pub(super) fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            routes: Arc::default(),
            rules: Arc::default(),
        }
    }

    /// Forgets everything; called after every change made through this handle.
    pub(super) fn clear(&self) {
        self.routes.lock().unwrap().clear();
        *self.rules.lock().unwrap() = None;
    }

    fn get(&self, key: &str) -> Option<Arc<Route>> {
        let routes = self.routes.lock().unwrap();
        routes
            .get(key)
            .filter(|(t, _)| t.elapsed() < self.ttl)
            .map(|(_, r)| r.clone())
    }

    fn put(&self, key: String, route: Arc<Route>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut routes = self.routes.lock().unwrap();
        if routes.len() >= MAX_CACHE_ENTRIES {
            routes.clear();
        }
        routes.insert(key, (Instant::now(), route));
    }
}

impl Directory {
    /// Where mail for `rcpt` goes. `static_rules` are sink rules from the
    /// config file (normalized pattern, TTL), consulted after the database's.
    pub async fn resolve(
        &self,
        rcpt: &Address,
        delimiter: Option<char>,
        static_rules: &[(String, Duration)],
    ) -> Result<Arc<Route>> {
        let key = rcpt.to_string();
        if let Some(route) = self.cache.get(&key) {
            return Ok(route);
        }
        let route = Arc::new(self.resolve_uncached(rcpt, delimiter, static_rules).await?);
        self.cache.put(key, route.clone());
        Ok(route)
    }

    async fn resolve_uncached(
        &self,
        rcpt: &Address,
        delimiter: Option<char>,
        static_rules: &[(String, Duration)],
    ) -> Result<Route> {
        let served = self.domain_active(&rcpt.domain).await?;
        if served {
            let (base, tag) = rcpt.without_subaddress(delimiter);
            let mut found = Vec::new();
            let direct = self
                .expand(&base.to_string(), 0, &mut Vec::new(), &mut found)
                .await?;
            if found.is_empty() {
                self.expand(&format!("@{}", rcpt.domain), 0, &mut Vec::new(), &mut found)
                    .await?;
            }
            if !found.is_empty() {
                let original = rcpt.to_string();
                for m in &mut found {
                    if direct {
                        m.tag = tag.map(str::to_string);
                    } else {
                        m.original = Some(original.clone());
                    }
                }
                return Ok(Route::Mailboxes(found));
            }
        }
        let db_rules = self.sink_rules_cached().await?;
        let rule = db_rules
            .iter()
            .chain(static_rules)
            .find(|(p, _)| address::sink_pattern_matches(p, &rcpt.domain));
        Ok(match rule {
            Some((pattern, ttl)) => Route::Sink {
                pattern: pattern.clone(),
                ttl: *ttl,
            },
            None if served => Route::UnknownUser,
            None => Route::NotServed,
        })
    }

    /// The mailboxes `addr` names as an identity: itself if it is a
    /// mailbox (a `+tag` subaddress is its mailbox's), else the mailboxes
    /// its aliases lead to, recursively. Never through the domain's
    /// catch-all, which catches mail for names nobody holds and makes no
    /// one their owner; never for a disabled domain. Not cached: asked once
    /// per submitted message, the answer must be current.
    pub async fn owners(&self, addr: &Address, delimiter: Option<char>) -> Result<Vec<Address>> {
        if !self.domain_active(&addr.domain).await? {
            return Ok(Vec::new());
        }
        let (base, _) = addr.without_subaddress(delimiter);
        let mut found = Vec::new();
        self.expand(&base.to_string(), 0, &mut Vec::new(), &mut found)
            .await?;
        Ok(found.into_iter().map(|m| m.address).collect())
    }

    async fn domain_active(&self, domain: &str) -> Result<bool> {
        let sql = self.sql("SELECT COUNT(*) FROM domains WHERE name = ? AND active = TRUE");
        let (n,): (i64,) =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(domain).fetch_one(p).await)?;
        Ok(n > 0)
    }

    /// Appends the mailboxes `addr` reaches to `out` (once each). Returns
    /// true when `addr` is itself an active mailbox. `path` holds the
    /// aliases being expanded, to stop at loops.
    fn expand<'a>(
        &'a self,
        addr: &'a str,
        depth: usize,
        path: &'a mut Vec<String>,
        out: &'a mut Vec<Mailbox>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send + 'a>> {
        Box::pin(async move {
            if let Some((local, domain)) = addr.rsplit_once('@').filter(|(l, _)| !l.is_empty()) {
                let sql = self.sql(
                    "SELECT u.quota FROM users u JOIN domains d ON d.name = u.domain \
                     WHERE u.domain = ? AND u.local_part = ? AND u.active = TRUE AND d.active = TRUE",
                );
                let user: Option<(i64,)> = on_pool!(&self.pool, p => sqlx::query_as(sql).bind(domain).bind(local).fetch_optional(p).await)?;
                if let Some((quota,)) = user {
                    let address = Address {
                        local: local.to_string(),
                        domain: domain.to_string(),
                    };
                    if !out.iter().any(|m| m.address == address) {
                        out.push(Mailbox {
                            address,
                            quota: quota.max(0) as u64,
                            tag: None,
                            original: None,
                        });
                    }
                    return Ok(true);
                }
            }
            if depth >= MAX_ALIAS_DEPTH || path.iter().any(|p| p == addr) {
                tracing::warn!(
                    alias = addr,
                    "alias loop or chain too deep; not following further"
                );
                return Ok(false);
            }
            let sql = self.sql("SELECT destination FROM aliases WHERE source = ? AND active = TRUE ORDER BY destination");
            let dests: Vec<(String,)> =
                on_pool!(&self.pool, p => sqlx::query_as(sql).bind(addr).fetch_all(p).await)?;
            path.push(addr.to_string());
            for (dest,) in dests {
                self.expand(&dest, depth + 1, path, out).await?;
            }
            path.pop();
            Ok(false)
        })
    }

    async fn sink_rules_cached(&self) -> Result<Arc<Vec<(String, Duration)>>> {
        if let Some((t, rules)) = self.cache.rules.lock().unwrap().as_ref()
            && t.elapsed() < self.cache.ttl
        {
            return Ok(rules.clone());
        }
        let sql =
            "SELECT pattern, ttl_seconds FROM sink_rules WHERE active = TRUE ORDER BY pattern";
        let rows: Vec<(String, i64)> =
            on_pool!(&self.pool, p => sqlx::query_as(sql).fetch_all(p).await)?;
        let rules: Arc<Vec<_>> = Arc::new(
            rows.into_iter()
                .map(|(p, t)| (p, Duration::from_secs(t.max(1) as u64)))
                .collect(),
        );
        if !self.cache.ttl.is_zero() {
            *self.cache.rules.lock().unwrap() = Some((Instant::now(), rules.clone()));
        }
        Ok(rules)
    }
}
