//! EHLO, HELO, LHLO and STARTTLS.

use tokio::io::{AsyncRead, AsyncWrite};

use super::session::{Next, Protocol, Session};
use crate::pipeline::Stage;
use crate::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// EHLO/HELO (RFC 5321 §4.1.1.1) or LHLO (RFC 2033 §4.1): resets any
    /// transaction and states what we offer.
    pub(super) async fn ehlo(&mut self, host: String, esmtp: bool) -> Reply {
        let host = host.trim().to_string();
        // Only visible ASCII reaches the Received header.
        if host.is_empty() || host.len() > 255 || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return Reply::syntax("Invalid domain name");
        }
        self.end_transaction();
        self.helo = Some(host.clone());
        self.esmtp = esmtp;
        let decision = self.stage(Stage::Helo, None, None).await;
        if let Err(reply) = decision.apply(&mut self.conn.effects) {
            self.helo = None;
            return reply;
        }
        let first = format!("{} greets {host}", self.runtime().hostname);
        if !esmtp {
            return Reply::new(250, "", first);
        }
        let mut lines = vec![
            first.into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.config().smtp.max_message_size.0).into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
        ];
        if self.starttls_offered() {
            lines.push("STARTTLS".into());
        }
        // RFC 4954 §4, RFC 8314 §3: only inside TLS.
        if self.conn.submission && self.conn.tls.is_some() {
            lines.push(format!("AUTH {}", crate::submission::sasl::OFFERED).into());
        }
        Reply {
            code: 250,
            status: "".into(),
            lines,
        }
    }

    /// LMTP runs on trusted local sockets and offers no TLS.
    fn starttls_offered(&self) -> bool {
        self.protocol == Protocol::Smtp && self.conn.tls.is_none() && self.runtime().tls_available()
    }

    /// STARTTLS (RFC 3207): 220, then the caller wraps the stream.
    pub(super) fn starttls(&mut self) -> (Reply, Next) {
        if self.conn.tls.is_some() {
            return (Reply::tls_already_active(), Next::Continue);
        }
        if !self.starttls_offered() {
            return (Reply::tls_unavailable(), Next::Continue);
        }
        (Reply::tls_ready(), Next::StartTls)
    }
}
