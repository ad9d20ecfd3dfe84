//! Recipient resolution at RCPT time, in the order the product promises:
//! mailbox, alias (expanded recursively), the domain's catch-all alias,
//! sink rule, else reject. Results are cached for `database.cache_ttl` so
//! the hot path rarely waits on the database.
//!
//! A mailbox may have alias rows of its own (added by the admin CLI to give
//! it a pipe or a forward beside its maildir): then those rows say where its
//! mail goes, and its own address among them means its maildir. An alias
//! destination `|…` is a pipe command (see `pipe.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Directory, Result, on_pool, pipe};
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

/// A command that gets a copy on its standard input: an alias destination
/// `|/path/to/program args…`, stored by the admin CLI only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipe {
    /// The program (an absolute path) and its arguments; no shell runs it.
    pub command: Vec<String>,
    /// The address whose alias holds the pipe: `RECIPIENT` without its
    /// extension, and `Delivered-To`.
    pub owner: Address,
    /// The subaddress tag when the recipient reached the owner by its own
    /// address (`issues+web@…` reaching `issues@…`'s pipe): `EXTENSION`.
    pub extension: Option<String>,
    /// The recipient as given, when another alias (or the catch-all) led
    /// here: `X-Original-To` and `ORIGINAL_RECIPIENT`.
    pub original: Option<String>,
}

/// Where a recipient goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// One or more mailboxes (an alias may expand to several).
    Mailboxes(Vec<Mailbox>),
    /// Pipe commands (at least one) and mailboxes (possibly none): an alias
    /// with pipe destinations. Kept apart from [`Route::Mailboxes`] so that
    /// routes without a pipe look exactly as they always did.
    WithPipes {
        mailboxes: Vec<Mailbox>,
        pipes: Vec<Pipe>,
    },
    /// The ephemeral sink, keeping messages this long.
    Sink { pattern: String, ttl: Duration },
    /// The domain is served but has no such recipient.
    UnknownUser,
    /// The domain is not ours: accepting would be relaying.
    NotServed,
    /// Leaves this server: queued and delivered to `address`'s MX (or the
    /// smarthost, or a configured route). `address` is where the copy goes,
    /// normalized; it may differ from the recipient the client gave (an
    /// alias that forwards).
    Remote { address: String },
}

impl Route {
    /// The mailboxes that get a copy; empty for a sink or a refusal.
    pub fn mailboxes(&self) -> &[Mailbox] {
        match self {
            Route::Mailboxes(m) | Route::WithPipes { mailboxes: m, .. } => m,
            _ => &[],
        }
    }

    /// The pipe commands that get a copy; empty unless [`Route::WithPipes`].
    pub fn pipes(&self) -> &[Pipe] {
        match self {
            Route::WithPipes { pipes, .. } => pipes,
            _ => &[],
        }
    }
}

/// What expanding an address found: mailboxes, pipes with the source
/// (alias) that holds each, and addresses on other servers.
#[derive(Default)]
struct Found {
    mailboxes: Vec<Mailbox>,
    pipes: Vec<(Vec<String>, String)>,
    /// Destinations in domains this server does not have.
    remote: Vec<String>,
}

impl Found {
    fn push_mailbox(&mut self, m: Mailbox) {
        if !self.mailboxes.iter().any(|x| x.address == m.address) {
            self.mailboxes.push(m);
        }
    }

    fn push_pipe(&mut self, destination: &str, source: &str) {
        match pipe::argv(destination) {
            Some(argv) if !self.pipes.iter().any(|(a, _)| *a == argv) => {
                self.pipes.push((argv, source.to_string()))
            }
            Some(_) => {}
            None => tracing::warn!(alias = source, "pipe destination names no command; skipped"),
        }
    }

    fn is_empty(&self) -> bool {
        self.mailboxes.is_empty() && self.pipes.is_empty() && self.remote.is_empty()
    }
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
            let base_str = base.to_string();
            let mut found = Found::default();
            self.expand(&base_str, 0, &mut Vec::new(), &mut found)
                .await?;
            if found.is_empty() {
                self.expand(&format!("@{}", rcpt.domain), 0, &mut Vec::new(), &mut found)
                    .await?;
            }
            // `alias add` lets a remote destination be an alias's only
            // one; a chain of aliases can still mix them, and a route has
            // one kind. The local mailboxes and pipes win, loudly.
            let local = !found.mailboxes.is_empty() || !found.pipes.is_empty();
            if !found.remote.is_empty() && (local || found.remote.len() > 1) {
                tracing::error!(
                    rcpt = %rcpt,
                    dropped = ?if local { &found.remote[..] } else { &found.remote[1..] },
                    "an alias chain mixes destinations on other servers with others; only one kind is delivered"
                );
            }
            if !local && let Some(address) = found.remote.first() {
                // Forwarded off this server. SRS rewrites the envelope
                // sender of such copies where they are queued
                // (pipeline::deliver, `Remote`'s original address).
                return Ok(Route::Remote {
                    address: address.clone(),
                });
            }
            if local {
                let original = rcpt.to_string();
                let Found {
                    mut mailboxes,
                    pipes,
                    ..
                } = found;
                for m in &mut mailboxes {
                    // The recipient's own mailbox keeps its tag; any other
                    // was reached through an alias and remembers the
                    // recipient as given.
                    if m.address == base {
                        m.tag = tag.map(str::to_string);
                    } else {
                        m.original = Some(original.clone());
                    }
                }
                if pipes.is_empty() {
                    return Ok(Route::Mailboxes(mailboxes));
                }
                let pipes = pipes
                    .into_iter()
                    .map(|(command, source)| {
                        let catch_all = source.starts_with('@');
                        let direct = source == base_str;
                        let owner = match source.rsplit_once('@') {
                            Some((local, domain)) if !catch_all => Address {
                                local: local.to_string(),
                                domain: domain.to_string(),
                            },
                            // The catch-all's pipe serves the recipient.
                            _ => base.clone(),
                        };
                        Pipe {
                            command,
                            owner,
                            extension: (direct || catch_all)
                                .then(|| tag.map(str::to_string))
                                .flatten(),
                            original: (!direct).then(|| original.clone()),
                        }
                    })
                    .collect();
                return Ok(Route::WithPipes { mailboxes, pipes });
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

    /// Whether the domain is in the directory at all (active or not): an
    /// address in it is ours, never forwarded.
    pub async fn domain_exists(&self, domain: &str) -> Result<bool> {
        let sql = self.sql("SELECT COUNT(*) FROM domains WHERE name = ?");
        let (n,): (i64,) =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(domain).fetch_one(p).await)?;
        Ok(n > 0)
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
        let mut found = Found::default();
        self.expand(&base.to_string(), 0, &mut Vec::new(), &mut found)
            .await?;
        Ok(found.mailboxes.into_iter().map(|m| m.address).collect())
    }

    async fn domain_active(&self, domain: &str) -> Result<bool> {
        let sql = self.sql("SELECT COUNT(*) FROM domains WHERE name = ? AND active = TRUE");
        let (n,): (i64,) =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(domain).fetch_one(p).await)?;
        Ok(n > 0)
    }

    /// Appends the mailboxes and pipes `addr` reaches to `out` (once each).
    /// `path` holds the aliases being expanded, to stop at loops.
    fn expand<'a>(
        &'a self,
        addr: &'a str,
        depth: usize,
        path: &'a mut Vec<String>,
        out: &'a mut Found,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            if let Some((local, domain)) = addr.rsplit_once('@').filter(|(l, _)| !l.is_empty()) {
                // One round trip: the mailbox, and whether it has alias rows
                // of its own (rare: a pipe or a forward beside its maildir).
                let sql = self.sql(
                    "SELECT u.quota, (SELECT COUNT(*) FROM aliases a WHERE a.source = ? AND a.active = TRUE) \
                     FROM users u JOIN domains d ON d.name = u.domain \
                     WHERE u.domain = ? AND u.local_part = ? AND u.active = TRUE AND d.active = TRUE",
                );
                let user: Option<(i64, i64)> = on_pool!(&self.pool, p => sqlx::query_as(sql).bind(addr).bind(domain).bind(local).fetch_optional(p).await)?;
                if let Some((quota, own_rows)) = user {
                    let mailbox = Mailbox {
                        address: Address {
                            local: local.to_string(),
                            domain: domain.to_string(),
                        },
                        quota: quota.max(0) as u64,
                        tag: None,
                        original: None,
                    };
                    if own_rows > 0 && depth >= MAX_ALIAS_DEPTH {
                        tracing::warn!(
                            alias = addr,
                            "alias chain too deep; delivering to the mailbox only"
                        );
                    }
                    if own_rows == 0 || depth >= MAX_ALIAS_DEPTH {
                        out.push_mailbox(mailbox);
                        return Ok(());
                    }
                    if path.iter().any(|p| p == addr) {
                        // Mailboxes forwarding to each other: this one is
                        // being expanded further up, its own row included.
                        return Ok(());
                    }
                    // Its rows say where its mail goes; its own address
                    // among them is its maildir, not a loop.
                    path.push(addr.to_string());
                    for dest in self.destinations(addr).await? {
                        if dest == addr {
                            out.push_mailbox(mailbox.clone());
                        } else {
                            self.follow(&dest, addr, depth, path, out).await?;
                        }
                    }
                    path.pop();
                    return Ok(());
                }
                // A destination in a domain we do not have: it leaves.
                if depth > 0 && !self.domain_exists(domain).await? {
                    if !out.remote.iter().any(|r| r == addr) {
                        out.remote.push(addr.to_string());
                    }
                    return Ok(());
                }
            }
            if depth >= MAX_ALIAS_DEPTH || path.iter().any(|p| p == addr) {
                tracing::warn!(
                    alias = addr,
                    "alias loop or chain too deep; not following further"
                );
                return Ok(());
            }
            let dests = self.destinations(addr).await?;
            if dests.iter().any(|d| d == addr) {
                // Only a mailbox's own alias names itself: this mailbox is
                // disabled, and its pipes and forwards are with it.
                return Ok(());
            }
            path.push(addr.to_string());
            for dest in dests {
                self.follow(&dest, addr, depth, path, out).await?;
            }
            path.pop();
            Ok(())
        })
    }

    /// One destination of the alias `source`: a pipe, or an address to
    /// expand further.
    async fn follow(
        &self,
        dest: &str,
        source: &str,
        depth: usize,
        path: &mut Vec<String>,
        out: &mut Found,
    ) -> Result<()> {
        if pipe::is_pipe(dest) {
            out.push_pipe(dest, source);
            Ok(())
        } else {
            self.expand(dest, depth + 1, path, out).await
        }
    }

    /// The active destinations of an alias, in a stable order.
    async fn destinations(&self, source: &str) -> Result<Vec<String>> {
        let sql = self.sql("SELECT destination FROM aliases WHERE source = ? AND active = TRUE ORDER BY destination");
        let rows: Vec<(String,)> =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(source).fetch_all(p).await)?;
        Ok(rows.into_iter().map(|(d,)| d).collect())
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
