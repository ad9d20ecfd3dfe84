//! DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030): receive the content into a
//! spool, bounded by the size limit, then hand the transaction over for
//! delivery and answer with what delivery reports.
//!
//! An oversized message is read to its end before it is refused: stopping
//! early would leave the rest to be read as commands (the smuggling door).

use tokio::io::{AsyncRead, AsyncWrite};

use super::dot::{Decoder, Progress};
use super::reply::Reply;
use super::session::{Next, Read, Session};
use crate::config::BareLf;
use crate::envelope::{self, Envelope, Received};
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
    fn new(decoder: Decoder, spool: Spool, max: u64, reservation: Option<Reservation>) -> Body {
        Body {
            decoder,
            spool,
            pending: Vec::with_capacity(SPOOL_CHUNK),
            size: 0,
            max,
            too_big: false,
            spool_error: None,
            reservation,
            sink_full: false,
        }
    }

    /// Decodes `input`; returns the decoder's progress.
    fn feed(&mut self, input: &[u8]) -> Progress {
        let before = self.pending.len();
        let progress = self.decoder.feed(input, &mut self.pending);
        self.account(before);
        if self.pending.len() >= SPOOL_CHUNK {
            self.flush();
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

    fn flush(&mut self) {
        if !self.too_big
            && !self.sink_full
            && self.spool_error.is_none()
            && !self.pending.is_empty()
            && let Err(e) = self.spool.write(&self.pending)
        {
            self.spool_error = Some(e);
        }
        self.pending.clear();
    }

    /// Ends the content (flushing a trailing CR of BDAT data).
    fn finish(&mut self) {
        let before = self.pending.len();
        self.decoder.finish(&mut self.pending);
        self.account(before);
        self.flush();
    }
}

/// Whether reading more content may go on.
enum Fill {
    Done,
    Stop(Reply),
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn new_body(&self, decoder: Decoder) -> Body {
        let has_sink = self.tx.as_ref().is_some_and(|t| t.has_sink);
        // Sink mail never touches the disk, not even as a spool file.
        let dir = (!has_sink).then(|| self.ctx.maildirs.spool_dir());
        let limit = self.ctx.config.maildir.spool_memory_limit.0 as usize;
        // The sink's bounds apply as the content streams in, not after.
        let max = if has_sink {
            self.ctx.sink.max_message_size()
        } else {
            self.ctx.config.smtp.max_message_size.0
        };
        let reservation = has_sink.then(|| self.ctx.sink.reservation());
        Body::new(decoder, Spool::new(limit, dir), max, reservation)
    }

    /// Checks that a transaction is ready for content.
    fn content_allowed(&self) -> Result<(), Reply> {
        match &self.tx {
            None => Err(Reply::bad_sequence("Need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => Err(Reply::bad_sequence("Need RCPT command")),
            Some(_) => Ok(()),
        }
    }

    pub(super) async fn data(&mut self) -> std::io::Result<(Reply, Next)> {
        if self.tx.as_ref().is_some_and(|t| t.bdat.is_some()) {
            return Ok((
                Reply::bad_sequence("DATA not allowed during BDAT transfer"),
                Next::Continue,
            ));
        }
        if let Err(r) = self.content_allowed() {
            return Ok((r, Next::Continue));
        }
        Reply::start_data().write_to(&mut self.wbuf);
        let mut body = self.new_body(Decoder::data());
        loop {
            if !self.rbuf.is_empty() {
                match body.feed(&self.rbuf) {
                    Progress::More => self.rbuf.clear(),
                    Progress::Done(n) => {
                        self.advance(n);
                        break;
                    }
                }
            }
            if let Fill::Stop(reply) = self.fill_data().await? {
                self.tx = None;
                return Ok((reply, Next::Close));
            }
        }
        body.flush();
        Ok((self.finish(body).await, Next::Continue))
    }

    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> std::io::Result<(Reply, Next)> {
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
                self.tx = None;
                return Ok((reply, Next::Close));
            }
            let chunk = self.take_buffered(remaining.min(usize::MAX as u64) as usize);
            remaining -= chunk.len() as u64;
            if let Some(b) = &mut body {
                b.feed(&chunk);
            }
        }
        let (Ok(()), Some(mut body)) = (allowed.clone(), body) else {
            return Ok((
                allowed.expect_err("no body only when refused"),
                Next::Continue,
            ));
        };
        if last {
            body.finish();
            return Ok((self.finish(body).await, Next::Continue));
        }
        if body.too_big {
            // RFC 3030 §2: after an error the transaction is over.
            self.tx = None;
            return Ok((Reply::message_too_big(), Next::Continue));
        }
        if let Some(tx) = &mut self.tx {
            tx.bdat = Some(Bdat { body });
        }
        Ok((Reply::chunk_ok(size), Next::Continue))
    }

    /// Reads more content; on timeout or disconnect says how to stop.
    async fn fill_data(&mut self) -> std::io::Result<Fill> {
        let timeout = self.ctx.config.smtp.data_timeout.0;
        Ok(match self.fill(timeout, false).await? {
            Ok(true) => Fill::Done,
            Ok(false) => Fill::Stop(Reply::local_error()),
            Err(Read::TimedOut) => Fill::Stop(Reply::timeout()),
            Err(_) => Fill::Stop(Reply::local_error()),
        })
    }

    /// The content is complete: refuse it, or deliver it and report.
    async fn finish(&mut self, body: Body) -> Reply {
        let tx = self.tx.take().expect("content only inside a transaction");
        // The transaction id exists only once the message is accepted for delivery.
        let mut id = None;
        let reply = if body.too_big {
            Reply::message_too_big()
        } else if body.decoder.saw_bare_lf && self.ctx.config.smtp.bare_lf == BareLf::Reject {
            Reply::bare_lf()
        } else if let Some(e) = &body.spool_error {
            tracing::error!(error = %e, "spooling the message failed");
            Reply::local_error()
        } else if body.sink_full {
            // Even in evict mode: what filled the sink is still arriving.
            Reply::sink_full()
        } else {
            let envelope = Envelope {
                id: envelope::new_id(),
                sender: tx.sender.clone(),
                recipients: tx.recipients,
                received: Received {
                    helo: self.helo.clone().unwrap_or_default(),
                    rdns: self.conn.rdns_name().await,
                    ip: self.conn.ip,
                    by: self.ctx.hostname.clone(),
                    with: protocol(self.esmtp, tx.smtputf8, self.conn.tls.is_some()),
                    tls: self.conn.tls.clone(),
                    date: envelope::rfc5322_now(),
                },
            };
            let reply =
                crate::dispatch::deliver(&self.ctx, &envelope, body.spool, body.reservation).await;
            id = Some(envelope.id);
            reply
        };
        tracing::info!(
            id = id.as_deref().unwrap_or("-"),
            ip = %self.conn.ip,
            helo = self.helo.as_deref().unwrap_or(""),
            tls = self.conn.tls.as_deref().unwrap_or("no"),
            from = %tx.sender,
            rcpts = ?tx.rcpt_log,
            size = body.size,
            duration_ms = tx.started.elapsed().as_millis() as u64,
            reply = %reply.to_wire().trim_end(),
            "transaction"
        );
        reply
    }
}

/// The `with` keyword of the Received header (RFC 3848, RFC 6531).
fn protocol(esmtp: bool, utf8: bool, tls: bool) -> String {
    let base = match (utf8, esmtp) {
        (true, _) => "UTF8SMTP",
        (false, true) => "ESMTP",
        (false, false) => "SMTP",
    };
    format!("{base}{}", if tls { "S" } else { "" })
}
