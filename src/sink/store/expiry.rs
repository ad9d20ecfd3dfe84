//! Expiry: the background task that forgets messages when their TTL runs
//! out, with no traffic needed, and the drop guard that stops it when the
//! last [`Sink`](super::Sink) handle goes.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Shared, State};

/// Held (in an `Arc`) by every handle; dropped with the last one, it tells
/// the purge task to stop.
#[derive(Debug)]
pub(super) struct DropGuard {
    shared: Arc<Shared>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().shutdown = true;
        self.shared.purge.notify_one();
    }
}

/// Spawns the purge task for `shared` on the current tokio runtime; it
/// runs until the returned guard is dropped.
pub(super) fn start(shared: &Arc<Shared>) -> DropGuard {
    tokio::spawn(purge_task(shared.clone()));
    DropGuard {
        shared: shared.clone(),
    }
}

impl State {
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
