//! DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030): receive the content into
//! the spool the pipeline chose, bounded by its size limit, then hand the
//! transaction to the pipeline's data checks and delivery, and answer with
//! what they report: one reply over SMTP, one per recipient over LMTP.
//!
//! An oversized message is read to its end before it is refused: stopping
//! early would leave the rest to be read as commands (the smuggling door).

use tokio::io::{AsyncRead, AsyncWrite};

use super::dot::{Decoder, Progress};
use super::session::{Next, Protocol, Read, Session, Transaction};
use crate::config::BareLf;
use crate::envelope::{self, Envelope, Received};
use crate::pipeline::content::Content;
use crate::pipeline::{Decision, Mode, Stage};
use crate::reply::Reply;
use crate::sink::Reservation;
use crate::spool::Spool;

/// Content is written to the spool in pieces of about this size.
const SPOOL_CHUNK: usize = 64 * 1024;

/// A message being received, by DATA or across BDAT chunks.
#[derive(Debug)]
pub(super) struct Bdat {
    body: Body,
}

/// Content on its way into the spool, with the size accounting.
#[derive(Debug)]
struct Body {
    decoder: Decoder,
    spool: Spool,
    pending: Vec<u8>,
    size: u64,
    max: u64,
    too_big: bool,
    spool_error: Option<std::io::Error>,
    /// Room in the sink's byte bound for this content, taken as it is
    /// decoded; None when no recipient is a sink (the maildir path never
    /// touches the sink's budget) or once `sink_full` let it go.
    reservation: Option<Reservation>,
    /// The sink had no room for more of this content: the rest is read and
    /// discarded, and the answer is 452 4.3.1.
    sink_full: bool,
}

impl Body {
    fn new(decoder: Decoder, content: Content) -> Body {
        Body {
            decoder,
            spool: content.spool,
            pending: Vec::with_capacity(SPOOL_CHUNK),
            size: 0,
            max: content.max,
            too_big: false,
            spool_error: None,
            reservation: content.reservation,
            sink_full: false,
        }
    }

    /// Decodes `input`; returns the decoder's progress.
    async fn feed(&mut self, input: &[u8]) -> Progress {
        let before = self.pending.len();
        let progress = self.decoder.feed(input, &mut self.pending);
        self.account(before);
        if self.pending.len() >= SPOOL_CHUNK {
            self.flush().await;
        }
        progress
    }

    fn account(&mut self, before: usize) {
        let n = (self.pending.len() - before) as u64;
        self.size += n;
        if self.size > self.max {
            self.too_big = true;
        } else if let Some(r) = &mut self.reservation
            && r.grow(n).is_err()
        {
            self.sink_full = true;
        }
        if self.too_big || self.sink_full {
            // Keep reading to the end, storing nothing more.
            self.pending.clear();
            if self.reservation.take().is_some() {
                // A sink message that will be refused gives its memory and
                // its room in the sink back now, not at the end of data.
                self.spool = Spool::new(0, None);
            }
        }
    }

    /// Moves what is pending into the spool; a write that reaches the disk
    /// runs on the blocking pool, never on the runtime.
    async fn flush(&mut self) {
        if self.too_big || self.sink_full || self.spool_error.is_some() || self.pending.is_empty() {
            self.pending.clear();
            return;
        }
        if !self.spool.would_block(self.pending.len()) {
            if let Err(e) = self.spool.write(&self.pending) {
                self.spool_error = Some(e);
            }
            self.pending.clear();
            return;
        }
        let mut spool = std::mem::replace(&mut self.spool, Spool::new(0, None));
        let mut pending = std::mem::take(&mut self.pending);
        let written = crate::blocking::run("writing a spool file", move || {
            let r = spool.write(&pending);
            pending.clear();
            (spool, pending, r)
        })
        .await;
        match written {
            Ok((spool, pending, r)) => {
                self.spool = spool;
                self.pending = pending;
                self.spool_error = r.err();
            }
            Err(e) => self.spool_error = Some(std::io::Error::other(e)),
        }
    }

    /// Ends the content (flushing a trailing CR of BDAT data).
    async fn finish(&mut self) {
        let before = self.pending.len();
        self.decoder.finish(&mut self.pending);
        self.account(before);
        self.flush().await;
    }

    /// Why the content itself cannot be accepted, if it cannot.
    fn refusal(&self, bare_lf: BareLf) -> Option<Reply> {
        if self.too_big {
            Some(Reply::message_too_big())
        } else if self.decoder.saw_bare_lf && bare_lf == BareLf::Reject {
            Some(Reply::bare_lf())
        } else if let Some(e) = &self.spool_error {
            tracing::error!(error = %e, "spooling the message failed");
            Some(Reply::local_error())
        } else if self.sink_full {
            // Even in evict mode: what filled the sink is still arriving.
            Some(Reply::sink_full())
        } else {
            None
        }
    }
}

/// Whether reading more content may go on.
enum Fill {
    Done,
    Stop(Reply),
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn new_body(&self, decoder: Decoder) -> Body {
        let recipients = self.tx.as_ref().map_or(&[][..], |t| &t.recipients);
        Body::new(decoder, self.pipeline.content(recipients))
    }

    /// Checks that a transaction is ready for content.
    fn content_allowed(&self) -> Result<(), Reply> {
        match &self.tx {
            None => Err(Reply::bad_sequence("Need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => Err(Reply::bad_sequence("Need RCPT command")),
            Some(_) => Ok(()),
        }
    }

    pub(super) async fn data(&mut self) -> std::io::Result<(Vec<Reply>, Next)> {
        if self.tx.as_ref().is_some_and(|t| t.bdat.is_some()) {
            return Ok((
                vec![Reply::bad_sequence("DATA not allowed during BDAT transfer")],
                Next::Continue,
            ));
        }
        if let Err(r) = self.content_allowed() {
            return Ok((vec![r], Next::Continue));
        }
        Reply::start_data().write_to(&mut self.wbuf);
        let mut body = self.new_body(Decoder::data());
        loop {
            if !self.rbuf.is_empty() {
                match body.feed(&self.rbuf).await {
                    Progress::More => self.rbuf.clear(),
                    Progress::Done(n) => {
                        self.advance(n);
                        break;
                    }
                }
            }
            if let Fill::Stop(reply) = self.fill_data().await? {
                self.end_transaction();
                return Ok((vec![reply], Next::Close));
            }
        }
        body.flush().await;
        Ok((self.finish(body).await, Next::Continue))
    }

    pub(super) async fn bdat(
        &mut self,
        size: u64,
        last: bool,
    ) -> std::io::Result<(Vec<Reply>, Next)> {
        let allowed = self.content_allowed();
        let mut body = match (&allowed, self.tx.as_mut().and_then(|t| t.bdat.take())) {
            (Ok(()), Some(b)) => Some(b.body),
            (Ok(()), None) => Some(self.new_body(Decoder::bdat())),
            (Err(_), _) => None,
        };
        // The chunk is read in full whatever the answer (RFC 3030 §2).
        let mut remaining = size;
        while remaining > 0 {
            if self.rbuf.is_empty()
                && let Fill::Stop(reply) = self.fill_data().await?
            {
                self.end_transaction();
                return Ok((vec![reply], Next::Close));
            }
            let chunk = self.take_buffered(remaining.min(usize::MAX as u64) as usize);
            remaining -= chunk.len() as u64;
            if let Some(b) = &mut body {
                b.feed(&chunk).await;
            }
        }
        let (Ok(()), Some(mut body)) = (allowed.clone(), body) else {
            let refused = allowed.expect_err("no body only when refused");
            return Ok((vec![refused], Next::Continue));
        };
        if last {
            body.finish().await;
            return Ok((self.finish(body).await, Next::Continue));
        }
        if body.too_big {
            // RFC 3030 §2: after an error the transaction is over.
            self.end_transaction();
            return Ok((vec![Reply::message_too_big()], Next::Continue));
        }
        if let Some(tx) = &mut self.tx {
            tx.bdat = Some(Bdat { body });
        }
        Ok((vec![Reply::chunk_ok(size)], Next::Continue))
    }

    /// Reads more content; on timeout or disconnect says how to stop.
    async fn fill_data(&mut self) -> std::io::Result<Fill> {
        let timeout = self.config().smtp.data_timeout.0;
        Ok(match self.fill(timeout, false).await? {
            Ok(true) => Fill::Done,
            Ok(false) => Fill::Stop(Reply::local_error()),
            Err(Read::TimedOut) => Fill::Stop(Reply::timeout()),
            Err(_) => Fill::Stop(Reply::local_error()),
        })
    }

    /// The content is complete: refuse it, or pass it through the data
    /// checks and deliver it. Returns one reply per accepted RCPT for LMTP,
    /// one for the transaction for SMTP.
    async fn finish(&mut self, body: Body) -> Vec<Reply> {
        let decision = match body.refusal(self.config().smtp.bare_lf) {
            Some(reply) => Decision::Refuse(reply),
            None => self.stage(Stage::Data, None, Some(&body.spool)).await,
        };
        let mut tx = self
            .end_transaction()
            .expect("content only inside a transaction");
        // The id reaches the client (and the log) only once accepted.
        let mut id = None;
        let outcomes: Vec<Reply> = match decision.apply(&mut tx.effects) {
            Err(reply) => vec![reply],
            Ok(()) if tx.effects.discard => {
                tracing::info!(id = %tx.id, "discarded; delivered nowhere");
                id = Some(tx.id.clone());
                vec![Reply::delivered(&tx.id)]
            }
            Ok(()) => {
                id = Some(tx.id.clone());
                self.deliver(&mut tx, body.spool, body.reservation).await
            }
        };
        let replies = self.replies_for(&tx, outcomes);
        if replies.iter().any(|r| r.code / 100 == 2) {
            self.accepted(Stage::Data).await;
        }
        tracing::info!(
            id = id.as_deref().unwrap_or("-"),
            ip = %self.conn.ip,
            helo = self.helo.as_deref().unwrap_or(""),
            tls = self.conn.tls.as_deref().unwrap_or("no"),
            from = %tx.sender,
            rcpts = ?tx.rcpt_log,
            size = body.size,
            duration_ms = tx.started.elapsed().as_millis() as u64,
            reply = %replies.iter().map(|r| r.to_wire().trim_end().to_string()).collect::<Vec<_>>().join("; "),
            "transaction"
        );
        replies
    }

    /// Delivers an accepted message; one reply per distinct recipient, or
    /// one for all when the protocol answers once.
    async fn deliver(
        &mut self,
        tx: &mut Transaction,
        spool: Spool,
        reservation: Option<Reservation>,
    ) -> Vec<Reply> {
        let edits = std::mem::take(&mut tx.effects.edits);
        let (recipients, places) = self
            .pipeline
            .edit_recipients(
                std::mem::take(&mut tx.recipients),
                &edits,
                spool.as_memory().is_some(),
            )
            .await;
        let spool = match self.pipeline.edit_content(spool, edits).await {
            Ok(s) => s,
            Err(f) => return vec![Reply::from(&f)],
        };
        // Last, on the final content: a logged-in user's From: is checked
        // and the message DKIM-signed. The signatures go above everything
        // the checks added, below our Received field.
        let mut headers = String::new();
        let spool = match &self.auth {
            Some(user) => match self.pipeline.seal(spool, user).await {
                Ok((s, signatures)) => {
                    headers = signatures;
                    s
                }
                Err(e) => return vec![Reply::from(&e)],
            },
            None => spool,
        };
        headers.push_str(&tx.effects.headers);
        let envelope = Envelope {
            id: tx.id.clone(),
            sender: tx.sender.clone(),
            recipients,
            received: Received {
                helo: self.helo.clone().unwrap_or_default(),
                rdns: self.conn.rdns_name().await,
                ip: self.conn.ip,
                by: self.runtime().hostname.clone(),
                with: protocol(
                    self.protocol,
                    self.esmtp,
                    tx.smtputf8,
                    self.conn.tls.is_some(),
                    self.auth.is_some(),
                ),
                tls: self.conn.tls.clone(),
                date: envelope::rfc5322_now(),
            },
            headers,
            quarantine: tx.effects.quarantine.is_some(),
        };
        let mode = match self.protocol {
            Protocol::Smtp => Mode::AllOrNothing,
            Protocol::Lmtp => Mode::PerRecipient,
        };
        let outcomes = match envelope.recipients.is_empty() {
            // A check dropped every recipient: accepted, delivered nowhere.
            true => Vec::new(),
            false => {
                self.pipeline
                    .deliver(&envelope, spool, reservation, mode)
                    .await
            }
        };
        let reply = |o: &Result<(), crate::pipeline::Failure>| match o {
            Ok(()) => Reply::delivered(&envelope.id),
            Err(f) => Reply::from(f),
        };
        if mode == Mode::AllOrNothing {
            // One answer, whoever the recipients are now (a check may
            // have added some and dropped every original).
            let failed = outcomes.iter().find(|o| o.is_err());
            return vec![failed.map_or_else(|| Reply::delivered(&envelope.id), reply)];
        }
        // One reply per recipient of the transaction, in its order.
        places
            .iter()
            .map(|p| p.map_or_else(|| Reply::delivered(&envelope.id), |j| reply(&outcomes[j])))
            .collect()
    }

    /// The answer to the end of data: `outcomes` holds one reply for the
    /// whole message, or one per distinct recipient.
    fn replies_for(&self, tx: &Transaction, outcomes: Vec<Reply>) -> Vec<Reply> {
        let of = |i: usize| outcomes.get(i).unwrap_or(&outcomes[0]).clone();
        match self.protocol {
            Protocol::Lmtp => tx.accepted.iter().map(|&i| of(i)).collect(),
            // All-or-nothing: every outcome is the same, the first failure if any.
            Protocol::Smtp => vec![
                outcomes
                    .iter()
                    .find(|r| r.is_error())
                    .unwrap_or(&outcomes[0])
                    .clone(),
            ],
        }
    }
}

/// The `with` keyword of the Received header (RFC 3848, RFC 6531): `S`
/// for TLS, then `A` for a logged-in client (ESMTPSA, UTF8SMTPSA).
fn protocol(proto: Protocol, esmtp: bool, utf8: bool, tls: bool, auth: bool) -> String {
    let base = match (proto, utf8, esmtp) {
        (Protocol::Lmtp, _, _) => "LMTP",
        (Protocol::Smtp, true, _) => "UTF8SMTP",
        (Protocol::Smtp, false, true) => "ESMTP",
        (Protocol::Smtp, false, false) => "SMTP",
    };
    format!(
        "{base}{}{}",
        if tls { "S" } else { "" },
        if auth { "A" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_with_keywords() {
        let smtp = |esmtp, utf8, tls, auth| protocol(Protocol::Smtp, esmtp, utf8, tls, auth);
        assert_eq!(smtp(true, false, false, false), "ESMTP");
        assert_eq!(smtp(true, false, true, false), "ESMTPS");
        assert_eq!(smtp(true, false, true, true), "ESMTPSA");
        assert_eq!(smtp(true, true, true, true), "UTF8SMTPSA");
        assert_eq!(smtp(false, false, false, false), "SMTP");
        assert_eq!(protocol(Protocol::Lmtp, true, false, false, false), "LMTP");
    }
}
