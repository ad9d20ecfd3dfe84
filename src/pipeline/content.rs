//! Where a message's content waits while it arrives, decided by its
//! recipients: a transaction with a sink recipient stays in memory within
//! the sink's bounds (sink mail never touches the disk); any other spills
//! to a file under the maildir root past `maildir.spool_memory_limit`.

use super::Pipeline;
use crate::directory::Route;
use crate::envelope::Recipient;
use crate::sink::Reservation;
use crate::spool::Spool;

/// The storage plan for one message's content.
#[derive(Debug)]
pub struct Content {
    pub spool: Spool,
    /// The most content bytes accepted; past it the rest is read and
    /// discarded and the answer is 552.
    pub max: u64,
    /// Room in the sink's byte bound, taken as content is decoded; None
    /// when no recipient is a sink (the maildir path never touches the
    /// sink's budget).
    pub reservation: Option<Reservation>,
}

impl Pipeline {
    /// The plan for content going to `recipients`.
    pub fn content(&self, recipients: &[Recipient]) -> Content {
        let rt = &self.runtime;
        let has_sink = recipients
            .iter()
            .any(|r| matches!(*r.route, Route::Sink { .. }));
        let limit = rt.config.maildir.spool_memory_limit.0 as usize;
        if has_sink {
            // The sink's bounds apply as the content streams in, not after:
            // a message larger than the whole sink could never be stored.
            Content {
                spool: Spool::new(limit, None),
                max: rt.sink.max_message_size(),
                reservation: Some(rt.sink.reservation()),
            }
        } else {
            Content {
                spool: Spool::new(limit, Some(rt.maildirs.spool_dir())),
                max: rt.config.smtp.max_message_size.0,
                reservation: None,
            }
        }
    }
}
