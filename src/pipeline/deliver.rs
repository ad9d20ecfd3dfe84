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
//! shares that copy's outcome; so does a pipe command: one run per distinct
//! command per message.
//!
//! The order is pipes, then sink copies, then maildir copies: what cannot
//! be taken back goes first. A pipe that ran has consumed its copy, so the
//! pipes run (side by side) before anything else, and only if every pipe a
//! unit depends on succeeded are the sink and maildir copies delivered.
//! Over SMTP one failed pipe fails the transaction (nothing else is
//! delivered, the client gets that pipe's reply); a pipe that succeeded
//! beside it gets a duplicate when the client retries. Duplicates beat
//! loss, as with the sink-first rule below.
//!
//! Remote recipients ([`Route::Remote`]) go into one entry of the outbound
//! queue (`crate::queue`), durable before the answer like a maildir copy.
//! Under [`Mode::AllOrNothing`] the queue entry and the maildir copies are
//! one unit: the entry is staged, the copies are staged and linked, the
//! entry is committed, and only then are the copies final; any failure
//! removes all of it. Under [`Mode::PerRecipient`] the queue entry is one
//! more unit beside the mailboxes, and the remote recipients share its
//! outcome.
//!
//! A forwarded copy's entry may carry an SRS envelope sender instead of the
//! one received (`Pipeline::queue_sender`, `crate::srs`).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;

use super::Pipeline;
use crate::delivery::DeliveryError;
use crate::delivery::pipe::PipeError;
use crate::directory::{Mailbox, Pipe, Route};
use crate::envelope::Envelope;
use crate::sink::Reservation;
use crate::spool::Spool;

/// How recipients' outcomes relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    AllOrNothing,
    PerRecipient,
}

/// Why a recipient's copy was not delivered. Nothing of it is kept (except
/// what a pipe that succeeded beside a failure consumed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The copy would pass the mailbox's quota (452 4.2.2).
    QuotaExceeded,
    /// The sink has no room (452 4.3.1).
    SinkFull,
    /// Disk or another local failure (451 4.3.0).
    Local,
    /// A pipe command exited 75 (EX_TEMPFAIL) or died of a signal (451 4.3.0).
    PipeTempFail,
    /// A pipe command ran past `delivery.pipe_timeout` (451 4.3.0).
    PipeTimeout,
    /// A pipe command exited with another status: the first line of its
    /// stderr, or its exit status (550 5.3.0).
    PipeRefused(String),
}

impl Failure {
    /// Whether a retry may succeed (a 4xx reply).
    pub fn is_temporary(&self) -> bool {
        !matches!(self, Failure::PipeRefused(_))
    }
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
        // Pipes first: a command that ran cannot be taken back. The branch
        // is all a message without pipes pays.
        if envelope
            .recipients
            .iter()
            .any(|r| !r.route.pipes().is_empty())
        {
            let runs = pipe_runs(envelope);
            let results = join_all(runs.iter().map(|run| self.pipe(envelope, &spool, run))).await;
            match mode {
                Mode::AllOrNothing => {
                    // A temporary failure wins: the retry may deliver
                    // everything, where a bounce would lose every copy.
                    let failures = results.into_iter().filter_map(Result::err);
                    if let Some(f) = failures.reduce(|a, b| {
                        if !a.is_temporary() && b.is_temporary() {
                            b
                        } else {
                            a
                        }
                    }) {
                        return vec![Err(f); n];
                    }
                }
                Mode::PerRecipient => {
                    for (run, result) in runs.iter().zip(results) {
                        if let Err(f) = result {
                            for &i in &run.recipients {
                                if outcomes[i].is_ok() {
                                    outcomes[i] = Err(f.clone());
                                }
                            }
                        }
                    }
                }
            }
        }

        // Sink copies next: if a maildir delivery then fails, the client
        // retries and the sink holds a duplicate, which beats losing a copy
        // after a 250.
        let sinks: Vec<usize> = (0..n)
            .filter(|&i| matches!(*envelope.recipients[i].route, Route::Sink { .. }))
            .filter(|&i| outcomes[i].is_ok())
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
        let units = units(envelope, mode, &outcomes);
        // Every remote recipient goes into one queue entry, whose outcome
        // they share (as recipients reaching one mailbox share its copy).
        let remote = remote(envelope);
        if units.is_empty() && remote.recipients.is_empty() {
            return outcomes;
        }
        let spool = Arc::new(spool);
        if mode == Mode::AllOrNothing && !remote.recipients.is_empty() {
            // Stage the queue entry, stage the maildir copies, then commit
            // both; a failure anywhere removes everything staged.
            let result = self
                .queue_with_maildirs(envelope, &spool, &remote, units.first())
                .await;
            if let Err(f) = result {
                return vec![Err(f); n];
            }
            return outcomes;
        }
        let queued = async {
            if remote.recipients.is_empty() {
                return Ok(());
            }
            self.queue_with_maildirs(envelope, &spool, &remote, None)
                .await
        };
        let (results, queued) = futures_util::join!(
            join_all(
                units
                    .iter()
                    .map(|u| self.maildirs(envelope, &spool, &u.mailboxes)),
            ),
            queued
        );
        for (unit, result) in units.iter().zip(results) {
            if let Err(f) = result {
                for &i in &unit.recipients {
                    if outcomes[i].is_ok() {
                        outcomes[i] = Err(f.clone());
                    }
                }
            }
        }
        if let Err(f) = queued {
            for &i in &remote.indices {
                outcomes[i] = Err(f.clone());
            }
        }
        outcomes
    }

    /// Runs one pipe command for the first recipient that reaches it.
    async fn pipe(
        &self,
        envelope: &Envelope,
        spool: &Spool,
        run: &PipeRun<'_>,
    ) -> Result<(), Failure> {
        let rcpt = &envelope.recipients[run.recipients[0]].address;
        let rt = &self.runtime;
        rt.pipes
            .deliver(envelope, spool, run.pipe, rcpt, rt.delimiter)
            .await
            .map_err(|e| match e {
                PipeError::TempFail => Failure::PipeTempFail,
                PipeError::TimedOut => Failure::PipeTimeout,
                PipeError::Refused(detail) => Failure::PipeRefused(detail),
                PipeError::Local => Failure::Local,
            })
    }

    /// Puts the remote recipients' copy into the queue, together with the
    /// maildir copies of `unit` when given: all of it is durable, or none
    /// is kept.
    async fn queue_with_maildirs(
        &self,
        envelope: &Envelope,
        spool: &Arc<Spool>,
        remote: &Remote,
        unit: Option<&Unit>,
    ) -> Result<(), Failure> {
        let queue = self.runtime.queue.clone();
        let mut env = envelope.clone();
        env.sender = self.queue_sender(envelope, remote).await;
        let (sp, rcpts) = (spool.clone(), remote.recipients.clone());
        let staged = crate::blocking::run("staging a queue entry", move || {
            queue.stage(&env, &sp, &rcpts)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(id = %envelope.id, error = %e, "queueing failed; nothing delivered");
                return Err(Failure::Local);
            }
        };
        let commit = move || {
            staged.commit().map(drop).map_err(|e| {
                tracing::error!(error = %e, "committing a queue entry failed; nothing delivered");
                std::io::Error::other(e.to_string())
            })
        };
        match unit {
            Some(u) => {
                self.maildirs_then(envelope, spool, &u.mailboxes, Some(Box::new(commit)))
                    .await
            }
            None => crate::blocking::run("committing a queue entry", commit)
                .await
                .map_err(|e| {
                    tracing::error!(id = %envelope.id, error = %e, "queueing failed");
                    Failure::Local
                })?
                .map_err(|_| Failure::Local),
        }
    }

    /// The envelope sender of the queue entry for `remote`: an SRS
    /// address (`crate::srs`) when SRS is on, an alias forwarded the copy
    /// (a remote recipient reached under another address), and the sender
    /// is neither null nor in a domain of ours (our SPF record already
    /// covers those). Else the sender as received.
    ///
    /// One entry serves every remote recipient, so one sender: a copy
    /// that is not forwarded only comes from submission, whose sender is
    /// always one of ours or `<>`, so no transaction mixes the two kinds.
    async fn queue_sender(&self, envelope: &Envelope, remote: &Remote) -> String {
        let sender = &envelope.sender;
        let rt = &self.runtime;
        let Some(srs) = &rt.srs else {
            return sender.clone();
        };
        if sender.is_empty() || !remote.recipients.iter().any(|(_, o)| o.is_some()) {
            return sender.clone();
        }
        let domain = match crate::address::Address::from_smtp(sender) {
            Ok(a) => a.domain,
            Err(_) => sender
                .rsplit_once('@')
                .map_or(String::new(), |(_, d)| d.to_ascii_lowercase()),
        };
        match rt.directory.domain_exists(&domain).await {
            Ok(true) => return sender.clone(),
            Ok(false) => {}
            // Rewriting is safe either way: a bounce to the SRS address
            // still reaches the sender.
            Err(e) => {
                tracing::warn!(id = %envelope.id, error = %e, "directory lookup failed; rewriting the sender with SRS")
            }
        }
        let rewritten = srs.forward(sender, crate::srs::now());
        tracing::info!(id = %envelope.id, sender = %sender, srs = %rewritten, "forwarded mail leaves with an SRS sender");
        rewritten
    }

    async fn maildirs(
        &self,
        envelope: &Envelope,
        spool: &Arc<Spool>,
        mailboxes: &[Mailbox],
    ) -> Result<(), Failure> {
        self.maildirs_then(envelope, spool, mailboxes, None).await
    }

    async fn maildirs_then(
        &self,
        envelope: &Envelope,
        spool: &Arc<Spool>,
        mailboxes: &[Mailbox],
        commit: Option<crate::delivery::Commit>,
    ) -> Result<(), Failure> {
        match self
            .runtime
            .maildirs
            .deliver_with(envelope, spool.clone(), mailboxes, commit)
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

/// One run of a pipe command, and the recipients whose outcome depends on it.
struct PipeRun<'a> {
    /// As the first recipient that reaches the command resolved it.
    pipe: &'a Pipe,
    recipients: Vec<usize>,
}

/// One run per distinct command, in the order recipients first reach them.
fn pipe_runs(envelope: &Envelope) -> Vec<PipeRun<'_>> {
    let mut runs: Vec<PipeRun<'_>> = Vec::new();
    for (i, r) in envelope.recipients.iter().enumerate() {
        for p in r.route.pipes() {
            match runs.iter_mut().find(|run| run.pipe.command == p.command) {
                Some(run) if !run.recipients.contains(&i) => run.recipients.push(i),
                Some(_) => {}
                None => runs.push(PipeRun {
                    pipe: p,
                    recipients: vec![i],
                }),
            }
        }
    }
    runs
}

/// The remote recipients of a transaction: where each copy goes (with the
/// recipient as given, when an alias forwarded it), and which recipients
/// share the queue entry's outcome.
#[derive(Debug, Default)]
struct Remote {
    recipients: Vec<(String, Option<String>)>,
    indices: Vec<usize>,
}

fn remote(envelope: &Envelope) -> Remote {
    let mut out = Remote::default();
    for (i, r) in envelope.recipients.iter().enumerate() {
        let Route::Remote { address } = &*r.route else {
            continue;
        };
        out.indices.push(i);
        if !out.recipients.iter().any(|(a, _)| a == address) {
            let original = (r.address != *address).then(|| r.address.clone());
            out.recipients.push((address.clone(), original));
        }
    }
    out
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
/// one of its mailboxes. A recipient that already failed (its pipe) gets
/// no copy.
fn units(envelope: &Envelope, mode: Mode, outcomes: &Outcomes) -> Vec<Unit> {
    let mut units: Vec<Unit> = Vec::new();
    for (i, r) in envelope.recipients.iter().enumerate() {
        let boxes = r.route.mailboxes();
        if boxes.is_empty() || outcomes[i].is_err() {
            continue;
        }
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
        let u = units(&env, Mode::PerRecipient, &vec![Ok(()); 4]);
        assert_eq!(u.len(), 3);
        assert_eq!((names(&u[0]), &u[0].recipients), (vec!["a"], &vec![0, 1]));
        assert_eq!((names(&u[1]), &u[1].recipients), (vec!["b"], &vec![1, 2]));
        assert_eq!((names(&u[2]), &u[2].recipients), (vec!["c"], &vec![3]));
    }

    #[test]
    fn all_or_nothing_is_one_unit_for_every_recipient() {
        let env = envelope(vec![vec!["a"], vec!["a", "b"], vec!["c"]]);
        let u = units(&env, Mode::AllOrNothing, &vec![Ok(()); 3]);
        assert_eq!(u.len(), 1);
        assert_eq!(names(&u[0]), vec!["a", "b", "c"]);
        assert_eq!(u[0].recipients, vec![0, 1, 2]);
    }
}
