//! The SMTP engine: an ESMTP server (RFC 5321) for a receiving MX, which
//! also speaks LMTP (RFC 2033) for local clients.
//!
//! - [`command`]: one line in, one typed command out (pure).
//! - [`dot`]: the DATA decoder, smuggling-safe (pure).
//! - [`session`]: the state machine, generic over the stream and over the
//!   protocol; one file per stage: [`ehlo`], [`mail`], [`rcpt`], [`data`].
//!   It asks the [`crate::pipeline`] at every stage and writes every reply.
//!   On a submission port (`Connection::submission`) it also speaks AUTH
//!   (auth.rs, RFC 4954).
//!   STARTTLS is an outcome the caller handles by wrapping the stream and
//!   starting a new session.
//! - [`server`]: TCP and unix listeners, the global connection limits, TLS
//!   upgrade and shutdown.

mod auth;
pub mod command;
mod data;
pub mod dot;
mod ehlo;
mod mail;
mod rcpt;
pub mod server;
pub mod session;

pub use server::Server;
pub use session::{Outcome, Protocol, Session};
