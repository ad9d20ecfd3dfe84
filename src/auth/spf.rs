//! SPF (RFC 7208) for one transaction: evaluated from MAIL FROM on, in a
//! task of its own, and kept in the transaction's [`SpfSlot`].
//!
//! The slot is how the result is shared. The auth check starts the lookup
//! at the mail stage through `Facts::spf` and does not wait for it unless
//! `auth.spf = "reject-fail"`; the session awaits it before the rcpt and
//! data stages to fill `Facts::spf_pass` for other checks (greylisting,
//! hooks); the auth check awaits it again at the data stage for DMARC and
//! Authentication-Results. Everyone awaits the same lookup, which runs
//! once. The slot lives in the transaction: when the transaction ends
//! (delivered, refused, RSET, closed) it is dropped and a lookup still
//! running is stopped.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{Parameters, SpfOutput, SpfResult};

use super::lookups::Lookups;
use crate::dns::Dns;

/// Whose SPF record was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The MAIL FROM address.
    MailFrom(String),
    /// The HELO name, for the null sender `<>` (RFC 7208 §2.4).
    Helo(String),
}

/// The SPF result of a transaction.
#[derive(Debug, Clone)]
pub struct SpfVerdict {
    /// The result, a temporary failure wherever a lookup failed for one.
    pub result: SpfResult,
    /// `mail-auth`'s own output, for DMARC.
    pub output: SpfOutput,
    pub identity: Identity,
    /// The domain whose record was evaluated, lowercase.
    pub domain: String,
}

/// The transaction's SPF lookup, once started: shared by the check that
/// starts it and the session that reads it into `Facts::spf_pass`.
#[derive(Default)]
pub struct SpfSlot {
    pending: Mutex<Option<Pending>>,
}

struct Pending {
    result: Shared<BoxFuture<'static, Arc<SpfVerdict>>>,
    task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for SpfSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self.pending.lock().unwrap().is_some();
        f.debug_struct("SpfSlot")
            .field("started", &started)
            .finish()
    }
}

impl Drop for SpfSlot {
    fn drop(&mut self) {
        if let Some(p) = self.pending.lock().unwrap().take() {
            p.task.abort();
        }
    }
}

impl SpfSlot {
    /// Starts evaluating SPF in the background; a second start is ignored.
    pub fn start(&self, dns: Dns, ip: IpAddr, helo: &str, sender: &str, hostname: &str) {
        let mut pending = self.pending.lock().unwrap();
        if pending.is_some() {
            return;
        }
        let (helo, sender, hostname) = (helo.to_string(), sender.to_string(), hostname.to_string());
        let task = tokio::spawn(async move { evaluate(&dns, ip, &helo, &sender, &hostname).await });
        let abort = task.abort_handle();
        let result = async move {
            Arc::new(task.await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the SPF lookup did not finish");
                SpfVerdict {
                    result: SpfResult::TempError,
                    output: SpfOutput::default(),
                    identity: Identity::MailFrom(String::new()),
                    domain: String::new(),
                }
            }))
        }
        .boxed()
        .shared();
        *pending = Some(Pending {
            result,
            task: abort,
        });
    }

    /// The result, waiting for the lookup if it is still running; None
    /// when SPF was never started for this transaction.
    pub async fn result(&self) -> Option<Arc<SpfVerdict>> {
        let result = self.pending.lock().unwrap().as_ref()?.result.clone();
        Some(result.await)
    }

    /// The domain whose SPF record passed, if one did.
    pub async fn passed(&self) -> Option<String> {
        let v = self.result().await?;
        (v.result == SpfResult::Pass).then(|| v.domain.clone())
    }
}

/// Evaluates SPF for a client at `ip` that said HELO `helo` and MAIL FROM
/// `sender` (empty: the null sender, whose HELO name is checked).
pub async fn evaluate(
    dns: &Dns,
    ip: IpAddr,
    helo: &str,
    sender: &str,
    hostname: &str,
) -> SpfVerdict {
    let ip = ip.to_canonical();
    let lookups = Lookups::default();
    let (identity, params) = if sender.is_empty() {
        (
            Identity::Helo(helo.to_string()),
            SpfParameters::verify_ehlo(ip, helo, hostname),
        )
    } else {
        (
            Identity::MailFrom(sender.to_string()),
            SpfParameters::verify_mail_from(ip, helo, hostname, sender),
        )
    };
    let params = Parameters::new(params)
        .with_txt_cache(&lookups)
        .with_mx_cache(&lookups)
        .with_ipv4_cache(&lookups)
        .with_ipv6_cache(&lookups);
    let output = dns.authenticator().verify_spf(params).await;
    let mut result = output.result();
    // RFC 7208 §4.4, §5: a lookup that failed other than NXDOMAIN is a
    // temperror, which mail-auth reads as "no record".
    if !matches!(result, SpfResult::Pass | SpfResult::TempError)
        && !lookups.failed().is_empty()
        && !lookups.temporary(dns).await.is_empty()
    {
        result = SpfResult::TempError;
    }
    SpfVerdict {
        result,
        domain: output.domain().to_ascii_lowercase(),
        output,
        identity,
    }
}

/// The RFC 8601 / RFC 7208 name of a result.
pub fn word(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}
