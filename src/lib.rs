//! letterbox: a virtual-user maildir MTA backed by SQL.
//!
//! Mail arrives over SMTP (or LMTP from a local MTA), every recipient is
//! checked against the SQL directory at RCPT time, and each accepted copy
//! is written atomically into `<root>/<domain>/<local>/` maildirs before
//! the 250 reply. Wildcard subdomains may instead route to an ephemeral
//! in-memory sink.
//!
//! # Map of the modules
//! - [`cli`]: the command line, one module per noun (domain, user, alias, sink, queue, dkim, check).
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
//! - [`queue`]: the outbound queue on disk: one message file and one state file per entry, durable before the 250; DSNs.
//! - [`srs`]: the Sender Rewriting Scheme (postsrsd-compatible SRS0/SRS1) for forwarded mail and the bounces that come back.
//! - [`outbound`]: delivery of queued mail: MX lookup, SMTP client with STARTTLS, MTA-STS, smarthost, retries and bounces.
//! - [`dns`]: the one DNS resolver of a running server, from `[dns]`.
//! - [`delivery`]: durable all-or-nothing delivery into maildirs (stage in tmp/, link into new/, fsync), quota, tmp sweeping; delivery into pipe commands.
//! - [`process`]: external programs (hooks, pipe commands): no shell, clean environment, bounded output, killed with their process group at a timeout.
//! - [`sink`]: the ephemeral in-memory catch-all: bounded store, sanitizing viewer, web page and JSON API.
//! - [`tls`]: certificates and keys into a rustls server config.
//! - [`limits`]: connection limits shared by every listener.
//! - [`net`]: IP networks as written in the config, and the groups clients are counted under.
//! - [`ratelimit`]: connections, recipients and messages per client per window; the store the counts live in.
//! - [`greylist`]: the check that defers an unknown (network, sender, recipient) at RCPT, its state in the directory.
//! - [`auth`]: sender authentication: SPF, DKIM, DMARC and ARC verified into one Authentication-Results field.
//! - [`dnsbl`]: DNS blocklists and allowlists asked about each SMTP client at connect, enforced at RCPT.
//! - [`runtime`]: the shared parts of a running server (directory, maildirs, sink, TLS, DNS, limits), outside any protocol.
//! - [`hooks`]: command hooks, chasquid-compatible programs that decide at a stage, as one pipeline check.
//! - [`pipeline`]: the seam between a session and everything that decides about or stores a message: stages, checks and their verdicts, recipient resolution, the content's storage plan, message edits, delivery with per-recipient outcomes.
//! - [`reply`]: every SMTP/LMTP reply, spelled in one place, including those for pipeline outcomes.
//! - [`smtp`]: the ESMTP/LMTP session and listeners: command parser, DATA decoder, session per connection.
//! - [`lmtp`]: LMTP intake: binding its TCP and unix sockets.
//! - [`endpoint`]: `inet:HOST:PORT` / `unix:/path` service addresses, as Postfix writes them.
//! - [`milter`]: a Sendmail milter client (protocol 6) for content filters such as rspamd and OpenDKIM.
//! - [`policy`]: a Postfix policy delegation client (SMTPD_POLICY_README) for servers such as postgrey.
//! - [`serve`]: `letterbox serve`, wiring the runtime, the pipeline and the listeners together.
//!
//! See `docs/flow.md` for one message's path from connect to fsync.

pub mod address;
pub mod auth;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod dkim;
pub mod dns;
pub mod dnsbl;
pub mod endpoint;
pub mod envelope;
pub mod greylist;
pub mod hooks;
pub mod limits;
pub mod lmtp;
pub mod logging;
pub mod milter;
pub mod net;
pub mod outbound;
pub mod password;
pub mod pipeline;
pub mod policy;
pub mod process;
pub mod queue;
pub mod ratelimit;
pub mod reply;
pub mod runtime;
pub mod serve;
pub mod sink;
pub mod smtp;
pub mod spool;
pub mod srs;
pub mod submission;
pub mod tls;
pub mod units;
