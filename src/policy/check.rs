//! A configured policy server as a pipeline check: asked once per
//! recipient at RCPT (or once per message at the end of data) with the
//! attribute set Postfix sends, its action word turned into a verdict.
//! Connections are pooled by the client and shared by every session, so a
//! request costs a round trip, never a connect.
//!
//! A server that is down or misbehaves gets `default_action` (accept by
//! default: greylisting is an extra, not a gate).

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Action, PolicyClient, PolicyReply, PolicyRequest, ProtocolState};
use crate::config::{DefaultAction, PolicyConfig, PolicyStage};
use crate::pipeline::{Check, CheckState, Facts, Header, Stage, Verdict};
use crate::reply::Reply;

/// One `[[policy]]` entry.
pub struct PolicyCheck {
    inner: Arc<Inner>,
}

struct Inner {
    client: PolicyClient,
    stage: PolicyStage,
    default_action: DefaultAction,
    name: String,
}

impl PolicyCheck {
    /// The check for one configured server; an error for a bad address.
    pub fn new(config: &PolicyConfig) -> Result<PolicyCheck, super::PolicyError> {
        Ok(PolicyCheck {
            inner: Arc::new(Inner {
                client: PolicyClient::new(&config.address, config.timeout.0)?,
                stage: config.stage,
                default_action: config.default_action,
                name: format!("policy {}", config.address),
            }),
        })
    }
}

impl Check for PolicyCheck {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn open(&self) -> Box<dyn CheckState> {
        Box::new(State {
            inner: self.inner.clone(),
        })
    }
}

struct State {
    inner: Arc<Inner>,
}

impl CheckState for State {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let state = match (stage, self.inner.stage) {
                (Stage::Rcpt, PolicyStage::Rcpt) => ProtocolState::Rcpt,
                (Stage::Data, PolicyStage::Data) => ProtocolState::EndOfMessage,
                _ => return Verdict::Continue,
            };
            let request = request(state, &facts);
            match self.inner.client.check(&request).await {
                Ok(action) => verdict(action),
                Err(e) => {
                    tracing::warn!(policy = %self.inner.name, error = %e,
                        action = ?self.inner.default_action, "policy server failed; applying its default action");
                    match self.inner.default_action {
                        DefaultAction::Accept => Verdict::Continue,
                        DefaultAction::Tempfail => Verdict::TempFail(Reply::filter_unavailable()),
                        DefaultAction::Reject => Verdict::Reject(Reply::filter_rejected()),
                    }
                }
            }
        })
    }
}

/// What Postfix tells a policy server at this point of the transaction.
fn request(state: ProtocolState, facts: &Facts<'_>) -> PolicyRequest {
    let (version, cipher) = match facts.tls {
        Some(t) => t.split_once(':').unwrap_or((t, "")),
        None => ("", ""),
    };
    let recipient = match (facts.rcpt, facts.recipients) {
        (Some(r), _) => r.address.clone(),
        (None, [only]) => only.address.clone(),
        _ => String::new(),
    };
    PolicyRequest {
        protocol_state: state,
        protocol_name: "ESMTP".into(),
        helo_name: facts.helo.unwrap_or_default().to_string(),
        queue_id: facts.id.unwrap_or_default().to_string(),
        sender: facts.sender.unwrap_or_default().to_string(),
        recipient,
        recipient_count: match state {
            ProtocolState::Rcpt => 0,
            _ => facts.recipients.len() as u32,
        },
        client_address: Some(facts.ip),
        instance: facts.id.unwrap_or_default().to_string(),
        size: facts.content.map_or(0, |c| c.len()),
        encryption_protocol: version.to_string(),
        encryption_cipher: cipher.to_string(),
        ..PolicyRequest::default()
    }
}

/// An action word as a verdict. Words letterbox has no equivalent for are
/// logged and count as DUNNO.
fn verdict(action: Action) -> Verdict {
    let reply = |r: PolicyReply| Reply::new(r.code, r.enhanced, r.text);
    match action {
        Action::Ok => Verdict::Accept,
        Action::Dunno => Verdict::Continue,
        Action::Reject(r) => Verdict::reject(Some(reply(r))),
        // Nothing after a policy server can turn its DEFER_IF_PERMIT into a
        // permit or a reject, so both conditional words act now.
        Action::Defer(r) | Action::DeferIfPermit(r) => Verdict::tempfail(Some(reply(r))),
        Action::DeferIfReject(_) => Verdict::Continue,
        Action::Prepend(field) => {
            match field.split_once(':').and_then(|(n, v)| Header::new(n, v)) {
                Some(h) => Verdict::AddHeaders(vec![h]),
                None => {
                    tracing::warn!(
                        field,
                        "policy server asked to prepend a malformed header; ignored"
                    );
                    Verdict::Continue
                }
            }
        }
        // No hold queue: a held message is kept aside where a person looks.
        Action::Hold(text) => Verdict::Quarantine(text.unwrap_or_else(|| "held by policy".into())),
        Action::Discard(_) => Verdict::Discard,
        Action::Other { command, text } => {
            tracing::warn!(
                command,
                text,
                "policy server action not supported; treated as DUNNO"
            );
            Verdict::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_word_has_a_verdict() {
        let v = |s: &str| verdict(Action::parse(s));
        assert_eq!(v("OK"), Verdict::Accept);
        assert_eq!(v("DUNNO"), Verdict::Continue);
        assert_eq!(
            v("REJECT go away"),
            Verdict::Reject(Reply::new(554, "5.7.1", "go away"))
        );
        assert_eq!(
            v("DEFER_IF_PERMIT 4.2.0 Greylisted"),
            Verdict::TempFail(Reply::new(450, "4.2.0", "Greylisted"))
        );
        assert_eq!(
            v("PREPEND X-Greylist: delayed 2 seconds"),
            Verdict::AddHeaders(vec![
                Header::new("X-Greylist", "delayed 2 seconds").unwrap()
            ])
        );
        assert_eq!(v("DISCARD"), Verdict::Discard);
        assert!(matches!(v("HOLD"), Verdict::Quarantine(_)));
        assert_eq!(v("FILTER smtp:[10.0.0.1]"), Verdict::Continue);
        assert_eq!(
            v("521 5.7.0 bye"),
            Verdict::Reject(Reply::new(521, "5.7.0", "bye"))
        );
    }
}
