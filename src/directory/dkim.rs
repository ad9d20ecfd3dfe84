//! DKIM signing keys in the directory (`dkim_keys`): added by
//! `letterbox dkim keygen`, listed, removed, and read when a submitted
//! message is signed. See `crate::dkim` for why they live here.

use serde::Serialize;

use super::{Directory, DirectoryError, Result, is_unique_violation, on_pool};
use crate::address;
use crate::dkim::{self, Algorithm, NewKey, SigningKey};

/// A key as `dkim list` shows it (never the private key).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DkimKeyRow {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    /// The record's `p=` value.
    pub public_key: String,
    /// When it was made, RFC 3339 in UTC.
    pub created: String,
    /// Whether it signs: the oldest key of its algorithm for its domain.
    pub signing: bool,
}

impl DkimKeyRow {
    /// The TXT record that publishes it.
    pub fn dns_record(&self) -> String {
        dkim::dns_record(
            &self.domain,
            &self.selector,
            self.algorithm,
            &self.public_key,
        )
    }
}

type Row = (String, String, String, String, i64);

fn algorithm(s: &str) -> Result<Algorithm> {
    s.parse()
        .map_err(|e: dkim::DkimError| DirectoryError::Conflict(e.to_string()))
}

impl Directory {
    /// Stores a new key for a served domain under `selector`.
    pub async fn dkim_add(&self, domain: &str, selector: &str, key: &NewKey) -> Result<DkimKeyRow> {
        let domain = address::domain_name(domain)?;
        let selector =
            dkim::selector(selector).map_err(|e| DirectoryError::Conflict(e.to_string()))?;
        self.require_domain(&domain).await?;
        let created = chrono::Utc::now().timestamp();
        let sql = self.sql(
            "INSERT INTO dkim_keys (domain, selector, algorithm, private_key, public_key, created) \
             VALUES (?, ?, ?, ?, ?, ?)",
        );
        let r = on_pool!(&self.pool, p => sqlx::query(sql)
            .bind(&domain).bind(&selector).bind(key.algorithm.name())
            .bind(&key.private_pem).bind(&key.public).bind(created)
            .execute(p).await.map(|r| r.rows_affected()));
        match r {
            Err(e) if is_unique_violation(&e) => Err(DirectoryError::Exists(format!(
                "DKIM key {selector} of {domain} exists already; choose another selector with --selector"
            ))),
            r => {
                r?;
                self.dkim_list(Some(&domain))
                    .await?
                    .into_iter()
                    .find(|k| k.selector == selector)
                    .ok_or_else(|| DirectoryError::NotFound("the new key vanished".into()))
            }
        }
    }

    /// Keys of one domain (which must be served) or of all, by domain,
    /// then oldest first.
    pub async fn dkim_list(&self, domain: Option<&str>) -> Result<Vec<DkimKeyRow>> {
        let rows: Vec<Row> = match domain {
            Some(d) => {
                let d = address::domain_name(d)?;
                self.require_domain(&d).await?;
                let sql = self.sql(
                    "SELECT domain, selector, algorithm, public_key, created FROM dkim_keys \
                     WHERE domain = ? ORDER BY domain, created, selector",
                );
                on_pool!(&self.pool, p => sqlx::query_as(sql).bind(&d).fetch_all(p).await)?
            }
            None => {
                let sql = "SELECT domain, selector, algorithm, public_key, created FROM dkim_keys \
                           ORDER BY domain, created, selector";
                on_pool!(&self.pool, p => sqlx::query_as(sql).fetch_all(p).await)?
            }
        };
        let mut out: Vec<DkimKeyRow> = Vec::with_capacity(rows.len());
        for (domain, selector, alg, public_key, created) in rows {
            let algorithm = algorithm(&alg)?;
            // Rows come oldest first within a domain: the first of an
            // algorithm signs.
            let signing = !out
                .iter()
                .any(|k| k.domain == domain && k.algorithm == algorithm);
            let created = chrono::DateTime::from_timestamp(created, 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default();
            out.push(DkimKeyRow {
                domain,
                selector,
                algorithm,
                public_key,
                created,
                signing,
            });
        }
        Ok(out)
    }

    /// Removes a key; returns it as it was listed.
    pub async fn dkim_remove(&self, domain: &str, selector: &str) -> Result<DkimKeyRow> {
        let domain = address::domain_name(domain)?;
        let selector =
            dkim::selector(selector).map_err(|e| DirectoryError::Conflict(e.to_string()))?;
        let row = self
            .dkim_list(Some(&domain))
            .await?
            .into_iter()
            .find(|k| k.selector == selector)
            .ok_or_else(|| {
                DirectoryError::NotFound(format!("DKIM key {selector} of {domain} does not exist"))
            })?;
        let sql = self.sql("DELETE FROM dkim_keys WHERE domain = ? AND selector = ?");
        on_pool!(&self.pool, p => sqlx::query(sql).bind(&domain).bind(&selector).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(row)
    }

    /// The keys that sign mail from `domain` (normalized): the oldest of
    /// each algorithm, RSA first. Read for every signed message, never
    /// cached, so a removed key stops signing at once.
    pub async fn dkim_signing_keys(&self, domain: &str) -> Result<Vec<SigningKey>> {
        let sql = self.sql(
            "SELECT selector, algorithm, private_key FROM dkim_keys \
             WHERE domain = ? ORDER BY created, selector",
        );
        let rows: Vec<(String, String, String)> =
            on_pool!(&self.pool, p => sqlx::query_as(sql).bind(domain).fetch_all(p).await)?;
        let mut keys: Vec<SigningKey> = Vec::new();
        for (selector, alg, private_pem) in rows {
            let algorithm = algorithm(&alg)?;
            if keys.iter().all(|k| k.algorithm != algorithm) {
                keys.push(SigningKey {
                    domain: domain.to_string(),
                    selector,
                    algorithm,
                    private_pem,
                });
            }
        }
        keys.sort_by_key(|k| k.algorithm != Algorithm::Rsa);
        Ok(keys)
    }
}
