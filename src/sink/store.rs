//! The bounded in-memory store: sink mailboxes, their limits, and the
//! task that forgets expired messages on time.
//!
//! The shape is mini-redis's `db.rs`: [`Sink`] is a cheap handle over an
//! `Arc<Shared>`; a background task sleeps until the next expiry and stops
//! when the last handle goes (a drop guard shared by every clone).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{SinkConfig, WhenFull};

/// Announcements kept for slow SSE / wait listeners before they lag.
const EVENT_CAPACITY: usize = 256;

/// Returned when a message does not fit: refuse mode at a bound, a
/// message larger than the SMTP limit or the whole store, or (in either
/// mode) when mail still arriving holds the room it would need.
#[derive(Debug, thiserror::Error)]
#[error("the sink is full")]
pub struct SinkFull;

/// One stored message. Handed out as `Arc<Message>` so readers parse it
/// without holding the store's lock; its bytes go when the last reader does.
#[derive(Debug)]
pub struct Message {
    /// Insertion order across the whole store; the oldest is evicted first.
    pub(crate) seq: u64,
    /// URL-safe, unguessable-ish: 16 hex characters from the thread RNG.
    pub id: String,
    /// Our trace header, this copy's own; empty for a message inserted
    /// whole. With `content`, the message exactly as handed over.
    trace: Bytes,
    /// What the client sent (CRLF line endings), one buffer shared by the
    /// copies of a transaction: a message for five sink mailboxes holds its
    /// content once, and storing a copy touches no new memory.
    content: Bytes,
    /// Wall-clock arrival, shown to people as RFC 3339.
    pub received_at: DateTime<Utc>,
    /// Wall-clock end of life, shown to people as RFC 3339.
    pub expires_at: DateTime<Utc>,
    /// Monotonic end of life; what the purge task actually goes by (tokio's
    /// clock, so tests can pause time).
    pub(crate) deadline: Instant,
}

impl Message {
    /// The whole message in bytes, trace header included.
    pub fn size(&self) -> usize {
        self.trace.len() + self.content.len()
    }

    /// What the client sent, without our trace header: all a listing line,
    /// the HTML body or an attachment needs, with no join.
    pub(crate) fn content(&self) -> &[u8] {
        &self.content
    }

    /// The whole message exactly as handed over, trace header first. Joined
    /// on each call for a copy with a trace header: people read a message
    /// far less often than mail arrives.
    pub fn raw(&self) -> Bytes {
        if self.trace.is_empty() {
            return self.content.clone();
        }
        let mut raw = BytesMut::with_capacity(self.size());
        raw.put_slice(&self.trace);
        raw.put_slice(&self.content);
        raw.freeze()
    }
}

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
    _guard: Arc<DropGuard>,
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

#[derive(Debug)]
struct DropGuard {
    shared: Arc<Shared>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().shutdown = true;
        self.shared.purge.notify_one();
    }
}

/// Room in the sink's byte bound held for content still arriving (one SMTP
/// transaction's), taken a chunk at a time with [`Reservation::grow`] as
/// the content is decoded, given back when dropped, and turned into the
/// stored copy's accounting by [`Sink::insert_received`].
///
/// One bound covers both: stored bytes plus in-flight bytes never exceed
/// `sink.max_bytes`, so that is the most sink mail in memory however many
/// sessions are receiving at once. A message's bytes count once: as in
/// flight while they arrive, then as stored when the insert converts its
/// reservation (the spool's copy, gone when the transaction ends, is not
/// counted again). Stored messages may be evicted (evict mode) to make room
/// for either; in-flight bytes never are: nobody has been told 250 for them
/// yet, and there is nobody to tell. So when in-flight bytes alone leave no
/// room, more content is refused in both modes and the client hears
/// 452 4.3.1, try again later. In evict mode a message that streams in
/// evicts as it goes, so what it pushed out stays gone even if it is then
/// refused for another reason.
#[must_use = "a reservation holds room only while it lives"]
pub struct Reservation {
    /// The store whose `in_flight` this counts in.
    shared: Arc<Shared>,
    /// Bytes held; what the drop gives back.
    bytes: u64,
}

impl Reservation {
    /// Holds `n` more bytes. In evict mode the oldest stored messages go to
    /// make room, but only when that is enough; Err(SinkFull) when it is
    /// not (in-flight bytes leave too little) or, in refuse mode, whenever
    /// the bound would be crossed. On Err nothing changed.
    pub fn grow(&mut self, n: u64) -> Result<(), SinkFull> {
        if n == 0 {
            return Ok(());
        }
        let limits = self.shared.limits;
        let mut state = self.shared.state.lock().unwrap();
        state.make_room(n, limits)?;
        state.in_flight += n;
        self.bytes += n;
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // A converted or empty reservation has nothing to give back.
        if self.bytes > 0 {
            self.shared.state.lock().unwrap().in_flight -= self.bytes;
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("bytes", &self.bytes)
            .finish()
    }
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
        tokio::spawn(purge_task(shared.clone()));
        Sink {
            _guard: Arc::new(DropGuard {
                shared: shared.clone(),
            }),
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

    /// An empty reservation, for content about to arrive over SMTP: see
    /// [`Reservation`].
    pub fn reservation(&self) -> Reservation {
        Reservation {
            shared: self.shared.clone(),
            bytes: 0,
        }
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
            debug_assert!(
                Arc::ptr_eq(&r.shared, &self.shared),
                "another sink's reservation"
            );
        }
        // What the reservation already holds for this copy needs no new room.
        let converted = reserved.as_ref().map_or(0, |r| r.bytes.min(size));
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
                r.bytes -= converted;
                state.in_flight -= converted;
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

    /// The most content one message for the sink may have: the SMTP size
    /// limit, or the whole store when that is smaller. The SMTP side stops
    /// keeping content past it while DATA streams in, so a sink transaction
    /// never buffers more, and a message that could never fit is refused
    /// for good (552) instead of "try again later" for ever.
    pub fn max_message_size(&self) -> u64 {
        let limits = self.shared.limits;
        limits.max_message_size.min(limits.max_bytes)
    }

    /// RCPT-time check for refuse mode: false when the store is at a bound
    /// (stored and in-flight bytes together for the byte bound) and would
    /// refuse.
    pub fn has_room(&self, mailbox: &str) -> bool {
        let limits = self.shared.limits;
        if limits.max_per_mailbox == 0 {
            return false;
        }
        if limits.when_full == WhenFull::Evict {
            return true;
        }
        let state = self.shared.state.lock().unwrap();
        let held = state
            .mailboxes
            .get(mailbox.to_lowercase().as_str())
            .map_or(0, VecDeque::len);
        held < limits.max_per_mailbox && state.bytes + state.in_flight < limits.max_bytes
    }

    /// Total bytes and messages held (for tests and metrics).
    pub fn usage(&self) -> (u64, usize) {
        let state = self.shared.state.lock().unwrap();
        (state.bytes, state.order.len())
    }

    /// Bytes held by reservations for content still arriving (for tests
    /// and metrics).
    pub fn in_flight(&self) -> u64 {
        self.shared.state.lock().unwrap().in_flight
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
    /// Whether `n` more bytes fit under the byte bound as things are.
    fn fits(&self, n: u64, limits: Limits) -> bool {
        self.bytes + self.in_flight + n <= limits.max_bytes
    }

    /// Whether `n` more bytes could fit once every stored message is gone:
    /// in-flight bytes cannot be evicted.
    fn can_fit(&self, n: u64, limits: Limits) -> bool {
        self.in_flight + n <= limits.max_bytes
    }

    /// Makes room for `n` more bytes under the byte bound: in evict mode by
    /// forgetting the globally oldest messages, but only when that is
    /// enough. Err(SinkFull), with nothing removed, when it is not.
    fn make_room(&mut self, n: u64, limits: Limits) -> Result<(), SinkFull> {
        if self.fits(n, limits) {
            return Ok(());
        }
        if limits.when_full == WhenFull::Refuse || !self.can_fit(n, limits) {
            return Err(SinkFull);
        }
        while !self.fits(n, limits) {
            let Some((&seq, _)) = self.order.first_key_value() else {
                break;
            };
            self.remove(seq);
        }
        Ok(())
    }

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

    /// Removes everything due by `now`; returns the next deadline, or None
    /// when the store is empty.
    fn purge_expired(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(deadline, seq)) = self.expirations.first() {
            if deadline > now {
                return Some(deadline);
            }
            // Also removes the (deadline, seq) entry.
            if self.remove(seq).is_none() {
                self.expirations.pop_first();
            }
        }
        None
    }
}

/// Sleeps until the next expiry (or until woken by an earlier one) and
/// forgets what is due, so messages disappear on time with no traffic.
async fn purge_task(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut state = shared.state.lock().unwrap();
            if state.shutdown {
                break;
            }
            state.purge_expired(Instant::now())
        };
        match next {
            Some(when) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(when) => {}
                    _ = shared.purge.notified() => {}
                }
            }
            None => shared.purge.notified().await,
        }
    }
    tracing::debug!("sink purge task stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::ByteSize;

    fn config(max_bytes: u64, per_mailbox: usize, when_full: WhenFull) -> SinkConfig {
        SinkConfig {
            max_bytes: ByteSize(max_bytes),
            max_messages_per_mailbox: per_mailbox,
            when_full,
            ..SinkConfig::default()
        }
    }

    fn msg(n: usize, len: usize) -> Bytes {
        let head = format!("Subject: {n}\r\n\r\n");
        let mut v = head.into_bytes();
        v.resize(len.max(v.len()), b'x');
        Bytes::from(v)
    }

    fn subjects(sink: &Sink, mailbox: &str) -> Vec<String> {
        sink.list(mailbox)
            .iter()
            .map(|m| {
                String::from_utf8_lossy(&m.raw()[9..])
                    .split('\r')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn global_byte_cap_evicts_the_globally_oldest() {
        let sink = Sink::new(&config(300, 100, WhenFull::Evict), 1000);
        sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
            .unwrap();
        sink.insert("b@x.tmp.example.org", HOUR, msg(2, 100))
            .unwrap();
        sink.insert("a@x.tmp.example.org", HOUR, msg(3, 100))
            .unwrap();
        assert_eq!(sink.usage(), (300, 3));
        sink.insert("b@x.tmp.example.org", HOUR, msg(4, 150))
            .unwrap();
        // 1 and 2 had to go (100 + 150 > 300 - 100 after only one).
        assert_eq!(sink.usage(), (250, 2));
        assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["3"]);
        assert_eq!(subjects(&sink, "b@x.tmp.example.org"), ["4"]);
        // The emptied mailbox is gone, not an empty entry.
        assert_eq!(sink.shared.state.lock().unwrap().mailboxes.len(), 2);
    }

    #[tokio::test]
    async fn per_mailbox_cap_evicts_that_mailboxs_oldest() {
        let sink = Sink::new(&config(1 << 20, 2, WhenFull::Evict), 1000);
        sink.insert("other@x.tmp.example.org", HOUR, msg(0, 50))
            .unwrap();
        for n in 1..=3 {
            sink.insert("a@x.tmp.example.org", HOUR, msg(n, 50))
                .unwrap();
        }
        assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["3", "2"]);
        assert_eq!(subjects(&sink, "other@x.tmp.example.org"), ["0"]);
        assert_eq!(sink.usage(), (150, 3));
    }

    #[tokio::test]
    async fn message_size_cap_refuses_in_both_modes() {
        for mode in [WhenFull::Evict, WhenFull::Refuse] {
            let sink = Sink::new(&config(1 << 20, 10, mode), 100);
            sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
                .unwrap();
            assert!(
                sink.insert("a@x.tmp.example.org", HOUR, msg(2, 101))
                    .is_err()
            );
            assert_eq!(sink.usage(), (100, 1));
        }
        // Larger than the whole store: refused rather than emptying it.
        let sink = Sink::new(&config(150, 10, WhenFull::Evict), 1000);
        sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
            .unwrap();
        assert!(
            sink.insert("a@x.tmp.example.org", HOUR, msg(2, 151))
                .is_err()
        );
        assert_eq!(sink.usage(), (100, 1));
    }

    #[tokio::test]
    async fn copies_of_one_transaction_share_its_content() {
        let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
        let content = msg(1, 300);
        for (mailbox, trace) in [
            ("a@x.tmp.example.org", "Received: a\r\n"),
            ("b@x.tmp.example.org", "Received: b\r\n"),
        ] {
            sink.insert_received(mailbox, HOUR, trace, &content, None)
                .unwrap();
        }
        let a = sink.list("a@x.tmp.example.org").remove(0);
        let b = sink.list("b@x.tmp.example.org").remove(0);
        // One buffer for both copies, each with its own trace header.
        assert_eq!(a.content.as_ptr(), content.as_ptr());
        assert_eq!(b.content.as_ptr(), content.as_ptr());
        assert_eq!(a.raw(), [&b"Received: a\r\n"[..], &content].concat());
        assert_eq!(b.raw(), [&b"Received: b\r\n"[..], &content].concat());
        // The bound still counts each copy in full.
        assert_eq!(sink.usage(), (2 * (13 + 300), 2));
    }

    #[tokio::test]
    async fn the_size_limit_counts_received_content_not_our_trace_header() {
        let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 100);
        let trace = "Received: from x\r\n";
        sink.insert_received("a@x.tmp.example.org", HOUR, trace, &msg(1, 100), None)
            .unwrap();
        assert!(
            sink.insert_received("a@x.tmp.example.org", HOUR, trace, &msg(2, 101), None)
                .is_err()
        );
        let stored = sink.list("a@x.tmp.example.org");
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].size(), trace.len() + 100);
        assert!(
            stored[0]
                .raw()
                .starts_with(b"Received: from x\r\nSubject: 1\r\n")
        );
        // The store's byte bound still counts the whole copy.
        let sink = Sink::new(&config(110, 10, WhenFull::Evict), 100);
        assert!(
            sink.insert_received("a@x.tmp.example.org", HOUR, trace, &msg(1, 100), None)
                .is_err()
        );
        assert_eq!(sink.usage(), (0, 0));
    }

    #[tokio::test]
    async fn refuse_mode_refuses_at_each_bound() {
        let sink = Sink::new(&config(250, 2, WhenFull::Refuse), 1000);
        assert!(sink.has_room("a@x.tmp.example.org"));
        sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
            .unwrap();
        sink.insert("a@x.tmp.example.org", HOUR, msg(2, 100))
            .unwrap();
        assert!(!sink.has_room("a@x.tmp.example.org"));
        assert!(!sink.has_room("A@X.tmp.example.org"));
        assert!(
            sink.insert("a@x.tmp.example.org", HOUR, msg(3, 10))
                .is_err()
        );
        // Another mailbox still fits under the byte cap, but not over it.
        assert!(sink.has_room("b@x.tmp.example.org"));
        assert!(
            sink.insert("b@x.tmp.example.org", HOUR, msg(4, 51))
                .is_err()
        );
        sink.insert("b@x.tmp.example.org", HOUR, msg(5, 50))
            .unwrap();
        assert!(!sink.has_room("c@x.tmp.example.org"));
        assert_eq!(sink.usage(), (250, 3));
        assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["2", "1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_messages_go_without_traffic() {
        let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
        sink.insert("a@x.tmp.example.org", Duration::from_secs(60), msg(1, 20))
            .unwrap();
        sink.insert("a@x.tmp.example.org", Duration::from_secs(10), msg(2, 20))
            .unwrap();
        sink.insert("b@x.tmp.example.org", Duration::from_secs(30), msg(3, 20))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(9_999)).await;
        assert_eq!(sink.usage(), (60, 3));
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["1"]);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(sink.usage(), (20, 1));
        assert!(sink.list("b@x.tmp.example.org").is_empty());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(sink.usage(), (0, 0));
        let state = sink.shared.state.lock().unwrap();
        assert!(
            state.mailboxes.is_empty() && state.order.is_empty() && state.expirations.is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn purge_task_stops_with_the_last_handle() {
        let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
        let shared = Arc::downgrade(&sink.shared);
        let clone = sink.clone();
        drop(sink);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(shared.upgrade().is_some(), "a clone still holds the store");
        drop(clone);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            shared.upgrade().is_none(),
            "the purge task let go of the store"
        );
    }

    #[tokio::test]
    async fn ids_are_unique_hex() {
        let sink = Sink::new(&config(1 << 30, 10_000, WhenFull::Evict), 1000);
        for n in 0..5000 {
            sink.insert("a@x.tmp.example.org", HOUR, msg(n, 10))
                .unwrap();
        }
        let list = sink.list("a@x.tmp.example.org");
        let ids: std::collections::HashSet<_> = list.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids.len(), 5000);
        assert!(ids.iter().all(|id| {
            id.len() == 16
                && id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }));
    }

    #[tokio::test]
    async fn delete_and_clear_free_everything() {
        let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
        sink.insert("a@x.tmp.example.org", HOUR, msg(1, 20))
            .unwrap();
        sink.insert("a@x.tmp.example.org", HOUR, msg(2, 30))
            .unwrap();
        sink.insert("b@x.tmp.example.org", HOUR, msg(3, 40))
            .unwrap();
        let id = sink.list("a@x.tmp.example.org")[0].id.clone();
        assert!(sink.delete("a@x.tmp.example.org", &id));
        assert!(!sink.delete("a@x.tmp.example.org", &id));
        assert!(!sink.delete(
            "b@x.tmp.example.org",
            &sink.list("a@x.tmp.example.org")[0].id
        ));
        assert_eq!(sink.usage(), (60, 2));
        sink.clear("a@x.tmp.example.org");
        assert_eq!(sink.usage(), (40, 1));
        let state = sink.shared.state.lock().unwrap();
        assert_eq!(state.mailboxes.len(), 1);
        assert_eq!(state.expirations.len(), 1);
    }

    /// Holds `n` bytes in a fresh reservation, or says it could not.
    fn reserve(sink: &Sink, n: u64) -> Result<Reservation, SinkFull> {
        let mut r = sink.reservation();
        r.grow(n)?;
        Ok(r)
    }

    #[tokio::test]
    async fn a_reservation_holds_room_and_gives_it_back_when_dropped() {
        for mode in [WhenFull::Evict, WhenFull::Refuse] {
            let sink = Sink::new(&config(1000, 10, mode), 1000);
            let mut r = sink.reservation();
            assert_eq!((r.bytes(), sink.in_flight()), (0, 0));
            r.grow(300).unwrap();
            r.grow(200).unwrap();
            let other = reserve(&sink, 100).unwrap();
            assert_eq!(
                (r.bytes(), other.bytes(), sink.in_flight()),
                (500, 100, 600)
            );
            // Held room is not stored mail.
            assert_eq!(sink.usage(), (0, 0));
            drop(r);
            assert_eq!(sink.in_flight(), 100);
            drop(other);
            assert_eq!(sink.in_flight(), 0);
            // All of it is free again.
            let all = reserve(&sink, 1000).unwrap();
            assert_eq!(sink.in_flight(), 1000);
            drop(all);
            assert_eq!(sink.in_flight(), 0);
        }
    }

    #[tokio::test]
    async fn stored_and_in_flight_bytes_share_one_bound() {
        let sink = Sink::new(&config(1000, 10, WhenFull::Refuse), 1000);
        sink.insert("a@x.tmp.example.org", HOUR, msg(1, 600))
            .unwrap();
        let mut r = reserve(&sink, 300).unwrap();
        r.grow(100).unwrap();
        // 600 stored + 400 in flight: not one byte more, and the refused
        // growth changed nothing.
        assert!(r.grow(1).is_err());
        assert_eq!((r.bytes(), sink.in_flight()), (400, 400));
        assert!(!sink.has_room("b@x.tmp.example.org"));
        assert!(
            sink.insert("b@x.tmp.example.org", HOUR, msg(2, 20))
                .is_err()
        );
        assert_eq!(sink.usage(), (600, 1));
        drop(r);
        assert!(sink.has_room("b@x.tmp.example.org"));
        sink.insert("b@x.tmp.example.org", HOUR, msg(2, 400))
            .unwrap();
        assert_eq!(sink.usage(), (1000, 2));
    }

    #[tokio::test]
    async fn inserting_converts_the_reservation_so_the_bytes_count_once() {
        let sink = Sink::new(&config(1000, 10, WhenFull::Refuse), 1000);
        let trace = "Received: from x\r\n";
        let content = msg(1, 900);
        let mut r = reserve(&sink, 900).unwrap();
        // 900 held + an 18-byte trace header: 918 of 1000, not 1818.
        sink.insert_received("a@x.tmp.example.org", HOUR, trace, &content, Some(&mut r))
            .unwrap();
        assert_eq!(r.bytes(), 0);
        assert_eq!(sink.in_flight(), 0);
        assert_eq!(sink.usage(), (918, 1));
        // Dropping the converted reservation gives nothing back twice.
        drop(r);
        assert_eq!((sink.in_flight(), sink.usage()), (0, (918, 1)));

        // A second copy of the same content needs room of its own: two
        // copies are 1836 bytes.
        let sink = Sink::new(&config(1835, 10, WhenFull::Refuse), 1000);
        let mut r = reserve(&sink, 900).unwrap();
        sink.insert_received("a@x.tmp.example.org", HOUR, trace, &content, Some(&mut r))
            .unwrap();
        assert!(
            sink.insert_received("b@x.tmp.example.org", HOUR, trace, &content, Some(&mut r))
                .is_err()
        );
        assert_eq!((sink.in_flight(), sink.usage()), (0, (918, 1)));

        // A reservation larger than the copy keeps the difference until
        // it is dropped.
        let sink = Sink::new(&config(1000, 10, WhenFull::Refuse), 1000);
        let mut r = reserve(&sink, 950).unwrap();
        sink.insert_received(
            "a@x.tmp.example.org",
            HOUR,
            trace,
            &msg(1, 100),
            Some(&mut r),
        )
        .unwrap();
        assert_eq!(
            (r.bytes(), sink.in_flight(), sink.usage()),
            (832, 832, (118, 1))
        );
        drop(r);
        assert_eq!(sink.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_refused_insert_leaves_the_reservation_as_it_was() {
        for mode in [WhenFull::Evict, WhenFull::Refuse] {
            let sink = Sink::new(&config(1000, 10, mode), 1000);
            let _other = reserve(&sink, 500).unwrap();
            let mut r = reserve(&sink, 400).unwrap();
            // The trace header needs 150 more: in flight holds 900 of 1000.
            let trace = "X".repeat(148) + "\r\n";
            assert!(
                sink.insert_received(
                    "a@x.tmp.example.org",
                    HOUR,
                    &trace,
                    &msg(1, 400),
                    Some(&mut r)
                )
                .is_err(),
                "{mode:?}"
            );
            assert_eq!(
                (r.bytes(), sink.in_flight(), sink.usage()),
                (400, 900, (0, 0))
            );
            drop(r);
            assert_eq!(sink.in_flight(), 500);
        }
    }

    #[tokio::test]
    async fn in_evict_mode_a_reservation_evicts_the_oldest_stored_to_make_room() {
        let sink = Sink::new(&config(1000, 10, WhenFull::Evict), 1000);
        for n in 1..=3 {
            sink.insert("a@x.tmp.example.org", HOUR, msg(n, 300))
                .unwrap();
        }
        let mut r = reserve(&sink, 100).unwrap();
        assert_eq!(sink.usage(), (900, 3));
        // 900 + 100 + 400 > 1000: the two oldest go, the newest stays.
        r.grow(400).unwrap();
        assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["3"]);
        assert_eq!((sink.in_flight(), sink.usage()), (500, (300, 1)));
        // An insert without a reservation makes room the same way, and
        // never out of what is in flight.
        sink.insert("b@x.tmp.example.org", HOUR, msg(4, 500))
            .unwrap();
        assert_eq!(subjects(&sink, "a@x.tmp.example.org"), Vec::<String>::new());
        assert_eq!((sink.in_flight(), sink.usage()), (500, (500, 1)));
    }

    #[tokio::test]
    async fn in_flight_bytes_alone_filling_the_bound_are_refused_even_in_evict_mode() {
        let sink = Sink::new(&config(1000, 10, WhenFull::Evict), 1000);
        sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
            .unwrap();
        let first = reserve(&sink, 800).unwrap();
        // 800 + 300 in flight could never fit: refused, and nothing stored
        // is evicted for it.
        let mut second = reserve(&sink, 100).unwrap();
        assert!(second.grow(200).is_err());
        assert!(reserve(&sink, 201).is_err());
        assert!(
            sink.insert("b@x.tmp.example.org", HOUR, msg(2, 201))
                .is_err()
        );
        assert_eq!((sink.in_flight(), sink.usage()), (900, (100, 1)));
        assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["1"]);
        // Once the first lets go there is room again.
        drop(first);
        second.grow(200).unwrap();
        assert_eq!((sink.in_flight(), sink.usage()), (300, (100, 1)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_receivers_never_cross_the_bound_and_give_everything_back() {
        let sink = Sink::new(&config(2_000, 5, WhenFull::Evict), 1000);
        let mut tasks = Vec::new();
        for t in 0..8 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..300usize {
                    let content = msg(n, 60 + (n * 7 + t) % 90);
                    let mut r = sink.reservation();
                    let mut refused = false;
                    for part in content.chunks(25) {
                        if r.grow(part.len() as u64).is_err() {
                            refused = true;
                            break;
                        }
                        let state = sink.shared.state.lock().unwrap();
                        assert!(state.bytes + state.in_flight <= 2_000);
                    }
                    if !refused && n % 3 != 0 {
                        let _ = sink.insert_received(
                            &format!("u{}@x.tmp.example.org", (t + n) % 7),
                            HOUR,
                            "Received: x\r\n",
                            &content,
                            Some(&mut r),
                        );
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let state = sink.shared.state.lock().unwrap();
        assert_eq!(state.in_flight, 0);
        let bytes: u64 = state
            .mailboxes
            .values()
            .flatten()
            .map(|m| m.size() as u64)
            .sum();
        assert_eq!(bytes, state.bytes);
        assert!(state.bytes <= 2_000 && !state.order.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_writers_keep_the_books_straight() {
        let sink = Sink::new(&config(10_000, 5, WhenFull::Evict), 1000);
        let mut tasks = Vec::new();
        for t in 0..8 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..500 {
                    sink.insert(
                        &format!("u{}@x.tmp.example.org", (t + n) % 13),
                        HOUR,
                        msg(n, 37 + n % 50),
                    )
                    .unwrap();
                    let _ = sink.list(&format!("u{}@x.tmp.example.org", n % 13));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let state = sink.shared.state.lock().unwrap();
        let bytes: u64 = state
            .mailboxes
            .values()
            .flatten()
            .map(|m| m.size() as u64)
            .sum();
        assert_eq!(bytes, state.bytes);
        assert!(state.bytes <= 10_000);
        assert!(
            state
                .mailboxes
                .values()
                .all(|q| q.len() <= 5 && !q.is_empty())
        );
        assert_eq!(state.order.len(), state.expirations.len());
        assert_eq!(
            state.order.len(),
            state.mailboxes.values().map(VecDeque::len).sum::<usize>()
        );
    }
}
