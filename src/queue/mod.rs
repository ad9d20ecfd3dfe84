//! The outbound queue: mail for recipients that leave this server waits
//! here, on disk, until every recipient is delivered or has failed and its
//! sender has been told. What is here survives SIGKILL and power loss with
//! the same rule as maildir delivery: nothing is answered 250 before its
//! queue entry is durable.
//!
//! # On disk
//! `queue.dir`, by default `<maildir.root>/.letterbox-queue` (a dot name, so
//! never a domain; on the root's filesystem, so files are linked into
//! place, never copied):
//!
//! ```text
//! .letterbox-queue/
//!   tmp/            entries being staged; anything here at start is debris
//!   <id>.msg        the message as it goes on the wire: our Received field,
//!                   the checks' fields, the content; CRLF, not dot-stuffed;
//!                   mode 0600, never changed once written
//!   <id>.state      JSON (entry.rs): sender, size, created, and per
//!                   recipient status, attempts, next_attempt, last_error…
//!   wake            a unix datagram socket `serve` listens on; `letterbox
//!                   queue …` sends it a byte after a change
//! ```
//!
//! An entry exists once its `.state` does. Enqueueing writes both files in
//! `tmp/`, fsyncs them, links the message file and then the state file into
//! place (link, not rename, so an existing entry is never replaced) and
//! fsyncs the directory: only then is the message accepted. A state change
//! writes a new state file in `tmp/`, fsyncs it, renames it over the old one
//! and fsyncs the directory. Removing an entry unlinks the state file
//! first, then the message file. At start a message file without a state
//! file, a state file without its message file, and anything in `tmp/` are
//! removed: none of them was ever answered 250.
//!
//! # Who changes an entry
//! The server's delivery of an entry, and `letterbox queue retry|bounce|
//! remove`, take an exclusive `flock` on its message file first and read
//! the state file under it, so neither overwrites what the other wrote.
//! The CLI never waits: an entry being delivered right now is reported as
//! busy.

pub mod dsn;
pub mod entry;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

pub use entry::{Entry, RecipientState, Status};

use crate::envelope::Envelope;
use crate::spool::Spool;

/// The default queue directory's name inside the maildir root.
pub const QUEUE_DIR: &str = ".letterbox-queue";
/// The wake-up socket's name inside the queue directory.
pub const WAKE_SOCKET: &str = "wake";
/// Copy buffer for spool → message file.
const COPY_CHUNK: usize = 64 * 1024;
/// Largest state file read: a state file is a few hundred bytes per
/// recipient; anything larger is not ours.
const MAX_STATE: u64 = 16 << 20;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("queue entry {0} does not exist")]
    NotFound(String),
    #[error("queue entry {0} is being delivered right now; try again in a moment")]
    Busy(String),
    #[error("queue state file {}: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("blocking queue work failed: {0}")]
    Blocking(#[from] crate::blocking::BlockingError),
}

type Result<T, E = QueueError> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The queue directory. Cheap to clone: clones share the wake-up signal.
#[derive(Debug, Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    tmp: PathBuf,
    /// The directory's owner: files root writes (the CLI run as root) are
    /// given to it, so the server running as that user can read them.
    owner: (u32, u32),
    /// Told when an entry is enqueued, so the scheduler starts on it now.
    notify: Notify,
    /// Entries enqueued since the scheduler last looked.
    fresh: Mutex<Vec<String>>,
    /// Entries between their first link and their directory fsync: a scan
    /// must not see them yet (the commit may still be undone).
    committing: Mutex<HashSet<String>>,
}

/// An entry written in `tmp/` and not yet in place; dropped without
/// [`Staged::commit`], it removes what it wrote.
#[derive(Debug)]
pub struct Staged {
    queue: Queue,
    id: String,
    tmp_msg: PathBuf,
    tmp_state: PathBuf,
    committed: bool,
}

/// The exclusive lock on one entry (an flock on its message file) and the
/// open message file; released when dropped.
#[derive(Debug)]
pub struct Locked {
    pub file: File,
    pub id: String,
}

impl Queue {
    /// Opens the queue at `dir`, creating it (0700) if missing. With
    /// `recover`, first removes what a crash left half-done (only the
    /// server does this, before any delivery). Blocking.
    pub fn open(dir: &Path, recover: bool) -> io::Result<Queue> {
        crate::blocking::assert_off_runtime("opening the queue");
        let tmp = dir.join("tmp");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)?;
        let meta = std::fs::metadata(dir)?;
        let q = Queue {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                tmp,
                owner: (
                    std::os::unix::fs::MetadataExt::uid(&meta),
                    std::os::unix::fs::MetadataExt::gid(&meta),
                ),
                notify: Notify::new(),
                fresh: Mutex::new(Vec::new()),
                committing: Mutex::new(HashSet::new()),
            }),
        };
        if recover {
            q.recover()?;
        }
        Ok(q)
    }

    /// Opens an existing queue for the CLI, without creating anything.
    pub fn open_existing(dir: &Path) -> io::Result<Option<Queue>> {
        if !dir.join("tmp").is_dir() {
            return Ok(None);
        }
        Queue::open(dir, false).map(Some)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Where an entry's message file is (the id is not checked: callers
    /// pass ids they read from the queue).
    pub fn message_path(&self, id: &str) -> PathBuf {
        self.inner.dir.join(format!("{id}.msg"))
    }

    fn state_path(&self, id: &str) -> PathBuf {
        self.inner.dir.join(format!("{id}.state"))
    }

    /// Removes debris of a crash: `tmp/`, and entries with only one file.
    fn recover(&self) -> io::Result<()> {
        for e in std::fs::read_dir(&self.inner.tmp)? {
            let e = e?;
            tracing::info!(path = %e.path().display(), "removing a queue file staged before a crash");
            let _ = std::fs::remove_file(e.path());
        }
        let mut changed = false;
        for e in std::fs::read_dir(&self.inner.dir)? {
            let name = e?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".msg") {
                if !self.state_path(id).exists() {
                    tracing::info!(
                        id,
                        "removing a queue message whose entry was never committed"
                    );
                    let _ = std::fs::remove_file(self.message_path(id));
                    changed = true;
                }
            } else if let Some(id) = name.strip_suffix(".state")
                && !self.message_path(id).exists()
            {
                tracing::error!(id, "queue entry without its message file; removing it");
                let _ = std::fs::remove_file(self.state_path(id));
                changed = true;
            }
        }
        if changed {
            fsync_dir(&self.inner.dir)?;
        }
        Ok(())
    }

    // ---- enqueueing ----

    /// Writes an entry for `recipients` (address, original) of `envelope`
    /// into `tmp/`, durable there but not yet in the queue. Blocking.
    pub fn stage(
        &self,
        envelope: &Envelope,
        spool: &Spool,
        recipients: &[(String, Option<String>)],
    ) -> Result<Staged> {
        crate::blocking::assert_off_runtime("staging a queue entry");
        let id = envelope.id.clone();
        let tmp_msg = self.inner.tmp.join(format!("{id}.msg"));
        let tmp_state = self.inner.tmp.join(format!("{id}.state"));
        let mut staged = Staged {
            queue: self.clone(),
            id: id.clone(),
            tmp_msg: tmp_msg.clone(),
            tmp_state: PathBuf::new(),
            committed: false,
        };
        // One recipient is named in the Received field as the client gave
        // it, as in a maildir copy; several are not (Bcc recipients stay
        // hidden).
        let received = match recipients {
            [(one, original)] => envelope.received_header(original.as_deref().unwrap_or(one)),
            _ => envelope.received_header_without_for(),
        };
        let (size, eight_bit) = write_message(&tmp_msg, &received, &envelope.headers, spool)
            .map_err(io_at(&tmp_msg))?;
        let now = entry::now();
        let smtputf8 = !envelope.sender.is_ascii() || recipients.iter().any(|(a, _)| !a.is_ascii());
        let entry = Entry {
            version: entry::VERSION,
            id,
            sender: envelope.sender.clone(),
            size,
            created: now,
            eight_bit,
            smtputf8,
            bounces: 0,
            recipients: recipients
                .iter()
                .map(|(a, o)| RecipientState::new(a.clone(), o.clone(), now))
                .collect(),
        };
        write_synced(&tmp_state, &state_bytes(&entry), self.inner.owner)
            .map_err(io_at(&tmp_state))?;
        staged.tmp_state = tmp_state;
        Ok(staged)
    }

    /// Stages and commits in one go: the entry is durable in the queue when
    /// this returns Ok. Returns its id.
    pub async fn enqueue(
        &self,
        envelope: &Envelope,
        spool: Arc<Spool>,
        recipients: Vec<(String, Option<String>)>,
    ) -> Result<String> {
        let q = self.clone();
        let env = envelope.clone();
        crate::blocking::run("enqueueing a message", move || {
            let staged = q.stage(&env, &spool, &recipients)?;
            staged.commit()
        })
        .await?
    }

    /// Wakes the scheduler for entries committed since it last looked.
    fn announce(&self, id: &str) {
        self.inner.fresh.lock().unwrap().push(id.to_string());
        self.inner.notify.notify_one();
    }

    /// Entries enqueued since the last call (the scheduler's).
    pub fn take_fresh(&self) -> Vec<String> {
        std::mem::take(&mut *self.inner.fresh.lock().unwrap())
    }

    /// Resolves when something was enqueued since the last wait.
    pub async fn enqueued(&self) {
        self.inner.notify.notified().await
    }

    // ---- reading ----

    /// Every entry's state, sorted by creation then id. Entries whose state
    /// cannot be read are logged and left out. Blocking.
    pub fn scan(&self) -> io::Result<Vec<Entry>> {
        crate::blocking::assert_off_runtime("scanning the queue");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.inner.dir)? {
            let name = e?.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".state")) else {
                continue;
            };
            if self.inner.committing.lock().unwrap().contains(id) {
                continue;
            }
            match self.read_state(id) {
                Ok(entry) => out.push(entry),
                // Removed between the listing and the read.
                Err(QueueError::NotFound(_)) => {}
                Err(e) => tracing::error!(id, error = %e, "cannot read a queue entry"),
            }
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// One entry's state. Blocking.
    pub fn read_state(&self, id: &str) -> Result<Entry> {
        let id = checked_id(id)?;
        let path = self.state_path(id);
        let mut text = Vec::new();
        match File::open(&path) {
            Ok(f) => f
                .take(MAX_STATE)
                .read_to_end(&mut text)
                .map_err(io_at(&path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(QueueError::NotFound(id.to_string()));
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        serde_json::from_slice(&text).map_err(|source| QueueError::Corrupt { path, source })
    }

    /// The message file, for reading. Blocking.
    pub fn open_message(&self, id: &str) -> Result<File> {
        let id = checked_id(id)?;
        let path = self.message_path(id);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => QueueError::NotFound(id.to_string()),
            _ => io_at(&path)(e),
        })
    }

    // ---- changing ----

    /// Takes the entry's lock without waiting: Busy when someone holds it.
    /// Blocking.
    pub fn lock(&self, id: &str) -> Result<Locked> {
        let file = self.open_message(id)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                QueueError::Busy(id.to_string())
            } else {
                io_at(&self.message_path(id))(e)
            });
        }
        // Removed while we opened it: the lock guards nothing.
        if !self.state_path(id).exists() {
            return Err(QueueError::NotFound(id.to_string()));
        }
        Ok(Locked {
            file,
            id: id.to_string(),
        })
    }

    /// Replaces the entry's state durably (tmp, fsync, rename, fsync dir).
    /// The caller holds its lock. Blocking.
    pub fn write_state(&self, _lock: &Locked, entry: &Entry) -> Result<()> {
        crate::blocking::assert_off_runtime("writing a queue state file");
        let tmp = self
            .inner
            .tmp
            .join(format!("{}.state.{:08x}", entry.id, rand::random::<u32>()));
        let done = write_synced(&tmp, &state_bytes(entry), self.inner.owner)
            .and_then(|()| std::fs::rename(&tmp, self.state_path(&entry.id)))
            .and_then(|()| fsync_dir(&self.inner.dir));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done.map_err(io_at(&self.state_path(&entry.id)))
    }

    /// Removes the entry durably: state file first, so a crash halfway
    /// leaves a message file that the next start removes. The caller holds
    /// its lock. Blocking.
    pub fn remove(&self, lock: &Locked) -> Result<()> {
        crate::blocking::assert_off_runtime("removing a queue entry");
        let state = self.state_path(&lock.id);
        std::fs::remove_file(&state).map_err(io_at(&state))?;
        let msg = self.message_path(&lock.id);
        std::fs::remove_file(&msg).map_err(io_at(&msg))?;
        fsync_dir(&self.inner.dir).map_err(io_at(&self.inner.dir))
    }

    /// Tells a running server to read the queue again now (best effort:
    /// without a server listening, nothing happens and the next start reads
    /// it anyway).
    pub fn poke(&self) {
        let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
            return;
        };
        let _ = sock.send_to(b"!", self.inner.dir.join(WAKE_SOCKET));
    }
}

impl Staged {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Puts the entry in place and makes that durable; on error nothing of
    /// it is left in the queue. Returns its id. Blocking.
    pub fn commit(mut self) -> Result<String> {
        crate::blocking::assert_off_runtime("committing a queue entry");
        let q = self.queue.clone();
        let id = self.id.clone();
        let (msg, state) = (q.message_path(&id), q.state_path(&id));
        q.inner.committing.lock().unwrap().insert(id.clone());
        let linked = std::fs::hard_link(&self.tmp_msg, &msg)
            .map_err(io_at(&msg))
            .and_then(|()| {
                std::fs::hard_link(&self.tmp_state, &state).map_err(|e| {
                    let _ = std::fs::remove_file(&msg);
                    io_at(&state)(e)
                })
            })
            .and_then(|()| {
                fsync_dir(&q.inner.dir).map_err(|e| {
                    let _ = std::fs::remove_file(&state);
                    let _ = std::fs::remove_file(&msg);
                    let _ = fsync_dir(&q.inner.dir);
                    io_at(&q.inner.dir)(e)
                })
            });
        q.inner.committing.lock().unwrap().remove(&id);
        linked?;
        self.committed = true;
        let _ = std::fs::remove_file(&self.tmp_msg);
        let _ = std::fs::remove_file(&self.tmp_state);
        q.announce(&id);
        tracing::debug!(id, "queued");
        Ok(id)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp_msg);
            if !self.tmp_state.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&self.tmp_state);
            }
        }
    }
}

/// A queue id is a file name we made: refuse anything that could name
/// another file (the CLI passes what the operator typed).
fn checked_id(id: &str) -> Result<&str> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(QueueError::NotFound(id.to_string()))
    }
}

fn state_bytes(entry: &Entry) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(entry).expect("an entry serializes");
    v.push(b'\n');
    v
}

/// Creates `path` exclusively (0600, owned by `owner` when we are root),
/// writes `data` and syncs it.
fn write_synced(path: &Path, data: &[u8], owner: (u32, u32)) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let r = give(&f, owner)
        .and_then(|()| f.write_all(data))
        .and_then(|()| f.sync_all());
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Writes the message file: `received`, `headers` and the spool, as CRLF
/// text; fdatasyncs it. Returns its size and whether it holds 8-bit bytes.
fn write_message(
    path: &Path,
    received: &str,
    headers: &str,
    spool: &Spool,
) -> io::Result<(u64, bool)> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let r = (|| {
        let mut eight_bit = !headers.is_ascii();
        f.write_all(received.as_bytes())?;
        f.write_all(headers.as_bytes())?;
        let mut size = (received.len() + headers.len()) as u64;
        let mut chunk = vec![0u8; COPY_CHUNK];
        let mut offset = 0u64;
        loop {
            let n = spool.read_at(&mut chunk, offset)?;
            if n == 0 {
                break;
            }
            eight_bit |= !chunk[..n].is_ascii();
            f.write_all(&chunk[..n])?;
            offset += n as u64;
        }
        size += offset;
        f.sync_data()?;
        Ok((size, eight_bit))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Gives a file we created to the queue's owner when we run as root and
/// the queue is not root's.
fn give(f: &File, (uid, gid): (u32, u32)) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || uid == 0 {
        return Ok(());
    }
    std::os::unix::fs::fchown(f, Some(uid), Some(gid))
}

/// fsync on a directory makes its entries (links, renames, unlinks) durable.
fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Received;

    fn envelope(id: &str) -> Envelope {
        Envelope {
            id: id.into(),
            sender: "alice@example.org".into(),
            recipients: vec![],
            received: Received {
                helo: "client.example".into(),
                rdns: None,
                ip: "127.0.0.1".parse().unwrap(),
                by: "mx.example.org".into(),
                with: "ESMTP".into(),
                tls: None,
                date: "Sun, 22 Nov 2026 12:00:00 +0000".into(),
            },
            headers: "X-Check: 1\r\n".into(),
            quarantine: false,
        }
    }

    fn spool(text: &str) -> Spool {
        let mut s = Spool::new(1 << 20, None);
        s.write(text.as_bytes()).unwrap();
        s
    }

    #[test]
    fn enqueue_lock_update_remove() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), true).unwrap();
        let rcpts = vec![
            ("b@example.net".to_string(), None),
            (
                "c@example.com".to_string(),
                Some("fwd@example.org".to_string()),
            ),
        ];
        let staged = q
            .stage(
                &envelope("00aa"),
                &spool("Subject: x\r\n\r\nbody\r\n"),
                &rcpts,
            )
            .unwrap();
        assert!(q.scan().unwrap().is_empty(), "staged is not queued");
        assert_eq!(staged.commit().unwrap(), "00aa");
        assert_eq!(q.take_fresh(), ["00aa"]);
        let e = q.scan().unwrap().pop().unwrap();
        let msg = std::fs::read_to_string(q.message_path("00aa")).unwrap();
        assert!(msg.starts_with("Received: from client.example"), "{msg}");
        assert!(!msg.contains("for <"), "two recipients: none named: {msg}");
        assert!(msg.ends_with("X-Check: 1\r\nSubject: x\r\n\r\nbody\r\n"));
        assert_eq!(e.size, msg.len() as u64);
        assert_eq!(e.recipients[1].original.as_deref(), Some("fwd@example.org"));

        let lock = q.lock("00aa").unwrap();
        assert!(matches!(q.lock("00aa"), Err(QueueError::Busy(_))));
        let mut e2 = e.clone();
        e2.recipients[0].status = Status::Delivered;
        q.write_state(&lock, &e2).unwrap();
        assert_eq!(q.read_state("00aa").unwrap(), e2);
        q.remove(&lock).unwrap();
        drop(lock);
        assert!(q.scan().unwrap().is_empty());
        assert!(matches!(q.read_state("00aa"), Err(QueueError::NotFound(_))));
        assert!(matches!(q.lock("../x"), Err(QueueError::NotFound(_))));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_dropped_stage_leaves_nothing_and_recovery_removes_half_entries() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), true).unwrap();
        let staged = q
            .stage(
                &envelope("00bb"),
                &spool("x\r\n"),
                &[("b@example.net".into(), None)],
            )
            .unwrap();
        drop(staged);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        std::fs::write(dir.path().join("orphan.msg"), "x").unwrap();
        std::fs::write(dir.path().join("lonely.state"), "{}").unwrap();
        std::fs::write(dir.path().join("tmp/half.msg"), "x").unwrap();
        Queue::open(dir.path(), true).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["tmp"]);
    }
}
