//! The rcpt stage's fixed step: every recipient is resolved in the
//! directory before it is accepted, so nothing is accepted that would later
//! bounce (no backscatter) and nothing foreign is accepted (never a relay).
//! The storage rules that can already be known here (a full mailbox, a
//! full sink) are checked here too, not in the protocol code.

use std::sync::Arc;

use super::Pipeline;
use crate::address::{Address, AddressError};
use crate::directory::Route;
use crate::envelope::Recipient;
use crate::reply::Reply;

/// Why a recipient is refused; `crate::reply` spells the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not an address: the null path `<>`, or bad syntax (501 5.1.3).
    Syntax,
    /// A domain we do not serve (550 5.7.1, never a relay).
    NotServed,
    /// A served domain without this recipient (550 5.1.1).
    UnknownUser,
    /// A mailbox already at its quota (452 4.2.2).
    MailboxFull,
    /// The sink has no room now (452 4.3.1).
    SinkFull,
    /// The directory did not answer (451 4.3.0, never an accept).
    DirectoryUnavailable,
    /// A local failure, such as the quota file unreadable (451 4.3.0).
    Local,
    /// A remote domain with a null MX (RFC 7505), relayed to on
    /// submission (556 5.1.10).
    NullMx,
    /// An address in our SRS domain whose hash or age does not check out
    /// (550 5.1.1): forged, or older than `srs.max_age`.
    InvalidSrs,
    /// A check refused with this reply.
    Check(Reply),
}

impl Pipeline {
    /// Resolves the forward-path of a RCPT command (as parsed, without the
    /// angle brackets) into a recipient and where its mail goes.
    pub async fn recipient(&self, to: &str) -> Result<Recipient, Refusal> {
        let rt = &self.runtime;
        // RFC 5321 §4.1.1.3: the forward-path is never null; `<>` is only
        // a reverse-path.
        if to.is_empty() {
            return Err(Refusal::Syntax);
        }
        // RFC 5321 §4.5.1: <Postmaster> without a domain must be accepted;
        // it means the postmaster of our own host name.
        let to = if to.eq_ignore_ascii_case("postmaster") {
            format!("postmaster@{}", rt.hostname)
        } else {
            to.to_string()
        };
        let addr = match Address::from_smtp(&to) {
            Ok(a) => a,
            // A domain we cannot even parse (an IP literal, say) is not ours.
            Err(AddressError::BadDomain(_) | AddressError::DomainTooLong(_)) => {
                return Err(Refusal::NotServed);
            }
            Err(_) => return Err(Refusal::Syntax),
        };
        // A quoted local part holding `@` is an old relay trick; no mailbox
        // here has one. Nor does any start with `|`, which marks a pipe
        // command among alias destinations: a client can never name one,
        // not even through the catch-all.
        if addr.local.contains('@') || addr.local.starts_with('|') {
            return Err(Refusal::UnknownUser);
        }
        if let Some(srs) = &rt.srs
            && addr.domain == srs.domain()
            && crate::srs::is_srs(&addr.local)
        {
            return self.srs_recipient(srs, &to, addr).await;
        }
        self.resolved(addr).await
    }

    /// A recipient in our SRS domain (a bounce of mail we forwarded): it
    /// goes back to the address it stands for, if its hash and age check
    /// out. Any sender is accepted, as postsrsd does: the hash already
    /// limits these addresses to senders we forwarded for.
    async fn srs_recipient(
        &self,
        srs: &crate::srs::Srs,
        to: &str,
        addr: Address,
    ) -> Result<Recipient, Refusal> {
        // The local part as given: the original's keeps its case.
        let local = to.rsplit_once('@').map_or(to, |(l, _)| l);
        let original = srs.reverse(local, crate::srs::now()).map_err(|e| {
            tracing::info!(rcpt = %addr, error = %e, "SRS address refused");
            Refusal::InvalidSrs
        })?;
        let parsed = Address::from_smtp(&original).map_err(|_| Refusal::InvalidSrs)?;
        let address = addr.to_string();
        let route = match self.resolved(parsed.clone()).await {
            // Ours after all (a sender we served when it was forwarded).
            Ok(r) => r.route,
            // As relay_recipient: the local part as given, the domain
            // normalized.
            Err(Refusal::NotServed) => {
                let local = original.rsplit_once('@').map_or("", |(l, _)| l);
                Arc::new(Route::Remote {
                    address: format!("{local}@{}", parsed.domain),
                })
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(rcpt = %address, original = %original, "SRS address reversed");
        Ok(Recipient { address, route })
    }

    /// Resolves a parsed recipient in the directory and checks what can be
    /// known now about storing its copy.
    async fn resolved(&self, addr: Address) -> Result<Recipient, Refusal> {
        let rt = &self.runtime;
        let route = rt
            .directory
            .resolve(&addr, rt.delimiter, &rt.static_rules)
            .await
            .map_err(|e| {
                tracing::error!(rcpt = %addr, error = %e, "directory lookup failed");
                Refusal::DirectoryUnavailable
            })?;
        let address = addr.to_string();
        match &*route {
            Route::NotServed => return Err(Refusal::NotServed),
            Route::UnknownUser => return Err(Refusal::UnknownUser),
            Route::Mailboxes(_) | Route::WithPipes { .. } => {
                for m in route.mailboxes() {
                    match rt.maildirs.is_over_quota(m).await {
                        Ok(false) => {}
                        Ok(true) => return Err(Refusal::MailboxFull),
                        Err(e) => {
                            tracing::error!(mailbox = %m.address, error = %e, "quota check failed");
                            return Err(Refusal::Local);
                        }
                    }
                }
            }
            Route::Sink { .. } => {
                if !rt.sink.has_room(&address) {
                    return Err(Refusal::SinkFull);
                }
            }
            // An alias that forwards: the queue takes it.
            Route::Remote { .. } => {}
        }
        Ok(Recipient {
            address,
            route: Arc::clone(&route),
        })
    }
}
