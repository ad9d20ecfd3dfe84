//! The byte budget: one bound, `sink.max_bytes`, over stored messages and
//! content still arriving together. Owns [`Reservation`] (room held for
//! content streaming in over SMTP), the fit checks and the eviction that
//! makes room, and the answers the SMTP side asks of the bounds (size
//! limit, room at RCPT, usage).

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Limits, Shared, Sink, SinkFull, State};
use crate::config::WhenFull;

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

    /// Whether this holds room in `shared`'s budget.
    pub(super) fn is_for(&self, shared: &Arc<Shared>) -> bool {
        Arc::ptr_eq(&self.shared, shared)
    }

    /// Hands `n` held bytes to a copy being stored (`state` is this
    /// reservation's store, locked): they stop counting as in flight and the
    /// drop no longer gives them back. The sum the bound is about is
    /// unchanged; the caller counts them as stored.
    pub(super) fn convert(&mut self, state: &mut State, n: u64) {
        self.bytes -= n;
        state.in_flight -= n;
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
    /// An empty reservation, for content about to arrive over SMTP: see
    /// [`Reservation`].
    pub fn reservation(&self) -> Reservation {
        Reservation {
            shared: self.shared.clone(),
            bytes: 0,
        }
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
}

impl State {
    /// Whether `n` more bytes fit under the byte bound as things are.
    pub(super) fn fits(&self, n: u64, limits: Limits) -> bool {
        self.bytes + self.in_flight + n <= limits.max_bytes
    }

    /// Whether `n` more bytes could fit once every stored message is gone:
    /// in-flight bytes cannot be evicted.
    pub(super) fn can_fit(&self, n: u64, limits: Limits) -> bool {
        self.in_flight + n <= limits.max_bytes
    }

    /// Makes room for `n` more bytes under the byte bound: in evict mode by
    /// forgetting the globally oldest messages, but only when that is
    /// enough. Err(SinkFull), with nothing removed, when it is not.
    pub(super) fn make_room(&mut self, n: u64, limits: Limits) -> Result<(), SinkFull> {
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
}
