//! The SQL directory: domains, mailboxes, aliases and sink rules (and
//! greylisting's triplets), on SQLite, PostgreSQL or MySQL/MariaDB.
//!
//! sqlx's compile-time macros cannot serve three backends, so queries are
//! runtime strings written once with `?` placeholders; [`Directory::sql`]
//! rewrites them to `$n` for PostgreSQL. Each backend keeps its native pool
//! (rather than sqlx's `Any` driver) so that types decode natively and the
//! hot recipient lookup pays no conversion.

mod admin;
mod dkim;
mod greylist;
pub mod pipe;
mod resolve;

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

pub use admin::{AliasRow, DomainRow, SinkRuleRow, UserRow};
pub use dkim::DkimKeyRow;
pub use greylist::{GreylistEntry, GreylistTimes, Greylisting, Triplet};
pub use resolve::{Mailbox, Pipe, Route};

use crate::address::AddressError;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");
static MYSQL_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/mysql");

/// Errors of the directory.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The URL's scheme is none of sqlite, postgres, mysql, mariadb.
    #[error(
        "database url {0:?}: unsupported scheme (use sqlite://, postgres://, mysql:// or mariadb://)"
    )]
    UnsupportedUrl(String),
    /// The database could not be reached or opened.
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    /// Applying migrations failed.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database has not been migrated to this version of letterbox.
    #[error("the database is not migrated ({0}); run `letterbox migrate`")]
    NotMigrated(String),
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    /// An address, domain or pattern is malformed.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    Exists(String),
    /// The operation would leave the directory inconsistent.
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T, E = DirectoryError> = std::result::Result<T, E>;

/// The backend and its pool.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// Runs `$body` with `$p` bound to the backend's native pool. The body is
/// compiled once per backend, so it may use any backend-generic sqlx API.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::directory::Pool::Sqlite($p) => $body,
            $crate::directory::Pool::Postgres($p) => $body,
            $crate::directory::Pool::MySql($p) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Which database system a directory lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

/// A handle on the directory: cheap to clone, shared by every session.
#[derive(Clone, Debug)]
pub struct Directory {
    pool: Pool,
    cache: resolve::Cache,
}

impl Directory {
    /// Opens a pool on `url`; a SQLite file is created if missing.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        cache_ttl: Duration,
    ) -> Result<Directory> {
        let connect_err = |source| DirectoryError::Connect {
            url: redact(url),
            source,
        };
        let acquire = Duration::from_secs(10);
        let pool = match backend_of(url)? {
            Backend::Sqlite => {
                let opts = SqliteConnectOptions::from_str(url)
                    .map_err(connect_err)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(acquire)
                    .connect_with(opts)
                    .await
                    .map_err(connect_err)?;
                Pool::Sqlite(pool)
            }
            Backend::Postgres => {
                let opts = PgConnectOptions::from_str(url).map_err(connect_err)?;
                probe(&opts).await.map_err(connect_err)?;
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(acquire)
                    .connect_with(opts)
                    .await
                    .map_err(connect_err)?;
                Pool::Postgres(pool)
            }
            Backend::MySql => {
                let url = url.replacen("mariadb://", "mysql://", 1);
                let opts = MySqlConnectOptions::from_str(&url).map_err(connect_err)?;
                probe(&opts).await.map_err(connect_err)?;
                let pool = MySqlPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(acquire)
                    .connect_with(opts)
                    .await
                    .map_err(connect_err)?;
                Pool::MySql(pool)
            }
        };
        Ok(Directory {
            pool,
            cache: resolve::Cache::new(cache_ttl),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
            Pool::MySql(_) => Backend::MySql,
        }
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend() {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::MySql => &MYSQL_MIGRATIONS,
        }
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<()> {
        let m = self.migrator();
        on_pool!(&self.pool, p => m.run(p).await)?;
        Ok(())
    }

    /// Fails unless every migration of this build has been applied.
    pub async fn check_migrated(&self) -> Result<()> {
        let applied: Vec<(i64,)> = on_pool!(&self.pool, p => {
            sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success = TRUE").fetch_all(p).await
        })
        .map_err(|e| DirectoryError::NotMigrated(format!("no migration table: {e}")))?;
        let missing: Vec<String> = self
            .migrator()
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .filter(|m| !applied.iter().any(|(v,)| *v == m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(DirectoryError::NotMigrated(format!(
                "pending: {}",
                missing.join(", ")
            )))
        }
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        on_pool!(&self.pool, p => p.close().await)
    }

    /// Rewrites `?` placeholders for the backend (`$1`, `$2`… on PostgreSQL).
    /// Our queries hold no `?` inside string literals.
    fn sql(&self, q: &'static str) -> SqlStr {
        if self.backend() != Backend::Postgres {
            return q.into_sql_str();
        }
        let mut out = String::with_capacity(q.len() + 8);
        let mut n = 0;
        for c in q.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        AssertSqlSafe(out).into_sql_str()
    }
}

/// Opens and closes one connection. A pool retries a refused or failing
/// connection until its acquire timeout and then reports only "pool timed
/// out", hiding the cause ("connection refused", a wrong password) from
/// `letterbox check` and every admin command; one direct attempt fails fast
/// and says why.
async fn probe<O>(opts: &O) -> Result<(), sqlx::Error>
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    use sqlx::Connection;
    opts.connect().await?.close().await
}

/// Which backend a URL names.
pub fn backend_of(url: &str) -> Result<Backend> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    match scheme {
        "sqlite" => Ok(Backend::Sqlite),
        "postgres" | "postgresql" => Ok(Backend::Postgres),
        "mysql" | "mariadb" => Ok(Backend::MySql),
        _ => Err(DirectoryError::UnsupportedUrl(redact(url))),
    }
}

/// A URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or(userinfo);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{masked}{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

/// Whether an error means a uniqueness constraint refused the row.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(backend_of("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(backend_of("postgres://u@h/db").unwrap(), Backend::Postgres);
        assert_eq!(backend_of("mariadb://root@h/db").unwrap(), Backend::MySql);
        assert!(backend_of("redis://h").is_err());
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://a.db"), "sqlite://a.db");
    }
}
