//! A Sendmail milter client (protocol version 6, as Postfix speaks it), for
//! content filters such as rspamd and OpenDKIM.
//!
//! A milter is a per-connection state machine on the milter's side, so a
//! [`Milter`] is one connection for one SMTP session: connect and
//! negotiate, report each stage (connect, HELO, MAIL, RCPT, DATA, headers,
//! body, end of message) and get a typed [`Response`] back, then
//! [`Milter::abort`] between messages and [`Milter::quit`] at the end. At
//! the end of a message the milter may also ask for [`Modification`]s
//! (header and body edits, recipient changes), which the caller applies.
//!
//! Everything here is plain data in, typed results out: nothing knows the
//! SMTP session. A milter that is down, too slow or breaks the protocol
//! gives a [`MilterError`]; the caller then applies its configured default
//! action (accept, tempfail, reject), as Postfix's `milter_default_action`.
//!
//! - [`codec`]: the wire format, pure and unit-tested byte for byte.
//! - [`client`]: the connection, negotiation, macros per stage, timeouts.

#![warn(missing_docs)]

pub mod check;
pub mod client;
pub mod codec;

pub use check::MilterCheck;
pub use client::{Milter, MilterOptions};
pub use codec::{Actions, ClientAddress, MacroStage, Negotiation, ProtocolFlags, SmtpReply};

use std::net::SocketAddr;
use std::time::Duration;

/// What a milter decided at one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// No objection; go on. Also the answer for a stage the milter chose
    /// not to see or not to answer, and for every stage after it accepted.
    Continue,
    /// Accept without further checks: the rest of this message (or, at
    /// connect and HELO, of this connection) is not shown to the milter.
    Accept,
    /// Accept the message and silently drop it.
    Discard,
    /// Reject; the MTA answers `550 5.7.1 Command rejected`. At RCPT it
    /// rejects only that recipient.
    Reject,
    /// Fail temporarily; the MTA answers `451 4.7.1 Service unavailable -
    /// try again later`.
    TempFail,
    /// Reject or fail temporarily with the milter's own 4xx/5xx reply.
    ReplyCode(SmtpReply),
    /// Accept, but hold the message for review (deliver it to a junk or
    /// quarantine folder), for the reason given. Sent with Continue or
    /// Accept; a Reject or Discard in the same answer wins over it.
    Quarantine(String),
    /// Answer `421 4.7.0` and close the SMTP connection.
    Shutdown,
}

impl Response {
    /// The SMTP reply the MTA gives for this response, if it refuses:
    /// the milter's own for [`Response::ReplyCode`], Postfix's wording
    /// for the others. `None` for the responses that let mail through.
    pub fn smtp_reply(&self) -> Option<SmtpReply> {
        let fixed = |code, status: &str, text: &str| SmtpReply {
            code,
            enhanced: Some(status.to_string()),
            text: text.to_string(),
        };
        match self {
            Response::Reject => Some(fixed(550, "5.7.1", "Command rejected")),
            Response::TempFail => {
                Some(fixed(451, "4.7.1", "Service unavailable - try again later"))
            }
            Response::Shutdown => Some(fixed(421, "4.7.0", "Service unavailable")),
            Response::ReplyCode(r) => Some(r.clone()),
            Response::Continue | Response::Accept | Response::Discard | Response::Quarantine(_) => {
                None
            }
        }
    }
}

/// The milter's verdict at the end of a message, with the edits it asked
/// for, in the order it sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndOfMessage {
    /// The verdict on the message.
    pub response: Response,
    /// Empty unless the response lets the message through; a rejected
    /// message needs no edits.
    pub modifications: Vec<Modification>,
}

/// An edit a milter asks for at the end of a message. Header values are
/// exactly what follows the colon on the header line (a leading space
/// included), with line breaks of folded values as CRLF: the field to
/// write is `name + ":" + value + "\r\n"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modification {
    /// Append a header field after the last one.
    AddHeader {
        /// The field name.
        name: String,
        /// The text after the colon.
        value: String,
    },
    /// Insert a header field before the `index`-th field (0 = at the top).
    /// DKIM signers use this to put their signature first.
    InsertHeader {
        /// Fields to skip from the top before inserting.
        index: u32,
        /// The field name.
        name: String,
        /// The text after the colon.
        value: String,
    },
    /// Replace the `index`-th (1-based) field called `name`
    /// (case-insensitively); `value: None` deletes it. An index past the
    /// last such field adds the field at the end, as libmilter's
    /// smfi_chgheader documents (a deletion there changes nothing).
    ChangeHeader {
        /// Which field of that name, from 1.
        index: u32,
        /// The field name.
        name: String,
        /// The new text after the colon, or `None` to delete the field.
        value: Option<String>,
    },
    /// Replace the whole body with this (CRLF line ends).
    ReplaceBody(Vec<u8>),
    /// Add a recipient, with ESMTP parameters if given.
    AddRecipient {
        /// The address, as the milter wrote it (usually `<a@b>`).
        recipient: String,
        /// ESMTP parameters, if any.
        args: Option<String>,
    },
    /// Remove a recipient.
    DeleteRecipient(String),
    /// Replace the envelope sender, with ESMTP parameters if given.
    ChangeSender {
        /// The address, as the milter wrote it (usually `<a@b>`).
        sender: String,
        /// ESMTP parameters, if any.
        args: Option<String>,
    },
}

/// The client connection, for the connect stage (the `C` packet and the
/// connect macros).
#[derive(Debug, Clone, Default)]
pub struct ConnectInfo {
    /// This host's name: macro `j`, what milters write into their headers
    /// (`Authentication-Results: <j>`, rspamd's `X-Rspamd-Server`).
    pub hostname: String,
    /// Macro `{daemon_name}`: which of the MTA's listeners took the
    /// connection; milters like OpenDKIM pick signing or verifying by it.
    pub daemon_name: String,
    /// Where the client connected to: `{daemon_addr}`, `{daemon_port}`.
    pub local: Option<SocketAddr>,
    /// The client's address and port; `None` when unknown.
    pub client: Option<SocketAddr>,
    /// The client's verified (forward-confirmed) host name, if any:
    /// `{client_name}`, and the host name in the `C` packet (else
    /// `[address]`, as Postfix sends).
    pub client_name: Option<String>,
    /// The client's reverse DNS name, verified or not: `{client_ptr}`.
    pub client_ptr: Option<String>,
}

/// The HELO/EHLO stage.
#[derive(Debug, Clone, Default)]
pub struct HeloInfo {
    /// The HELO/EHLO argument (macro `s`).
    pub name: String,
    /// The TLS session, when the client used STARTTLS (the client says
    /// EHLO again after it, so this stage carries it).
    pub tls: Option<TlsInfo>,
}

/// A TLS session, for the `{tls_version}`… macros.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// `{tls_version}`, e.g. `TLSv1.3`.
    pub version: String,
    /// `{cipher}`, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// `{cipher_bits}`: the symmetric key size.
    pub cipher_bits: Option<u32>,
    /// `{cert_subject}`: a verified client certificate's subject.
    pub cert_subject: Option<String>,
    /// `{cert_issuer}`: its issuer.
    pub cert_issuer: Option<String>,
}

/// The MAIL FROM stage: a new transaction.
#[derive(Debug, Clone, Default)]
pub struct MailInfo {
    /// The reverse-path without angle brackets; empty for the null sender.
    /// Sent as `<sender>` and as `{mail_addr}`.
    pub sender: String,
    /// The ESMTP parameters as given (`SIZE=1000`, `BODY=8BITMIME`).
    pub args: Vec<String>,
    /// The transaction's id: macro `i`, which milters log and put in their
    /// headers to tie them to the MTA's log.
    pub queue_id: String,
    /// The client's SASL login, if it authenticated.
    pub auth: Option<AuthInfo>,
}

/// A SASL login, for the `{auth_*}` macros; OpenDKIM signs mail from
/// authenticated clients, and rspamd skips some checks for them.
#[derive(Debug, Clone, Default)]
pub struct AuthInfo {
    /// `{auth_type}`: the mechanism, e.g. `PLAIN`.
    pub mechanism: String,
    /// `{auth_authen}`: the login name.
    pub username: String,
    /// `{auth_author}`: the MAIL FROM `AUTH=` parameter, if given.
    pub author: Option<String>,
}

/// The RCPT TO stage: one recipient.
#[derive(Debug, Clone, Default)]
pub struct RcptInfo {
    /// The forward-path without angle brackets: sent as `<recipient>` and
    /// as `{rcpt_addr}`.
    pub recipient: String,
    /// The ESMTP parameters as given (`NOTIFY=NEVER`).
    pub args: Vec<String>,
}

/// Why a milter gave no usable answer. In every case the connection is
/// unusable afterwards and the caller applies its default action.
#[derive(Debug, thiserror::Error)]
pub enum MilterError {
    /// The address string names no milter.
    #[error(transparent)]
    Address(#[from] crate::endpoint::EndpointError),
    /// The milter could not be reached (refused, no such socket, …).
    #[error("cannot connect to milter {endpoint}: {source}")]
    Connect {
        /// The milter's address, for the log.
        endpoint: String,
        /// What the system said (refused, no such file, …).
        source: std::io::Error,
    },
    /// Reading from or writing to the milter failed.
    #[error("milter I/O error during {during}: {source}")]
    Io {
        /// The stage (`connect`, `helo`, `end of message`, …).
        during: &'static str,
        /// What the system said.
        source: std::io::Error,
    },
    /// The milter closed the connection.
    #[error("milter closed the connection during {during}")]
    Closed {
        /// The stage.
        during: &'static str,
    },
    /// The milter did not answer in time.
    #[error("milter timed out after {after:?} during {during}")]
    Timeout {
        /// The stage.
        during: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The milter sent something the protocol does not allow here.
    #[error("milter protocol error during {during}: {why}")]
    Protocol {
        /// The stage.
        during: &'static str,
        /// What it sent.
        why: String,
    },
    /// The milter's bytes do not decode.
    #[error("milter sent a bad packet during {during}: {source}")]
    Decode {
        /// The stage.
        during: &'static str,
        /// What is wrong with the packet.
        source: codec::DecodeError,
    },
    /// What the caller gave cannot be sent (a NUL in a string).
    #[error("cannot send to milter during {during}: {source}")]
    Encode {
        /// The stage.
        during: &'static str,
        /// What cannot be encoded.
        source: codec::EncodeError,
    },
    /// A stage was reported out of order (say, MAIL before connect).
    #[error("milter stage {stage} called out of order")]
    OutOfOrder {
        /// The stage that came too early or too late.
        stage: &'static str,
    },
    /// An earlier error left this connection unusable.
    #[error("milter connection is unusable after an earlier error")]
    Unusable,
}
