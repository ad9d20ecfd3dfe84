//! Delivery of queued mail to other servers.
//!
//! A scheduler task ([`Outbound::run`]) keeps, in memory, when each queue
//! entry is next due. It learns of new entries from the queue at once, of
//! changes made by `letterbox queue …` when the CLI pokes the `wake`
//! socket (or on SIGUSR1), and reads the whole directory again every
//! `queue.scan_interval` in any case. A due entry is delivered by a task of
//! its own:
//!
//! 1. it takes the entry's lock and reads its state (the CLI may have
//!    changed it);
//! 2. recipients past `queue.max_age` fail as expired;
//! 3. the due recipients are grouped by destination domain (all of them
//!    into one group with a smarthost), and each group is one SMTP
//!    transaction carrying all of its recipients, the groups side by side;
//! 4. as each group ends, its recipients' outcomes (delivered; failed for
//!    good; or retried later, after 1m, 5m, 15m, 30m, 1h, 2h, then every
//!    4h: `queue.retry_schedule`) are written to the state file durably
//!    before anything else happens, so a crash never delivers twice what
//!    the state says was delivered;
//! 5. failed recipients are reported to the sender in one DSN, through the
//!    pipeline's own delivery (a local sender's maildir, or the queue);
//! 6. an entry with nothing left to do is removed.
//!
//! Connections are bounded overall (`outbound.max_connections`) and per
//! destination (`outbound.max_connections_per_domain`); entries in progress
//! are bounded too, so a huge queue never opens more files than that.
//!
//! The one window where a message can go out twice is RFC 1047's: the
//! remote's 250 to the end of data is received, and the process dies before
//! the state file records it.

pub mod client;
pub mod mta_sts;
pub mod mx;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::client::{Client, ClientError, Response};
use self::mta_sts::{Mode as StsMode, MtaSts};
use self::mx::{Host, MxError};
use self::tls::ClientTls;
use crate::address::Address;
use crate::directory::Route;
use crate::envelope::{Envelope, Received, Recipient};
use crate::pipeline::{Mode, Pipeline, Refusal};
use crate::queue::entry::{self, Entry, Status};
use crate::queue::{Locked, Queue, QueueError, dsn};
use crate::spool::Spool;

/// Entries in progress at once, per allowed connection: enough to keep
/// every connection busy while some entries wait for a domain's slot.
const ENTRIES_PER_CONNECTION: usize = 4;
/// When the CLI holds an entry's lock, look again this soon.
const BUSY_RETRY: u64 = 2;

/// A smarthost and how we log in to it.
struct Relay {
    /// `host:port` as configured.
    hop: String,
    /// User and password for AUTH PLAIN; the password never reaches a log.
    login: Option<(String, String)>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("hop", &self.hop)
            .field("user", &self.login.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The delivery side of the queue; one per running server.
pub struct Outbound {
    pipeline: Arc<Pipeline>,
    queue: Queue,
    hostname: String,
    /// Remote MX port (`outbound.port`).
    port: u16,
    routes: HashMap<String, String>,
    relay: Option<Relay>,
    connect_timeout: Duration,
    /// Seconds.
    max_age: u64,
    /// Seconds between attempts; the last repeats.
    schedule: Vec<u64>,
    scan_interval: Duration,
    tls: ClientTls,
    sts: Option<MtaSts>,
    global: Arc<Semaphore>,
    per_domain_limit: usize,
    per_domain: Mutex<HashMap<String, Arc<Semaphore>>>,
    entries: Arc<Semaphore>,
}

/// How one recipient's attempt ended.
#[derive(Debug, Clone)]
struct Outcome {
    kind: Kind,
    /// For people: `mx.example.net[192.0.2.1] said: 550 … (in reply to RCPT TO)`.
    error: Option<String>,
    /// Enhanced status (RFC 3463).
    status: Option<String>,
    /// The remote's reply, for the DSN's Diagnostic-Code.
    diagnostic: Option<String>,
    /// The server that answered.
    remote: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delivered,
    Temporary,
    Permanent,
}

impl Outcome {
    fn local(kind: Kind, status: &str, error: String) -> Outcome {
        Outcome {
            kind,
            error: Some(error),
            status: Some(status.to_string()),
            diagnostic: None,
            remote: None,
        }
    }

    /// The server's reply to `stage`.
    fn reply(host: &Host, addr: IpAddr, r: &Response, stage: &str) -> Outcome {
        let kind = if r.is_positive() {
            Kind::Delivered
        } else if r.is_permanent() {
            Kind::Permanent
        } else {
            Kind::Temporary
        };
        Outcome {
            kind,
            error: (kind != Kind::Delivered).then(|| {
                format!(
                    "{}[{addr}] said: {} (in reply to {stage})",
                    host.name,
                    r.one_line()
                )
            }),
            status: Some(r.status_or_default()),
            diagnostic: Some(r.one_line()),
            remote: Some(host.name.clone()),
        }
    }
}

/// Why a host gave no transaction; the next one is tried.
enum HostError {
    /// Opportunistic TLS failed: try the same address in plaintext.
    TlsFailed(String),
    /// Anything else, with the enhanced status (RFC 3463) it is reported
    /// under when no host does better: `4.4.1` for a host that would not
    /// talk, `4.7.x` for a security requirement or a login that failed.
    Other(&'static str, String),
}

impl Outbound {
    /// Reads what delivery needs from the runtime's config: trust anchors,
    /// the relay's password. Fails on a bad `ca_file` or password file.
    pub async fn new(pipeline: Arc<Pipeline>) -> anyhow::Result<Arc<Outbound>> {
        let rt = pipeline.runtime.clone();
        let config = rt.config.clone();
        let o = &config.outbound;
        let ca = o.ca_file.clone();
        let password_file = o.relay_password_file.clone();
        let user = o.relay_username.clone();
        let (tls, password) =
            crate::blocking::run("reading outbound TLS and relay files", move || {
                let tls = ClientTls::new(&ca)?;
                let password = if user.is_empty() {
                    None
                } else {
                    let text = std::fs::read_to_string(&password_file).map_err(|e| {
                        anyhow::anyhow!(
                            "outbound.relay_password_file {}: {e}",
                            password_file.display()
                        )
                    })?;
                    Some(text.lines().next().unwrap_or("").to_string())
                };
                anyhow::Ok((tls, password))
            })
            .await??;
        let relay = (!o.relay.is_empty()).then(|| Relay {
            hop: o.relay.clone(),
            login: password.map(|p| (o.relay_username.clone(), p)),
        });
        let sts = o
            .mta_sts
            .then(|| MtaSts::new(rt.resolver().clone(), tls.strict.clone()));
        Ok(Arc::new(Outbound {
            queue: rt.queue.clone(),
            hostname: rt.hostname.clone(),
            port: o.port,
            routes: o
                .routes
                .iter()
                .map(|(d, h)| (d.to_ascii_lowercase(), h.clone()))
                .collect(),
            relay,
            connect_timeout: o.connect_timeout.0,
            max_age: config.queue.max_age.as_secs(),
            schedule: config
                .queue
                .retry_schedule
                .iter()
                .map(|d| d.as_secs().max(1))
                .collect(),
            scan_interval: config.queue.scan_interval.0.max(Duration::from_secs(1)),
            tls,
            sts,
            global: Arc::new(Semaphore::new(o.max_connections)),
            per_domain_limit: o.max_connections_per_domain,
            per_domain: Mutex::new(HashMap::new()),
            entries: Arc::new(Semaphore::new(o.max_connections * ENTRIES_PER_CONNECTION)),
            pipeline,
        }))
    }

    /// The scheduler: runs until `shutdown`; delivery tasks go on `tracker`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, tracker: TaskTracker) {
        let wake_path = self.queue.dir().join(crate::queue::WAKE_SOCKET);
        let _ = std::fs::remove_file(&wake_path);
        let wake = match tokio::net::UnixDatagram::bind(&wake_path) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %wake_path.display(), error = %e, "cannot listen for queue wake-ups; changes by the CLI are seen at the next scan");
                None
            }
        };
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Option<u64>)>();
        let mut due: HashMap<String, u64> = HashMap::new();
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut rescan = true;
        let mut next_scan = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        loop {
            if rescan {
                let q = self.queue.clone();
                match crate::blocking::run("scanning the queue", move || q.scan()).await {
                    Ok(Ok(entries)) => {
                        due = entries
                            .iter()
                            .filter(|e| !in_flight.contains(&e.id))
                            .filter_map(|e| Some((e.id.clone(), e.next_due()?)))
                            .collect();
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot read the queue directory"),
                    Err(e) => tracing::error!(error = %e, "cannot read the queue directory"),
                }
                rescan = false;
                next_scan = tokio::time::Instant::now() + self.scan_interval;
            }
            for id in self.queue.take_fresh() {
                if !in_flight.contains(&id) {
                    due.insert(id, 0);
                }
            }
            // Only as many of the oldest due entries as there are free
            // slots are picked; with a backlog (every slot busy) nothing
            // is copied or sorted, whatever the queue's length. The rest
            // start when a running one ends (done_rx), not by a timer.
            let now = entry::now();
            let free = self.entries.available_permits();
            let mut ready: Vec<(u64, &String)> = if free == 0 {
                Vec::new()
            } else {
                due.iter()
                    .filter(|(_, t)| **t <= now)
                    .map(|(id, t)| (*t, id))
                    .collect()
            };
            if ready.len() > free {
                ready.select_nth_unstable(free - 1);
                ready.truncate(free);
            }
            ready.sort_unstable();
            let ready: Vec<String> = ready.into_iter().map(|(_, id)| id.clone()).collect();
            for id in ready {
                if shutdown.is_cancelled() {
                    break;
                }
                let Ok(permit) = self.entries.clone().try_acquire_owned() else {
                    break;
                };
                due.remove(&id);
                in_flight.insert(id.clone());
                let (me, tx, stop) = (self.clone(), done_tx.clone(), shutdown.clone());
                tracker.spawn(async move {
                    let next = me.attempt(&id, &stop).await;
                    drop(permit);
                    let _ = tx.send((id, next));
                });
            }
            let soonest = due
                .values()
                .filter(|t| **t > now)
                .min()
                .map(|t| unix_instant(*t))
                .unwrap_or(next_scan)
                .min(next_scan);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.queue.enqueued() => {}
                Some((id, next)) = done_rx.recv() => {
                    in_flight.remove(&id);
                    if let Some(t) = next {
                        due.insert(id, t);
                    }
                }
                _ = tokio::time::sleep_until(soonest) => {
                    if tokio::time::Instant::now() >= next_scan {
                        rescan = true;
                    }
                }
                _ = async { wake.as_ref().unwrap().recv(&mut buf).await }, if wake.is_some() => {
                    tracing::debug!("queue wake-up from the CLI");
                    rescan = true;
                }
                _ = async { usr1.as_mut().unwrap().recv().await }, if usr1.is_some() => {
                    tracing::info!("SIGUSR1: reading the queue again");
                    rescan = true;
                }
            }
        }
        let _ = std::fs::remove_file(&wake_path);
    }

    /// One pass over one entry. Returns when it is next due, None when it
    /// is gone.
    async fn attempt(self: &Arc<Self>, id: &str, shutdown: &CancellationToken) -> Option<u64> {
        let (q, i) = (self.queue.clone(), id.to_string());
        let locked = crate::blocking::run("locking a queue entry", move || {
            let lock = q.lock(&i)?;
            let entry = q.read_state(&i)?;
            Ok::<_, QueueError>((lock, entry))
        })
        .await;
        let (lock, entry) = match locked {
            Ok(Ok(x)) => x,
            Ok(Err(QueueError::NotFound(_))) => return None,
            Ok(Err(QueueError::Busy(_))) => return Some(entry::now() + BUSY_RETRY),
            Ok(Err(e)) => {
                tracing::error!(id, error = %e, "cannot open a queue entry");
                return Some(entry::now() + self.schedule[0]);
            }
            Err(e) => {
                tracing::error!(id, error = %e, "cannot open a queue entry");
                return Some(entry::now() + self.schedule[0]);
            }
        };
        let lock = Arc::new(lock);
        let entry = Arc::new(tokio::sync::Mutex::new(entry));
        let now = entry::now();

        // Expired recipients fail before anything is tried.
        {
            let mut e = entry.lock().await;
            let deadline = e.created.saturating_add(self.max_age);
            if now >= deadline && e.recipients.iter().any(|r| r.status == Status::Queued) {
                let age = crate::units::Duration::from_secs(self.max_age);
                let null_sender = e.sender.is_empty();
                for r in e
                    .recipients
                    .iter_mut()
                    .filter(|r| r.status == Status::Queued)
                {
                    let last = r.last_error.clone().unwrap_or_else(|| "none".into());
                    r.status = Status::Failed;
                    r.notified = null_sender;
                    r.next_attempt = now;
                    r.last_error = Some(format!(
                        "message expired: not delivered within {age} (last error: {last})"
                    ));
                    if !r.last_status.as_deref().is_some_and(|s| s.starts_with('4')) {
                        r.last_status = Some("4.4.7".into());
                    }
                    tracing::info!(id, rcpt = %r.address, "expired in the queue");
                }
                if !self.save(&lock, &e).await {
                    return Some(now + self.schedule[0]);
                }
            }
        }

        // One group per destination: the domain, or the smarthost.
        let groups: Vec<(String, Vec<String>)> = {
            let e = entry.lock().await;
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for r in e
                .recipients
                .iter()
                .filter(|r| r.status == Status::Queued && r.next_attempt <= now)
            {
                // With a smarthost every recipient goes to the same place:
                // one transaction for all of them.
                let domain = match &self.relay {
                    Some(relay) => relay.hop.clone(),
                    None => r.domain(),
                };
                match groups.iter_mut().find(|(d, _)| *d == domain) {
                    Some((_, v)) => v.push(r.address.clone()),
                    None => groups.push((domain, vec![r.address.clone()])),
                }
            }
            groups
        };
        if !shutdown.is_cancelled() {
            let snapshot = entry.lock().await.clone();
            let snapshot = Arc::new(snapshot);
            futures_util::future::join_all(groups.into_iter().map(|(domain, rcpts)| {
                let (entry, lock, snapshot) = (entry.clone(), lock.clone(), snapshot.clone());
                async move {
                    let outcomes = self.deliver_group(&snapshot, &domain, &rcpts).await;
                    let mut e = entry.lock().await;
                    self.apply(&mut e, &rcpts, &outcomes);
                    self.save(&lock, &e).await;
                }
            }))
            .await;
        }

        let mut e = entry.lock().await;
        if e.recipients
            .iter()
            .any(|r| r.status == Status::Failed && !r.notified && r.next_attempt <= entry::now())
        {
            self.bounce(&lock, &mut e).await;
        }
        if e.finished() {
            let (q, l) = (self.queue.clone(), lock.clone());
            match crate::blocking::run("removing a queue entry", move || q.remove(&l)).await {
                Ok(Ok(())) => {
                    tracing::info!(id, "queue entry done and removed");
                    return None;
                }
                Ok(Err(e)) => {
                    tracing::error!(id, error = %e, "cannot remove a finished queue entry")
                }
                Err(e) => tracing::error!(id, error = %e, "cannot remove a finished queue entry"),
            }
            return Some(entry::now() + self.schedule[0]);
        }
        e.next_due()
    }

    /// Writes the state durably; false (logged) when that failed.
    async fn save(&self, lock: &Arc<Locked>, e: &Entry) -> bool {
        let (q, l, e2) = (self.queue.clone(), lock.clone(), e.clone());
        match crate::blocking::run("writing a queue state file", move || q.write_state(&l, &e2))
            .await
        {
            Ok(Ok(())) => true,
            Ok(Err(err)) => {
                tracing::error!(id = %e.id, error = %err, "cannot record delivery state");
                false
            }
            Err(err) => {
                tracing::error!(id = %e.id, error = %err, "cannot record delivery state");
                false
            }
        }
    }

    /// Records a group's outcomes in the entry.
    fn apply(&self, e: &mut Entry, rcpts: &[String], outcomes: &[Outcome]) {
        let now = entry::now();
        let deadline = e.created.saturating_add(self.max_age);
        let null_sender = e.sender.is_empty();
        for (addr, o) in rcpts.iter().zip(outcomes) {
            let Some(r) = e.recipients.iter_mut().find(|r| r.address == *addr) else {
                continue;
            };
            r.attempts += 1;
            r.remote_mta = o.remote.clone();
            match o.kind {
                Kind::Delivered => {
                    r.status = Status::Delivered;
                    r.last_error = None;
                    tracing::info!(id = %e.id, rcpt = %r.address, remote = ?o.remote, "delivered");
                }
                Kind::Temporary => {
                    let wait =
                        self.schedule[(r.attempts as usize - 1).min(self.schedule.len() - 1)];
                    r.next_attempt = now.saturating_add(wait).min(deadline.max(now + 1));
                    tracing::info!(id = %e.id, rcpt = %r.address, error = ?o.error, retry_in = r.next_attempt - now, "deferred");
                }
                Kind::Permanent => {
                    r.status = Status::Failed;
                    r.notified = null_sender;
                    r.next_attempt = now;
                    tracing::info!(id = %e.id, rcpt = %r.address, error = ?o.error, "failed");
                }
            }
            if o.kind != Kind::Delivered {
                r.last_error = o.error.clone();
                r.last_status = o.status.clone();
                r.diagnostic = o.diagnostic.clone();
            }
        }
    }

    /// The semaphore of one destination.
    fn domain_slots(&self, key: &str) -> Arc<Semaphore> {
        let mut map = self.per_domain.lock().unwrap();
        if map.len() > 10_000 {
            // Forget idle destinations; one in use is held elsewhere too.
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        map.entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_domain_limit)))
            .clone()
    }

    /// One SMTP transaction for `rcpts` of `domain`; an outcome for each.
    async fn deliver_group(&self, e: &Entry, domain: &str, rcpts: &[String]) -> Vec<Outcome> {
        let all = |o: Outcome| vec![o; rcpts.len()];
        let (key, hosts, policy, login) = if let Some(relay) = &self.relay {
            let h = mx::hop_host(self.pipeline.runtime.resolver(), &relay.hop, 25).await;
            (
                "relay".to_string(),
                h.map(|h| vec![h]),
                None,
                relay.login.as_ref(),
            )
        } else if let Some(route) = self.routes.get(domain) {
            let h = mx::hop_host(self.pipeline.runtime.resolver(), route, self.port).await;
            (domain.to_string(), h.map(|h| vec![h]), None, None)
        } else {
            let policy = match &self.sts {
                Some(sts) => sts.policy(domain).await,
                None => None,
            };
            let h = mx::mx_hosts(self.pipeline.runtime.resolver(), domain, self.port).await;
            (domain.to_string(), h, policy, None)
        };
        let mut hosts = match hosts {
            Ok(h) => h,
            Err(MxError::Permanent(status, why)) => {
                return all(Outcome::local(Kind::Permanent, status, why));
            }
            Err(MxError::Temporary(why)) => {
                return all(Outcome::local(Kind::Temporary, "4.4.3", why));
            }
        };
        let enforce = policy.as_ref().is_some_and(|p| p.mode == StsMode::Enforce);
        if let Some(p) = &policy
            && p.mode != StsMode::None
        {
            let listed: Vec<bool> = hosts.iter().map(|h| p.matches(&h.name)).collect();
            if enforce {
                let mut i = 0;
                hosts.retain(|_| {
                    i += 1;
                    listed[i - 1]
                });
                if hosts.is_empty() {
                    return all(Outcome::local(
                        Kind::Temporary,
                        "4.7.5",
                        format!(
                            "MTA-STS policy of {domain} (enforce) lists none of its MX hosts; not delivered"
                        ),
                    ));
                }
            } else if listed.iter().any(|l| !l) {
                tracing::warn!(
                    domain,
                    "MTA-STS (testing): an MX host is not listed in the policy"
                );
            }
        }
        // With a password, the smarthost's certificate must be valid too.
        let strict = enforce || login.is_some();

        let slots = self.domain_slots(&key);
        let Ok(_domain_permit) = slots.acquire_owned().await else {
            return all(Outcome::local(
                Kind::Temporary,
                "4.3.0",
                "shutting down".into(),
            ));
        };
        let Ok(_permit) = self.global.clone().acquire_owned().await else {
            return all(Outcome::local(
                Kind::Temporary,
                "4.3.0",
                "shutting down".into(),
            ));
        };

        let mut last = format!("no host of {domain} could be reached");
        let mut last_status = "4.4.1";
        for host in &hosts {
            for &ip in &host.addrs {
                let mut use_tls = true;
                loop {
                    match self
                        .try_host(e, host, ip, rcpts, strict, use_tls, login, domain)
                        .await
                    {
                        Ok(outcomes) => return outcomes,
                        Err(HostError::TlsFailed(why)) if use_tls && !strict => {
                            tracing::info!(host = %host.name, %ip, error = %why, "opportunistic TLS failed; trying without");
                            use_tls = false;
                        }
                        Err(HostError::TlsFailed(why)) => {
                            tracing::info!(host = %host.name, %ip, error = %why, "host failed; trying the next");
                            (last, last_status) = (why, "4.7.5");
                            break;
                        }
                        Err(HostError::Other(status, why)) => {
                            tracing::info!(host = %host.name, %ip, error = %why, "host failed; trying the next");
                            (last, last_status) = (why, status);
                            break;
                        }
                    }
                }
            }
        }
        all(Outcome::local(Kind::Temporary, last_status, last))
    }

    /// Connects to one address of one host and, if it will talk, runs the
    /// transaction: Ok with an outcome per recipient, or why to try another.
    #[allow(clippy::too_many_arguments)]
    async fn try_host(
        &self,
        e: &Entry,
        host: &Host,
        ip: IpAddr,
        rcpts: &[String],
        strict: bool,
        use_tls: bool,
        login: Option<&(String, String)>,
        domain: &str,
    ) -> Result<Vec<Outcome>, HostError> {
        let at = format!("{}[{ip}]:{}", host.name, host.port);
        let other = |why: String| HostError::Other("4.4.1", format!("{at}: {why}"));
        // A security requirement not met, or a login the relay refused.
        let security = |status, why: String| HostError::Other(status, format!("{at}: {why}"));
        let addr = SocketAddr::new(ip, host.port);
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| other("connection timed out".into()))?
            .map_err(|e| other(format!("cannot connect: {e}")))?;
        // Commands and the message go out as soon as they are written, not
        // after the peer's delayed ACK of the previous segment (40 ms each).
        let _ = tcp.set_nodelay(true);
        let implicit_tls = self.relay.is_some() && host.port == 465;
        let name = ServerName::try_from(host.name.clone())
            .map_err(|_| other("not a valid TLS server name".into()))?;
        let stream: Box<dyn client::Io> = if implicit_tls {
            let tls = tokio_rustls::TlsConnector::from(self.tls.strict.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| match login {
                    Some(_) => security(
                        "4.7.5",
                        format!(
                            "TLS required ({}) but the handshake failed: {e}; not delivered",
                            requirement(login, domain)
                        ),
                    ),
                    None => security("4.7.5", format!("TLS handshake failed: {e}")),
                })?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let (mut c, greeting) = Client::greet(stream)
            .await
            .map_err(|e| other(e.to_string()))?;
        if greeting.code != 220 {
            return Err(other(format!("greeted with {}", greeting.one_line())));
        }
        let r = c
            .ehlo(&self.hostname)
            .await
            .map_err(|e| other(e.to_string()))?;
        if !r.is_positive() {
            return Err(other(format!("refused EHLO/HELO: {}", r.one_line())));
        }
        if implicit_tls {
            // Already TLS; nothing to upgrade.
        } else if use_tls && c.caps.starttls {
            let config = if strict {
                self.tls.strict.clone()
            } else {
                self.tls.opportunistic.clone()
            };
            match c.starttls(config, name.clone()).await {
                Ok(Ok(tls)) => {
                    c = tls;
                    let info = c.tls.clone().expect("TLS is on");
                    match self.tls.judge(&info.certs, &name) {
                        None => {
                            tracing::debug!(host = %host.name, cipher = %info.cipher, "TLS, certificate verified")
                        }
                        Some(why) => {
                            tracing::info!(host = %host.name, cipher = %info.cipher, reason = %why, "TLS, certificate not verified (opportunistic)")
                        }
                    }
                    let r = c
                        .ehlo(&self.hostname)
                        .await
                        .map_err(|e| other(e.to_string()))?;
                    if !r.is_positive() {
                        return Err(other(format!(
                            "refused EHLO after STARTTLS: {}",
                            r.one_line()
                        )));
                    }
                }
                Ok(Err((plain, r))) if !strict => {
                    tracing::info!(host = %host.name, reply = %r.one_line(), "STARTTLS refused; going on in plaintext");
                    c = plain;
                }
                Ok(Err((_, r))) => {
                    return Err(security(
                        "4.7.5",
                        format!("refused STARTTLS: {}", r.one_line()),
                    ));
                }
                Err(ClientError::Tls(why)) => {
                    let why = if strict {
                        format!(
                            "TLS required ({}) but the handshake failed: {why}; not delivered",
                            requirement(login, domain)
                        )
                    } else {
                        why
                    };
                    return Err(HostError::TlsFailed(format!("{at}: {why}")));
                }
                Err(e) => return Err(HostError::TlsFailed(format!("{at}: STARTTLS: {e}"))),
            }
        } else if strict {
            return Err(security(
                "4.7.5",
                format!(
                    "TLS required ({}) but STARTTLS is not offered; not delivered",
                    requirement(login, domain)
                ),
            ));
        }

        if let Some((user, password)) = login {
            if c.tls.is_none() && !implicit_tls {
                return Err(security(
                    "4.7.5",
                    "will not send the relay password without TLS".into(),
                ));
            }
            // A server that does not ask for a password (a port 25 MX, a
            // relay misconfigured to one) is not sent it, and the operator
            // is told what it offers instead of a bare 502 to AUTH.
            if !c.caps.offers_auth("PLAIN") {
                return Err(security(
                    "4.7.0",
                    match c.caps.auth.as_slice() {
                        [] => "offers no AUTH; the relay password is not sent".into(),
                        offered => format!(
                            "offers AUTH {} but not PLAIN; the relay password is not sent",
                            offered.join(" ")
                        ),
                    },
                ));
            }
            let r = c
                .auth_plain(user, password)
                .await
                .map_err(|e| other(e.to_string()))?;
            if r.code != 235 {
                // RFC 4954's 535 5.7.8; kept temporary: the queue retries
                // until the password is fixed or the message expires.
                return Err(security(
                    "4.7.8",
                    format!("refused our login: {}", r.one_line()),
                ));
            }
        }

        // The transaction; from here its answers are final for this attempt.
        let result = self.transaction(&mut c, e, host, ip, rcpts).await;
        match result {
            Ok(outcomes) => {
                c.quit().await;
                Ok(outcomes)
            }
            Err(err) => {
                let o = Outcome::local(Kind::Temporary, "4.4.2", format!("{at}: {err}"));
                Ok(vec![o; rcpts.len()])
            }
        }
    }

    async fn transaction(
        &self,
        c: &mut Client,
        e: &Entry,
        host: &Host,
        ip: IpAddr,
        rcpts: &[String],
    ) -> Result<Vec<Outcome>, ClientError> {
        let mut mail = format!("MAIL FROM:<{}>", e.sender);
        if c.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", e.size));
        }
        if e.eight_bit && c.caps.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if e.smtputf8 {
            if !c.caps.smtputf8 {
                let o = Outcome::local(
                    Kind::Permanent,
                    "5.6.7",
                    format!(
                        "{}[{ip}] does not support SMTPUTF8, which the addresses need",
                        host.name
                    ),
                );
                return Ok(vec![o; rcpts.len()]);
            }
            mail.push_str(" SMTPUTF8");
        }
        let r = c.command(&mail, client::COMMAND_TIMEOUT, "MAIL").await?;
        if !r.is_positive() {
            let _ = c.command("RSET", client::COMMAND_TIMEOUT, "RSET").await;
            return Ok(vec![Outcome::reply(host, ip, &r, "MAIL FROM"); rcpts.len()]);
        }
        let mut outcomes = Vec::with_capacity(rcpts.len());
        for rcpt in rcpts {
            let r = c
                .command(
                    &format!("RCPT TO:<{rcpt}>"),
                    client::COMMAND_TIMEOUT,
                    "RCPT",
                )
                .await?;
            outcomes.push(Outcome::reply(host, ip, &r, "RCPT TO"));
        }
        if outcomes.iter().all(|o| o.kind != Kind::Delivered) {
            let _ = c.command("RSET", client::COMMAND_TIMEOUT, "RSET").await;
            return Ok(outcomes);
        }
        let file = tokio::fs::File::open(self.queue.message_path(&e.id)).await?;
        let r = c.data(tokio::io::BufReader::new(file)).await?;
        let data = Outcome::reply(host, ip, &r, "end of DATA");
        for o in outcomes.iter_mut().filter(|o| o.kind == Kind::Delivered) {
            *o = data.clone();
        }
        Ok(outcomes)
    }

    /// Sends the DSN for failed recipients not yet reported, and records
    /// that it went. A failure to deliver it leaves them to try again.
    async fn bounce(&self, lock: &Arc<Locked>, e: &mut Entry) {
        let now = entry::now();
        let failed: Vec<usize> = (0..e.recipients.len())
            .filter(|&i| {
                let r = &e.recipients[i];
                r.status == Status::Failed && !r.notified
            })
            .collect();
        if failed.is_empty() {
            return;
        }
        let sent = if e.sender.is_empty() {
            tracing::info!(id = %e.id, "a bounce failed; bounces are never bounced");
            true
        } else {
            match self.send_dsn(e, &failed).await {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(id = %e.id, sender = %e.sender, error = %why, "could not deliver the DSN; trying again later");
                    false
                }
            }
        };
        for &i in &failed {
            let r = &mut e.recipients[i];
            if sent {
                r.notified = true;
            } else {
                r.next_attempt = now + self.schedule[0];
            }
        }
        if sent && !e.sender.is_empty() {
            e.bounces += 1;
        }
        self.save(lock, e).await;
    }

    async fn send_dsn(&self, e: &Entry, failed: &[usize]) -> Result<(), String> {
        let rt = &self.pipeline.runtime;
        let route = match self.pipeline.recipient(&e.sender).await {
            Ok(r) => r.route,
            Err(Refusal::NotServed) => {
                let address = Address::from_smtp(&e.sender).map_err(|err| err.to_string())?;
                Arc::new(Route::Remote {
                    address: address.to_string(),
                })
            }
            // An SRS sender too old or forged: nobody to tell.
            Err(Refusal::UnknownUser | Refusal::Syntax | Refusal::InvalidSrs) => {
                tracing::warn!(id = %e.id, sender = %e.sender, "the sender does not exist here; the DSN is dropped");
                return Ok(());
            }
            Err(why) => return Err(format!("the sender's mailbox refused it for now: {why:?}")),
        };
        let dsn_id = format!("{}-b{}", e.id, e.bounces);
        if matches!(*route, Route::Remote { .. }) {
            let (q, i) = (self.queue.clone(), dsn_id.clone());
            if let Ok(Ok(_)) =
                crate::blocking::run("reading a queue entry", move || q.read_state(&i)).await
            {
                // Queued before a crash kept us from recording it.
                return Ok(());
            }
        }
        let path = self.queue.message_path(&e.id);
        let headers = crate::blocking::run("reading a queued message's header", move || {
            use std::io::Read as _;
            let mut buf = Vec::new();
            std::fs::File::open(path)?
                .take((dsn::MAX_HEADERS + 4) as u64)
                .read_to_end(&mut buf)?;
            std::io::Result::Ok(buf)
        })
        .await
        .map_err(|err| err.to_string())?
        .map_err(|err| err.to_string())?;
        let recipients: Vec<&_> = failed.iter().map(|&i| &e.recipients[i]).collect();
        let report = dsn::build(
            &self.hostname,
            e,
            &recipients,
            dsn::header_section(&headers),
            e.bounces,
            entry::now(),
        );
        let envelope = Envelope {
            // Named after the entry and its count of DSNs: queueing the
            // same DSN twice (a crash before recording it) fails, not sends.
            id: dsn_id,
            sender: String::new(),
            recipients: vec![Recipient {
                address: e.sender.clone(),
                route,
            }],
            received: Received {
                helo: self.hostname.clone(),
                rdns: None,
                ip: IpAddr::from([127, 0, 0, 1]),
                by: self.hostname.clone(),
                with: "LOCAL".into(),
                tls: None,
                date: crate::envelope::rfc5322_now(),
            },
            headers: String::new(),
            quarantine: false,
        };
        let spool_dir: PathBuf = rt.maildirs.spool_dir();
        let limit = rt.config.maildir.spool_memory_limit.0 as usize;
        let spool = crate::blocking::run("spooling a DSN", move || {
            let mut s = Spool::new(limit, Some(spool_dir));
            s.write(&report).map(|()| s)
        })
        .await
        .map_err(|err| err.to_string())?
        .map_err(|err| err.to_string())?;
        let outcomes = self
            .pipeline
            .deliver(&envelope, spool, None, Mode::AllOrNothing)
            .await;
        match outcomes.iter().find_map(|o| o.as_ref().err()) {
            None => {
                tracing::info!(id = %e.id, dsn = %envelope.id, sender = %e.sender, "DSN sent");
                Ok(())
            }
            Some(f) => Err(format!("{f:?}")),
        }
    }
}

/// What demands TLS, for the error text.
fn requirement(login: Option<&(String, String)>, domain: &str) -> String {
    match login {
        Some(_) => "the smarthost login".into(),
        None => format!("MTA-STS policy of {domain}, enforce"),
    }
}

/// The tokio instant of Unix time `t` (seconds); now when past.
fn unix_instant(t: u64) -> tokio::time::Instant {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = Duration::from_secs(t);
    tokio::time::Instant::now() + at.saturating_sub(now_unix)
}
