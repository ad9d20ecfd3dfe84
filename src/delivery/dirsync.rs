//! Group commit for directory fsyncs. Many transactions link into the same
//! `new/` at once, and fsyncs of one directory run one after another. So a
//! transaction that has linked takes a ticket; one fsync started after the
//! ticket was issued covers it. While a fsync runs, later tickets wait and
//! are all covered by the next one, so N concurrent deliveries to a mailbox
//! cost about two fsyncs, not N.
//!
//! A failed fsync fails every ticket it was to cover: after a failed fsync
//! Linux may report success for the next one although the entries were
//! lost, so a failure is never retried into a success.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// One group-commit state per directory.
#[derive(Debug, Default)]
pub(crate) struct DirSyncs {
    /// Grows with the number of maildirs delivered to, like the set of
    /// known maildirs. The lock is held only to look up an entry.
    dirs: Mutex<HashMap<PathBuf, Arc<DirSync>>>,
}

impl DirSyncs {
    /// Returns once every entry made in `dir` before this call is durable.
    pub(crate) fn sync(&self, dir: &Path) -> io::Result<()> {
        let ds = self
            .dirs
            .lock()
            .unwrap()
            .entry(dir.to_path_buf())
            .or_default()
            .clone();
        ds.sync(|| super::maildir::fsync_dir(dir))
    }
}

#[derive(Debug, Default)]
struct DirSync {
    /// Never held across the fsync itself, so a std mutex is right.
    state: Mutex<State>,
    /// Signalled when a fsync finishes.
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out; the last one issued.
    issued: u64,
    /// Every ticket up to this one has its outcome decided.
    decided: u64,
    /// A fsync is under way.
    running: bool,
    /// Ticket ranges whose fsync failed, with the errno. Rare, so kept.
    failures: Vec<(u64, u64, i32)>,
}

impl DirSync {
    fn sync(&self, fsync: impl Fn() -> io::Result<()>) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.decided >= ticket {
                return match st
                    .failures
                    .iter()
                    .find(|(lo, hi, _)| (*lo..=*hi).contains(&ticket))
                {
                    Some(&(_, _, errno)) => Err(io::Error::from_raw_os_error(errno)),
                    None => Ok(()),
                };
            }
            if st.running {
                st = self.done.wait(st).unwrap();
                continue;
            }
            // Lead: this fsync starts after every ticket up to `upto` was
            // issued, so after their links were made.
            st.running = true;
            let (from, upto) = (st.decided + 1, st.issued);
            drop(st);
            let r = fsync();
            st = self.state.lock().unwrap();
            st.running = false;
            st.decided = upto;
            if let Err(e) = r {
                st.failures
                    .push((from, upto, e.raw_os_error().unwrap_or(libc::EIO)));
            }
            self.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn waiters_during_a_fsync_share_the_next_one() {
        let ds = Arc::new(DirSync::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let fsync = {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                entered_tx.send(()).unwrap();
                release_rx.lock().unwrap().recv().unwrap();
                Ok(())
            }
        };
        let fsync = Arc::new(fsync);
        std::thread::scope(|s| {
            // The leader enters its fsync and is held there.
            let (d, f) = (ds.clone(), fsync.clone());
            let leader = s.spawn(move || d.sync(|| f()));
            entered_rx.recv().unwrap();
            // Ten more arrive while it runs; they wait for it.
            let followers: Vec<_> = (0..10)
                .map(|_| {
                    let (d, f) = (ds.clone(), fsync.clone());
                    s.spawn(move || d.sync(|| f()))
                })
                .collect();
            while ds.state.lock().unwrap().issued < 11 {
                std::thread::yield_now();
            }
            release_tx.send(()).unwrap();
            leader.join().unwrap().unwrap();
            // One of them leads a single fsync covering all ten.
            entered_rx.recv().unwrap();
            release_tx.send(()).unwrap();
            for f in followers {
                f.join().unwrap().unwrap();
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_fsync_fails_what_it_covered_and_only_that() {
        let ds = DirSync::default();
        assert_eq!(
            ds.sync(|| Err(io::Error::from_raw_os_error(libc::EIO)))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EIO)
        );
        ds.sync(|| Ok(())).unwrap();
        let st = ds.state.lock().unwrap();
        assert_eq!(
            (st.issued, st.decided, st.failures.as_slice()),
            (2, 2, &[(1, 1, libc::EIO)][..])
        );
    }
}
