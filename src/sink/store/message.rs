//! The stored message: its bytes (our trace header and the content the
//! client sent, shared between copies) and its times. What people see of
//! it, parsed on demand, is [`crate::sink::message`]'s.

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio::time::Instant;

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
    pub(super) trace: Bytes,
    /// What the client sent (CRLF line endings), one buffer shared by the
    /// copies of a transaction: a message for five sink mailboxes holds its
    /// content once, and storing a copy touches no new memory.
    pub(super) content: Bytes,
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
