//! The pipeline's steps for mail from an authenticated client on a
//! submission port (RFC 6409): who may send as which address, where a
//! recipient in a domain we do not serve goes (the outbound queue), and the
//! last step of the data stage, after every check and edit: the From:
//! header checked against the user, and the DKIM signatures.
//!
//! Sender policy, as documented in the README:
//! - MAIL FROM must be the user's own address, a `+tag` subaddress of it,
//!   or an alias that leads to the user (directly or through other
//!   aliases). A domain's catch-all does not count: it catches names
//!   nobody holds and makes no one their owner. The null sender `<>` is
//!   allowed (read receipts, vacation replies): it impersonates no one.
//! - Every address in the From: header (the one people see, and the one
//!   DKIM and DMARC are about) must pass the same test. A message without
//!   a From: field is sent as it is, unsigned.

use std::sync::Arc;

use mail_parser::{HeaderName, HeaderValue, MessageParser};

use super::{Pipeline, Refusal};
use crate::address::{self, Address};
use crate::directory::Route;
use crate::envelope::Recipient;
use crate::spool::Spool;

/// Why the last step refused a submitted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// A From: address the user does not own (550 5.7.1).
    FromNotOwned,
    /// The directory, the spool or a signing key failed (451 4.3.0).
    Local,
}

impl Pipeline {
    /// Resolves a RCPT of an authenticated client: local recipients as at
    /// the MX, and a domain we do not serve becomes [`Route::Remote`] for
    /// the outbound queue. The local part of a remote address is kept as
    /// given (RFC 5321 §2.4: only its own host may interpret it).
    pub async fn relay_recipient(&self, to: &str) -> Result<Recipient, Refusal> {
        match self.recipient(to).await {
            Err(Refusal::NotServed) => {}
            resolved => return resolved,
        }
        // An address literal or a malformed domain is still refused.
        let addr = Address::from_smtp(to).map_err(|_| Refusal::NotServed)?;
        let local = to.rsplit_once('@').map_or("", |(l, _)| l);
        // RFC 7505 §4.2: a domain that publishes a null MX takes no mail;
        // say so now rather than bounce later. No answer (no MX, a DNS
        // failure) leaves it to the queue, which falls back or retries.
        let fqdn = format!("{}.", addr.domain);
        if let Ok(mx) = self.runtime.resolver().mx_lookup(fqdn).await {
            let records: Vec<(u16, String)> = mx
                .iter()
                .map(|r| (r.preference(), r.exchange().to_utf8()))
                .collect();
            if is_null_mx(&records) {
                return Err(Refusal::NullMx);
            }
        }
        let address = format!("{local}@{}", addr.domain);
        Ok(Recipient {
            address: address.clone(),
            route: Arc::new(Route::Remote { address }),
        })
    }

    /// Whether `user` (an authenticated, canonical address) may send as
    /// `address` (as a client wrote it). Errors are the directory's.
    pub async fn may_send_as(
        &self,
        user: &str,
        address: &str,
    ) -> Result<bool, crate::directory::DirectoryError> {
        if address.is_empty() {
            return Ok(true);
        }
        let Ok(addr) = Address::from_smtp(address) else {
            return Ok(false);
        };
        let rt = &self.runtime;
        if addr.without_subaddress(rt.delimiter).0.to_string() == user {
            return Ok(true);
        }
        let owners = rt.directory.owners(&addr, rt.delimiter).await?;
        Ok(owners.iter().any(|o| o.to_string() == user))
    }

    /// The last step of the data stage for an authenticated user's message
    /// (`spool`: the final content, after every check and edit): checks the
    /// From: header against `user` and signs with the DKIM keys of its
    /// domain. Returns the spool and the DKIM-Signature fields (maybe
    /// none) to put above the message. Reading and signing run on the
    /// blocking pool; the whole message is held in memory while it is
    /// signed (at most `smtp.max_message_size`).
    pub async fn seal(&self, spool: Spool, user: &str) -> Result<(Spool, String), SealError> {
        let read = crate::blocking::run("reading a submitted message", move || {
            let mut content = Vec::with_capacity(spool.len() as usize);
            let r = std::io::Read::read_to_end(&mut spool.reader(), &mut content);
            let from = r.as_ref().ok().map(|_| from_addresses(&content));
            (spool, content, r.err(), from)
        })
        .await;
        let (spool, content, from) = match read {
            Ok((spool, content, None, Some(from))) => (spool, content, from),
            Ok((_, _, e, _)) => {
                tracing::error!(error = ?e, "reading a submitted message failed");
                return Err(SealError::Local);
            }
            Err(e) => {
                tracing::error!(error = %e, "reading a submitted message failed");
                return Err(SealError::Local);
            }
        };
        let Some(from) = from else {
            // No From: field: nothing to impersonate, nothing to sign for.
            return Ok((spool, String::new()));
        };
        for a in &from {
            match self.may_send_as(user, a).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(%user, from = %a, "From: address not owned by the user");
                    return Err(SealError::FromNotOwned);
                }
                Err(e) => {
                    tracing::error!(error = %e, "directory lookup for the From: address failed");
                    return Err(SealError::Local);
                }
            }
        }
        // The first author's domain signs (a From: with several is rare,
        // and they are all the user's anyway).
        let Some(domain) = from
            .first()
            .and_then(|a| a.rsplit_once('@'))
            .and_then(|(_, d)| address::domain_name(d).ok())
        else {
            return Ok((spool, String::new()));
        };
        let keys = match self.runtime.directory.dkim_signing_keys(&domain).await {
            Ok(k) if k.is_empty() => return Ok((spool, String::new())),
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, %domain, "reading the DKIM keys failed");
                return Err(SealError::Local);
            }
        };
        let signed = crate::blocking::run("signing a message", move || {
            crate::dkim::sign(&content, &keys)
        })
        .await;
        match signed {
            Ok(Ok(headers)) => Ok((spool, headers)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, %domain, "DKIM signing failed");
                Err(SealError::Local)
            }
            Err(e) => {
                tracing::error!(error = %e, %domain, "DKIM signing failed");
                Err(SealError::Local)
            }
        }
    }
}

/// Every address in the message's From: fields, as written; None when it
/// has no From: field. A field with no parsable address gives an empty
/// string, which no user owns.
fn from_addresses(message: &[u8]) -> Option<Vec<String>> {
    let parsed = MessageParser::new().parse_headers(message)?;
    let mut fields = parsed.header_values(HeaderName::From).peekable();
    fields.peek()?;
    let mut out = Vec::new();
    for value in fields {
        let before = out.len();
        if let HeaderValue::Address(list) = value {
            out.extend(list.iter().map(|a| a.address().unwrap_or("").to_string()));
        }
        if out.len() == before {
            out.push(String::new());
        }
    }
    Some(out)
}

/// Whether MX records, as (preference, exchange), are a null MX (RFC 7505
/// §3): exactly one, of preference 0, whose exchange is the root.
pub fn is_null_mx(records: &[(u16, String)]) -> bool {
    matches!(records, [(0, exchange)] if exchange == "." || exchange.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_fields() {
        let f = |m: &str| from_addresses(m.as_bytes());
        assert_eq!(
            f("From: Alice <alice@example.org>\r\nSubject: x\r\n\r\nbody\r\n"),
            Some(vec!["alice@example.org".into()])
        );
        assert_eq!(
            f("From: a@example.org, \"B\" <b@example.net>\r\n\r\n"),
            Some(vec!["a@example.org".into(), "b@example.net".into()])
        );
        // Two From: fields: both count.
        assert_eq!(
            f("From: a@example.org\r\nFrom: ceo@example.net\r\n\r\n"),
            Some(vec!["a@example.org".into(), "ceo@example.net".into()])
        );
        assert_eq!(f("Subject: none\r\n\r\nbody\r\n"), None);
        assert_eq!(f("From: undisclosed\r\n\r\n"), Some(vec![String::new()]));
    }

    #[test]
    fn null_mx() {
        assert!(is_null_mx(&[(0, ".".into())]));
        assert!(!is_null_mx(&[(10, ".".into())]));
        assert!(!is_null_mx(&[(0, "mx.example.org.".into())]));
        assert!(!is_null_mx(&[
            (0, ".".into()),
            (10, "mx.example.org.".into())
        ]));
        assert!(!is_null_mx(&[]));
    }
}
