//! The deliver stage: a received message goes to its targets (sink copies
//! in memory, maildir copies on disk) and every recipient gets an outcome.
//!
//! Two modes, as the protocols need them:
//! - [`Mode::AllOrNothing`] (SMTP): one answer for the transaction, so
//!   every copy is durable or none is kept, and all recipients share the
//!   outcome;
//! - [`Mode::PerRecipient`] (LMTP): each recipient's copies succeed or
//!   fail on their own, and a full mailbox fails only its recipient.
//!
//! In both, a mailbox reached by several recipients (an alias and its
//! target, a duplicate RCPT) gets one copy, and each of those recipients
//! shares that copy's outcome.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;

use super::Pipeline;
use crate::delivery::DeliveryError;
use crate::directory::{Mailbox, Route};
use crate::envelope::Envelope;
use crate::sink::Reservation;
use crate::spool::Spool;

/// How recipients' outcomes relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    AllOrNothing,
    PerRecipient,
}

/// Why a recipient's copy was not delivered. Nothing of it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The copy would pass the mailbox's quota (452 4.2.2).
    QuotaExceeded,
    /// The sink has no room (452 4.3.1).
    SinkFull,
    /// Disk or another local failure (451 4.3.0).
    Local,
}

/// One outcome per recipient of the envelope, in RCPT order.
pub type Outcomes = Vec<Result<(), Failure>>;

impl Pipeline {
    /// Delivers every copy of a received message. `reserved` is the room
    /// the content took in the sink's byte bound while it streamed in
    /// (sink transactions only); the first sink copy takes it over, and
    /// whatever is left goes at the return.
    pub async fn deliver(
        &self,
        envelope: &Envelope,
        spool: Spool,
        mut reserved: Option<Reservation>,
        mode: Mode,
    ) -> Outcomes {
        let n = envelope.recipients.len();
        let mut outcomes: Outcomes = vec![Ok(()); n];
        // Remote recipients (relayed for an authenticated client) go to
        // the outbound queue. TODO(queue): stage the message in the queue
        // here, as one more target of the all-or-nothing delivery. Until
        // this build has a queue, they fail with 451 4.3.0 and, over SMTP,
        // before any copy is stored: never a 250 for mail kept nowhere.
        let remote: Vec<usize> = (0..n)
            .filter(|&i| matches!(*envelope.recipients[i].route, Route::Remote { .. }))
            .collect();
        if !remote.is_empty() {
            tracing::error!(
                id = %envelope.id,
                remote = remote.len(),
                "no outbound queue in this build; remote recipients fail with 451"
            );
            if mode == Mode::AllOrNothing {
                return vec![Err(Failure::Local); n];
            }
            for &i in &remote {
                outcomes[i] = Err(Failure::Local);
            }
        }
        // Sink copies first: if a maildir delivery then fails, the client
        // retries and the sink holds a duplicate, which beats losing a copy
        // after a 250.
        let sinks: Vec<usize> = (0..n)
            .filter(|&i| matches!(*envelope.recipients[i].route, Route::Sink { .. }))
            .collect();
        if !sinks.is_empty() {
            let content = spool
                .as_memory()
                .expect("sink transactions are spooled in memory");
            // One buffer for every sink copy; each adds only its trace
            // header. Copied, not moved: the spool grew by doubling, and
            // the sink's bound counts bytes held, not capacity.
            let content = Bytes::copy_from_slice(content);
            for &i in &sinks {
                let r = &envelope.recipients[i];
                let Route::Sink { ttl, .. } = &*r.route else {
                    unreachable!("filtered above")
                };
                let header = format!(
                    "{}{}",
                    envelope.received_header(&r.address),
                    envelope.headers
                );
                let stored = self.runtime.sink.insert_received(
                    &r.address,
                    *ttl,
                    &header,
                    &content,
                    reserved.as_mut(),
                );
                if stored.is_err() {
                    if mode == Mode::AllOrNothing {
                        return vec![Err(Failure::SinkFull); n];
                    }
                    outcomes[i] = Err(Failure::SinkFull);
                }
            }
        }
        drop(reserved);

        // Which recipient's unit of delivery carries each mailbox's copy.
        let units = units(envelope, mode);
        if units.is_empty() {
            return outcomes;
        }
        let spool = Arc::new(spool);
        let results = join_all(
            units
                .iter()
                .map(|u| self.maildirs(envelope, &spool, &u.mailboxes)),
        )
        .await;
        for (unit, result) in units.iter().zip(results) {
            if let Err(f) = result {
                for &i in &unit.recipients {
                    if outcomes[i].is_ok() {
                        outcomes[i] = Err(f);
                    }
                }
            }
        }
        outcomes
    }

    async fn maildirs(
        &self,
        envelope: &Envelope,
        spool: &Arc<Spool>,
        mailboxes: &[Mailbox],
    ) -> Result<(), Failure> {
        match self
            .runtime
            .maildirs
            .deliver(envelope, spool.clone(), mailboxes)
            .await
        {
            Ok(_) => Ok(()),
            Err(DeliveryError::QuotaExceeded { mailbox }) => {
                tracing::info!(id = %envelope.id, %mailbox, "over quota");
                Err(Failure::QuotaExceeded)
            }
            Err(e) => {
                tracing::error!(id = %envelope.id, error = %e, "delivery failed");
                Err(Failure::Local)
            }
        }
    }
}

/// Mailboxes delivered together, all or nothing, and the recipients whose
/// outcome depends on them.
#[derive(Debug, PartialEq)]
struct Unit {
    mailboxes: Vec<Mailbox>,
    recipients: Vec<usize>,
}

/// Groups the maildir copies: one unit for the whole transaction, or one
/// per recipient that reaches a mailbox no earlier recipient reached.
/// Every mailbox appears once; a recipient depends on each unit holding
/// one of its mailboxes.
fn units(envelope: &Envelope, mode: Mode) -> Vec<Unit> {
    let mut units: Vec<Unit> = Vec::new();
    for (i, r) in envelope.recipients.iter().enumerate() {
        let Route::Mailboxes(boxes) = &*r.route else {
            continue;
        };
        let mut depends = Vec::new();
        let mut fresh = Vec::new();
        for m in boxes {
            match units
                .iter()
                .position(|u| u.mailboxes.iter().any(|x| x.address == m.address))
            {
                Some(u) => depends.push(u),
                None if !fresh.iter().any(|x: &Mailbox| x.address == m.address) => {
                    fresh.push(m.clone())
                }
                None => {}
            }
        }
        if !fresh.is_empty() {
            if mode == Mode::AllOrNothing && !units.is_empty() {
                units[0].mailboxes.extend(fresh);
                depends.push(0);
            } else {
                units.push(Unit {
                    mailboxes: fresh,
                    recipients: Vec::new(),
                });
                depends.push(units.len() - 1);
            }
        }
        for u in depends {
            if !units[u].recipients.contains(&i) {
                units[u].recipients.push(i);
            }
        }
    }
    if mode == Mode::AllOrNothing
        && let Some(u) = units.first_mut()
    {
        // Every recipient shares the one answer, sink recipients included.
        u.recipients = (0..envelope.recipients.len()).collect();
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Address;
    use crate::envelope::{Received, Recipient};

    fn mailbox(local: &str) -> Mailbox {
        Mailbox {
            address: Address {
                local: local.into(),
                domain: "example.org".into(),
            },
            quota: 0,
            tag: None,
            original: None,
        }
    }

    fn envelope(routes: Vec<Vec<&str>>) -> Envelope {
        Envelope {
            id: "0".into(),
            sender: String::new(),
            recipients: routes
                .into_iter()
                .enumerate()
                .map(|(i, boxes)| Recipient {
                    address: format!("r{i}@example.org"),
                    route: Arc::new(Route::Mailboxes(boxes.into_iter().map(mailbox).collect())),
                })
                .collect(),
            received: Received {
                helo: String::new(),
                rdns: None,
                ip: "127.0.0.1".parse().unwrap(),
                by: String::new(),
                with: String::new(),
                tls: None,
                date: String::new(),
            },
            headers: String::new(),
            quarantine: false,
        }
    }

    fn names(u: &Unit) -> Vec<&str> {
        u.mailboxes
            .iter()
            .map(|m| m.address.local.as_str())
            .collect()
    }

    #[test]
    fn per_recipient_units_share_a_mailbox_once() {
        // r0 → a; r1 (an alias) → a, b; r2 → b; r3 → c.
        let env = envelope(vec![vec!["a"], vec!["a", "b"], vec!["b"], vec!["c"]]);
        let u = units(&env, Mode::PerRecipient);
        assert_eq!(u.len(), 3);
        assert_eq!((names(&u[0]), &u[0].recipients), (vec!["a"], &vec![0, 1]));
        assert_eq!((names(&u[1]), &u[1].recipients), (vec!["b"], &vec![1, 2]));
        assert_eq!((names(&u[2]), &u[2].recipients), (vec!["c"], &vec![3]));
    }

    #[test]
    fn all_or_nothing_is_one_unit_for_every_recipient() {
        let env = envelope(vec![vec!["a"], vec!["a", "b"], vec!["c"]]);
        let u = units(&env, Mode::AllOrNothing);
        assert_eq!(u.len(), 1);
        assert_eq!(names(&u[0]), vec!["a", "b", "c"]);
        assert_eq!(u[0].recipients, vec![0, 1, 2]);
    }
}
