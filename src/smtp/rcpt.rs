//! RCPT TO (RFC 5321 §4.1.1.3): every recipient is checked against the
//! directory now, so nothing is accepted that would later bounce
//! (no backscatter), and nothing foreign is accepted (never a relay).

use tokio::io::{AsyncRead, AsyncWrite};

use super::reply::Reply;
use super::session::Session;
use crate::address::{Address, AddressError};
use crate::directory::Route;
use crate::envelope::Recipient;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn rcpt(&mut self, to: String) -> Reply {
        let reply = self.check_rcpt(&to).await;
        if let Some(tx) = &mut self.tx {
            tx.rcpt_log.push((to, reply.code));
        }
        reply
    }

    async fn check_rcpt(&mut self, to: &str) -> Reply {
        let Some(tx) = &self.tx else {
            return Reply::bad_sequence("Need MAIL command");
        };
        // Once content has begun the recipients are fixed: how it is kept
        // (on disk, or in memory within the sink's bounds) was chosen for them.
        if tx.bdat.is_some() {
            return Reply::bad_sequence("RCPT not allowed during BDAT transfer");
        }
        if tx.recipients.len() >= self.ctx.config.smtp.max_recipients {
            return Reply::too_many_recipients();
        }
        if !to.is_ascii() && !tx.smtputf8 {
            return Reply::need_utf8();
        }
        // RFC 5321 §4.5.1: <Postmaster> without a domain must be accepted;
        // it means the postmaster of our own host name.
        let to = if to.is_empty() {
            format!("postmaster@{}", self.ctx.hostname)
        } else {
            to.to_string()
        };
        let addr = match Address::from_smtp(&to) {
            Ok(a) => a,
            // A domain we cannot even parse (an IP literal, say) is not ours.
            Err(AddressError::BadDomain(_) | AddressError::DomainTooLong(_)) => {
                return Reply::relay_denied();
            }
            Err(_) => return Reply::bad_recipient(),
        };
        // A quoted local part holding `@` is an old relay trick; no mailbox
        // here has one.
        if addr.local.contains('@') {
            return Reply::unknown_user();
        }
        let route = match self
            .ctx
            .directory
            .resolve(&addr, self.ctx.delimiter, &self.ctx.static_rules)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(rcpt = %addr, error = %e, "directory lookup failed");
                return Reply::directory_unavailable();
            }
        };
        match &*route {
            Route::NotServed => return Reply::relay_denied(),
            Route::UnknownUser => return Reply::unknown_user(),
            Route::Mailboxes(boxes) => {
                for m in boxes {
                    match self.ctx.maildirs.is_over_quota(m).await {
                        Ok(false) => {}
                        Ok(true) => return Reply::mailbox_full(),
                        Err(e) => {
                            tracing::error!(mailbox = %m.address, error = %e, "quota check failed");
                            return Reply::local_error();
                        }
                    }
                }
            }
            Route::Sink { .. } => {
                if !self.ctx.sink.has_room(&addr.to_string()) {
                    return Reply::sink_full();
                }
            }
        }
        let tx = self.tx.as_mut().expect("checked above");
        let address = addr.to_string();
        if !tx.recipients.iter().any(|r| r.address == address) {
            tx.has_sink |= matches!(*route, Route::Sink { .. });
            tx.recipients.push(Recipient { address, route });
        }
        Reply::recipient_ok()
    }
}
