//! Submission (RFC 6409, RFC 8314): our own users sending mail from their
//! mail clients, on ports 587 (STARTTLS) and 465 (implicit TLS).
//!
//! The session is the ordinary SMTP session with the submission flag set
//! on its connection (`smtp::session::Connection::submission`); this module
//! holds what that flag adds, outside any protocol code:
//! - [`sasl`]: AUTH PLAIN and LOGIN responses decoded (pure);
//! - [`logins`]: passwords checked against the directory's argon2 hashes,
//!   a bounded number at a time on the blocking pool, and failed logins
//!   counted per client address, which is locked out past
//!   `limits.auth_failures`;
//!
//! The rate is `crate::ratelimit::Rate`, as for the inbound limits.
//!
//! Who may send as which address, where relayed recipients go and the DKIM
//! signature are pipeline steps (`pipeline::submission`).

pub mod logins;
pub mod sasl;

pub use crate::ratelimit::Rate;
pub use logins::{Login, Logins};
