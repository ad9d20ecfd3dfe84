//! Logins on the submission ports: a user name and password checked
//! against the directory's `{ARGON2ID}` hashes (the ones Dovecot checks),
//! and failed logins counted per client address.
//!
//! - **Off the runtime, a few at a time.** An argon2 check takes about
//!   19 MiB and tens of milliseconds of CPU. It runs on the blocking pool
//!   under a semaphore of `submission.auth_concurrency` permits, so a login
//!   flood queues behind the permits instead of taking every core (and
//!   memory) from the sessions that are receiving mail.
//! - **Same cost for unknown users.** A name with no usable password (no
//!   such user, receive-only, disabled, or of a disabled domain) is checked
//!   against a dummy hash, so the answer's timing does not tell which names
//!   exist.
//! - **Lockout.** Failures from one address (IPv6: its /64) are counted
//!   over `limits.auth_failures` (`N/DURATION`); the failure that makes N
//!   within the window locks the address out for one window from then:
//!   AUTH, and a new connection to a submission port, are answered
//!   `421 4.7.0` and closed. Then it starts again from zero. A successful
//!   login does not clear the count, or one known account would let an
//!   attacker reset it between guesses at another. Memory is bounded:
//!   at most [`MAX_CLIENTS`] addresses are remembered; when full, those
//!   whose failures have all expired go first, then arbitrary ones (which
//!   loosens the limit for them rather than growing).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex};

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::Rate;
use super::sasl::Credentials;
use crate::address::Address;
use crate::directory::Directory;
use crate::password;

/// Addresses whose failures are remembered at once.
pub const MAX_CLIENTS: usize = 65_536;

/// A hash of no one's password, checked when the user has none, so that
/// unknown and known names cost the same. Made on first use, on the
/// blocking pool.
static DUMMY_HASH: LazyLock<String> =
    LazyLock::new(|| password::hash("letterbox: no such user").expect("a fixed password hashes"));

/// How a login attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// The credentials are good: the user's canonical address.
    Ok(String),
    /// Wrong name or password, or a user who may not log in (535 5.7.8).
    Failed,
    /// The client's address has failed too often (421 4.7.0, and close).
    Locked,
    /// The directory or the password check did not answer (454 4.7.0).
    Unavailable,
}

/// Password checks and the failure counts, shared by every session.
#[derive(Debug)]
pub struct Logins {
    slots: Arc<Semaphore>,
    rate: Rate,
    clients: Mutex<HashMap<IpAddr, Failures>>,
}

/// One address's recent failures.
#[derive(Debug, Default)]
struct Failures {
    /// Within the window, oldest first; at most the rate's count.
    times: VecDeque<Instant>,
    /// Locked out until then.
    locked_until: Option<Instant>,
}

impl Failures {
    fn expired(&self, now: Instant, window: std::time::Duration) -> bool {
        self.locked_until.is_none_or(|t| t <= now)
            && self
                .times
                .back()
                .is_none_or(|&t| now.duration_since(t) >= window)
    }
}

/// Whom failures count against: the address, or an IPv6 address's /64
/// (one subscriber usually holds a whole /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

impl Logins {
    /// `rate`: `limits.auth_failures`; `slots`: password checks at once.
    pub fn new(rate: Rate, slots: usize) -> Logins {
        Logins {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            rate,
            clients: Mutex::default(),
        }
    }

    /// Whether `ip` is locked out now.
    pub fn locked(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let clients = self.clients.lock().unwrap();
        clients
            .get(&client_key(ip))
            .and_then(|f| f.locked_until)
            .is_some_and(|t| t > now)
    }

    /// Counts a failure from `ip`; true when it locked the address out.
    pub fn fail(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let window = self.rate.window();
        let key = client_key(ip);
        let mut clients = self.clients.lock().unwrap();
        if !clients.contains_key(&key) && clients.len() >= MAX_CLIENTS {
            clients.retain(|_, f| !f.expired(now, window));
            if clients.len() >= MAX_CLIENTS
                && let Some(k) = clients.keys().next().copied()
            {
                clients.remove(&k);
            }
        }
        let f = clients.entry(key).or_default();
        if f.locked_until.is_some_and(|t| t <= now) {
            f.locked_until = None;
        }
        while f
            .times
            .front()
            .is_some_and(|&t| now.duration_since(t) >= window)
        {
            f.times.pop_front();
        }
        f.times.push_back(now);
        if f.times.len() >= self.rate.count() as usize {
            f.times.clear();
            f.locked_until = Some(now + window);
            return true;
        }
        false
    }

    /// Checks `creds` (None: the client's response was malformed) from a
    /// client at `ip`, counting a failure against it.
    pub async fn check(
        &self,
        directory: &Directory,
        ip: IpAddr,
        creds: Option<Credentials>,
    ) -> Login {
        if self.locked(ip) {
            return Login::Locked;
        }
        let Some(creds) = creds else {
            self.failed(ip, "(malformed)");
            return Login::Failed;
        };
        let addr = Address::from_smtp(creds.username.trim()).ok();
        // The dovecot_passdb view: active users of active domains that
        // have a password. Anyone else has none to match.
        let stored = match &addr {
            Some(a) => match directory.user_password(a).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(user = %a, error = %e, "login: directory lookup failed");
                    return Login::Unavailable;
                }
            },
            None => None,
        };
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the login semaphore is never closed");
        let known = stored.is_some();
        let password = creds.password;
        let verified = crate::blocking::run("checking a password", move || {
            let _permit = permit;
            let hash = stored.as_deref().unwrap_or(&DUMMY_HASH);
            password::verify(hash, &password) && known
        })
        .await;
        match (verified, addr) {
            (Ok(true), Some(a)) => {
                let user = a.to_string();
                tracing::info!(%ip, %user, "login");
                Login::Ok(user)
            }
            (Ok(_), _) => {
                self.failed(ip, &creds.username);
                Login::Failed
            }
            (Err(e), _) => {
                tracing::error!(error = %e, "login: the password check failed");
                Login::Unavailable
            }
        }
    }

    fn failed(&self, ip: IpAddr, user: &str) {
        // One line per failure, with the address, for fail2ban and friends.
        let user: String = user.chars().filter(|c| !c.is_control()).take(254).collect();
        if self.fail(ip) {
            tracing::warn!(%ip, %user, rate = %self.rate, "login failed; address locked out");
        } else {
            tracing::info!(%ip, %user, "login failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn locks_out_after_the_rate_for_one_window() {
        let logins = Logins::new(Rate::new(3, Duration::from_secs(60)).unwrap(), 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!logins.fail(ip));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!logins.fail(ip));
        assert!(!logins.locked(ip));
        // The first failure leaves the window: still two.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!logins.fail(ip));
        assert!(logins.fail(ip), "the third within a window locks");
        assert!(logins.locked(ip));
        assert!(!logins.locked(other));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(logins.locked(ip));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!logins.locked(ip), "one window after the lock");
        assert!(!logins.fail(ip), "and counting starts again");
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_key(v4), v4);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded() {
        let logins = Logins::new(Rate::new(2, Duration::from_secs(60)).unwrap(), 1);
        for i in 0..(MAX_CLIENTS as u32 + 10) {
            logins.fail(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(logins.clients.lock().unwrap().len(), MAX_CLIENTS);
    }
}
