//! Every reply the server sends over SMTP and LMTP, written in one place.
//! Enhanced status codes (RFC 3463, RFC 2034) are on every reply except the
//! greeting and the answer to EHLO/HELO/LHLO, where RFC 2034 §3 leaves them
//! out. Pipeline outcomes (refusals, delivery failures) become replies
//! here too, so the session never spells a reply of its own.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::pipeline::{Failure, Refusal, SealError};

/// One SMTP reply: a code, an optional enhanced status, and one or more
/// lines of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `x.y.z`, or empty where RFC 2034 omits it. Owned when a check
    /// (a milter, a policy server) chose it.
    pub status: Cow<'static, str>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub fn new(
        code: u16,
        status: impl Into<Cow<'static, str>>,
        text: impl Into<Cow<'static, str>>,
    ) -> Reply {
        Reply {
            code,
            status: status.into(),
            lines: vec![text.into()],
        }
    }

    /// Whether the reply reports an error the client caused or must retry.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Appends the wire form: `250-first`, …, `250 last`, each ending CRLF.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut s = String::new();
        let n = self.lines.len();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let _ = write!(s, "{}{sep}", self.code);
            if !self.status.is_empty() {
                let _ = write!(s, "{} ", self.status);
            }
            let _ = write!(s, "{line}\r\n");
        }
        out.extend_from_slice(s.as_bytes());
    }

    /// The wire form as a string (for logs and tests).
    pub fn to_wire(&self) -> String {
        let mut v = Vec::new();
        self.write_to(&mut v);
        String::from_utf8(v).expect("replies are UTF-8")
    }

    // ---- connection ----

    pub fn greeting(host: &str) -> Reply {
        Reply::new(220, "", format!("{host} ESMTP letterbox"))
    }
    /// The LMTP greeting (RFC 2033 §4): the same shape, naming the protocol.
    pub fn greeting_lmtp(host: &str) -> Reply {
        Reply::new(220, "", format!("{host} LMTP letterbox"))
    }
    pub fn closing(host: &str) -> Reply {
        Reply::new(221, "2.0.0", format!("{host} closing connection"))
    }
    pub fn pregreet() -> Reply {
        Reply::new(554, "5.5.0", "Protocol error: talking before the greeting")
    }
    pub fn too_many_connections() -> Reply {
        Reply::new(421, "4.7.0", "Too many connections, try again later")
    }
    pub fn too_many_from_ip() -> Reply {
        Reply::new(
            421,
            "4.7.0",
            "Too many connections from your address, try again later",
        )
    }
    pub fn too_many_errors() -> Reply {
        Reply::new(421, "4.7.0", "Too many errors, closing connection")
    }
    pub fn timeout() -> Reply {
        Reply::new(421, "4.4.2", "Timeout exceeded, closing connection")
    }
    pub fn shutting_down() -> Reply {
        Reply::new(421, "4.3.2", "Service shutting down, try again later")
    }

    // ---- generic ----

    pub fn ok() -> Reply {
        Reply::new(250, "2.0.0", "Ok")
    }
    pub fn unknown_command() -> Reply {
        Reply::new(500, "5.5.1", "Command unrecognized")
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, "5.5.2", "Line too long")
    }
    pub fn syntax(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::new(501, "5.5.4", text)
    }
    pub fn not_implemented() -> Reply {
        Reply::new(502, "5.5.1", "Command not implemented")
    }
    pub fn bad_sequence(text: &'static str) -> Reply {
        Reply::new(503, "5.5.1", text)
    }
    pub fn unsupported_parameter(param: &str) -> Reply {
        let p: String = param
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        Reply::new(555, "5.5.4", format!("Unsupported parameter {p}"))
    }
    /// EHLO or HELO on an LMTP connection, or LHLO on an SMTP one: the
    /// greeting verbs are not interchangeable (RFC 2033 §4.1).
    pub fn wrong_greeting_verb(want: &'static str) -> Reply {
        Reply::new(500, "5.5.1", format!("Command unrecognized; use {want}"))
    }
    pub fn help() -> Reply {
        Reply::new(
            214,
            "2.0.0",
            "See RFC 5321; letterbox accepts mail for its own domains only",
        )
    }
    pub fn vrfy() -> Reply {
        Reply::new(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }
    pub fn expn_refused() -> Reply {
        Reply::new(502, "5.5.1", "EXPN not available")
    }

    // ---- STARTTLS ----

    pub fn tls_ready() -> Reply {
        Reply::new(220, "2.0.0", "Ready to start TLS")
    }
    pub fn tls_unavailable() -> Reply {
        Reply::new(502, "5.5.1", "STARTTLS not available")
    }
    pub fn tls_already_active() -> Reply {
        Reply::new(503, "5.5.1", "TLS already active")
    }

    // ---- AUTH (RFC 4954) and submission (RFC 6409) ----

    /// A SASL challenge: `334` and base64 text (empty for PLAIN's).
    pub fn auth_challenge(base64: &'static str) -> Reply {
        Reply::new(334, "", base64)
    }
    pub fn auth_ok() -> Reply {
        Reply::new(235, "2.7.0", "Authentication successful")
    }
    pub fn auth_failed() -> Reply {
        Reply::new(535, "5.7.8", "Authentication credentials invalid")
    }
    /// The client answered a challenge with `*`.
    pub fn auth_cancelled() -> Reply {
        Reply::new(501, "5.7.0", "Authentication cancelled")
    }
    pub fn auth_bad_base64() -> Reply {
        Reply::new(501, "5.5.2", "Cannot decode response")
    }
    pub fn auth_line_too_long() -> Reply {
        Reply::new(500, "5.5.6", "Authentication exchange line is too long")
    }
    pub fn auth_unknown_mechanism() -> Reply {
        Reply::new(504, "5.5.4", "Unrecognized authentication type")
    }
    /// AUTH before TLS: never offered, never accepted (RFC 4954 §4, §6).
    pub fn auth_needs_tls() -> Reply {
        Reply::new(
            538,
            "5.7.11",
            "Encryption required for requested authentication mechanism",
        )
    }
    /// MAIL on a submission port before a successful AUTH.
    pub fn auth_required() -> Reply {
        Reply::new(530, "5.7.0", "Authentication required")
    }
    pub fn auth_unavailable() -> Reply {
        Reply::new(454, "4.7.0", "Temporary authentication failure")
    }
    /// `limits.auth_failures` reached: to AUTH, or instead of the greeting
    /// on a submission port; the connection is closed.
    pub fn auth_locked_out() -> Reply {
        Reply::new(
            421,
            "4.7.0",
            "Too many failed logins from your address, try again later",
        )
    }
    /// MAIL FROM an address the authenticated user does not own.
    pub fn sender_not_owned() -> Reply {
        Reply::new(
            553,
            "5.7.1",
            "Sender address not owned by the authenticated user",
        )
    }
    /// A From: header address the authenticated user does not own, at the
    /// end of data (RFC 5321 §4.3.2 lists 550, not 553, after DATA).
    pub fn from_not_owned() -> Reply {
        Reply::new(
            550,
            "5.7.1",
            "From header address not owned by the authenticated user",
        )
    }
    /// A recipient domain that says it takes no mail (RFC 7505 §4.2).
    pub fn null_mx() -> Reply {
        Reply::new(556, "5.1.10", "Recipient address has null MX")
    }

    // ---- MAIL ----

    pub fn sender_ok() -> Reply {
        Reply::new(250, "2.1.0", "Sender ok")
    }
    pub fn bad_sender() -> Reply {
        Reply::new(501, "5.1.7", "Bad sender address syntax")
    }
    pub fn message_too_big_declared() -> Reply {
        Reply::new(
            552,
            "5.3.4",
            "Message size exceeds fixed maximum message size",
        )
    }
    pub fn need_utf8() -> Reply {
        Reply::new(
            553,
            "5.6.7",
            "Non-ASCII address requires the SMTPUTF8 parameter",
        )
    }

    // ---- RCPT ----

    pub fn recipient_ok() -> Reply {
        Reply::new(250, "2.1.5", "Recipient ok")
    }
    pub fn bad_recipient() -> Reply {
        Reply::new(501, "5.1.3", "Bad recipient address syntax")
    }
    pub fn too_many_recipients() -> Reply {
        Reply::new(452, "4.5.3", "Too many recipients")
    }
    pub fn unknown_user() -> Reply {
        Reply::new(550, "5.1.1", "No such user here")
    }
    pub fn relay_denied() -> Reply {
        Reply::new(550, "5.7.1", "Relay access denied")
    }
    pub fn mailbox_full() -> Reply {
        Reply::new(452, "4.2.2", "Mailbox full, try again later")
    }
    pub fn sink_full() -> Reply {
        Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
    }
    pub fn directory_unavailable() -> Reply {
        Reply::new(451, "4.3.0", "Temporary directory failure, try again later")
    }

    // ---- DATA / BDAT ----

    pub fn start_data() -> Reply {
        Reply::new(354, "", "End data with <CR><LF>.<CR><LF>")
    }
    pub fn chunk_ok(size: u64) -> Reply {
        Reply::new(250, "2.0.0", format!("{size} octets received"))
    }
    pub fn message_too_big() -> Reply {
        Reply::new(552, "5.3.4", "Message too big")
    }
    pub fn bare_lf() -> Reply {
        Reply::new(
            550,
            "5.5.2",
            "Bare LF line endings are not allowed; use CRLF",
        )
    }
    /// A check (hook, milter, policy server) refused without a reply of
    /// its own.
    pub fn check_rejected() -> Reply {
        Reply::new(550, "5.7.1", "Rejected by policy")
    }
    pub fn check_tempfail() -> Reply {
        Reply::new(
            451,
            "4.7.1",
            "Temporarily rejected by policy, try again later",
        )
    }
    pub fn delivered(id: &str) -> Reply {
        Reply::new(250, "2.0.0", format!("Ok: delivered as {id}"))
    }
    pub fn local_error() -> Reply {
        Reply::new(451, "4.3.0", "Local error in processing, try again later")
    }
}

impl From<&Failure> for Reply {
    /// Why a recipient's copy was not delivered, as its reply.
    fn from(f: &Failure) -> Reply {
        match f {
            Failure::QuotaExceeded => Reply::mailbox_full(),
            Failure::SinkFull => Reply::sink_full(),
            Failure::Local => Reply::local_error(),
        }
    }
}

impl From<&SealError> for Reply {
    /// Why the last step of a submitted message refused it.
    fn from(e: &SealError) -> Reply {
        match e {
            SealError::FromNotOwned => Reply::from_not_owned(),
            SealError::Local => Reply::local_error(),
        }
    }
}

impl From<&Refusal> for Reply {
    /// Why the pipeline refused a recipient, as the reply to its RCPT.
    fn from(r: &Refusal) -> Reply {
        match r {
            Refusal::Syntax => Reply::bad_recipient(),
            Refusal::NotServed => Reply::relay_denied(),
            Refusal::UnknownUser => Reply::unknown_user(),
            Refusal::MailboxFull => Reply::mailbox_full(),
            Refusal::SinkFull => Reply::sink_full(),
            Refusal::DirectoryUnavailable => Reply::directory_unavailable(),
            Refusal::Local => Reply::local_error(),
            Refusal::NullMx => Reply::null_mx(),
            Refusal::Check(reply) => reply.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form() {
        assert_eq!(
            Reply::unknown_user().to_wire(),
            "550 5.1.1 No such user here\r\n"
        );
        assert_eq!(
            Reply::greeting("mx.example.org").to_wire(),
            "220 mx.example.org ESMTP letterbox\r\n"
        );
        let multi = Reply {
            code: 250,
            status: "".into(),
            lines: vec!["a".into(), "b".into(), "c".into()],
        };
        assert_eq!(multi.to_wire(), "250-a\r\n250-b\r\n250 c\r\n");
    }
}
