//! Every reply the server sends over SMTP and LMTP, written in one place.
//! Enhanced status codes (RFC 3463, RFC 2034) are on every reply except the
//! greeting and the answer to EHLO/HELO/LHLO, where RFC 2034 §3 leaves them
//! out. Pipeline outcomes (refusals, delivery failures) become replies
//! here too, so the session never spells a reply of its own.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;

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

    /// RCPT: an SRS address in our SRS domain that is forged or older than
    /// `srs.max_age`; its bounce has nowhere to go.
    pub fn invalid_srs() -> Reply {
        Reply::new(550, "5.1.1", "Invalid SRS address")
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
    /// A content filter (milter) or policy server is down and its
    /// default action is to fail for now (Postfix's wording).
    pub fn filter_unavailable() -> Reply {
        Reply::new(451, "4.7.1", "Service unavailable - try again later")
    }
    /// … or to refuse.
    pub fn filter_rejected() -> Reply {
        Reply::new(550, "5.7.1", "Command rejected")
    }
    /// A hook crashed, timed out or wrote what is not a verdict, and its
    /// `on_failure` is "tempfail".
    pub fn hook_failed() -> Reply {
        Reply::new(
            451,
            "4.3.0",
            "Temporary failure of a policy check, try again later",
        )
    }
    /// A reply an external program (a hook) wrote as one line: three
    /// digits (4 or 5 first: a refusal), an optional enhanced status of the
    /// same class, then printable ASCII text. None for anything else. A
    /// missing status becomes `x.7.1` (a policy refusal), since every
    /// reply after EHLO carries one (RFC 2034 §3).
    pub fn from_program(line: &str) -> Option<Reply> {
        /// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets.
        const MAX_TEXT: usize = 400;
        let line = line.trim_end_matches(['\r', '\n']);
        let (code, rest) = line.split_at_checked(3)?;
        let b = code.as_bytes();
        let class = b[0];
        if !matches!(class, b'4' | b'5') || !(b'0'..=b'5').contains(&b[1]) || !b[2].is_ascii_digit()
        {
            return None;
        }
        let rest = rest.strip_prefix(' ')?;
        let status_shaped = |s: &str| {
            let parts: Vec<&str> = s.split('.').collect();
            parts.len() == 3
                && parts.iter().zip([1, 3, 3]).all(|(p, max)| {
                    !p.is_empty() && p.len() <= max && p.bytes().all(|c| c.is_ascii_digit())
                })
        };
        let (first, after) = rest.split_once(' ').unwrap_or((rest, ""));
        let (status, text) = if status_shaped(first) {
            // RFC 3463 §2: the status's class is the reply's.
            if first.as_bytes()[0] != class {
                return None;
            }
            (first.to_string(), after)
        } else {
            (format!("{}.7.1", class as char), rest)
        };
        let text = text.trim();
        if text.is_empty()
            || text.len() > MAX_TEXT
            || !text.bytes().all(|c| (b' '..=b'~').contains(&c))
        {
            return None;
        }
        Some(Reply::new(code.parse().ok()?, status, text.to_string()))
    }
    pub fn delivered(id: &str) -> Reply {
        Reply::new(250, "2.0.0", format!("Ok: delivered as {id}"))
    }
    pub fn local_error() -> Reply {
        Reply::new(451, "4.3.0", "Local error in processing, try again later")
    }

    // ---- rate limits and greylisting ----

    /// `limits.connections_per_ip`: before the greeting, then closed.
    pub fn connection_rate_exceeded() -> Reply {
        Reply::new(
            421,
            "4.7.0",
            "Too many connections from your address recently, try again later",
        )
    }
    /// `limits.messages_per_ip`, to MAIL.
    pub fn message_rate_exceeded() -> Reply {
        Reply::new(
            450,
            "4.7.1",
            "Too many messages from your address recently, try again later",
        )
    }
    /// `limits.recipients_per_ip`, to RCPT.
    pub fn recipient_rate_exceeded() -> Reply {
        Reply::new(
            450,
            "4.7.1",
            "Too many recipients from your address recently, try again later",
        )
    }
    /// An unknown (network, sender, recipient), or its retry too soon.
    pub fn greylisted() -> Reply {
        Reply::new(450, "4.7.1", "Greylisted, try again later")
    }
    /// A pipe delivery exited 75 (EX_TEMPFAIL) or died of a signal.
    pub fn pipe_tempfail() -> Reply {
        Reply::new(
            451,
            "4.3.0",
            "Delivery command failed temporarily, try again later",
        )
    }
    /// A pipe delivery ran past `delivery.pipe_timeout` and was killed.
    pub fn pipe_timeout() -> Reply {
        Reply::new(451, "4.3.0", "Delivery command timed out, try again later")
    }
    /// A pipe delivery exited with another status: `detail` is the first
    /// line of its stderr (printable ASCII, bounded), or its exit status.
    pub fn pipe_refused(detail: &str) -> Reply {
        Reply::new(550, "5.3.0", format!("Delivery command failed: {detail}"))
    }

    // ---- trust checks (dnsbl.rs, auth/) ----

    /// The client is on a DNS blocklist (RFC 5782); postmaster still gets
    /// mail (RFC 5321 §4.5.1), and the reply says so.
    pub fn dnsbl_listed(ip: IpAddr, zone: &str) -> Reply {
        Reply::new(
            554,
            "5.7.1",
            format!(
                "Service unavailable; client [{ip}] is listed by {zone}; mail to postmaster is accepted"
            ),
        )
    }
    /// DNS lists that did not answer could decide whether the client is
    /// listed: a DNS failure is never an accept where a check enforces.
    pub fn dnsbl_unavailable() -> Reply {
        Reply::new(
            451,
            "4.4.3",
            "Cannot check your address against DNS blocklists now, try again later",
        )
    }
    /// SPF said `fail` at MAIL FROM under `auth.spf = "reject-fail"`
    /// (RFC 7372: 5.7.23 SPF validation failed).
    pub fn spf_fail(domain: &str, ip: IpAddr) -> Reply {
        Reply::new(
            550,
            "5.7.23",
            format!("SPF check failed: {domain} does not allow {ip} to send its mail"),
        )
    }
    /// SPF could not be evaluated for a DNS failure under `reject-fail`
    /// (RFC 7372: 4.7.24 SPF validation error).
    pub fn spf_temperror(domain: &str) -> Reply {
        Reply::new(
            451,
            "4.7.24",
            format!("SPF check of {domain} failed for a DNS error, try again later"),
        )
    }
    /// The From domain's DMARC policy is p=reject and the message fails it
    /// (RFC 7489 §6.6.2 suggests 5.7.1).
    pub fn dmarc_reject(domain: &str) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            format!("Message rejected by the DMARC policy of {domain}"),
        )
    }
    /// DMARC could not be evaluated for a DNS failure, where its answer
    /// would decide.
    pub fn dmarc_temperror(domain: &str) -> Reply {
        Reply::new(
            451,
            "4.4.3",
            format!("DMARC check of {domain} failed for a DNS error, try again later"),
        )
    }
}

impl From<&Failure> for Reply {
    /// Why a recipient's copy was not delivered, as its reply.
    fn from(f: &Failure) -> Reply {
        match f {
            Failure::QuotaExceeded => Reply::mailbox_full(),
            Failure::SinkFull => Reply::sink_full(),
            Failure::Local => Reply::local_error(),
            Failure::PipeTempFail => Reply::pipe_tempfail(),
            Failure::PipeTimeout => Reply::pipe_timeout(),
            Failure::PipeRefused(detail) => Reply::pipe_refused(detail),
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
            Refusal::InvalidSrs => Reply::invalid_srs(),
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

    #[test]
    fn replies_written_by_programs() {
        let wire = |l: &str| Reply::from_program(l).map(|r| r.to_wire());
        assert_eq!(
            wire("550 5.7.1 spam detected\n").as_deref(),
            Some("550 5.7.1 spam detected\r\n")
        );
        assert_eq!(
            wire("451 4.7.28 slow down").as_deref(),
            Some("451 4.7.28 slow down\r\n")
        );
        // Without a status, the policy one of the reply's class.
        assert_eq!(
            wire("554 no thanks").as_deref(),
            Some("554 5.7.1 no thanks\r\n")
        );
        for bad in [
            "spam detected",
            "250 2.0.0 fine",
            "550",
            "550 ",
            "5501 x",
            "560 x",
            "550-5.7.1 x",
            "550 5.7.1 caf\u{e9}",
            "550 5.7.1 a\tb",
            "550 5.7.1 ",
            "450 4.2.0",
            "550 4.7.1 class mismatch",
            "¡No pasarán!",
        ] {
            assert_eq!(wire(bad), None, "{bad:?}");
        }
        assert_eq!(wire(&format!("550 {}", "x".repeat(401))), None);
    }
}
