//! EHLO, HELO and STARTTLS.

use tokio::io::{AsyncRead, AsyncWrite};

use super::reply::Reply;
use super::session::{Next, Session};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// EHLO/HELO (RFC 5321 §4.1.1.1): resets any transaction and states
    /// what we offer.
    pub(super) fn ehlo(&mut self, host: String, esmtp: bool) -> Reply {
        let host = host.trim().to_string();
        // Only visible ASCII reaches the Received header.
        if host.is_empty() || host.len() > 255 || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return Reply::syntax("Invalid domain name");
        }
        self.tx = None;
        self.helo = Some(host.clone());
        self.esmtp = esmtp;
        let first = format!("{} greets {host}", self.ctx.hostname);
        if !esmtp {
            return Reply::new(250, "", first);
        }
        let mut lines = vec![
            first.into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.ctx.config.smtp.max_message_size.0).into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
        ];
        if self.conn.tls.is_none() && self.ctx.tls_available() {
            lines.push("STARTTLS".into());
        }
        Reply {
            code: 250,
            status: "",
            lines,
        }
    }

    /// STARTTLS (RFC 3207): 220, then the caller wraps the stream.
    pub(super) fn starttls(&mut self) -> (Reply, Next) {
        if self.conn.tls.is_some() {
            return (Reply::tls_already_active(), Next::Continue);
        }
        if !self.ctx.tls_available() {
            return (Reply::tls_unavailable(), Next::Continue);
        }
        (Reply::tls_ready(), Next::StartTls)
    }
}
