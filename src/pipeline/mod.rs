//! The transaction pipeline: the one seam between a protocol session (SMTP,
//! LMTP) and everything that decides about or stores a message.
//!
//! A session consults the pipeline at each stage, in order:
//! connect → helo → mail → rcpt (per recipient) → data (end of message) →
//! deliver. At each stage the pipeline runs its own fixed step (at rcpt,
//! the directory: [`rcpt`]; at data, the content's storage plan:
//! [`content`]; at deliver, the targets: [`deliver`]) and then every
//! configured [`Check`], side by side. Their [`Verdict`]s are merged in
//! configuration order: the first refusal wins, headers accumulate
//! (maddy's check runner; see STYLE.md). The session never knows which
//! checks exist, and a test can hand a session a pipeline of its own.
//!
//! Outcomes are typed ([`Decision`], [`Refusal`], [`Failure`]); the session
//! turns them into replies through `crate::reply`, the one place replies
//! are spelled.

pub mod content;
pub mod deliver;
pub mod edit;
pub mod rcpt;
pub mod submission;

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::future::{BoxFuture, join_all};

pub use deliver::{Failure, Mode};
pub use edit::Edit;
pub use rcpt::Refusal;
pub use submission::SealError;

use crate::envelope::Recipient;
use crate::reply::Reply;
use crate::runtime::Runtime;
use crate::spool::Spool;

/// The stages a check is consulted at. Their lowercase names are what the
/// configuration (`[[hooks]] stage = "rcpt"`) and hooks (`STAGE`) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// A client connected; nothing has been said yet.
    Connect,
    /// EHLO, HELO or LHLO was accepted.
    Helo,
    /// MAIL FROM is about to be accepted.
    Mail,
    /// A recipient resolved in the directory is about to be accepted.
    Rcpt,
    /// The content is complete and about to be accepted for delivery.
    Data,
}

impl Stage {
    /// The stage's name in the configuration and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
        }
    }
}

/// What a check may look at; it grows as the transaction proceeds.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub ip: IpAddr,
    /// The EHLO/HELO/LHLO argument, from the helo stage on.
    pub helo: Option<&'a str>,
    /// TLS version and cipher, once TLS is active.
    pub tls: Option<&'a str>,
    /// The transaction's id, from the mail stage on.
    pub id: Option<&'a str>,
    /// The reverse-path (empty for `<>`), from the mail stage on.
    pub sender: Option<&'a str>,
    /// Recipients accepted so far.
    pub recipients: &'a [Recipient],
    /// The recipient being decided, at the rcpt stage.
    pub rcpt: Option<&'a Recipient>,
    /// The content (CRLF, unstuffed), at the data stage.
    pub content: Option<&'a Spool>,
    /// The client came over a unix socket (local LMTP): `ip` is then a
    /// stand-in, 127.0.0.1.
    pub local: bool,
    /// The domain whose SPF record passed (the MAIL FROM domain, or the
    /// HELO name for the null sender), from the rcpt stage on: the session
    /// awaits the SPF lookup the auth check started at MAIL.
    pub spf_pass: Option<&'a str>,
    /// The transaction's SPF result, from the mail stage on: the auth
    /// check starts the lookup here, and the session reads it for
    /// `spf_pass` (see [`crate::auth::SpfSlot`]).
    pub spf: Option<&'a crate::auth::SpfSlot>,
    /// The user the client logged in as (AUTH on a submission port), its
    /// canonical address: hooks' AUTH_AS, a milter's `{auth_authen}`.
    pub auth: Option<&'a str>,
}

/// A header field a check adds to every copy, below our Received field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    name: String,
    value: String,
}

impl Header {
    /// A field, or None when the name is not an RFC 5322 field name or
    /// the value holds a CR, LF or NUL (a check must not inject fields).
    pub fn new(name: &str, value: &str) -> Option<Header> {
        let name_ok = !name.is_empty()
            && name.len() <= 76
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        let value_ok = !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0));
        (name_ok && value_ok).then(|| Header {
            name: name.to_string(),
            value: value.trim().to_string(),
        })
    }

    /// A field whose value is folded over several lines (a long
    /// Authentication-Results): every line break, LF or CRLF, must be
    /// followed by a space or tab and more text, so no line can start a
    /// field of its own; breaks are written CRLF.
    pub fn folded(name: &str, value: &str) -> Option<Header> {
        let mut lines = value.split('\n');
        let first = lines.next().unwrap_or_default();
        let mut out = Header::new(name, first.strip_suffix('\r').unwrap_or(first))?;
        for line in lines {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let continued = line.starts_with([' ', '\t']) && !line.trim().is_empty();
            if !continued || line.bytes().any(|b| matches!(b, b'\r' | 0)) {
                return None;
            }
            out.value.push_str("\r\n");
            out.value.push_str(line.trim_end());
        }
        Some(out)
    }

    /// `Name: value` and CRLF.
    pub fn render(&self) -> String {
        format!("{}: {}\r\n", self.name, self.value)
    }
}

/// What one check says at one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No objection; later checks decide.
    Continue,
    /// Accept at this stage without asking the checks after this one.
    Accept,
    /// Refuse permanently with this reply (5xx).
    Reject(Reply),
    /// Refuse for now with this reply (4xx).
    TempFail(Reply),
    /// Accept, then deliver the message nowhere.
    Discard,
    /// No objection, and add these fields to every copy.
    AddHeaders(Vec<Header>),
    /// No objection, and change the message so (data stage).
    Modify(Vec<Edit>),
    /// Accept, into the recipients' `.Junk` folder; the reason is logged.
    Quarantine(String),
    /// No objection, with several effects at once (a milter's end of
    /// message: edits and a quarantine).
    Pass(Effects),
    /// Several of the above from one check, merged in order as if each
    /// came from a check of its own (fields to add and a quarantine, say).
    Several(Vec<Verdict>),
}

impl Verdict {
    /// A permanent refusal with the check's own reply, or the default one
    /// when its code is not 5xx.
    pub fn reject(reply: Option<Reply>) -> Verdict {
        Verdict::Reject(
            reply
                .filter(|r| r.code / 100 == 5)
                .unwrap_or_else(Reply::check_rejected),
        )
    }

    /// A temporary refusal with the check's own reply, or the default one
    /// when its code is not 4xx.
    pub fn tempfail(reply: Option<Reply>) -> Verdict {
        Verdict::TempFail(
            reply
                .filter(|r| r.code / 100 == 4)
                .unwrap_or_else(Reply::check_tempfail),
        )
    }
}

/// The merged verdicts of one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on, with what the checks asked for (possibly nothing).
    Pass(Effects),
    /// Refuse with this reply (4xx or 5xx).
    Refuse(Reply),
    /// Accept, deliver nowhere.
    Discard,
}

/// What checks asked for so far, carried by the connection (connect and
/// helo stages) and by the transaction, and acted on at delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Accept and deliver nowhere.
    pub discard: bool,
    /// Fields for every copy, below our Received field, each ending CRLF.
    pub headers: String,
    /// Changes to the message, in order.
    pub edits: Vec<Edit>,
    /// Deliver into the `.Junk` folder, for this reason.
    pub quarantine: Option<String>,
}

impl Effects {
    /// Adds `other`'s effects after these.
    pub fn extend(&mut self, other: Effects) {
        self.discard |= other.discard;
        self.headers.push_str(&other.headers);
        self.edits.extend(other.edits);
        if self.quarantine.is_none() {
            self.quarantine = other.quarantine;
        }
    }
}

impl Decision {
    /// Folds a passing or discarding decision into what the connection or
    /// transaction carries; a refusal comes back as its reply.
    pub fn apply(self, effects: &mut Effects) -> Result<(), Reply> {
        match self {
            Decision::Pass(e) => {
                effects.extend(e);
                Ok(())
            }
            Decision::Discard => {
                effects.discard = true;
                Ok(())
            }
            Decision::Refuse(reply) => Err(reply),
        }
    }
}

/// A kind of check, configured once; it makes a state per connection.
pub trait Check: Send + Sync + 'static {
    /// For logs: which check decided.
    fn name(&self) -> &str;
    /// Per-connection state (a milter keeps one connection per client).
    fn open(&self) -> Box<dyn CheckState>;
}

/// One check's state for one connection.
pub trait CheckState: Send {
    /// Decides at `stage`. A check that needs the network starts its work
    /// early (at connect, say) and awaits it at the stage that needs the
    /// answer, so it runs beside the session instead of in front of it.
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict>;
    /// The session accepted what a stage decided: a recipient (RCPT
    /// answered 250) at [`Stage::Rcpt`], the message (the end of data
    /// answered 250: delivered or discarded; over LMTP, for at least one
    /// recipient) at [`Stage::Data`]. A check that counts what is accepted
    /// (a rate limit) counts here, not in `check`, where a later check or
    /// the delivery may still refuse. Called for those two stages only; at
    /// the data stage after [`CheckState::reset`].
    fn accepted(&mut self, _stage: Stage) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
    /// The transaction ended (delivered, refused, RSET, or the connection
    /// closed) and the next one starts clean.
    fn reset(&mut self) {}
}

/// The seam a session talks to: the runtime's shared parts and the
/// configured checks.
pub struct Pipeline {
    pub runtime: Arc<Runtime>,
    checks: Vec<Arc<dyn Check>>,
}

impl Pipeline {
    pub fn new(runtime: Arc<Runtime>, checks: Vec<Arc<dyn Check>>) -> Pipeline {
        Pipeline { runtime, checks }
    }

    /// The check states of a new connection.
    pub fn open(&self) -> Checks {
        Checks {
            states: self
                .checks
                .iter()
                .map(|c| (c.name().to_string(), c.open()))
                .collect(),
        }
    }
}

/// The check states of one connection; they outlive a STARTTLS upgrade.
#[derive(Default)]
pub struct Checks {
    states: Vec<(String, Box<dyn CheckState>)>,
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.states.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Checks {
    /// Runs every check at `stage` side by side and merges their verdicts
    /// in configuration order.
    pub async fn run(&mut self, stage: Stage, facts: Facts<'_>) -> Decision {
        if self.states.is_empty() {
            return Decision::Pass(Effects::default());
        }
        let verdicts = join_all(self.states.iter_mut().map(|(_, s)| s.check(stage, facts))).await;
        let names = self.states.iter().map(|(n, _)| n.as_str());
        merge(stage, names.zip(verdicts))
    }

    /// Tells every check what the session accepted (see
    /// [`CheckState::accepted`]).
    pub async fn accepted(&mut self, stage: Stage) {
        if self.states.is_empty() {
            return;
        }
        join_all(self.states.iter_mut().map(|(_, s)| s.accepted(stage))).await;
    }

    /// The transaction is over; every check forgets it.
    pub fn reset(&mut self) {
        for (_, s) in &mut self.states {
            s.reset();
        }
    }
}

/// The first refusal or discard in order wins; an accept ends the stage;
/// headers and edits from every check before the end accumulate, and the
/// first quarantine's reason is kept.
fn merge<'a>(stage: Stage, verdicts: impl Iterator<Item = (&'a str, Verdict)>) -> Decision {
    let mut effects = Effects::default();
    let verdicts = verdicts.flat_map(|(check, v)| flatten(v).into_iter().map(move |v| (check, v)));
    for (check, verdict) in verdicts {
        match verdict {
            Verdict::Continue => {}
            Verdict::AddHeaders(h) => effects.headers.extend(h.iter().map(Header::render)),
            Verdict::Modify(edits) => effects.edits.extend(edits),
            Verdict::Quarantine(reason) => {
                tracing::info!(check, ?stage, %reason, "quarantined by a check");
                effects.quarantine.get_or_insert(reason);
            }
            Verdict::Pass(e) => {
                if let Some(reason) = &e.quarantine {
                    tracing::info!(check, ?stage, %reason, "quarantined by a check");
                }
                effects.extend(e);
            }
            Verdict::Accept => break,
            Verdict::Reject(reply) | Verdict::TempFail(reply) => {
                tracing::info!(check, ?stage, reply = %reply.to_wire().trim_end(), "refused by a check");
                return Decision::Refuse(reply);
            }
            Verdict::Discard => {
                tracing::info!(check, ?stage, "message discarded by a check");
                return Decision::Discard;
            }
            Verdict::Several(_) => unreachable!("flattened above"),
        }
    }
    Decision::Pass(effects)
}

/// A verdict as the plain verdicts it stands for, in order.
fn flatten(v: Verdict) -> Vec<Verdict> {
    match v {
        Verdict::Several(vs) => vs.into_iter().flat_map(flatten).collect(),
        v => vec![v],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str) -> Header {
        Header::new(name, "v").unwrap()
    }

    #[test]
    fn first_refusal_in_order_wins_and_headers_accumulate() {
        let refuse = Verdict::reject(None);
        let verdicts = vec![
            ("a", Verdict::AddHeaders(vec![h("X-A")])),
            ("b", Verdict::Continue),
            ("c", Verdict::tempfail(None)),
            ("d", refuse),
        ];
        assert_eq!(
            merge(Stage::Data, verdicts.into_iter()),
            Decision::Refuse(Reply::check_tempfail())
        );
        let verdicts = vec![
            ("a", Verdict::AddHeaders(vec![h("X-A")])),
            ("b", Verdict::AddHeaders(vec![h("X-B")])),
            ("c", Verdict::Accept),
            ("d", Verdict::reject(None)),
        ];
        assert_eq!(
            merge(Stage::Data, verdicts.into_iter()),
            Decision::Pass(Effects {
                headers: "X-A: v\r\nX-B: v\r\n".into(),
                ..Effects::default()
            })
        );
        let verdicts = vec![
            ("a", Verdict::Quarantine("first".into())),
            (
                "b",
                Verdict::Modify(vec![Edit::AddHeader {
                    name: "X-M".into(),
                    value: "1".into(),
                }]),
            ),
            ("c", Verdict::Quarantine("second".into())),
        ];
        let Decision::Pass(e) = merge(Stage::Data, verdicts.into_iter()) else {
            panic!("quarantine and edits pass");
        };
        assert_eq!(e.quarantine.as_deref(), Some("first"));
        assert_eq!(e.edits.len(), 1);
        let verdicts = vec![("a", Verdict::Discard), ("b", Verdict::reject(None))];
        assert_eq!(merge(Stage::Mail, verdicts.into_iter()), Decision::Discard);
        // One check's several verdicts count as consecutive checks.
        let verdicts = vec![
            (
                "a",
                Verdict::Several(vec![
                    Verdict::AddHeaders(vec![h("X-A")]),
                    Verdict::Quarantine("junk".into()),
                ]),
            ),
            ("b", Verdict::AddHeaders(vec![h("X-B")])),
        ];
        let Decision::Pass(e) = merge(Stage::Data, verdicts.into_iter()) else {
            panic!("headers and a quarantine pass");
        };
        assert_eq!(e.headers, "X-A: v\r\nX-B: v\r\n");
        assert_eq!(e.quarantine.as_deref(), Some("junk"));
        let verdicts = vec![(
            "a",
            Verdict::Several(vec![
                Verdict::AddHeaders(vec![h("X-A")]),
                Verdict::tempfail(None),
            ]),
        )];
        assert_eq!(
            merge(Stage::Data, verdicts.into_iter()),
            Decision::Refuse(Reply::check_tempfail())
        );
    }

    #[test]
    fn a_check_reply_of_the_wrong_class_falls_back_to_the_default() {
        let ok = Reply::new(250, "2.0.0", "fine");
        assert_eq!(
            Verdict::reject(Some(ok.clone())),
            Verdict::Reject(Reply::check_rejected())
        );
        assert_eq!(
            Verdict::tempfail(Some(ok)),
            Verdict::TempFail(Reply::check_tempfail())
        );
        let own = Reply::new(554, "5.7.1", "spam");
        assert_eq!(Verdict::reject(Some(own.clone())), Verdict::Reject(own));
    }

    #[test]
    fn headers_cannot_inject_fields() {
        assert!(Header::new("X-Spam", "yes\r\nBcc: x@y").is_none());
        assert!(Header::new("X Spam", "yes").is_none());
        assert!(Header::new("X-Spam:", "yes").is_none());
        assert_eq!(
            Header::new("X-Spam", " yes ").unwrap().render(),
            "X-Spam: yes\r\n"
        );
        assert_eq!(
            Header::folded("A-R", "mx.example.org;\r\n\tspf=pass;\n dkim=none")
                .unwrap()
                .render(),
            "A-R: mx.example.org;\r\n\tspf=pass;\r\n dkim=none\r\n"
        );
        assert!(Header::folded("A-R", "a\r\nBcc: x@y").is_none());
        assert!(Header::folded("A-R", "a\r\n\t\r\nBcc: x@y").is_none());
        assert!(Header::folded("A-R", "a\r\n \rb").is_none());
    }
}
