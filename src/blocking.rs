//! Blocking work kept off the async runtime, and a guard that proves it.
//!
//! A file write, a full MIME parse or an HTML sanitize on a runtime worker
//! stalls every session that worker serves. Such work goes through
//! [`run`], which moves it to tokio's blocking pool and marks the thread
//! while it runs. Functions that block call [`assert_off_runtime`] first:
//! in debug builds (every test run) it panics when called on a runtime
//! worker outside [`run`], so a path that forgets the hand-off fails its
//! tests instead of passing slowly. Release builds pay nothing.

use std::cell::Cell;

thread_local! {
    /// Set while this thread runs a closure given to [`run`].
    static BLOCKING_ALLOWED: Cell<bool> = const { Cell::new(false) };
}

/// Why blocking work did not produce its value.
#[derive(Debug, thiserror::Error)]
#[error("blocking task for {what} failed: {why}")]
pub struct BlockingError {
    pub what: &'static str,
    pub why: String,
}

/// Runs `f` on the blocking pool and waits for it without blocking the
/// runtime. A panic in `f` comes back as an error naming `what`, so the
/// caller can answer with a temporary failure instead of dying.
pub async fn run<F, T>(what: &'static str, f: F) -> Result<T, BlockingError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || allowed(f))
        .await
        .map_err(|e| BlockingError {
            what,
            why: if e.is_panic() {
                "it panicked".into()
            } else {
                e.to_string()
            },
        })
}

/// Runs `f` with blocking marked as allowed on this thread: for threads
/// that are not runtime workers but still have a runtime context (tokio's
/// own `spawn_blocking`, used by code that predates this module).
pub fn allowed<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BLOCKING_ALLOWED.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(BLOCKING_ALLOWED.with(|b| b.replace(true)));
    f()
}

/// Panics (debug builds only) when called on an async runtime thread
/// outside [`run`]: `what` is about to block.
#[track_caller]
pub fn assert_off_runtime(what: &str) {
    if cfg!(debug_assertions)
        && tokio::runtime::Handle::try_current().is_ok()
        && !BLOCKING_ALLOWED.with(Cell::get)
    {
        panic!("{what} blocks and was called on the async runtime; use blocking::run");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_allows_blocking_and_the_runtime_does_not() {
        let ok = run("test", || {
            assert_off_runtime("a test write");
            7
        })
        .await
        .unwrap();
        assert_eq!(ok, 7);
        let on_runtime = std::panic::catch_unwind(|| assert_off_runtime("a test write"));
        assert!(on_runtime.is_err(), "the guard must fire on the runtime");
    }

    #[test]
    fn plain_threads_may_block() {
        assert_off_runtime("a write outside any runtime");
    }

    #[tokio::test]
    async fn a_panic_is_an_error_naming_the_work() {
        let e = run("parsing a message", || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "blocking task for parsing a message failed: it panicked"
        );
    }
}
