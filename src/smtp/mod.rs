//! The SMTP engine: an ESMTP server (RFC 5321) for a receiving MX.
//!
//! - [`reply`]: every reply, written in one place.
//! - [`command`]: one line in, one typed command out (pure).
//! - [`dot`]: the DATA decoder, smuggling-safe (pure).
//! - [`session`]: the state machine, generic over the stream; one file per
//!   stage: [`ehlo`], [`mail`], [`rcpt`], [`data`]. STARTTLS is an outcome
//!   the caller handles by wrapping the stream and starting a new session.
//! - [`server`]: listeners, connection limits, TLS upgrade and shutdown.

pub mod command;
mod data;
pub mod dot;
mod ehlo;
mod mail;
mod rcpt;
pub mod reply;
pub mod server;
pub mod session;

pub use server::{Context, Server};
pub use session::{Outcome, Session};
