//! A client for Postfix's SMTP access policy delegation protocol
//! (SMTPD_POLICY_README), spoken by policy servers such as postgrey
//! (greylisting), policyd-spf and policyd-rate-limit.
//!
//! One request is `name=value` lines ended by an empty line, describing
//! the SMTP session at one stage (CONNECT, HELO, MAIL, RCPT, DATA,
//! END-OF-MESSAGE…); the answer is the same format with one `action`, any
//! word Postfix's access(5) tables allow. A policy server keeps no state
//! per connection, so the client keeps connections open and reuses them
//! across SMTP sessions.
//!
//! Plain data in, typed results out; nothing here knows the SMTP session.
//! A server that is down, slow or garbled gives a [`PolicyError`], and the
//! caller applies its default action (Postfix's
//! `smtpd_policy_service_default_action`, `451 4.3.5` by default).
//!
//! - [`request`]: the attributes Postfix sends, and their encoding.
//! - [`response`]: the answer, parsed into an [`Action`].
//! - [`client`]: connections, reuse, reconnect, timeouts.

#![warn(missing_docs)]

pub mod check;
pub mod client;
pub mod request;
pub mod response;

pub use check::PolicyCheck;
pub use client::{PolicyClient, PolicyOptions};
pub use request::{PolicyRequest, ProtocolState};
pub use response::{Action, PolicyReply};

use std::time::Duration;

/// Why a policy server gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The address string names no server.
    #[error(transparent)]
    Address(#[from] crate::endpoint::EndpointError),
    /// The server could not be reached (refused, no such socket, …).
    #[error("cannot connect to policy server {endpoint}: {source}")]
    Connect {
        /// The server's address, for the log.
        endpoint: String,
        /// What the system said (refused, no such file, …).
        source: std::io::Error,
    },
    /// Reading or writing failed on a fresh connection.
    #[error("policy server I/O error: {0}")]
    Io(#[source] std::io::Error),
    /// The server closed the connection without answering; by the
    /// protocol, that is how a server in trouble answers.
    #[error("policy server closed the connection without an answer")]
    Closed,
    /// No complete answer in time.
    #[error("policy server did not answer within {after:?}")]
    Timeout {
        /// The timeout that ran out.
        after: Duration,
    },
    /// The answer breaks the protocol: no `action`, a line without `=`,
    /// or more bytes than the limit.
    #[error("bad answer from policy server: {0}")]
    Protocol(String),
}
