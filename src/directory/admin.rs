//! Changes to the directory made by the admin CLI. Every input is
//! normalized and validated here, so no caller can store a name that would
//! later build an unsafe maildir path.

use serde::Serialize;

use super::{Directory, DirectoryError, Result, is_unique_violation, on_pool, pipe};
use crate::address::{self, Address};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DomainRow {
    pub name: String,
    pub active: bool,
    pub users: i64,
    pub aliases: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserRow {
    pub address: String,
    pub active: bool,
    /// Bytes; 0 = unlimited.
    pub quota: i64,
    /// No password: the mailbox receives mail but nobody can log in.
    pub receive_only: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AliasRow {
    pub source: String,
    pub destinations: Vec<String>,
    pub active: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SinkRuleRow {
    pub pattern: String,
    pub ttl_seconds: i64,
    pub active: bool,
}

impl Directory {
    // ---- domains ----

    pub async fn domain_add(&self, name: &str) -> Result<String> {
        let name = address::domain_name(name)?;
        let sql = self.sql("INSERT INTO domains (name) VALUES (?)");
        let r = on_pool!(&self.pool, p => sqlx::query(sql).bind(&name).execute(p).await.map(|r| r.rows_affected()));
        match r {
            Err(e) if is_unique_violation(&e) => Err(DirectoryError::Exists(format!(
                "domain {name} exists already"
            ))),
            r => Ok(r.map(|_| name)?),
        }
    }

    pub async fn domain_list(&self) -> Result<Vec<DomainRow>> {
        let sql = "SELECT d.name, d.active, \
                   (SELECT COUNT(*) FROM users u WHERE u.domain = d.name), \
                   (SELECT COUNT(DISTINCT a.source) FROM aliases a WHERE a.domain = d.name) \
                   FROM domains d ORDER BY d.name";
        let rows: Vec<(String, bool, i64, i64)> =
            on_pool!(&self.pool, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(name, active, users, aliases)| DomainRow {
                name,
                active,
                users,
                aliases,
            })
            .collect())
    }

    /// Removes a domain. With users or aliases it refuses unless `force`,
    /// which removes them too (their mail stays on disk).
    pub async fn domain_remove(&self, name: &str, force: bool) -> Result<DomainRow> {
        let name = address::domain_name(name)?;
        let row = self
            .domain_list()
            .await?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| DirectoryError::NotFound(format!("domain {name} does not exist")))?;
        if !force && (row.users > 0 || row.aliases > 0) {
            return Err(DirectoryError::Conflict(format!(
                "domain {name} still has {} user(s) and {} alias(es); remove them first or pass --force",
                row.users, row.aliases
            )));
        }
        // Deleted explicitly rather than by ON DELETE CASCADE, which SQLite
        // only honours with foreign keys switched on.
        // Alias destinations in other domains that pointed at its mailboxes
        // go too, as `user remove` does: left behind, they would silently
        // reach whoever reuses the name later. Domain names hold no LIKE
        // wildcards (`%`, `_`), so the pattern matches literally. A pipe
        // command that happens to end in the domain points at no mailbox.
        let stmts = [
            ("DELETE FROM aliases WHERE domain = ?", name.clone()),
            (
                "DELETE FROM aliases WHERE destination LIKE ? AND destination NOT LIKE '|%'",
                format!("%@{name}"),
            ),
            ("DELETE FROM users WHERE domain = ?", name.clone()),
            // Its DKIM keys sign for nothing without it.
            ("DELETE FROM dkim_keys WHERE domain = ?", name.clone()),
            ("DELETE FROM domains WHERE name = ?", name.clone()),
        ];
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            for (s, value) in &stmts {
                sqlx::query(self.sql(s)).bind(value).execute(&mut *tx).await?;
            }
            tx.commit().await
        })?;
        self.cache.clear();
        Ok(row)
    }

    pub async fn domain_set_active(&self, name: &str, active: bool) -> Result<String> {
        let name = address::domain_name(name)?;
        let sql = self
            .sql("UPDATE domains SET active = ?, updated_at = CURRENT_TIMESTAMP WHERE name = ?");
        let n = on_pool!(&self.pool, p => sqlx::query(sql).bind(active).bind(&name).execute(p).await?.rows_affected());
        if n == 0 {
            return Err(DirectoryError::NotFound(format!(
                "domain {name} does not exist"
            )));
        }
        self.cache.clear();
        Ok(name)
    }

    pub(super) async fn require_domain(&self, name: &str) -> Result<()> {
        let sql = self.sql("SELECT COUNT(*) FROM domains WHERE name = ?");
        let (n,): (i64,) =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(name).fetch_one(p).await)?;
        if n == 0 {
            return Err(DirectoryError::NotFound(format!(
                "domain {name} is not served; add it first with `letterbox domain add {name}`"
            )));
        }
        Ok(())
    }

    // ---- users ----

    /// Adds a mailbox; `password_hash` is None for a receive-only one.
    pub async fn user_add(
        &self,
        addr: &str,
        delimiter: Option<char>,
        password_hash: Option<&str>,
        quota: u64,
    ) -> Result<Address> {
        let addr = Address::parse(addr, delimiter)?;
        self.require_domain(&addr.domain).await?;
        // A mailbox may have alias rows of its own; it is still a mailbox.
        if self.user_exists(&addr).await? {
            return Err(DirectoryError::Exists(format!(
                "user {addr} exists already"
            )));
        }
        if self.alias_exists(&addr.to_string()).await? {
            return Err(DirectoryError::Conflict(format!(
                "{addr} is an alias; remove the alias first"
            )));
        }
        let sql =
            self.sql("INSERT INTO users (domain, local_part, password, quota) VALUES (?, ?, ?, ?)");
        let quota = i64::try_from(quota)
            .map_err(|_| DirectoryError::Conflict("quota is too large".into()))?;
        let r = on_pool!(&self.pool, p => {
            sqlx::query(sql).bind(&addr.domain).bind(&addr.local).bind(password_hash).bind(quota).execute(p).await.map(|r| r.rows_affected())
        });
        match r {
            Err(e) if is_unique_violation(&e) => Err(DirectoryError::Exists(format!(
                "user {addr} exists already"
            ))),
            r => {
                r?;
                self.cache.clear();
                Ok(addr)
            }
        }
    }

    pub async fn user_list(&self, domain: Option<&str>) -> Result<Vec<UserRow>> {
        let domain = domain.map(address::domain_name).transpose()?;
        let rows: Vec<(String, String, bool, i64, bool)> = match &domain {
            Some(d) => {
                self.require_domain(d).await?;
                let sql = self.sql("SELECT local_part, domain, active, quota, password IS NULL FROM users WHERE domain = ? ORDER BY domain, local_part");
                on_pool!(&self.pool, p => sqlx::query_as(sql).bind(d).fetch_all(p).await)?
            }
            None => {
                let sql = "SELECT local_part, domain, active, quota, password IS NULL FROM users ORDER BY domain, local_part";
                on_pool!(&self.pool, p => sqlx::query_as(sql).fetch_all(p).await)?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(local, domain, active, quota, receive_only)| UserRow {
                address: format!("{local}@{domain}"),
                active,
                quota,
                receive_only,
            })
            .collect())
    }

    /// Removes a mailbox, every alias destination pointing at it, and its
    /// own alias rows (a pipe or a forward beside its maildir), which would
    /// otherwise go on receiving its mail. Returns how many destinations
    /// elsewhere pointed at it and how many its own alias had.
    pub async fn user_remove(
        &self,
        addr: &str,
        delimiter: Option<char>,
    ) -> Result<(Address, u64, u64)> {
        let addr = Address::parse(addr, delimiter)?;
        let full = addr.to_string();
        let del_user = self.sql("DELETE FROM users WHERE domain = ? AND local_part = ?");
        let del_alias = self.sql("DELETE FROM aliases WHERE destination = ? AND source <> ?");
        let del_own = self.sql("DELETE FROM aliases WHERE source = ?");
        let (users, aliases, own) = on_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let users = sqlx::query(del_user).bind(&addr.domain).bind(&addr.local).execute(&mut *tx).await?.rows_affected();
            let aliases = sqlx::query(del_alias).bind(&full).bind(&full).execute(&mut *tx).await?.rows_affected();
            let own = sqlx::query(del_own).bind(&full).execute(&mut *tx).await?.rows_affected();
            if users > 0 { tx.commit().await?; }
            Ok::<_, sqlx::Error>((users, aliases, own))
        })?;
        if users == 0 {
            return Err(DirectoryError::NotFound(format!(
                "user {addr} does not exist"
            )));
        }
        self.cache.clear();
        Ok((addr, aliases, own))
    }

    async fn user_update<T>(
        &self,
        addr: &str,
        delimiter: Option<char>,
        set: &'static str,
        value: T,
    ) -> Result<Address>
    where
        T: Clone + Send + Sync,
        for<'q> T: sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
        for<'q> T: sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
        for<'q> T: sqlx::Encode<'q, sqlx::MySql> + sqlx::Type<sqlx::MySql>,
    {
        let addr = Address::parse(addr, delimiter)?;
        let sql = self.sql(set);
        let n = on_pool!(&self.pool, p => {
            sqlx::query(sql).bind(value.clone()).bind(&addr.domain).bind(&addr.local).execute(p).await?.rows_affected()
        });
        if n == 0 {
            return Err(DirectoryError::NotFound(format!(
                "user {addr} does not exist"
            )));
        }
        self.cache.clear();
        Ok(addr)
    }

    pub async fn user_set_password(
        &self,
        addr: &str,
        delimiter: Option<char>,
        hash: &str,
    ) -> Result<Address> {
        let set = "UPDATE users SET password = ?, updated_at = CURRENT_TIMESTAMP WHERE domain = ? AND local_part = ?";
        self.user_update(addr, delimiter, set, hash.to_string())
            .await
    }

    pub async fn user_set_active(
        &self,
        addr: &str,
        delimiter: Option<char>,
        active: bool,
    ) -> Result<Address> {
        let set = "UPDATE users SET active = ?, updated_at = CURRENT_TIMESTAMP WHERE domain = ? AND local_part = ?";
        self.user_update(addr, delimiter, set, active).await
    }

    pub async fn user_set_quota(
        &self,
        addr: &str,
        delimiter: Option<char>,
        quota: u64,
    ) -> Result<Address> {
        let quota = i64::try_from(quota)
            .map_err(|_| DirectoryError::Conflict("quota is too large".into()))?;
        let set = "UPDATE users SET quota = ?, updated_at = CURRENT_TIMESTAMP WHERE domain = ? AND local_part = ?";
        self.user_update(addr, delimiter, set, quota).await
    }

    /// The stored password hash of an active user, for authentication.
    pub async fn user_password(&self, addr: &Address) -> Result<Option<String>> {
        let sql = self.sql("SELECT password FROM dovecot_passdb WHERE username = ?");
        let row: Option<(Option<String>,)> = on_pool!(&self.pool, p => sqlx::query_as(sql).bind(addr.to_string()).fetch_optional(p).await)?;
        Ok(row.and_then(|(p,)| p))
    }

    async fn user_exists(&self, addr: &Address) -> Result<bool> {
        let sql = self.sql("SELECT COUNT(*) FROM users WHERE domain = ? AND local_part = ?");
        let (n,): (i64,) = on_pool!(&self.pool, p => sqlx::query_as(sql).bind(&addr.domain).bind(&addr.local).fetch_one(p).await)?;
        Ok(n > 0)
    }

    // ---- aliases ----

    /// Whether the alias already forwards to another server.
    async fn alias_forwards(&self, source: &str) -> Result<bool> {
        let sql = self.sql("SELECT destination FROM aliases WHERE source = ?");
        let dests: Vec<(String,)> =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(source).fetch_all(p).await)?;
        for (d,) in dests {
            if let Some((_, domain)) = d.rsplit_once('@')
                && !self.domain_exists(domain).await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn alias_exists(&self, source: &str) -> Result<bool> {
        Ok(self.destinations_of(source).await? > 0)
    }

    /// Normalizes an alias source: `local@domain`, or `@domain` for the
    /// domain's catch-all. Returns (source, domain).
    fn alias_source(source: &str, delimiter: Option<char>) -> Result<(String, String)> {
        match source.strip_prefix('@') {
            Some(domain) => {
                let domain = address::domain_name(domain)?;
                Ok((format!("@{domain}"), domain))
            }
            None => {
                let a = Address::parse(source, delimiter)?;
                Ok((a.to_string(), a.domain))
            }
        }
    }

    /// Adds destinations to an alias. Each destination must be a local
    /// mailbox, another alias or a pipe command (`|/path/to/program args`,
    /// see `pipe.rs`), or an address in a domain this server does not have
    /// (forwarded there through the outbound queue); an alias that forwards
    /// has that one destination only. Loops are caught when mail is
    /// resolved.
    ///
    /// The source may be a mailbox only if the alias keeps the mailbox
    /// itself among its destinations: then its rows add a pipe or a forward
    /// beside its maildir, and never take the maildir away.
    pub async fn alias_add(
        &self,
        source: &str,
        destinations: &[String],
        delimiter: Option<char>,
    ) -> Result<(String, Vec<String>)> {
        let (source, domain) = Self::alias_source(source, delimiter)?;
        self.require_domain(&domain).await?;
        let mailbox = !source.starts_with('@')
            && self
                .user_exists(&Address::parse(&source, delimiter)?)
                .await?;
        if mailbox {
            // Checked first, as it always was: a mailbox's alias that leaves
            // its maildir out would shadow it.
            let names_itself = destinations.iter().any(|d| {
                !pipe::is_pipe(d)
                    && Address::parse(d, delimiter).is_ok_and(|a| a.to_string() == source)
            });
            if !names_itself && !self.keeps_itself(&source).await? {
                return Err(DirectoryError::Conflict(format!(
                    "{source} is a mailbox; an alias cannot shadow it"
                )));
            }
        }
        if destinations.is_empty() {
            return Err(DirectoryError::Conflict(
                "an alias needs at least one destination".into(),
            ));
        }
        let mut dests = Vec::new();
        let mut forwards = false;
        for d in destinations {
            let foreign = match d.rsplit_once('@') {
                Some((_, dom)) if !pipe::is_pipe(d) => {
                    !self.domain_exists(&address::domain_name(dom)?).await?
                }
                _ => false,
            };
            let full = if pipe::is_pipe(d) {
                pipe::normalize(d)?
            } else if foreign {
                // Its local part is the other server's business: any that
                // SMTP can carry.
                forwards = true;
                Address::from_smtp(d)?.to_string()
            } else {
                let a = Address::parse(d, delimiter)?;
                let full = a.to_string();
                if full == source {
                    // A mailbox's own address among its rows is its maildir.
                    if !mailbox {
                        return Err(DirectoryError::Conflict(format!(
                            "alias {source} cannot point to itself"
                        )));
                    }
                } else if !self.user_exists(&a).await? && !self.alias_exists(&full).await? {
                    return Err(DirectoryError::NotFound(format!(
                        "destination {full} is neither a mailbox nor an alias here; a destination in a domain served here must exist"
                    )));
                }
                full
            };
            if !dests.contains(&full) {
                dests.push(full);
            }
        }
        if forwards || self.alias_forwards(&source).await? {
            let existing = self.alias_exists(&source).await?;
            if dests.len() > 1 || existing {
                return Err(DirectoryError::Conflict(format!(
                    "an alias that forwards to another server has that one destination only; \
                     {source} cannot have more (use one alias per destination)"
                )));
            }
        }
        let sql = self.sql("INSERT INTO aliases (domain, source, destination) VALUES (?, ?, ?)");
        // The async block keeps `?` inside it: a duplicate must reach the
        // match below as a sqlx error, not leave this function as a bare
        // query error (and the dropped transaction rolls back).
        let r = on_pool!(&self.pool, p => async {
            let mut tx = p.begin().await?;
            for d in &dests {
                sqlx::query(sql.clone()).bind(&domain).bind(&source).bind(d).execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await);
        match r {
            Err(e) if is_unique_violation(&e) => Err(DirectoryError::Exists(format!(
                "alias {source} already has one of those destinations"
            ))),
            r => {
                r?;
                self.cache.clear();
                Ok((source, dests))
            }
        }
    }

    /// Whether the mailbox `source` already has its own address among its
    /// alias rows.
    async fn keeps_itself(&self, source: &str) -> Result<bool> {
        let sql = self.sql("SELECT COUNT(*) FROM aliases WHERE source = ? AND destination = ?");
        let (n,): (i64,) = on_pool!(&self.pool, p => sqlx::query_as(sql).bind(source).bind(source).fetch_one(p).await)?;
        Ok(n > 0)
    }

    pub async fn alias_list(&self, domain: Option<&str>) -> Result<Vec<AliasRow>> {
        let domain = domain.map(address::domain_name).transpose()?;
        let rows: Vec<(String, String, bool)> = match &domain {
            Some(d) => {
                self.require_domain(d).await?;
                let sql = self.sql("SELECT source, destination, active FROM aliases WHERE domain = ? ORDER BY source, destination");
                on_pool!(&self.pool, p => sqlx::query_as(sql).bind(d).fetch_all(p).await)?
            }
            None => {
                let sql =
                    "SELECT source, destination, active FROM aliases ORDER BY source, destination";
                on_pool!(&self.pool, p => sqlx::query_as(sql).fetch_all(p).await)?
            }
        };
        let mut out: Vec<AliasRow> = Vec::new();
        for (source, dest, active) in rows {
            match out.last_mut() {
                Some(last) if last.source == source => {
                    last.destinations.push(dest);
                    last.active &= active;
                }
                _ => out.push(AliasRow {
                    source,
                    destinations: vec![dest],
                    active,
                }),
            }
        }
        Ok(out)
    }

    /// Removes an alias, or only one of its destinations. A mailbox's own
    /// address leaves its alias only with the whole alias: alone, the rest
    /// would shadow its maildir.
    pub async fn alias_remove(
        &self,
        source: &str,
        destination: Option<&str>,
        delimiter: Option<char>,
    ) -> Result<String> {
        let (source, _) = Self::alias_source(source, delimiter)?;
        let n = match destination {
            Some(d) => {
                let d = if pipe::is_pipe(d) {
                    pipe::normalize(d)?
                } else {
                    Address::parse(d, delimiter)?.to_string()
                };
                if d == source && self.destinations_of(&source).await? > 1 {
                    return Err(DirectoryError::Conflict(format!(
                        "{source} is a mailbox; without its own address its alias would shadow it: remove the whole alias (`letterbox alias remove {source}`) or its other destinations"
                    )));
                }
                let sql = self.sql("DELETE FROM aliases WHERE source = ? AND destination = ?");
                on_pool!(&self.pool, p => sqlx::query(sql).bind(&source).bind(&d).execute(p).await?.rows_affected())
            }
            None => {
                let sql = self.sql("DELETE FROM aliases WHERE source = ?");
                on_pool!(&self.pool, p => sqlx::query(sql).bind(&source).execute(p).await?.rows_affected())
            }
        };
        if n == 0 {
            return Err(DirectoryError::NotFound(format!(
                "alias {source} does not exist"
            )));
        }
        self.cache.clear();
        Ok(source)
    }

    /// How many destinations an alias has.
    async fn destinations_of(&self, source: &str) -> Result<i64> {
        let sql = self.sql("SELECT COUNT(*) FROM aliases WHERE source = ?");
        let (n,): (i64,) =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(source).fetch_one(p).await)?;
        Ok(n)
    }

    // ---- sink rules ----

    pub async fn sink_add(&self, pattern: &str, ttl_seconds: u64) -> Result<String> {
        let pattern = address::sink_pattern(pattern)?;
        if ttl_seconds == 0 {
            return Err(DirectoryError::Conflict(
                "a sink rule's TTL must be at least 1s".into(),
            ));
        }
        let ttl = i64::try_from(ttl_seconds)
            .map_err(|_| DirectoryError::Conflict("TTL is too large".into()))?;
        let sql = self.sql("INSERT INTO sink_rules (pattern, ttl_seconds) VALUES (?, ?)");
        let r = on_pool!(&self.pool, p => sqlx::query(sql).bind(&pattern).bind(ttl).execute(p).await.map(|r| r.rows_affected()));
        match r {
            Err(e) if is_unique_violation(&e) => Err(DirectoryError::Exists(format!(
                "sink rule {pattern} exists already"
            ))),
            r => {
                r?;
                self.cache.clear();
                Ok(pattern)
            }
        }
    }

    pub async fn sink_list(&self) -> Result<Vec<SinkRuleRow>> {
        let sql = "SELECT pattern, ttl_seconds, active FROM sink_rules ORDER BY pattern";
        let rows: Vec<(String, i64, bool)> =
            on_pool!(&self.pool, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(pattern, ttl_seconds, active)| SinkRuleRow {
                pattern,
                ttl_seconds,
                active,
            })
            .collect())
    }

    pub async fn sink_remove(&self, pattern: &str) -> Result<String> {
        let pattern = address::sink_pattern(pattern)?;
        let sql = self.sql("DELETE FROM sink_rules WHERE pattern = ?");
        let n = on_pool!(&self.pool, p => sqlx::query(sql).bind(&pattern).execute(p).await?.rows_affected());
        if n == 0 {
            return Err(DirectoryError::NotFound(format!(
                "sink rule {pattern} does not exist"
            )));
        }
        self.cache.clear();
        Ok(pattern)
    }
}
