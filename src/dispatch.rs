//! The narrow interface between receiving and storing: a complete
//! transaction goes in, the reply to the end of data comes out. Sink copies
//! go to memory, maildir copies to disk; all-or-nothing as far as the
//! client can tell.

use std::sync::Arc;

use bytes::Bytes;

use crate::delivery::DeliveryError;
use crate::directory::{Mailbox, Route};
use crate::envelope::Envelope;
use crate::sink::Reservation;
use crate::smtp::Context;
use crate::smtp::reply::Reply;
use crate::spool::Spool;

/// Delivers every copy of a received message; the reply tells the client
/// whether all of them are safe. `reserved` is the room the content took in
/// the sink's byte bound while it streamed in (sink transactions only); the
/// first sink copy takes it over, and whatever is left goes at the return.
pub async fn deliver(
    ctx: &Context,
    envelope: &Envelope,
    spool: Spool,
    mut reserved: Option<Reservation>,
) -> Reply {
    let mut mailboxes: Vec<Mailbox> = Vec::new();
    let mut sinks = Vec::new();
    for r in &envelope.recipients {
        match &*r.route {
            Route::Mailboxes(boxes) => {
                for m in boxes {
                    // One copy per mailbox per transaction, however many
                    // recipients (aliases, duplicates) lead to it.
                    if !mailboxes.iter().any(|x| x.address == m.address) {
                        mailboxes.push(m.clone());
                    }
                }
            }
            Route::Sink { ttl, .. } => sinks.push((r.address.as_str(), *ttl)),
            Route::UnknownUser | Route::NotServed => {}
        }
    }
    // Sink copies first: if the maildir delivery then fails, the client
    // retries and the sink holds a duplicate, which beats losing a copy
    // after a 250.
    if !sinks.is_empty() {
        let content = spool
            .as_memory()
            .expect("sink transactions are spooled in memory");
        // One buffer for every sink copy; each adds only its trace header.
        // Copied, not moved: the spool grew by doubling, and the sink's
        // bound counts bytes held, not capacity.
        let content = Bytes::copy_from_slice(content);
        for (rcpt, ttl) in &sinks {
            let header = envelope.received_header(rcpt);
            if ctx
                .sink
                .insert_received(rcpt, *ttl, &header, &content, reserved.as_mut())
                .is_err()
            {
                return Reply::sink_full();
            }
        }
    }
    if !mailboxes.is_empty() {
        match ctx
            .maildirs
            .deliver(envelope, Arc::new(spool), &mailboxes)
            .await
        {
            Ok(_) => {}
            Err(DeliveryError::QuotaExceeded { mailbox }) => {
                tracing::info!(id = %envelope.id, %mailbox, "over quota");
                return Reply::mailbox_full();
            }
            Err(e) => {
                tracing::error!(id = %envelope.id, error = %e, "delivery failed");
                return Reply::local_error();
            }
        }
    }
    Reply::delivered(&envelope.id)
}
