//! Which DNS lookups a verification made, and which of them failed for a
//! temporary reason.
//!
//! `mail-auth` 0.7 reads every answer without records as "no such
//! record": a SERVFAIL or REFUSED for an SPF record becomes SPF `none`, for
//! a DMARC record "no policy", for a DKIM key "no key". RFC 7208 §4.4 and
//! RFC 7489 §6.6.3 call those temporary errors, and a check that enforces
//! must not accept on them. So each verification gets a [`Lookups`] as its
//! DNS cache: it never caches (the resolver below does), it only notes the
//! names asked for and the names answered. A name asked and never answered
//! was a failed lookup; [`Lookups::temporary`] asks the resolver again
//! (usually from its cache) to tell "does not exist" from "no answer".

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::join_all;
use hickory_resolver::proto::rr::RecordType;
use mail_auth::{MX, ResolverCache, Txt};

use crate::dns::{Dns, Lookup, classify};

/// The lookups of one verification.
#[derive(Debug, Default)]
pub struct Lookups {
    inner: Mutex<Noted>,
}

#[derive(Debug, Default)]
struct Noted {
    /// Names asked, with their record type, in order, without repeats.
    asked: Vec<(RecordType, String)>,
    answered: HashSet<(RecordType, String)>,
    /// The name a DMARC record was found at, if one was.
    dmarc_at: Option<String>,
}

impl Lookups {
    fn ask(&self, rt: RecordType, name: Option<String>) {
        let Some(name) = name else { return };
        let mut n = self.inner.lock().unwrap();
        let entry = (rt, name.to_ascii_lowercase());
        if !n.asked.contains(&entry) {
            n.asked.push(entry);
        }
    }

    fn answer(&self, rt: RecordType, name: &str) {
        let mut n = self.inner.lock().unwrap();
        n.answered.insert((rt, name.to_ascii_lowercase()));
    }

    /// Names asked and never answered: the lookups that failed.
    pub fn failed(&self) -> Vec<(RecordType, String)> {
        let n = self.inner.lock().unwrap();
        n.asked
            .iter()
            .filter(|e| !n.answered.contains(*e))
            .cloned()
            .collect()
    }

    /// The failed lookups that failed for a temporary reason (no answer,
    /// SERVFAIL, REFUSED…), not because the name or record does not
    /// exist: each name, lowercase with its final dot.
    pub async fn temporary(&self, dns: &Dns) -> HashSet<String> {
        let failed = self.failed();
        let again = join_all(failed.iter().map(|(rt, name)| async move {
            match dns.resolver().lookup(name.as_str(), *rt).await {
                Ok(_) => Lookup::Found(()),
                Err(e) => classify(&e),
            }
        }))
        .await;
        failed
            .into_iter()
            .zip(again)
            .filter(|(_, l)| matches!(l, Lookup::Failed(_)))
            .map(|((_, name), _)| name)
            .collect()
    }

    /// Where the DMARC record was found (`_dmarc.example.org.`).
    pub fn dmarc_at(&self) -> Option<String> {
        self.inner.lock().unwrap().dmarc_at.clone()
    }
}

/// The cache traits give a name only as `Q: Hash`; hashing it into this
/// keeps the bytes (`str` hashes as its bytes then 0xff, which no UTF-8
/// text contains). A unit test below pins that.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Hasher for Bytes {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

fn name_of<Q: Hash + ?Sized>(q: &Q) -> Option<String> {
    let mut h = Bytes::default();
    q.hash(&mut h);
    while h.0.last() == Some(&0xff) {
        h.0.pop();
    }
    String::from_utf8(h.0).ok()
}

macro_rules! noting_cache {
    ($value:ty, $rt:expr) => {
        impl ResolverCache<String, $value> for Lookups {
            fn get<Q>(&self, name: &Q) -> Option<$value>
            where
                String: Borrow<Q>,
                Q: Hash + Eq + ?Sized,
            {
                self.ask($rt, name_of(name));
                None
            }

            fn remove<Q>(&self, _: &Q) -> Option<$value>
            where
                String: Borrow<Q>,
                Q: Hash + Eq + ?Sized,
            {
                None
            }

            fn insert(&self, name: String, value: $value, _: Instant) {
                self.answer($rt, &name);
                value.note(self, &name);
            }
        }
    };
}

/// What an answer tells beyond having come: where DMARC's record is.
trait Note {
    fn note(&self, _: &Lookups, _: &str) {}
}

impl Note for Txt {
    fn note(&self, l: &Lookups, name: &str) {
        if matches!(self, Txt::Dmarc(_)) {
            l.inner
                .lock()
                .unwrap()
                .dmarc_at
                .get_or_insert_with(|| name.to_ascii_lowercase());
        }
    }
}
impl Note for Arc<Vec<MX>> {}
impl Note for Arc<Vec<Ipv4Addr>> {}
impl Note for Arc<Vec<Ipv6Addr>> {}

noting_cache!(Txt, RecordType::TXT);
noting_cache!(Arc<Vec<MX>>, RecordType::MX);
noting_cache!(Arc<Vec<Ipv4Addr>>, RecordType::A);
noting_cache!(Arc<Vec<Ipv6Addr>>, RecordType::AAAA);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_read_back_from_its_hash() {
        assert_eq!(
            name_of("_dmarc.example.org.").as_deref(),
            Some("_dmarc.example.org.")
        );
        assert_eq!(
            name_of(&String::from("sel._domainkey.example.org.")).as_deref(),
            Some("sel._domainkey.example.org.")
        );
    }

    #[test]
    fn asked_and_unanswered_names_are_the_failures() {
        let l = Lookups::default();
        let txt = |l: &Lookups, n: &str| ResolverCache::<String, Txt>::get(l, n);
        assert!(txt(&l, "a.example.").is_none());
        assert!(txt(&l, "B.example.").is_none());
        assert!(txt(&l, "a.example.").is_none());
        let four: Option<Arc<Vec<Ipv4Addr>>> = l.get("a.example.");
        assert!(four.is_none());
        ResolverCache::<String, Txt>::insert(
            &l,
            "a.example.".into(),
            Txt::Error(mail_auth::Error::ParseError),
            Instant::now(),
        );
        assert_eq!(
            l.failed(),
            [
                (RecordType::TXT, "b.example.".to_string()),
                (RecordType::A, "a.example.".to_string()),
            ]
        );
        assert_eq!(l.dmarc_at(), None);
    }
}
