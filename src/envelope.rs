//! What a session hands over when a message has been received: the
//! envelope (sender, routed recipients), the trace header to prepend and
//! the fields checks added. Delivery and the sink see only this, never the
//! session.

use std::net::IpAddr;
use std::sync::Arc;

use crate::directory::Route;

/// One accepted transaction.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Unique id of the transaction, in logs and the Received header.
    pub id: String,
    /// The reverse-path; empty for the null sender `<>`.
    pub sender: String,
    /// Recipients in the order they were accepted at RCPT.
    pub recipients: Vec<Recipient>,
    /// Facts for the Received header of each copy.
    pub received: Received,
    /// Fields the pipeline's checks added (Authentication-Results, a spam
    /// verdict…), each ending in CRLF; every copy carries them below its
    /// Received field.
    pub headers: String,
    /// A check quarantined the message: mailbox copies go to each
    /// mailbox's `.Junk` folder.
    pub quarantine: bool,
}

/// A recipient accepted at RCPT time, and where it goes.
#[derive(Debug, Clone)]
pub struct Recipient {
    /// The address as given, normalized (lowercase, IDNA domain).
    pub address: String,
    pub route: Arc<Route>,
}

/// The validated facts a Received header is built from. Every string here
/// has been checked by the session to hold no CR, LF, NUL or other control
/// character, so rendering cannot inject a header.
#[derive(Debug, Clone)]
pub struct Received {
    /// The EHLO/HELO argument.
    pub helo: String,
    /// The client's reverse DNS name, if looked up and found.
    pub rdns: Option<String>,
    pub ip: IpAddr,
    /// Our hostname.
    pub by: String,
    /// `ESMTP`, `ESMTPS`, `UTF8SMTPS`… (RFC 3848 and RFC 6531).
    pub with: String,
    /// TLS version and cipher when TLS was used, e.g. `TLSv1.3:TLS13_AES_256_GCM_SHA384`.
    pub tls: Option<String>,
    /// RFC 5322 date of the end of DATA.
    pub date: String,
}

impl Envelope {
    /// The `Received:` field for the copy going to `rcpt`, folded, ending in
    /// CRLF. One copy names one recipient, so Bcc recipients stay hidden.
    pub fn received_header(&self, rcpt: &str) -> String {
        self.received(Some(rcpt))
    }

    /// The `Received:` field naming no recipient: for a copy that goes to
    /// several (a queued message for remote recipients).
    pub fn received_header_without_for(&self) -> String {
        self.received(None)
    }

    fn received(&self, rcpt: Option<&str>) -> String {
        let r = &self.received;
        let ip = match r.ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("IPv6:{v6}"),
            },
        };
        let rdns = r.rdns.as_deref().unwrap_or("unknown");
        let tls = match &r.tls {
            Some(t) => format!("\r\n\t({t})"),
            None => String::new(),
        };
        let rcpt = match rcpt {
            Some(r) => format!("for <{r}>; "),
            None => "; ".into(),
        };
        format!(
            "Received: from {helo} ({rdns} [{ip}])\r\n\tby {by} with {with} id {id}{tls}\r\n\t{rcpt}{date}\r\n",
            helo = r.helo,
            by = r.by,
            with = r.with,
            id = self.id,
            date = r.date,
        )
    }
}

/// An RFC 5322 date-time for now, in UTC: `Sun, 22 Nov 2026 12:00:00 +0000`.
pub fn rfc5322_now() -> String {
    chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S +0000")
        .to_string()
}

/// A fresh transaction id: 16 lowercase hex digits from a CSPRNG.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_header_is_folded_and_names_one_recipient() {
        let env = Envelope {
            id: "00000000deadbeef".into(),
            sender: "a@b.example".into(),
            recipients: vec![],
            received: Received {
                helo: "client.example".into(),
                rdns: None,
                ip: "192.0.2.1".parse().unwrap(),
                by: "mx.example.org".into(),
                with: "ESMTPS".into(),
                tls: Some("TLSv1.3:TLS13_AES_128_GCM_SHA256".into()),
                date: "Sun, 22 Nov 2026 12:00:00 +0000".into(),
            },
            headers: String::new(),
            quarantine: false,
        };
        assert_eq!(
            env.received_header("alice@example.org"),
            "Received: from client.example (unknown [192.0.2.1])\r\n\
             \tby mx.example.org with ESMTPS id 00000000deadbeef\r\n\
             \t(TLSv1.3:TLS13_AES_128_GCM_SHA256)\r\n\
             \tfor <alice@example.org>; Sun, 22 Nov 2026 12:00:00 +0000\r\n"
        );
    }
}
