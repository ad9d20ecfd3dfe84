//! Throwaway databases on each backend.

use std::path::Path;

use sqlx::Connection;

/// The backends a test can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    fn env_var(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("LETTERBOX_TEST_POSTGRES"),
            Backend::MySql => Some("LETTERBOX_TEST_MYSQL"),
        }
    }

    /// The admin URL for this backend, or None (with a note on stderr) when
    /// its suite is switched off. Under CI a backend suite must run: a
    /// missing variable panics rather than let the suite pass by skipping.
    pub fn admin_url(self) -> Option<String> {
        let var = self.env_var()?;
        self.admin_url_from(
            std::env::var(var).ok().as_deref(),
            std::env::var("CI").ok().as_deref(),
        )
    }

    /// [`Backend::admin_url`] given the values of its variable and of `CI`.
    pub fn admin_url_from(self, value: Option<&str>, ci: Option<&str>) -> Option<String> {
        let var = self.env_var()?;
        match value {
            Some(url) if !url.is_empty() => Some(url.to_string()),
            _ if is_ci(ci) => panic!(
                "CI is set, so the {self:?} suite must run, not be skipped: \
                 set {var} to an admin URL (.ci/run does)"
            ),
            _ => {
                eprintln!("note: {self:?} suite left out: set {var} to an admin URL to run it");
                None
            }
        }
    }
}

/// Whether `CI` (its value given) says we run under CI: any non-empty
/// value but `false` or `0`, as CI services set `CI=true`.
pub fn is_ci(ci: Option<&str>) -> bool {
    match ci.map(str::trim) {
        None | Some("") | Some("0") => false,
        Some(v) => !v.eq_ignore_ascii_case("false"),
    }
}

/// A fresh, empty database; dropped (best effort) with the value.
pub struct TestDb {
    pub url: String,
    admin: Option<(Backend, String, String)>,
}

impl TestDb {
    /// A database on `backend`, or None when that suite is switched off.
    /// SQLite databases live in `dir`.
    pub async fn new(backend: Backend, dir: &Path) -> Option<TestDb> {
        if backend == Backend::Sqlite {
            return Some(TestDb {
                url: format!("sqlite://{}", dir.join("letterbox.db").display()),
                admin: None,
            });
        }
        let admin = backend.admin_url()?;
        let name = format!("lbtest_{:016x}", rand_u64());
        let base = admin.trim_end_matches('/');
        // admin URL is server-level, e.g. postgres://postgres@127.0.0.1:5432/postgres
        let server = match base.rfind('/') {
            Some(i) if i > base.find("://").map(|j| j + 2).unwrap_or(0) => &base[..i],
            _ => base,
        };
        let url = format!("{server}/{name}");
        match backend {
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL at {admin}: {e}"));
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            Backend::MySql => {
                let mut c = sqlx::MySqlConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("MySQL at {admin}: {e}"));
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            Backend::Sqlite => unreachable!(),
        }
        Some(TestDb {
            url,
            admin: Some((backend, admin, name)),
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((backend, admin, name)) = self.admin.take() else {
            return;
        };
        // Drop runs outside any runtime we could borrow; use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sql = match backend {
                    Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    _ => format!("DROP DATABASE IF EXISTS {name}"),
                };
                if backend == Backend::Postgres {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                            .execute(&mut c)
                            .await;
                    }
                } else if let Ok(mut c) = sqlx::MySqlConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut c)
                        .await;
                }
            })
        })
        .join();
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}
