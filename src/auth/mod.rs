//! Sender authentication of mail arriving over SMTP: SPF, DKIM, DMARC and
//! ARC, verified with the `mail-auth` crate on the shared resolver, and
//! reported in one Authentication-Results field (RFC 8601) that names our
//! `hostname` as its authserv-id.
//!
//! One check, `auth`, at two stages:
//! - **mail**: SPF (RFC 7208) of the MAIL FROM domain, or of the HELO name
//!   for the null sender, starts in the background ([`SpfSlot`]). With
//!   `spf = "reject-fail"` the MAIL reply waits for it: `fail` is refused
//!   (550 5.7.23), a DNS failure answered 451 4.7.24.
//! - **data**: every DKIM signature (RFC 6376) and the ARC chain (RFC 8617)
//!   are verified, then DMARC (RFC 7489) for the From domain, with relaxed
//!   or strict alignment against the public suffix list. With
//!   `dmarc = "enforce"` the domain's policy is applied: p=reject refuses
//!   the message (550 5.7.1), p=quarantine delivers it into the recipients'
//!   `.Junk` folders, p=none delivers it. Then the Authentication-Results
//!   field is added (and Received-SPF with `auth.received_spf`), and any
//!   Authentication-Results field in the message that claims our
//!   authserv-id is deleted: only we may speak for us.
//!
//! A DNS failure is never read as an accept where a policy is enforced:
//! it is reported `temperror`, and where it would decide (SPF under
//! reject-fail; DMARC's record, or SPF or DKIM under a failing DMARC
//! policy that would act) the answer is a temporary failure. `dkim = "off"`
//! or `spf = "off"` only leave that method out of the field: DMARC still
//! verifies both when it is on, since it is built on them. ARC is
//! reported, not used to override DMARC.

pub mod lookups;
pub mod message;
pub mod results;
pub mod spf;

use std::sync::Arc;

use futures_util::future::{BoxFuture, join};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::{AuthenticatedMessage, DkimOutput, DkimResult, Parameters, SpfResult};

pub use spf::{Identity, SpfSlot, SpfVerdict};

use self::lookups::Lookups;
use self::results::{Disposition, DmarcResult};
use crate::config::{AuthConfig, DmarcPolicy, SpfPolicy, TagPolicy};
use crate::dns::Dns;
use crate::pipeline::{Check, CheckState, Facts, Header, Stage, Verdict};
use crate::reply::Reply;
use crate::runtime::Runtime;

/// The `auth` check.
pub struct Auth {
    shared: Arc<Shared>,
}

struct Shared {
    dns: Dns,
    policy: AuthConfig,
    /// Our authserv-id.
    hostname: String,
}

impl Auth {
    /// The check, or None when `[auth]` turns every method off.
    pub fn check(runtime: &Runtime) -> Option<Arc<dyn Check>> {
        let policy = runtime.config.auth.clone();
        if !policy.any() {
            return None;
        }
        // Runtime::new refuses to start without DNS when auth is on.
        let dns = runtime.dns.clone()?;
        Some(Arc::new(Auth {
            shared: Arc::new(Shared {
                dns,
                policy,
                hostname: runtime.hostname.clone(),
            }),
        }))
    }
}

impl Check for Auth {
    fn name(&self) -> &str {
        "auth"
    }

    fn open(&self) -> Box<dyn CheckState> {
        Box::new(State(self.shared.clone()))
    }
}

/// Nothing is kept per connection: SPF's state is the transaction's
/// [`SpfSlot`], the rest is decided at the data stage.
struct State(Arc<Shared>);

impl CheckState for State {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        let shared = self.0.clone();
        Box::pin(async move {
            match stage {
                Stage::Mail => shared.at_mail(facts).await,
                Stage::Data => shared.at_data(facts).await,
                _ => Verdict::Continue,
            }
        })
    }
}

/// What DMARC concluded, as reported and enforced.
struct DmarcOutcome {
    result: DmarcResult,
    /// The policy that applies to the From domain, when it has a record.
    policy: Option<Disposition>,
    /// What we do about a failure: the policy under `enforce` (after
    /// `pct` sampling), nothing under `tag`.
    disposition: Disposition,
    /// The RFC5322.From domain.
    domain: Option<String>,
}

impl Shared {
    /// Starts SPF; under reject-fail, waits for it and refuses a failure.
    async fn at_mail(&self, facts: Facts<'_>) -> Verdict {
        let (Some(slot), Some(sender)) = (facts.spf, facts.sender) else {
            return Verdict::Continue;
        };
        if self.policy.spf == SpfPolicy::Off && self.policy.dmarc == DmarcPolicy::Off {
            return Verdict::Continue;
        }
        let helo = facts.helo.unwrap_or_default();
        slot.start(self.dns.clone(), facts.ip, helo, sender, &self.hostname);
        if self.policy.spf != SpfPolicy::RejectFail {
            return Verdict::Continue;
        }
        let Some(v) = slot.result().await else {
            return Verdict::Continue;
        };
        let domain = printable(&v.domain);
        match v.result {
            SpfResult::Fail => Verdict::Reject(Reply::spf_fail(&domain, facts.ip.to_canonical())),
            SpfResult::TempError => Verdict::TempFail(Reply::spf_temperror(&domain)),
            _ => Verdict::Continue,
        }
    }

    /// DKIM, ARC and DMARC; the field; the forged fields; the policy.
    async fn at_data(&self, facts: Facts<'_>) -> Verdict {
        let Some(content) = facts.content else {
            return Verdict::Continue;
        };
        let spf = match facts.spf {
            Some(slot) => slot.result().await,
            None => None,
        };
        let p = &self.policy;
        let needs_message =
            p.dkim != TagPolicy::Off || p.dmarc != DmarcPolicy::Off || p.arc != TagPolicy::Off;
        let message = if needs_message {
            match message::load(content).await {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(id = facts.id, error = %e, "reading the message for DKIM failed");
                    return Verdict::TempFail(Reply::local_error());
                }
            }
        } else {
            None
        };
        let parsed = message.as_ref().and_then(|m| m.get().0.as_ref());
        let header = match parsed {
            Some(m) => message::header_of(m.raw_message()).to_vec(),
            None => match message::head(content).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(id = facts.id, error = %e, "reading the message's header failed");
                    return Verdict::TempFail(Reply::local_error());
                }
            },
        };

        let lookups = (Lookups::default(), Lookups::default());
        let (dkim, dkim_temporary, arc) = self.verify_dkim_and_arc(parsed, &lookups).await;
        let dmarc = match p.dmarc {
            DmarcPolicy::Off => None,
            _ => Some(self.dmarc(parsed, &dkim, spf.as_deref()).await),
        };

        // Enforcement first: a refusal needs no field.
        let mut quarantine = None;
        if p.dmarc == DmarcPolicy::Enforce
            && let Some(d) = &dmarc
        {
            let domain = printable(d.domain.as_deref().unwrap_or_default());
            let unsure = spf
                .as_ref()
                .is_some_and(|v| v.result == SpfResult::TempError)
                || dkim_temporary.iter().any(|t| *t)
                || dkim
                    .iter()
                    .any(|o| matches!(o.result(), DkimResult::TempError(_)));
            match (d.result, d.disposition) {
                (DmarcResult::TempError, _) => {
                    return Verdict::TempFail(Reply::dmarc_temperror(&domain));
                }
                // It might have passed had every lookup answered.
                (DmarcResult::Fail, Disposition::Reject | Disposition::Quarantine) if unsure => {
                    return Verdict::TempFail(Reply::dmarc_temperror(&domain));
                }
                (DmarcResult::Fail, Disposition::Reject) => {
                    return Verdict::Reject(Reply::dmarc_reject(&domain));
                }
                (DmarcResult::Fail, Disposition::Quarantine) => {
                    quarantine = Some(format!("DMARC policy of {domain} is quarantine"));
                }
                _ => {}
            }
        }

        let mut entries = Vec::new();
        if p.spf != SpfPolicy::Off
            && let Some(v) = &spf
        {
            entries.push(results::spf(v));
        }
        if p.dkim != TagPolicy::Off {
            if dkim.is_empty() {
                entries.push("dkim=none".into());
            }
            for (o, temporary) in dkim.iter().zip(&dkim_temporary) {
                entries.push(results::dkim(o, *temporary));
            }
        }
        if let Some(d) = &dmarc {
            entries.push(results::dmarc(
                d.result,
                d.policy,
                d.disposition,
                d.domain.as_deref(),
            ));
        }
        if let Some((result, temporary)) = &arc {
            entries.push(results::arc(result, *temporary));
        }
        tracing::info!(id = facts.id, results = %entries.join("; "), "authentication results");

        let mut fields: Vec<Header> = results::authentication_results(&self.hostname, &entries)
            .into_iter()
            .collect();
        if p.received_spf
            && p.spf != SpfPolicy::Off
            && let Some(v) = &spf
        {
            fields.extend(results::received_spf(
                v,
                &self.hostname,
                facts.ip,
                facts.helo.unwrap_or_default(),
            ));
        }
        let mut verdicts = vec![Verdict::AddHeaders(fields)];
        let forged = results::forged(&header, &self.hostname);
        if !forged.is_empty() {
            tracing::info!(
                id = facts.id,
                count = forged.len(),
                "removing forged Authentication-Results"
            );
            verdicts.push(Verdict::Modify(forged));
        }
        if let Some(reason) = quarantine {
            verdicts.push(Verdict::Quarantine(reason));
        }
        Verdict::Several(verdicts)
    }

    /// Every DKIM signature (when DKIM or DMARC is on) and the ARC chain
    /// (when ARC is on), side by side. For each signature, whether its key
    /// lookup failed for a temporary reason; for ARC, its result and the
    /// same. `lookups` note DKIM's and ARC's DNS queries.
    async fn verify_dkim_and_arc<'m>(
        &self,
        parsed: Option<&'m AuthenticatedMessage<'m>>,
        (dkim_lookups, arc_lookups): &'m (Lookups, Lookups),
    ) -> (Vec<DkimOutput<'m>>, Vec<bool>, Option<(DkimResult, bool)>) {
        let p = &self.policy;
        let auth = self.dns.authenticator();
        let (dkim, arc) = match parsed {
            Some(m) => {
                let dkim = async {
                    if p.dkim != TagPolicy::Off || p.dmarc != DmarcPolicy::Off {
                        auth.verify_dkim(Parameters::new(m).with_txt_cache(dkim_lookups))
                            .await
                    } else {
                        Vec::new()
                    }
                };
                let arc = async {
                    if p.arc != TagPolicy::Off {
                        let o = auth
                            .verify_arc(Parameters::new(m).with_txt_cache(arc_lookups))
                            .await;
                        Some(o.result().clone())
                    } else {
                        None
                    }
                };
                join(dkim, arc).await
            }
            None if p.arc != TagPolicy::Off => (Vec::new(), Some(DkimResult::None)),
            None => (Vec::new(), None),
        };
        // mail-auth reads a SERVFAIL for a key as "no key": ask again.
        let undecided = |r: &DkimResult| !matches!(r, DkimResult::Pass | DkimResult::TempError(_));
        let temporary =
            if dkim.iter().any(|o| undecided(o.result())) && !dkim_lookups.failed().is_empty() {
                dkim_lookups.temporary(&self.dns).await
            } else {
                Default::default()
            };
        let dkim_temporary = dkim
            .iter()
            .map(|o| {
                undecided(o.result())
                    && o.signature().is_some_and(|s| {
                        temporary
                            .contains(&format!("{}._domainkey.{}.", s.s, s.d).to_ascii_lowercase())
                    })
            })
            .collect();
        let arc = match arc {
            Some(r)
                if undecided(&r) && r != DkimResult::None && !arc_lookups.failed().is_empty() =>
            {
                let temporary = !arc_lookups.temporary(&self.dns).await.is_empty();
                Some((r, temporary))
            }
            other => other.map(|r| (r, false)),
        };
        (dkim, dkim_temporary, arc)
    }

    /// DMARC for the message's From domain.
    async fn dmarc(
        &self,
        parsed: Option<&AuthenticatedMessage<'_>>,
        dkim: &[DkimOutput<'_>],
        spf: Option<&SpfVerdict>,
    ) -> DmarcOutcome {
        let none = DmarcOutcome {
            result: DmarcResult::None,
            policy: None,
            disposition: Disposition::None,
            domain: None,
        };
        let Some(m) = parsed else {
            return none;
        };
        let spf_output = spf.map(|v| v.output.clone()).unwrap_or_default();
        // With the null sender, SPF checked the HELO name (RFC 7489 §3.1.2).
        let mail_from_domain = spf.map(|v| v.domain.clone()).unwrap_or_default();
        let lookups = Lookups::default();
        let params = DmarcParameters::new(m, dkim, &mail_from_domain, &spf_output)
            .with_domain_suffix_fn(organizational_domain);
        let out = self
            .dns
            .authenticator()
            .verify_dmarc(Parameters::new(params).with_txt_cache(&lookups))
            .await;
        let domain = Some(out.domain().to_ascii_lowercase()).filter(|d| !d.is_empty());
        let Some(domain) = domain else {
            // No From domain, or several (RFC 7489 §6.6.1): not evaluated.
            return none;
        };
        use mail_auth::DmarcResult as R;
        let record = out.dmarc_record();
        let mut result = match record {
            Some(_) if *out.spf_result() == R::Pass || *out.dkim_result() == R::Pass => {
                DmarcResult::Pass
            }
            Some(_) => DmarcResult::Fail,
            None => match (out.spf_result(), out.dkim_result()) {
                (R::TempError(_), _) | (_, R::TempError(_)) => DmarcResult::TempError,
                (R::PermError(_), _) | (_, R::PermError(_)) => DmarcResult::PermError,
                _ => DmarcResult::None,
            },
        };
        // mail-auth reads a SERVFAIL for the record as "no record".
        if result == DmarcResult::None
            && !lookups.failed().is_empty()
            && !lookups.temporary(&self.dns).await.is_empty()
        {
            result = DmarcResult::TempError;
        }
        let policy = record.map(|r| applicable_policy(r, &domain, lookups.dmarc_at().as_deref()));
        let disposition = match (result, policy, record) {
            (DmarcResult::Fail, Some(policy), Some(r))
                if self.policy.dmarc == DmarcPolicy::Enforce =>
            {
                sampled(policy, r.pct)
            }
            _ => Disposition::None,
        };
        DmarcOutcome {
            result,
            policy,
            disposition,
            domain: Some(domain),
        }
    }
}

/// The registrable domain of `d` by the public suffix list (`mail.example.co.uk`
/// → `example.co.uk`), for relaxed alignment (RFC 7489 §3.2).
fn organizational_domain(d: &str) -> &str {
    psl::domain_str(d).unwrap_or(d)
}

/// The policy for the From domain: `p` when the record is the domain's
/// own, `sp` (or `p` without one) when it was found at the organizational
/// domain (RFC 7489 §6.6.3).
fn applicable_policy(record: &Dmarc, from: &str, found_at: Option<&str>) -> Disposition {
    let own = found_at.is_none_or(|at| at.trim_end_matches('.') == format!("_dmarc.{from}"));
    let policy = match record.sp {
        Policy::Unspecified => record.p,
        sp if !own => sp,
        _ => record.p,
    };
    match policy {
        Policy::Reject => Disposition::Reject,
        Policy::Quarantine => Disposition::Quarantine,
        Policy::None | Policy::Unspecified => Disposition::None,
    }
}

/// `pct` (RFC 7489 §6.6.4): a failing message outside the sample gets the
/// next milder policy.
fn sampled(policy: Disposition, pct: u8) -> Disposition {
    if pct >= 100 || rand::random::<u8>() % 100 < pct {
        return policy;
    }
    match policy {
        Disposition::Reject => Disposition::Quarantine,
        _ => Disposition::None,
    }
}

/// Text from the message or the client made safe for a reply line.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> Dmarc {
        use mail_auth::common::parse::TxtRecordParser;
        Dmarc::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn a_subdomain_without_its_own_record_gets_sp() {
        let r = record("v=DMARC1; p=reject; sp=quarantine");
        let own = Some("_dmarc.example.org.");
        assert_eq!(
            applicable_policy(&r, "example.org", own),
            Disposition::Reject
        );
        assert_eq!(
            applicable_policy(&r, "mail.example.org", own),
            Disposition::Quarantine
        );
        let r = record("v=DMARC1; p=quarantine");
        assert_eq!(
            applicable_policy(&r, "mail.example.org", own),
            Disposition::Quarantine
        );
        let r = record("v=DMARC1; p=none");
        assert_eq!(applicable_policy(&r, "example.org", own), Disposition::None);
    }

    #[test]
    fn relaxed_alignment_compares_registrable_domains() {
        assert_eq!(organizational_domain("mail.example.co.uk"), "example.co.uk");
        assert_eq!(organizational_domain("a.b.example.org"), "example.org");
        assert_eq!(organizational_domain("sub.pass.test"), "pass.test");
    }

    #[test]
    fn pct_zero_softens_the_policy() {
        assert_eq!(sampled(Disposition::Reject, 0), Disposition::Quarantine);
        assert_eq!(sampled(Disposition::Quarantine, 0), Disposition::None);
        assert_eq!(sampled(Disposition::Reject, 100), Disposition::Reject);
    }

    #[test]
    fn replies_hold_printable_text_only() {
        assert_eq!(printable("ex ample\r\n.org\u{e9}"), "example.org");
    }
}
