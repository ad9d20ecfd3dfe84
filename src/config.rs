//! The configuration as the operator wrote it: built-in defaults, then a TOML
//! file, then `LETTERBOX_…` environment variables (`__` separates levels, as
//! in `LETTERBOX_DATABASE__URL`).
//!
//! A variable is configuration when its first segment names a top-level key
//! (`LETTERBOX_SMTP__…`, `LETTERBOX_HOSTNAME`); those are checked as
//! strictly as the file. Any other `LETTERBOX_…` variable (a wrapper's
//! `LETTERBOX_BIN`, say) is not ours to refuse: it is ignored, and named in
//! [`Config::warnings`] for the caller to report. `LETTERBOX_TEST_…` is
//! reserved for the test suites and ignored silently.
//!
//! This is the plain, validated value. Resolved runtime objects (pools, the
//! TLS acceptor, the sink store) are built from it elsewhere.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::net::Network;
use crate::ratelimit::Rate;
use crate::units::{ByteSize, Duration};

/// Where a config file is looked for when `--config` is not given, in order.
pub const DEFAULT_PATHS: [&str; 2] = ["letterbox.toml", "/etc/letterbox/letterbox.toml"];

/// Errors from loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that does not exist or cannot be read.
    #[error("config file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A key is unknown, has the wrong type, or a value does not parse;
    /// figment's message names the key and where it came from.
    #[error("{0}")]
    Invalid(#[from] Box<figment::Error>),
    /// The values parse but do not make sense together.
    #[error("config: {0}")]
    Inconsistent(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our name in the greeting, EHLO reply and Received headers.
    pub hostname: String,
    pub database: DatabaseConfig,
    pub smtp: SmtpConfig,
    pub tls: TlsConfig,
    pub maildir: MaildirConfig,
    pub sink: SinkConfig,
    pub log: LogConfig,
    pub lmtp: LmtpConfig,
    pub dns: DnsConfig,
    pub outbound: OutboundConfig,
    pub queue: QueueConfig,
    /// Milters, consulted in this order (`[[milters]]`).
    pub milters: Vec<MilterConfig>,
    /// Policy servers, consulted in this order (`[[policy]]`).
    pub policy: Vec<PolicyConfig>,
    pub limits: LimitsConfig,
    pub greylist: GreylistConfig,
    /// Sender authentication (SPF, DKIM, DMARC, ARC) and what it enforces.
    pub auth: AuthConfig,
    /// DNS blocklists and allowlists asked about every SMTP client.
    pub dnsbl: Vec<DnsblConfig>,
    pub submission: SubmissionConfig,
    /// `LETTERBOX_…` variables that name no configuration key and were
    /// therefore ignored, as they were spelled. Not configuration itself:
    /// kept so that the warning can be given once the log is set up.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
    /// How copies reach targets other than maildirs (pipe commands).
    pub delivery: DeliveryConfig,
    /// Command hooks (`[[hooks]]`), run in this order at their stage.
    pub hooks: Vec<crate::hooks::HookConfig>,
    /// The Sender Rewriting Scheme for mail an alias forwards to another
    /// server.
    pub srs: SrsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path`, `postgres://…`, `mysql://…` or `mariadb://…`.
    pub url: String,
    /// Upper bound on pooled connections.
    pub max_connections: u32,
    /// How long a recipient lookup is remembered by a running server. CLI
    /// changes become visible to the server after at most this long; `0s`
    /// turns the cache off.
    pub cache_ttl: Duration,
}

/// What to do with a bare LF (without CR) inside message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLf {
    /// Treat it as a line ending (as most MTAs do) and store CRLF.
    Normalize,
    /// Refuse the message with 550 5.5.2.
    Reject,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Addresses to accept SMTP on.
    pub listen: Vec<SocketAddr>,
    /// Largest message accepted, in bytes (advertised as SIZE).
    pub max_message_size: ByteSize,
    /// Recipients per transaction; RFC 5321 §4.5.3.1.8 requires at least 100.
    pub max_recipients: usize,
    /// Longest command line including CRLF. RFC 5321 §4.5.3.1.4 says 512,
    /// extensions add to it; Postfix accepts 2048.
    pub max_line_length: usize,
    /// Errors after which the session is closed with 421.
    pub max_errors: u32,
    /// Idle time allowed between commands (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub command_timeout: Duration,
    /// Idle time allowed while receiving DATA or BDAT (§4.5.3.2.6: 3 minutes).
    pub data_timeout: Duration,
    /// Connections served at once; more are told 421 and closed.
    pub max_connections: usize,
    /// Connections from one IP address at once; loopback is not exempt.
    pub max_connections_per_ip: usize,
    /// Separator of subaddresses: `user+tag@domain` reaches `user`. Empty
    /// disables subaddressing.
    pub subaddress_delimiter: String,
    /// Normalize or reject bare LF in message content.
    pub bare_lf: BareLf,
    /// Look up the client's reverse DNS name for the Received header.
    pub reverse_dns: bool,
    /// On shutdown, how long transactions already in DATA may take to finish.
    pub shutdown_grace: Duration,
    /// Wait this long before the greeting; a client that talks first is
    /// refused with 554 (pregreet detection, as Postfix's postscreen). 0
    /// still refuses a client whose bytes are already waiting at connect.
    pub greeting_delay: Duration,
    /// A client whose DNSBL weights add up to this or more is refused at
    /// RCPT (postmaster excepted).
    pub dnsbl_threshold: i32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key`, STARTTLS is offered.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaildirConfig {
    /// Mail for alice@example.org lands in `<root>/example.org/alice/`.
    pub root: PathBuf,
    /// Messages up to this size are spooled in memory, larger ones in a
    /// file under the root.
    pub spool_memory_limit: ByteSize,
    /// Deliver `user+tag@domain` into the Maildir++ folder `.tag` (created
    /// on demand) instead of the inbox.
    pub subaddress_folders: bool,
}

/// What the sink does when a new message does not fit in its memory bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// Drop the oldest messages to make room.
    Evict,
    /// Refuse the new message with 452 4.3.1.
    Refuse,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Serve the sink's web page and API. Sink rules still route mail into
    /// memory when this is off; they just cannot be read over HTTP.
    pub enabled: bool,
    /// Address of the web page and JSON API.
    pub http_listen: SocketAddr,
    /// Total bytes of message data held in memory.
    pub max_bytes: ByteSize,
    /// Messages kept per sink mailbox.
    pub max_messages_per_mailbox: usize,
    /// TTL of rules that do not set one.
    pub default_ttl: Duration,
    /// Evict the oldest or refuse new mail when a bound is reached.
    pub when_full: WhenFull,
    /// Rules from the config file, in addition to those in the database.
    pub rules: Vec<SinkRuleConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkRuleConfig {
    /// `*.tmp.example.org` or an exact domain.
    pub pattern: String,
    /// How long messages are kept; the sink's default when absent.
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `letterbox=debug`; `RUST_LOG`
    /// overrides it.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// LMTP (RFC 2033): mail handed to us by trusted local clients, such as
/// another MTA or a content filter, with a reply per recipient.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpConfig {
    /// Addresses to accept LMTP on; empty (the default) turns LMTP off.
    /// LMTP has no authentication, so these belong on loopback or a unix
    /// socket, never on a public address.
    pub listen: Vec<ListenAddr>,
    /// Group of the unix sockets (mode 0660), so that another MTA's user
    /// can be let in without being letterbox's own group: Postfix's
    /// `lmtp` client runs as `postfix`. Unset: the server's own group.
    pub socket_group: Option<String>,
}

/// The resolver every DNS lookup goes through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers to ask (`127.0.0.1:53`); empty: the system's
    /// `/etc/resolv.conf`.
    pub servers: Vec<SocketAddr>,
    /// How long one query waits for an answer (it is tried twice).
    pub timeout: Duration,
}

/// What SPF does with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpfPolicy {
    /// Not reported (DMARC still evaluates SPF when it is on).
    Off,
    /// Reported in Authentication-Results; the MAIL reply does not wait.
    Tag,
    /// Also refuse a `fail` at MAIL FROM (550 5.7.23) and a `temperror`
    /// (451 4.7.24); the MAIL reply waits for the lookup.
    RejectFail,
}

/// A method that is only reported (DKIM, ARC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagPolicy {
    /// Not reported (DMARC still verifies DKIM when it is on).
    Off,
    /// Reported in Authentication-Results.
    Tag,
}

/// What DMARC does with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmarcPolicy {
    /// Not evaluated.
    Off,
    /// Reported in Authentication-Results only.
    Tag,
    /// Reported, and the domain's policy applied: p=reject refuses the
    /// message (550 5.7.1), p=quarantine delivers it into `.Junk`.
    Enforce,
}

/// Sender authentication of mail arriving over SMTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub spf: SpfPolicy,
    pub dkim: TagPolicy,
    pub dmarc: DmarcPolicy,
    pub arc: TagPolicy,
    /// Also add a Received-SPF field (RFC 7208 §9.1).
    pub received_spf: bool,
}

impl AuthConfig {
    /// Whether any method runs at all.
    pub fn any(&self) -> bool {
        self.spf != SpfPolicy::Off
            || self.dkim != TagPolicy::Off
            || self.dmarc != DmarcPolicy::Off
            || self.arc != TagPolicy::Off
    }
}

/// One DNS blocklist (positive weight) or allowlist (negative weight).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsblConfig {
    /// The list's zone, e.g. `zen.spamhaus.org`.
    pub zone: String,
    /// Added to the client's score when the list names it.
    #[serde(default = "one")]
    pub weight: i32,
    /// Only these answers count as a listing; empty: any answer in
    /// 127.0.0.0/8.
    #[serde(default)]
    pub codes: Vec<Ipv4Addr>,
}

fn one() -> i32 {
    1
}

/// Submission (RFC 6409, RFC 8314): mail from our own users' mail clients,
/// who log in with their address and password and may then send to any
/// domain. Both lists empty (the default) turns it off: an MX-only server
/// needs none of it, and a submission port is a password-guessing target
/// worth opening on purpose. Production sets `listen = ["0.0.0.0:587"]`
/// and `listen_tls = ["0.0.0.0:465"]`; either needs `tls.cert` and `tls.key`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    /// Addresses for submission with STARTTLS (port 587); AUTH is offered
    /// only once TLS is on.
    pub listen: Vec<SocketAddr>,
    /// Addresses for submission over implicit TLS (port 465, RFC 8314):
    /// TLS from the first byte.
    pub listen_tls: Vec<SocketAddr>,
    /// Password checks (argon2, about 19 MiB and tens of milliseconds of
    /// CPU each) run at once, on the blocking pool; more wait their turn,
    /// so a login flood cannot take every core or much memory. 0 (the
    /// default) means one per CPU core.
    pub auth_concurrency: usize,
}

impl SubmissionConfig {
    /// Whether any submission listener is configured.
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty() || !self.listen_tls.is_empty()
    }

    /// Password checks allowed at once.
    pub fn auth_slots(&self) -> usize {
        match self.auth_concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Where a listener accepts connections. Written as a string: `IP:PORT`
/// (`127.0.0.1:2424`, `[::1]:2424`) or `unix:/ABSOLUTE/PATH`; [`Display`]
/// gives back the same form.
///
/// [`Display`]: fmt::Display
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP address with its port.
    Tcp(SocketAddr),
    /// A unix socket at this absolute path.
    Unix(PathBuf),
}

/// Why a string is not a [`ListenAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenAddrError {
    /// Neither `unix:…` nor an IP address with a port (host names are not
    /// resolved: a listener binds an address).
    #[error(
        "invalid listen address {0:?}: expected IP:PORT (127.0.0.1:2424, [::1]:2424) or unix:/ABSOLUTE/PATH"
    )]
    Unrecognized(String),
    /// `unix:` with a relative or empty path, which would depend on the
    /// working directory the server happens to start in.
    #[error(
        "invalid listen address {0:?}: a unix socket path must be absolute (unix:/ABSOLUTE/PATH)"
    )]
    RelativeUnixPath(String),
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(ListenAddrError::RelativeUnixPath(s.into()));
            }
            return Ok(ListenAddr::Unix(path));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| ListenAddrError::Unrecognized(s.into()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: default_hostname(),
            database: DatabaseConfig::default(),
            smtp: SmtpConfig::default(),
            tls: TlsConfig::default(),
            maildir: MaildirConfig::default(),
            sink: SinkConfig::default(),
            log: LogConfig::default(),
            lmtp: LmtpConfig::default(),
            dns: DnsConfig::default(),
            outbound: OutboundConfig::default(),
            queue: QueueConfig::default(),
            milters: Vec::new(),
            policy: Vec::new(),
            limits: LimitsConfig::default(),
            greylist: GreylistConfig::default(),
            auth: AuthConfig::default(),
            dnsbl: Vec::new(),
            submission: SubmissionConfig::default(),
            ignored_env: Vec::new(),
            delivery: DeliveryConfig::default(),
            hooks: Vec::new(),
            srs: SrsConfig::default(),
        }
    }
}

/// SRS (`crate::srs`): forwarded copies leave with an `SRS0=…@domain`
/// envelope sender, and bounces to such addresses go back to the sender.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SrsConfig {
    /// The file holding the HMAC secret (its first line, trimmed), read
    /// once at start; empty turns SRS off and forwarded mail keeps its
    /// original envelope sender.
    pub secret_file: PathBuf,
    /// The domain of our SRS addresses; empty is `hostname` without its
    /// first label (`mx.example.org` → `example.org`).
    pub domain: String,
    /// How long an SRS address stays valid for a bounce (whole days).
    pub max_age: Duration,
}

impl Default for SrsConfig {
    fn default() -> Self {
        SrsConfig {
            secret_file: PathBuf::new(),
            domain: String::new(),
            max_age: Duration::from_secs(21 * 86400),
        }
    }
}

impl Config {
    /// The SRS domain: `srs.domain`, else derived from `hostname`.
    pub fn srs_domain(&self) -> String {
        if self.srs.domain.is_empty() {
            crate::srs::default_domain(&self.hostname)
        } else {
            self.srs.domain.clone()
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://letterbox.db".into(),
            max_connections: 16,
            cache_ttl: Duration::from_secs(5),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            max_message_size: ByteSize(25 << 20),
            max_recipients: 100,
            max_line_length: 2048,
            max_errors: 20,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_connections: 1000,
            max_connections_per_ip: 50,
            subaddress_delimiter: "+".into(),
            bare_lf: BareLf::Normalize,
            reverse_dns: true,
            shutdown_grace: Duration::from_secs(30),
            greeting_delay: Duration::from_secs(0),
            dnsbl_threshold: 1,
        }
    }
}

impl Default for MaildirConfig {
    fn default() -> Self {
        MaildirConfig {
            root: PathBuf::from("mail"),
            spool_memory_limit: ByteSize(1 << 20),
            subaddress_folders: false,
        }
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            enabled: true,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
            max_bytes: ByteSize(256 << 20),
            max_messages_per_mailbox: 100,
            default_ttl: Duration::from_secs(3600),
            when_full: WhenFull::Evict,
            rules: Vec::new(),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            spf: SpfPolicy::Tag,
            dkim: TagPolicy::Tag,
            dmarc: DmarcPolicy::Enforce,
            arc: TagPolicy::Tag,
            received_spf: false,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Rate limits per client (`crate::ratelimit`): each `N/DURATION`, or
/// `""` for off. IPv6 clients count by /64; unix-socket clients and the
/// `exempt` networks are not counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Messages accepted per client per window; past it MAIL gets 450 4.7.1.
    #[serde(with = "crate::ratelimit::optional")]
    pub messages_per_ip: Option<Rate>,
    /// Recipients accepted per client per window; past it RCPT gets 450 4.7.1.
    #[serde(with = "crate::ratelimit::optional")]
    pub recipients_per_ip: Option<Rate>,
    /// New connections per client per window, beside the concurrency cap;
    /// past it a connection gets 421 4.7.0 before the greeting.
    #[serde(with = "crate::ratelimit::optional")]
    pub connections_per_ip: Option<Rate>,
    /// Networks never rate limited; loopback by default, since a local
    /// client is the operator's own.
    pub exempt: Vec<Network>,
    /// Failed logins (AUTH) from one address (an IPv6 /64) per window;
    /// past it the address is answered `421 4.7.0` on the submission
    /// ports until the window has passed since the failure that reached it.
    pub auth_failures: Rate,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let rate = |n, secs| Rate::new(n, std::time::Duration::from_secs(secs));
        LimitsConfig {
            messages_per_ip: rate(60, 60),
            recipients_per_ip: rate(300, 60),
            connections_per_ip: rate(30, 60),
            exempt: Network::loopback(),
            auth_failures: rate(5, 600).expect("5/10m is a valid rate"),
        }
    }
}

/// Greylisting (`crate::greylist`): the first attempt of an unknown
/// (client network, sender, recipient) is deferred at RCPT.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreylistConfig {
    pub enabled: bool,
    /// A retry earlier than this after the first attempt is deferred again.
    pub delay: Duration,
    /// An unretried triplet is forgotten after this long.
    pub expire: Duration,
    /// A triplet that passed is not greylisted again for this long after
    /// it was last seen.
    pub pass_for: Duration,
    /// Clients never greylisted; replaces the default (loopback) when set.
    pub allow: Vec<Network>,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig {
            enabled: false,
            delay: Duration::from_secs(5 * 60),
            expire: Duration::from_secs(2 * 86400),
            pass_for: Duration::from_secs(35 * 86400),
            allow: Network::loopback(),
        }
    }
}

/// Mail leaving this server: where it goes (MX, a smarthost, per-domain
/// routes), how it is protected (opportunistic STARTTLS, MTA-STS) and how
/// many connections it may use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// A smarthost (`smtp.provider.net:587`) that every remote message goes
    /// to instead of the recipients' MX; empty delivers directly.
    pub relay: String,
    /// With `relay`: log in with AUTH PLAIN as this user (only over TLS).
    pub relay_username: String,
    /// With `relay_username`: the file holding the password (its first
    /// line), read once at start and never logged.
    pub relay_password_file: PathBuf,
    /// The port of remote MX servers (25; tests point it elsewhere).
    pub port: u16,
    /// Extra trust anchors (PEM), beside the system's, for MTA-STS policy
    /// fetches and for MX and relay certificates.
    pub ca_file: PathBuf,
    /// Per-domain next hop instead of the MX: `{ "example.net" =
    /// "10.0.0.5:25" }` (a host name or IP, with an optional port).
    pub routes: BTreeMap<String, String>,
    /// Outbound SMTP connections open at once, over all destinations.
    pub max_connections: usize,
    /// Outbound SMTP connections open at once to one destination domain.
    pub max_connections_per_domain: usize,
    /// How long connecting to one address may take before the next is tried.
    pub connect_timeout: Duration,
    /// Honour recipient domains' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            relay: String::new(),
            relay_username: String::new(),
            relay_password_file: PathBuf::new(),
            port: 25,
            ca_file: PathBuf::new(),
            routes: BTreeMap::new(),
            max_connections: 20,
            max_connections_per_domain: 4,
            connect_timeout: Duration::from_secs(30),
            mta_sts: true,
        }
    }
}

/// The outbound queue on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Where queued messages wait; empty is `<maildir.root>/.letterbox-queue`.
    /// Entries are staged in its own `tmp/` and linked into place, so it
    /// needs one local filesystem that honours fsync; by default it shares
    /// the maildirs' (one disk to watch and back up).
    pub dir: PathBuf,
    /// How long a message may wait before it is returned to its sender.
    pub max_age: Duration,
    /// Waits between attempts; the last repeats until `max_age`.
    pub retry_schedule: Vec<Duration>,
    /// How often the whole queue directory is read again, to pick up what
    /// `letterbox queue …` changed (the CLI also wakes the server at once).
    pub scan_interval: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            dir: PathBuf::new(),
            max_age: Duration::from_secs(5 * 86400),
            retry_schedule: [60, 300, 900, 1800, 3600, 7200, 14400]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            scan_interval: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// The queue directory: `queue.dir`, else under the maildir root.
    pub fn queue_dir(&self) -> PathBuf {
        if self.queue.dir.as_os_str().is_empty() {
            self.maildir.root.join(crate::queue::QUEUE_DIR)
        } else {
            self.queue.dir.clone()
        }
    }
}

/// The prefix of our environment variables.
const ENV_PREFIX: &str = "LETTERBOX_";

/// What a `LETTERBOX_…` variable is to the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnvRole {
    /// Its first segment names a top-level key: read, and strictly checked.
    Config,
    /// `LETTERBOX_TEST_…`, the test suites' own (`LETTERBOX_TEST_POSTGRES`):
    /// a developer who exports them must still be able to run the binary.
    Reserved,
    /// Anything else: someone else's variable that happens to share our
    /// prefix. Ignored with a warning.
    Ignored,
}

/// The role of the variable `LETTERBOX_<rest>`, given the top-level keys.
/// The first segment is what comes before the first `__`, in any case.
fn env_role(rest: &str, keys: &[String]) -> EnvRole {
    let first = rest.split("__").next().unwrap_or_default();
    if keys.iter().any(|k| k.eq_ignore_ascii_case(first)) {
        EnvRole::Config
    } else if rest.to_ascii_lowercase().starts_with("test_") {
        EnvRole::Reserved
    } else {
        EnvRole::Ignored
    }
}

/// The top-level keys (`hostname` and the sections), read from what
/// `Config` serializes, so that a new section is picked up by itself.
fn top_level_keys(defaults: &Config) -> Vec<String> {
    match serde_json::to_value(defaults) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => unreachable!("Config serializes to a map"),
    }
}

/// The configuration variables, `__` separating levels.
fn env(keys: Vec<String>) -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(move |rest| env_role(rest.as_str(), &keys) == EnvRole::Config)
        .split("__")
}

/// The names of the variables [`env`] leaves out that deserve a warning,
/// sorted. Matches names as figment does: trimmed, the prefix in any case.
fn ignored_env(keys: &[String]) -> Vec<String> {
    let mut ignored: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| {
            let name = name.to_string_lossy();
            let name = name.trim();
            let prefix = name.get(..ENV_PREFIX.len())?;
            let rest = name[ENV_PREFIX.len()..].trim();
            (prefix.eq_ignore_ascii_case(ENV_PREFIX) && env_role(rest, keys) == EnvRole::Ignored)
                .then(|| name.to_string())
        })
        .collect();
    ignored.sort();
    ignored
}

fn default_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// Loads defaults, then the file (`explicit`, else the first of
    /// [`DEFAULT_PATHS`] that exists), then the environment.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let file = match explicit {
            Some(path) => {
                // figment skips a missing file silently; a file the operator
                // named must exist.
                std::fs::metadata(path).map_err(|source| ConfigError::Unreadable {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(path.to_path_buf())
            }
            None => DEFAULT_PATHS.iter().map(PathBuf::from).find(|p| p.exists()),
        };
        let defaults = Config::default();
        let keys = top_level_keys(&defaults);
        let ignored = ignored_env(&keys);
        let mut figment = Figment::from(Serialized::defaults(defaults));
        if let Some(path) = &file {
            figment = figment.merge(Toml::file_exact(path));
        }
        let figment = figment.merge(env(keys));
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        config.ignored_env = ignored;
        Ok((config, file))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Inconsistent(m));
        if self.hostname.is_empty() || !self.hostname.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(format!(
                "hostname {:?} must be a non-empty name without spaces",
                self.hostname
            ));
        }
        if self.smtp.listen.is_empty() {
            return bad("smtp.listen must name at least one address".into());
        }
        if self.smtp.max_recipients == 0 {
            return bad("smtp.max_recipients must be at least 1".into());
        }
        if self.smtp.max_line_length < 512 {
            return bad("smtp.max_line_length must be at least 512 (RFC 5321 §4.5.3.1.4)".into());
        }
        if self.smtp.subaddress_delimiter.chars().count() > 1 {
            return bad("smtp.subaddress_delimiter must be a single character or empty".into());
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key must be set together".into());
        }
        if self.queue.retry_schedule.is_empty()
            || self.queue.retry_schedule.iter().any(|d| d.0.is_zero())
        {
            return bad("queue.retry_schedule must list at least one wait, none of them 0".into());
        }
        if self.outbound.max_connections == 0 || self.outbound.max_connections_per_domain == 0 {
            return bad("outbound.max_connections and outbound.max_connections_per_domain must be at least 1".into());
        }
        if !self.outbound.relay_username.is_empty()
            && self.outbound.relay_password_file.as_os_str().is_empty()
        {
            return bad("outbound.relay_username needs outbound.relay_password_file".into());
        }
        if !self.outbound.relay_username.is_empty() && self.outbound.relay.is_empty() {
            return bad("outbound.relay_username is set but outbound.relay is empty".into());
        }
        if self.greylist.expire <= self.greylist.delay {
            return bad(format!(
                "greylist.expire ({}) must be longer than greylist.delay ({}), or no retry could pass",
                self.greylist.expire, self.greylist.delay
            ));
        }
        if self.dns.timeout.0.is_zero() {
            return bad("dns.timeout must be more than 0s".into());
        }
        if self.smtp.dnsbl_threshold < 1 {
            return bad("smtp.dnsbl_threshold must be at least 1".into());
        }
        for list in &self.dnsbl {
            if crate::address::domain_name(&list.zone).is_err() {
                return bad(format!("dnsbl zone {:?} is not a domain name", list.zone));
            }
        }
        // RFC 8314 §3, RFC 4954 §4: passwords never cross in plaintext, so
        // a submission port without a certificate could never log anyone in.
        if self.submission.enabled() && self.tls.cert.is_none() {
            return bad(
                "submission.listen and submission.listen_tls need tls.cert and tls.key: \
                 logins are only accepted over TLS"
                    .into(),
            );
        }
        Ok(())
    }

    /// What loading found worth telling the operator without refusing to
    /// start, one sentence each; the caller shows them where it reports
    /// (the log for `serve`, stderr for the admin commands).
    pub fn warnings(&self) -> Vec<String> {
        self.ignored_env
            .iter()
            .map(|name| format!("ignoring environment variable {name} (not a configuration key)"))
            .collect()
    }

    /// The subaddress delimiter, if subaddressing is on.
    pub fn subaddress_delimiter(&self) -> Option<char> {
        self.smtp.subaddress_delimiter.chars().next()
    }
}

/// `[delivery]`: how copies reach targets other than maildirs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The user pipe commands (`|…` alias destinations) run as, resolved
    /// at start; unset: the server's own user (no switch).
    pub pipe_user: Option<String>,
    /// How long a pipe command may run before it is killed and the
    /// delivery fails temporarily. The client waits for the answer to the
    /// end of data for 10 minutes (RFC 5321 §4.5.3.2.6); 5 minutes leave
    /// room for the maildir copies and the client's own clock.
    pub pipe_timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            pipe_user: None,
            pipe_timeout: Duration::from_secs(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_keys_follow_the_struct() {
        let mut keys = top_level_keys(&Config::default());
        keys.sort();
        assert_eq!(
            keys,
            [
                "auth",
                "database",
                "delivery",
                "dns",
                "dnsbl",
                "greylist",
                "hooks",
                "hostname",
                "limits",
                "lmtp",
                "log",
                "maildir",
                "milters",
                "outbound",
                "policy",
                "queue",
                "sink",
                "smtp",
                "srs",
                "submission",
                "tls"
            ]
        );
    }

    #[test]
    fn env_roles() {
        let keys = top_level_keys(&Config::default());
        let role = |rest| env_role(rest, &keys);
        assert_eq!(role("SMTP__LISTEN"), EnvRole::Config);
        assert_eq!(role("smtp__listn"), EnvRole::Config);
        assert_eq!(role("HOSTNAME"), EnvRole::Config);
        assert_eq!(role("LMTP__LISTEN"), EnvRole::Config);
        assert_eq!(role("Database__Url"), EnvRole::Config);
        // A section given as a whole is still the section, checked as such.
        assert_eq!(role("SMTP"), EnvRole::Config);
        assert_eq!(role("TEST_POSTGRES"), EnvRole::Reserved);
        assert_eq!(role("test_mysql"), EnvRole::Reserved);
        assert_eq!(role("BIN"), EnvRole::Ignored);
        assert_eq!(role("SMTPX__LISTEN"), EnvRole::Ignored);
        assert_eq!(role("SMTP_LISTEN"), EnvRole::Ignored);
        assert_eq!(role(""), EnvRole::Ignored);
    }

    #[test]
    fn warnings_name_each_ignored_variable() {
        let config = Config {
            ignored_env: vec!["LETTERBOX_BIN".into(), "letterbox_home".into()],
            ..Config::default()
        };
        assert_eq!(
            config.warnings(),
            [
                "ignoring environment variable LETTERBOX_BIN (not a configuration key)",
                "ignoring environment variable letterbox_home (not a configuration key)",
            ]
        );
        assert!(Config::default().warnings().is_empty());
    }

    #[test]
    fn submission_is_off_by_default_and_needs_tls() {
        let defaults = Config::default();
        assert!(!defaults.submission.enabled());
        assert_eq!(defaults.limits.auth_failures.to_string(), "5/10m");
        let load = |toml: &str| -> Result<Config, ConfigError> {
            let c: Config = Figment::from(Serialized::defaults(Config::default()))
                .merge(Toml::string(toml))
                .extract()
                .map_err(Box::new)?;
            c.validate()?;
            Ok(c)
        };
        let err = load("[submission]\nlisten_tls = [\"127.0.0.1:465\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config: submission.listen and submission.listen_tls need tls.cert and tls.key: \
             logins are only accepted over TLS"
        );
        let c = load(
            "[submission]\nlisten = [\"127.0.0.1:587\"]\nauth_concurrency = 3\n\
             [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [limits]\nauth_failures = \"3/30s\"\n",
        )
        .unwrap();
        assert!(c.submission.enabled());
        assert_eq!(c.submission.auth_slots(), 3);
        assert_eq!(c.limits.auth_failures.count(), 3);
        assert_eq!(c.limits.auth_failures.window().as_secs(), 30);
        let err = load("[limits]\nauth_failures = \"5\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.auth_failures"), "{err}");
    }

    #[test]
    fn listen_addr_round_trips_its_string_form() {
        for s in [
            "127.0.0.1:2424",
            "0.0.0.0:24",
            "[::1]:2424",
            "[::]:2424",
            "unix:/run/letterbox/lmtp.sock",
        ] {
            let addr: ListenAddr = s.parse().unwrap();
            assert_eq!(addr.to_string(), s);
        }
        assert_eq!(
            "unix:/run/letterbox/lmtp.sock".parse(),
            Ok(ListenAddr::Unix("/run/letterbox/lmtp.sock".into()))
        );
        assert_eq!(
            "[::1]:2424".parse(),
            Ok(ListenAddr::Tcp("[::1]:2424".parse().unwrap()))
        );
    }

    #[test]
    fn listen_addr_refuses_other_forms_by_name() {
        let err = |s: &str| s.parse::<ListenAddr>().unwrap_err().to_string();
        let unrecognized = |s: &str| {
            format!(
                "invalid listen address {s:?}: expected IP:PORT (127.0.0.1:2424, [::1]:2424) or unix:/ABSOLUTE/PATH"
            )
        };
        for s in [
            "localhost:2424",
            "127.0.0.1",
            "::1:2424",
            "/run/lmtp.sock",
            "tcp:127.0.0.1:2424",
            "",
        ] {
            assert_eq!(err(s), unrecognized(s));
        }
        for s in ["unix:lmtp.sock", "unix:", "unix:./lmtp.sock"] {
            assert_eq!(
                err(s),
                format!(
                    "invalid listen address {s:?}: a unix socket path must be absolute (unix:/ABSOLUTE/PATH)"
                )
            );
        }
    }

    #[test]
    fn trust_sections_are_read_from_toml_and_checked() {
        let read = |text: &str| {
            Figment::from(Serialized::defaults(Config::default()))
                .merge(Toml::string(text))
                .extract::<Config>()
                .map_err(|e| e.to_string())
        };
        let config = read(
            "[auth]\nspf = \"reject-fail\"\ndmarc = \"tag\"\n\
             [dns]\nservers = [\"127.0.0.1:5353\"]\ntimeout = \"2s\"\n\
             [[dnsbl]]\nzone = \"zen.spamhaus.org\"\ncodes = [\"127.0.0.2\"]\n\
             [[dnsbl]]\nzone = \"list.dnswl.org\"\nweight = -1\n",
        )
        .unwrap();
        assert_eq!(config.auth.spf, SpfPolicy::RejectFail);
        assert_eq!(config.auth.dkim, TagPolicy::Tag);
        assert_eq!(config.auth.dmarc, DmarcPolicy::Tag);
        assert_eq!(config.dns.servers, ["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(config.dnsbl.len(), 2);
        assert_eq!(config.dnsbl[0].weight, 1);
        assert_eq!(config.dnsbl[0].codes, [Ipv4Addr::new(127, 0, 0, 2)]);
        assert_eq!(config.dnsbl[1].weight, -1);
        assert!(config.validate().is_ok());
        let err = read("[auth]\nspf = \"reject\"\n").unwrap_err();
        assert!(err.contains("reject-fail"), "{err}");
        let mut bad = config.clone();
        bad.dnsbl[0].zone = "not a zone".into();
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "config: dnsbl zone \"not a zone\" is not a domain name"
        );
        let mut bad = config;
        bad.smtp.dnsbl_threshold = 0;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn lmtp_is_off_by_default_and_read_from_toml() {
        assert!(Config::default().lmtp.listen.is_empty());
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(
                "[lmtp]\nlisten = [\"unix:/run/letterbox/lmtp.sock\", \"[::1]:2424\"]\n",
            ))
            .extract()
            .unwrap();
        assert_eq!(
            config.lmtp.listen,
            [
                ListenAddr::Unix("/run/letterbox/lmtp.sock".into()),
                ListenAddr::Tcp("[::1]:2424".parse().unwrap()),
            ]
        );
        let err = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[lmtp]\nlisten = [\"unix:lmtp.sock\"]\n"))
            .extract::<Config>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a unix socket path must be absolute") && err.contains("lmtp.listen"),
            "{err}"
        );
    }
}

/// What a milter or policy server that is down or misbehaves means for
/// the mail it was to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Go on as if it had said nothing.
    Accept,
    /// Refuse for now (4xx): the client retries later.
    Tempfail,
    /// Refuse permanently (5xx).
    Reject,
}

/// One `[[milters]]` entry (Sendmail milter protocol 6, as Postfix speaks).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MilterConfig {
    /// `inet:HOST:PORT`, `inet6:…` or `unix:/path`, as in Postfix.
    pub address: String,
    /// For connecting, each command, and the end of the message.
    #[serde(default = "milter_timeout")]
    pub timeout: Duration,
    /// When the milter is down or misbehaves (Postfix's
    /// `milter_default_action`).
    #[serde(default = "tempfail")]
    pub default_action: DefaultAction,
}

/// When a policy server is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyStage {
    /// Once per recipient, at RCPT (Postfix's smtpd_recipient_restrictions).
    Rcpt,
    /// Once per message, at the end of data (smtpd_end_of_data_restrictions).
    Data,
}

/// One `[[policy]]` entry (Postfix's SMTPD_POLICY_README protocol).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `inet:HOST:PORT` or `unix:/path`.
    pub address: String,
    #[serde(default = "policy_stage")]
    pub stage: PolicyStage,
    #[serde(default = "policy_timeout")]
    pub timeout: Duration,
    /// A policy server that is down must not stop mail by default:
    /// greylisting or a reputation check is an extra, not a gate.
    #[serde(default = "accept")]
    pub default_action: DefaultAction,
}

fn milter_timeout() -> Duration {
    Duration::from_secs(30)
}
fn policy_timeout() -> Duration {
    Duration::from_secs(10)
}
fn tempfail() -> DefaultAction {
    DefaultAction::Tempfail
}
fn accept() -> DefaultAction {
    DefaultAction::Accept
}
fn policy_stage() -> PolicyStage {
    PolicyStage::Rcpt
}
