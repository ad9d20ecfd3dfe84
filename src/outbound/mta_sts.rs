//! MTA-STS (RFC 8461): a recipient domain may publish that its MX servers
//! have valid certificates, and in `enforce` mode that mail must not reach
//! it otherwise. The policy is announced by a TXT record at
//! `_mta-sts.<domain>` (`v=STSv1; id=…`) and served over HTTPS, with a
//! certificate we verify, at `https://mta-sts.<domain>/.well-known/mta-sts.txt`.
//!
//! Policies are cached in memory for their `max_age` and fetched again
//! when the TXT record's id changes; a failed fetch keeps the cached
//! policy. The cache does not outlive the process: after a restart the
//! first message to a domain fetches its policy again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hickory_resolver::TokioResolver;
use http_body_util::{BodyExt, Empty, Limited};
use rustls::pki_types::ServerName;

/// RFC 8461 §3.2: at most a year.
const MAX_MAX_AGE: u64 = 31_557_600;
/// RFC 8461 §3.3: a policy body is small; 64 KiB is the suggested bound.
const MAX_BODY: usize = 64 * 1024;
/// How long one fetch may take in all (RFC 8461 §3.3 suggests 60 s).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The HTTPS port of the policy host.
const HTTPS_PORT: u16 = 443;

/// What a policy asks of senders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only over valid TLS to a listed MX.
    Enforce,
    /// Report failures (we log them) but deliver anyway.
    Testing,
    /// No policy.
    None,
}

/// A domain's policy as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns: exact names or `*.example.net` (one label).
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

impl Policy {
    /// Parses a policy body (RFC 8461 §3.2).
    pub fn parse(body: &str) -> Result<Policy, String> {
        let mut version = None;
        let mut mode = None;
        let mut mx = Vec::new();
        let mut max_age = None;
        for line in body.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                return Err(format!("policy line without a colon: {line:?}"));
            };
            let v = v.trim();
            match k.trim() {
                "version" => version = Some(v.to_string()),
                "mode" => {
                    mode = Some(match v {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        _ => return Err(format!("unknown policy mode {v:?}")),
                    })
                }
                "mx" => mx.push(v.trim_end_matches('.').to_ascii_lowercase()),
                "max_age" => {
                    max_age = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("bad max_age {v:?}"))?
                            .min(MAX_MAX_AGE),
                    )
                }
                _ => {} // §3.2: unknown fields are ignored
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("policy version is not STSv1".into());
        }
        let mode = mode.ok_or("policy without a mode")?;
        let max_age = max_age.ok_or("policy without max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("policy without mx".into());
        }
        Ok(Policy { mode, mx, max_age })
    }

    /// Whether the MX host `name` is one the policy lists (§4.1).
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => name
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
            None => *p == name,
        })
    }
}

/// The id of a `v=STSv1; id=…` TXT record (§3.1).
pub fn txt_id(txt: &str) -> Option<String> {
    let mut fields = txt.split(';').map(str::trim);
    if fields.next()? != "v=STSv1" {
        return None;
    }
    fields
        .filter_map(|f| f.split_once('='))
        .find(|(k, _)| k.trim() == "id")
        .map(|(_, v)| v.trim().to_string())
        .filter(|id| {
            !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

struct Cached {
    id: String,
    policy: Arc<Policy>,
    expires: Instant,
}

/// Fetches and caches policies.
pub struct MtaSts {
    resolver: TokioResolver,
    /// The strict client configuration: the policy host's certificate must
    /// verify.
    tls: Arc<rustls::ClientConfig>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl MtaSts {
    pub fn new(resolver: TokioResolver, tls: Arc<rustls::ClientConfig>) -> MtaSts {
        MtaSts {
            resolver,
            tls,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The policy `domain` publishes, if any; None also when it cannot be
    /// had and none is cached (delivery is then opportunistic, §5).
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        let cached = {
            let cache = self.cache.lock().unwrap();
            cache
                .get(domain)
                .filter(|c| c.expires > Instant::now())
                .map(|c| (c.id.clone(), c.policy.clone()))
        };
        let id = self.txt_record(domain).await;
        let Some(id) = id else {
            return cached.map(|(_, p)| p);
        };
        if let Some((cached_id, p)) = &cached
            && *cached_id == id
        {
            return Some(p.clone());
        }
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch(domain)).await {
            Ok(Ok(policy)) => {
                tracing::info!(domain, ?policy.mode, mx = ?policy.mx, "MTA-STS policy fetched");
                let policy = Arc::new(policy);
                self.cache.lock().unwrap().insert(
                    domain.to_string(),
                    Cached {
                        id,
                        policy: policy.clone(),
                        expires: Instant::now() + Duration::from_secs(policy.max_age),
                    },
                );
                Some(policy)
            }
            Ok(Err(e)) => {
                tracing::warn!(domain, error = %e, "MTA-STS policy fetch failed");
                cached.map(|(_, p)| p)
            }
            Err(_) => {
                tracing::warn!(domain, "MTA-STS policy fetch timed out");
                cached.map(|(_, p)| p)
            }
        }
    }

    async fn txt_record(&self, domain: &str) -> Option<String> {
        let name = format!("_mta-sts.{domain}.");
        let txt = self.resolver.txt_lookup(name).await.ok()?;
        let ids: Vec<String> = txt
            .iter()
            .filter_map(|t| {
                let s: String = t
                    .txt_data()
                    .iter()
                    .map(|d| String::from_utf8_lossy(d).into_owned())
                    .collect();
                txt_id(&s)
            })
            .collect();
        // §3.1: more than one record is as good as none.
        match ids.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }

    /// GET the policy over HTTPS, no redirects, at most [`MAX_BODY`].
    async fn fetch(&self, domain: &str) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        let ips = self
            .resolver
            .lookup_ip(format!("{host}."))
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let mut last = format!("{host} has no address");
        for ip in ips.iter() {
            let addr = SocketAddr::new(ip, HTTPS_PORT);
            match self.get(addr, &host, name.clone()).await {
                Ok(body) => return Policy::parse(&body),
                Err(e) => last = format!("{host} [{ip}]: {e}"),
            }
        }
        Err(last)
    }

    async fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        name: ServerName<'static>,
    ) -> Result<String, String> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(15),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "letterbox")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            // §3.3: only 200 counts; redirects are not followed.
            if resp.status() != hyper::StatusCode::OK {
                return Err(format!("HTTP status {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the policy: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "the policy is not UTF-8".to_string())
        }
        .await;
        driver.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies_and_matches_mx() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.net\r\nmx: *.backup.example.net\r\nmax_age: 86400\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert!(p.matches("mail.example.net."));
        assert!(p.matches("MX1.backup.example.net"));
        assert!(!p.matches("a.b.backup.example.net"));
        assert!(!p.matches("backup.example.net"));
        assert!(!p.matches("evil.example.net"));
        assert!(Policy::parse("mode: enforce\nmx: a\nmax_age: 1").is_err());
        assert!(Policy::parse("version: STSv1\nmode: enforce\nmax_age: 1").is_err());
        assert_eq!(
            Policy::parse("version: STSv1\nmode: none\nmax_age: 99999999999")
                .unwrap()
                .max_age,
            MAX_MAX_AGE
        );
    }

    #[test]
    fn txt_record_ids() {
        assert_eq!(
            txt_id("v=STSv1; id=20160831085700Z;").as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(txt_id("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(txt_id("v=spf1 -all"), None);
        assert_eq!(txt_id("v=STSv1; id=a-b"), None);
    }
}
