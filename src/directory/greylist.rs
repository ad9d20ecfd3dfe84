//! Greylisting's state: one row per (client network, sender, recipient)
//! triplet in the `greylist` table (migration 0002), so that every backend
//! and several instances sharing one database see the same triplets. The
//! policy (what to answer) is `crate::greylist`'s; this module records and
//! reads. Times are milliseconds since the Unix epoch, given by the caller.
//!
//! Two sessions racing on one triplet never fail: a new triplet is inserted
//! with `ON CONFLICT DO NOTHING` (`ON DUPLICATE KEY UPDATE` on MySQL), and
//! every other change is an `UPDATE` guarded by the values it read, so the
//! loser of a race changes nothing and the winner's row stands.

use std::time::Duration;

use serde::Serialize;

use super::{Backend, Directory, Result, on_pool};
use crate::address::Address;
use crate::net::Network;

/// Sender and recipient are cut to this many characters, which keeps the
/// MySQL key within InnoDB's limit; longer addresses are not real ones.
const MAX_ADDRESS_CHARS: usize = 320;

/// What greylisting keys on, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triplet {
    /// The client's network (`/24` or `/64`), as text.
    pub network: String,
    /// The reverse-path, normalized; empty for `<>`.
    pub sender: String,
    /// The recipient, normalized.
    pub recipient: String,
    /// The sender's domain; empty for `<>`.
    pub sender_domain: String,
}

impl Triplet {
    /// The triplet of `network`, a reverse-path as the client gave it
    /// (empty for `<>`) and a recipient address. Both addresses are
    /// normalized (`address.rs`), or lowercased when they do not parse.
    pub fn new(network: Network, sender: &str, recipient: &str) -> Triplet {
        let norm = |a: &str| match Address::from_smtp(a) {
            Ok(a) => a.to_string(),
            Err(_) => a.to_lowercase(),
        };
        let sender = cut(norm(sender));
        let sender_domain = sender
            .rsplit_once('@')
            .map(|(_, d)| d.chars().take(255).collect())
            .unwrap_or_default();
        Triplet {
            network: network.to_string(),
            sender,
            recipient: cut(norm(recipient)),
            sender_domain,
        }
    }
}

fn cut(mut s: String) -> String {
    if let Some((i, _)) = s.char_indices().nth(MAX_ADDRESS_CHARS) {
        s.truncate(i);
    }
    s
}

/// How long greylisting's states last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreylistTimes {
    /// A retry before this is deferred again.
    pub delay: Duration,
    /// An unretried triplet is forgotten after this.
    pub expire: Duration,
    /// A passed triplet passes for this long after it last passed.
    pub passed_for: Duration,
}

/// What the directory says about a triplet at one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greylisting {
    /// Unknown (or forgotten): recorded now, to be deferred.
    New,
    /// Seen, and retried before the delay: to be deferred again.
    TooSoon,
    /// Retried after the delay: it passes, and will pass from now on.
    Passed,
    /// It passed before: it passes.
    Known,
}

impl Greylisting {
    /// Whether the attempt passes.
    pub fn passes(self) -> bool {
        matches!(self, Greylisting::Passed | Greylisting::Known)
    }
}

/// One triplet, as `greylist_entries` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GreylistEntry {
    pub network: String,
    pub sender: String,
    pub recipient: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub passed: bool,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Directory {
    /// Records an attempt of `t` at `now` (ms since the epoch) and says
    /// what it is. A triplet whose state has run out (unretried past
    /// `expire`, or passed longer ago than `passed_for`) is treated as
    /// new, whether or not the purge has removed it yet.
    pub async fn greylist(
        &self,
        t: &Triplet,
        now: i64,
        times: &GreylistTimes,
    ) -> Result<Greylisting> {
        let sql = self.sql(
            "SELECT first_seen, last_seen, passed FROM greylist \
             WHERE network = ? AND sender = ? AND recipient = ?",
        );
        let row: Option<(i64, i64, bool)> = on_pool!(&self.pool, p => sqlx::query_as(sql)
            .bind(&t.network).bind(&t.sender).bind(&t.recipient)
            .fetch_optional(p).await)?;
        let Some((first, last, passed)) = row else {
            self.greylist_insert(t, now).await?;
            return Ok(Greylisting::New);
        };
        let ran_out = if passed {
            now.saturating_sub(last) >= ms(times.passed_for)
        } else {
            now.saturating_sub(first) >= ms(times.expire)
        };
        if ran_out {
            let sql = self.sql(
                "UPDATE greylist SET first_seen = ?, last_seen = ?, passed = FALSE \
                 WHERE network = ? AND sender = ? AND recipient = ? \
                 AND first_seen = ? AND last_seen = ? AND passed = ?",
            );
            on_pool!(&self.pool, p => sqlx::query(sql)
                .bind(now).bind(now)
                .bind(&t.network).bind(&t.sender).bind(&t.recipient)
                .bind(first).bind(last).bind(passed)
                .execute(p).await.map(|_| ()))?;
            return Ok(Greylisting::New);
        }
        if passed {
            let sql = self.sql(
                "UPDATE greylist SET last_seen = ? \
                 WHERE network = ? AND sender = ? AND recipient = ? AND last_seen < ?",
            );
            on_pool!(&self.pool, p => sqlx::query(sql)
                .bind(now).bind(&t.network).bind(&t.sender).bind(&t.recipient).bind(now)
                .execute(p).await.map(|_| ()))?;
            return Ok(Greylisting::Known);
        }
        if now.saturating_sub(first) < ms(times.delay) {
            return Ok(Greylisting::TooSoon);
        }
        let sql = self.sql(
            "UPDATE greylist SET passed = TRUE, last_seen = ? \
             WHERE network = ? AND sender = ? AND recipient = ? AND first_seen = ?",
        );
        on_pool!(&self.pool, p => sqlx::query(sql)
            .bind(now).bind(&t.network).bind(&t.sender).bind(&t.recipient).bind(first)
            .execute(p).await.map(|_| ()))?;
        Ok(Greylisting::Passed)
    }

    /// Inserts a new triplet; one inserted meanwhile by another session
    /// stays as it is.
    async fn greylist_insert(&self, t: &Triplet, now: i64) -> Result<()> {
        let sql = self.sql(match self.backend() {
            Backend::Sqlite | Backend::Postgres => {
                "INSERT INTO greylist \
                 (network, sender, recipient, sender_domain, first_seen, last_seen, passed) \
                 VALUES (?, ?, ?, ?, ?, ?, FALSE) ON CONFLICT DO NOTHING"
            }
            Backend::MySql => {
                "INSERT INTO greylist \
                 (network, sender, recipient, sender_domain, first_seen, last_seen, passed) \
                 VALUES (?, ?, ?, ?, ?, ?, FALSE) ON DUPLICATE KEY UPDATE network = network"
            }
        });
        on_pool!(&self.pool, p => sqlx::query(sql)
            .bind(&t.network).bind(&t.sender).bind(&t.recipient).bind(&t.sender_domain)
            .bind(now).bind(now)
            .execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Whether a triplet of a sender in `domain` passed within
    /// `passed_for` before `now`.
    pub async fn greylist_domain_passed(
        &self,
        domain: &str,
        now: i64,
        passed_for: Duration,
    ) -> Result<bool> {
        let sql = self.sql(
            "SELECT sender_domain FROM greylist \
             WHERE sender_domain = ? AND passed = TRUE AND last_seen > ? LIMIT 1",
        );
        let since = now.saturating_sub(ms(passed_for));
        let row: Option<(String,)> = on_pool!(&self.pool, p => sqlx::query_as(sql)
            .bind(domain.to_ascii_lowercase()).bind(since)
            .fetch_optional(p).await)?;
        Ok(row.is_some())
    }

    /// Removes the triplets whose state has run out at `now`; how many.
    pub async fn greylist_purge(&self, now: i64, times: &GreylistTimes) -> Result<u64> {
        let sql = self.sql(
            "DELETE FROM greylist WHERE (passed = FALSE AND first_seen <= ?) \
             OR (passed = TRUE AND last_seen <= ?)",
        );
        let n = on_pool!(&self.pool, p => sqlx::query(sql)
            .bind(now.saturating_sub(ms(times.expire)))
            .bind(now.saturating_sub(ms(times.passed_for)))
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Every triplet recorded, in key order.
    pub async fn greylist_entries(&self) -> Result<Vec<GreylistEntry>> {
        let sql = "SELECT network, sender, recipient, first_seen, last_seen, passed \
                   FROM greylist ORDER BY network, sender, recipient";
        let rows: Vec<(String, String, String, i64, i64, bool)> =
            on_pool!(&self.pool, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(
                |(network, sender, recipient, first_seen_ms, last_seen_ms, passed)| GreylistEntry {
                    network,
                    sender,
                    recipient,
                    first_seen_ms,
                    last_seen_ms,
                    passed,
                },
            )
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triplets_are_normalized() {
        let net: Network = "192.0.2.0/24".parse().unwrap();
        let t = Triplet::new(net, "Bob@Remote.EXAMPLE", "alice@example.org");
        assert_eq!(t.network, "192.0.2.0/24");
        assert_eq!(t.sender, "bob@remote.example");
        assert_eq!(t.sender_domain, "remote.example");
        assert_eq!(t.recipient, "alice@example.org");
        let null = Triplet::new(net, "", "alice@example.org");
        assert_eq!(
            (null.sender.as_str(), null.sender_domain.as_str()),
            ("", "")
        );
        let long = Triplet::new(net, &format!("{}@x", "é".repeat(400)), "a@b");
        assert_eq!(long.sender.chars().count(), MAX_ADDRESS_CHARS);
    }
}
