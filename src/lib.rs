//! letterbox: a virtual-user maildir MTA backed by SQL.
//!
//! Mail arrives over SMTP (or LMTP from a local MTA), every recipient is
//! checked against the SQL directory at RCPT time, and each accepted copy
//! is written atomically into `<root>/<domain>/<local>/` maildirs before
//! the 250 reply. Wildcard subdomains may instead route to an ephemeral
//! in-memory sink.
//!
//! # Map of the modules
//! - [`cli`]: the command line, one module per noun (domain, user, alias, sink, dkim, check).
//! - [`config`]: the configuration as written: defaults, TOML file, `LETTERBOX_…` variables.
//! - [`logging`]: the log on stderr, text or JSON, coloured only on a terminal without `NO_COLOR`.
//! - [`blocking`]: blocking work moved off the async runtime, and the debug guard that proves it.
//! - [`units`]: durations (`1h`) and sizes (`500M`) as people write them.
//! - [`address`]: the one place addresses become canonical (case, IDNA, safe local parts).
//! - [`password`]: `{ARGON2ID}` hashes that Dovecot verifies.
//! - [`submission`]: our users sending mail (RFC 6409): SASL PLAIN/LOGIN, password checks bounded and off the runtime, failed-login lockout.
//! - [`dkim`]: DKIM keys (generated, published as DNS records) and signatures on submitted mail.
//! - [`directory`]: the SQL directory on SQLite, PostgreSQL or MySQL; admin changes and RCPT-time resolution.
//! - [`envelope`]: what a received message hands to delivery: sender, routed recipients, trace facts.
//! - [`spool`]: a message's content between DATA and delivery, in memory or an unlinked file.
//! - [`delivery`]: durable all-or-nothing delivery into maildirs (stage in tmp/, link into new/, fsync), quota, tmp sweeping.
//! - [`sink`]: the ephemeral in-memory catch-all: bounded store, sanitizing viewer, web page and JSON API.
//! - [`tls`]: certificates and keys into a rustls server config.
//! - [`limits`]: connection limits shared by every listener.
//! - [`runtime`]: the shared parts of a running server (directory, maildirs, sink, TLS, DNS, limits), outside any protocol.
//! - [`pipeline`]: the seam between a session and everything that decides about or stores a message: stages, checks and their verdicts, recipient resolution, the content's storage plan, delivery with per-recipient outcomes.
//! - [`reply`]: every SMTP/LMTP reply, spelled in one place, including those for pipeline outcomes.
//! - [`smtp`]: the ESMTP/LMTP session and listeners: command parser, DATA decoder, session per connection.
//! - [`lmtp`]: LMTP intake: binding its TCP and unix sockets.
//! - [`serve`]: `letterbox serve`, wiring the runtime, the pipeline and the listeners together.
//!
//! See `docs/flow.md` for one message's path from connect to fsync.

pub mod address;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod dkim;
pub mod envelope;
pub mod limits;
pub mod lmtp;
pub mod logging;
pub mod password;
pub mod pipeline;
pub mod reply;
pub mod runtime;
pub mod serve;
pub mod sink;
pub mod smtp;
pub mod spool;
pub mod submission;
pub mod tls;
pub mod units;
