//! The bounded in-memory store: sink mailboxes, what goes in and what
//! comes out, and which message goes when a bound is reached.
//!
//! The shape is mini-redis's `db.rs`: [`Sink`] is a cheap handle over an
//! `Arc<Shared>`; a background task sleeps until the next expiry and stops
//! when the last handle goes (a drop guard shared by every clone).
//!
//! - this file: the handle, the shared state, inserting (each bound checked
//!   and the eviction of a full mailbox), lookups and removal.
//! - [`budget`]: the byte bound over stored and arriving mail, and
//!   [`Reservation`], the room held for content still arriving.
//! - [`expiry`]: the task that forgets messages when their TTL runs out.
//! - [`message`]: the stored [`Message`] itself.

mod budget;
mod expiry;
mod message;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use budget::Reservation;
pub use message::Message;

use crate::config::{SinkConfig, WhenFull};

/// Announcements kept for slow SSE / wait listeners before they lag.
const EVENT_CAPACITY: usize = 256;

/// Returned when a message does not fit: refuse mode at a bound, a
/// message larger than the SMTP limit or the whole store, or (in either
/// mode) when mail still arriving holds the room it would need.
#[derive(Debug, thiserror::Error)]
#[error("the sink is full")]
pub struct SinkFull;

/// A new message for `mailbox`; broadcast to SSE and wait listeners. It
/// carries names, not bytes, so a slow listener never pins message memory.
#[derive(Debug, Clone)]
pub(crate) struct Arrival {
    pub mailbox: Arc<str>,
    pub id: Arc<str>,
}

/// The store handle. Clones share one store; the purge task ends when the
/// last clone is dropped.
#[derive(Debug, Clone)]
pub struct Sink {
    /// The store itself, also held by the purge task.
    shared: Arc<Shared>,
    /// Dropped with the last handle; tells the purge task to stop.
    _guard: Arc<expiry::DropGuard>,
}

#[derive(Debug)]
struct Shared {
    /// A std Mutex is right here: it is never held across an `.await`, and
    /// every critical section is a few map operations.
    state: Mutex<State>,
    /// Wakes the purge task when an earlier deadline appears or at shutdown.
    purge: Notify,
    /// New-message announcements for SSE and wait.
    events: broadcast::Sender<Arrival>,
    /// The bounds, copied from the configuration.
    limits: Limits,
    /// Cancelled when the HTTP server shuts down, so SSE and wait requests
    /// end and graceful shutdown does not wait on them forever.
    closing: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Total bytes of sink mail in memory: stored plus in flight (see
    /// [`Reservation`]).
    max_bytes: u64,
    /// Messages per mailbox.
    max_per_mailbox: usize,
    /// The SMTP size limit; larger messages are refused in either mode.
    max_message_size: u64,
    /// Evict the oldest or refuse the newcomer.
    when_full: WhenFull,
}

#[derive(Debug, Default)]
struct State {
    /// Mailbox (lowercase address) → its messages, oldest first (by seq).
    mailboxes: HashMap<Arc<str>, VecDeque<Arc<Message>>>,
    /// Every message by seq → its mailbox: global age order for eviction.
    order: BTreeMap<u64, Arc<str>>,
    /// (deadline, seq) for every message: what the purge task walks.
    expirations: BTreeSet<(Instant, u64)>,
    /// Sum of [`Message::size`] over every message held.
    bytes: u64,
    /// Bytes of sink content still streaming in over SMTP, held by live
    /// [`Reservation`]s; `bytes + in_flight <= max_bytes` at all times.
    in_flight: u64,
    /// Next insertion number.
    next_seq: u64,
    /// Set when the last handle goes; the purge task then returns.
    shutdown: bool,
}

impl Sink {
    /// Spawns the expiry task on the current tokio runtime; it stops when
    /// the last Sink handle is dropped.
    pub fn new(config: &SinkConfig, max_message_size: u64) -> Sink {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            purge: Notify::new(),
            events,
            closing: CancellationToken::new(),
            limits: Limits {
                max_bytes: config.max_bytes.0,
                max_per_mailbox: config.max_messages_per_mailbox,
                max_message_size,
                when_full: config.when_full,
            },
        });
        Sink {
            _guard: Arc::new(expiry::start(&shared)),
            shared,
        }
    }

    /// Stores one copy for `mailbox` (full lowercase address). `raw` is the
    /// whole message with CRLF endings, trace header already prepended.
    /// Err(SinkFull) only in refuse mode when it does not fit; in evict mode
    /// the oldest go instead. A message larger than max_message_size is
    /// refused.
    pub fn insert(&self, mailbox: &str, ttl: Duration, raw: Bytes) -> Result<(), SinkFull> {
        if raw.len() as u64 > self.shared.limits.max_message_size {
            return Err(SinkFull);
        }
        self.store(mailbox, ttl, Bytes::new(), raw, None)
    }

    /// Stores one copy of a message received over SMTP: our `trace` header,
    /// then the `content` the client sent, shared with the transaction's
    /// other copies. The size limit (SIZE, RFC 1870) is the client's and
    /// counts the content alone, so a message at the limit still fits with
    /// the trace header on top; the store's own byte bound counts the whole
    /// copy, each copy in full, so it overstates, never understates, the
    /// memory held.
    ///
    /// `reserved` is the room the content took while it streamed in: the
    /// copy uses what it holds first (the reservation shrinks by that much,
    /// so its bytes are counted once) and needs room only for the rest, the
    /// trace header and any further copy. On Err the reservation is left as
    /// it was. Otherwise as [`Sink::insert`].
    pub fn insert_received(
        &self,
        mailbox: &str,
        ttl: Duration,
        trace: &str,
        content: &Bytes,
        reserved: Option<&mut Reservation>,
    ) -> Result<(), SinkFull> {
        if content.len() as u64 > self.shared.limits.max_message_size {
            return Err(SinkFull);
        }
        let trace = Bytes::copy_from_slice(trace.as_bytes());
        self.store(mailbox, ttl, trace, content.clone(), reserved)
    }

    /// Both inserts past their size check: the store's bounds, then in.
    fn store(
        &self,
        mailbox: &str,
        ttl: Duration,
        trace: Bytes,
        content: Bytes,
        reserved: Option<&mut Reservation>,
    ) -> Result<(), SinkFull> {
        let limits = self.shared.limits;
        let size = (trace.len() + content.len()) as u64;
        if size > limits.max_bytes || limits.max_per_mailbox == 0 {
            return Err(SinkFull);
        }
        if let Some(r) = &reserved {
            debug_assert!(r.is_for(&self.shared), "another sink's reservation");
        }
        // What the reservation already holds for this copy needs no new room.
        let converted = reserved.as_ref().map_or(0, |r| r.bytes().min(size));
        let need = size - converted;
        let mailbox = mailbox.to_lowercase();
        let received_at = Utc::now();
        let now = Instant::now();
        // A TTL beyond what the clocks can represent is as good as forever.
        let ttl = ttl.min(Duration::from_secs(100 * 365 * 86_400));
        let deadline = now + ttl;
        let expires_at =
            received_at + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);

        let (arrival, wake) = {
            let mut state = self.shared.state.lock().unwrap();
            let key: Arc<str> = match state.mailboxes.get_key_value(mailbox.as_str()) {
                Some((k, _)) => k.clone(),
                None => mailbox.into(),
            };
            let held = state.mailboxes.get(&key).map_or(0, VecDeque::len);
            // The converted bytes move from in flight to stored: the sum,
            // which the bound is about, is unchanged by that.
            match limits.when_full {
                WhenFull::Refuse => {
                    if held >= limits.max_per_mailbox || !state.fits(need, limits) {
                        return Err(SinkFull);
                    }
                }
                WhenFull::Evict => {
                    // Nothing goes for a copy that cannot fit anyway.
                    if !state.can_fit(need, limits) {
                        return Err(SinkFull);
                    }
                    // The mailbox's own oldest make room under its count cap…
                    while let Some(queue) = state
                        .mailboxes
                        .get(&key)
                        .filter(|q| q.len() >= limits.max_per_mailbox)
                    {
                        let seq = queue.front().map(|m| m.seq);
                        match seq {
                            Some(seq) => state.remove(seq),
                            None => break,
                        };
                    }
                    // …and the globally oldest under the byte cap.
                    state.make_room(need, limits)?;
                }
            }
            if let Some(r) = reserved {
                r.convert(&mut state, converted);
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let id = loop {
                let id = format!("{:016x}", rand::random::<u64>());
                // Unique within the mailbox, which is how ids are looked up.
                if !state
                    .mailboxes
                    .get(&key)
                    .is_some_and(|q| q.iter().any(|m| m.id == id))
                {
                    break id;
                }
            };
            let wake = state
                .expirations
                .first()
                .is_none_or(|&(first, _)| deadline < first);
            let message = Arc::new(Message {
                seq,
                id: id.clone(),
                trace,
                content,
                received_at,
                expires_at,
                deadline,
            });
            state.bytes += size;
            state.order.insert(seq, key.clone());
            state.expirations.insert((deadline, seq));
            state
                .mailboxes
                .entry(key.clone())
                .or_default()
                .push_back(message);
            (
                Arrival {
                    mailbox: key,
                    id: id.into(),
                },
                wake,
            )
        };
        if wake {
            self.shared.purge.notify_one();
        }
        // No listener is the common case; the announcement is then dropped.
        let _ = self.shared.events.send(arrival);
        Ok(())
    }

    /// The mailbox's messages, newest first.
    pub(crate) fn list(&self, mailbox: &str) -> Vec<Arc<Message>> {
        let state = self.shared.state.lock().unwrap();
        state
            .mailboxes
            .get(mailbox)
            .map(|q| q.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// One message of the mailbox.
    pub(crate) fn get(&self, mailbox: &str, id: &str) -> Option<Arc<Message>> {
        let state = self.shared.state.lock().unwrap();
        state
            .mailboxes
            .get(mailbox)?
            .iter()
            .find(|m| m.id == id)
            .cloned()
    }

    /// The oldest message of the mailbox received after message `id`, when
    /// `id` is still held.
    pub(crate) fn next_after(&self, mailbox: &str, id: &str) -> Option<Arc<Message>> {
        let state = self.shared.state.lock().unwrap();
        let queue = state.mailboxes.get(mailbox)?;
        let at = queue.iter().position(|m| m.id == id)?;
        queue.get(at + 1).cloned()
    }

    /// Removes one message; false when there was none.
    pub(crate) fn delete(&self, mailbox: &str, id: &str) -> bool {
        let mut state = self.shared.state.lock().unwrap();
        let seq = state
            .mailboxes
            .get(mailbox)
            .and_then(|q| q.iter().find(|m| m.id == id))
            .map(|m| m.seq);
        match seq {
            Some(seq) => {
                state.remove(seq);
                true
            }
            None => false,
        }
    }

    /// Empties the mailbox.
    pub(crate) fn clear(&self, mailbox: &str) {
        let mut state = self.shared.state.lock().unwrap();
        let seqs: Vec<u64> = state
            .mailboxes
            .get(mailbox)
            .map(|q| q.iter().map(|m| m.seq).collect())
            .unwrap_or_default();
        for seq in seqs {
            state.remove(seq);
        }
    }

    /// Cancelled when the HTTP server starts shutting down.
    pub(crate) fn closing(&self) -> CancellationToken {
        self.shared.closing.clone()
    }

    /// A receiver of every arrival from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arrival> {
        self.shared.events.subscribe()
    }
}

impl State {
    /// Forgets message `seq` everywhere; its bytes are freed once no reader
    /// holds it, and an emptied mailbox gives its map slot back.
    fn remove(&mut self, seq: u64) -> Option<Arc<Message>> {
        let mailbox = self.order.remove(&seq)?;
        let queue = self.mailboxes.get_mut(&mailbox)?;
        // Sorted by seq: insertion order.
        let at = queue.binary_search_by_key(&seq, |m| m.seq).ok()?;
        let message = queue.remove(at)?;
        if queue.is_empty() {
            self.mailboxes.remove(&mailbox);
            if self.mailboxes.capacity() > 64
                && self.mailboxes.len() < self.mailboxes.capacity() / 4
            {
                self.mailboxes.shrink_to_fit();
            }
        } else if queue.capacity() > 16 && queue.len() < queue.capacity() / 4 {
            queue.shrink_to_fit();
        }
        self.expirations.remove(&(message.deadline, seq));
        self.bytes -= message.size() as u64;
        Some(message)
    }
}
