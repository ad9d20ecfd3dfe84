//! Delivery status notifications (RFC 3464, in an RFC 6522
//! multipart/report): what the sender of a queued message receives, from
//! the null sender `<>`, when recipients failed for good or expired. A
//! bounce is never bounced: a message from `<>` is never reported on.
//!
//! The shape, CRLF throughout:
//!
//! ```text
//! From: Mail Delivery System <MAILER-DAEMON@HOSTNAME>
//! To: <SENDER>
//! Subject: Undelivered Mail Returned to Sender
//! Date: …
//! Message-ID: <QUEUEID.N@HOSTNAME>
//! Auto-Submitted: auto-replied
//! MIME-Version: 1.0
//! Content-Type: multipart/report; report-type=delivery-status;
//!  boundary="…"
//!
//! part 1, text/plain: a sentence per failed recipient, for people
//! part 2, message/delivery-status: Reporting-MTA, Arrival-Date, then per
//!   recipient Final-Recipient, Action: failed, Status, Remote-MTA and
//!   Diagnostic-Code (when a server answered), Last-Attempt-Date
//! part 3, text/rfc822-headers: the original message's header section
//! ```

use std::fmt::Write as _;

use super::entry::{self, Entry, RecipientState};

/// Most bytes of the original header section quoted in the report.
pub const MAX_HEADERS: usize = 64 * 1024;

/// Builds the report on `failed` recipients of `entry`. `headers` is the
/// original's header section (as read from the message file; cut to
/// [`MAX_HEADERS`] here), `n` numbers this entry's reports.
pub fn build(
    hostname: &str,
    entry: &Entry,
    failed: &[&RecipientState],
    headers: &[u8],
    n: u32,
    now: u64,
) -> Vec<u8> {
    let boundary = format!("{}.{}/{}", entry.id, n, hostname);
    let date = entry::rfc5322(now);
    let mut m = String::new();
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{sender}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}.{n}@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         The header of your message is attached below.\r\n\
         \r\n",
        sender = entry.sender,
        id = entry.id,
    );
    for r in failed {
        let why = r.last_error.as_deref().unwrap_or("delivery failed");
        let _ = write!(m, "<{}>: {}\r\n", r.address, ascii_line(why));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Letterbox-Queue-ID: {id}\r\n\
         Arrival-Date: {arrival}\r\n",
        id = entry.id,
        arrival = entry::rfc5322(entry.created),
    );
    for r in failed {
        m.push_str("\r\n");
        if let Some(o) = &r.original {
            let _ = write!(m, "Original-Recipient: rfc822; {o}\r\n");
        }
        let status = r.last_status.as_deref().unwrap_or("5.0.0");
        let _ = write!(
            m,
            "Final-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {status}\r\n",
            r.address
        );
        if let Some(mta) = &r.remote_mta {
            let _ = write!(m, "Remote-MTA: dns; {}\r\n", ascii_line(mta));
        }
        if let Some(d) = &r.diagnostic {
            let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", ascii_line(d));
        }
        let _ = write!(m, "Last-Attempt-Date: {date}\r\n");
    }
    let headers = header_section(headers);
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Undelivered Message Headers\r\n\
         Content-Type: text/rfc822-headers\r\n{}\
         \r\n",
        if headers.is_ascii() {
            ""
        } else {
            "Content-Transfer-Encoding: 8bit\r\n"
        }
    );
    let mut out = m.into_bytes();
    out.extend_from_slice(headers);
    if !headers.ends_with(b"\r\n") && !headers.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header section of `message` (up to, not including, the empty
/// line), cut at a line end to at most [`MAX_HEADERS`] bytes.
pub fn header_section(message: &[u8]) -> &[u8] {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(message.len());
    let mut h = &message[..end];
    if h.len() > MAX_HEADERS {
        h = &h[..MAX_HEADERS];
        if let Some(i) = h.windows(2).rposition(|w| w == b"\r\n") {
            h = &h[..i + 2];
        }
    }
    h
}

/// One line of printable ASCII: what a remote server said can hold
/// anything, and a report field must not break.
pub fn ascii_line(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\r' | '\n' | '\t' => ' ',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::entry::{RecipientState, Status, VERSION};

    #[test]
    fn report_has_the_three_parts() {
        let mut r = RecipientState::new("bob@example.net".into(), None, 0);
        r.status = Status::Failed;
        r.last_status = Some("5.1.1".into());
        r.remote_mta = Some("mx.example.net".into());
        r.diagnostic = Some("550 5.1.1 No such user\r\nhere".into());
        r.last_error = Some("mx.example.net said: 550 5.1.1 No such user".into());
        let e = Entry {
            version: VERSION,
            id: "abc".into(),
            sender: "alice@example.org".into(),
            size: 1,
            created: 0,
            eight_bit: false,
            smtputf8: false,
            bounces: 0,
            recipients: vec![r.clone()],
        };
        let msg = b"Subject: hi\r\nFrom: alice@example.org\r\n\r\nbody\r\n";
        let out = String::from_utf8(build("mx.example.org", &e, &[&r], msg, 0, 0)).unwrap();
        assert!(out.contains("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"abc.0/mx.example.org\"\r\n"));
        assert!(out.contains("\r\nFinal-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.example.net\r\nDiagnostic-Code: smtp; 550 5.1.1 No such user  here\r\n"), "{out}");
        assert!(out.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\nFrom: alice@example.org\r\n\r\n--abc.0/mx.example.org--\r\n"), "{out}");
        assert!(!out.contains("body"));
        let parsed = mail_parser::MessageParser::default()
            .parse(out.as_bytes())
            .unwrap();
        assert_eq!(parsed.parts.len(), 4, "the report and its three parts");
    }
}
