//! Durable delivery into maildirs: when the session answers 250 to the end
//! of DATA, every recipient's copy is on disk and survives a power cut
//! (RFC 5321 §6.1).
//!
//! Layout is Dovecot's `mail_location = maildir:<root>/%d/%n`: mail for
//! `alice@example.org` lands in `<root>/example.org/alice/new/`, or with
//! `maildir.subaddress_folders` and `alice+lists@…` in the Maildir++
//! folder `<root>/example.org/alice/.lists/new/`.
//!
//! One transaction is all-or-nothing across its mailboxes:
//! 1. check every copy against its quota (`maildirsize`, see [`quota`]);
//! 2. write each copy to `tmp/` (O_EXCL, LF line endings) and fdatasync it;
//! 3. only when all are staged, link each into `new/`, then fsync every
//!    `new/` touched, then drop the `tmp/` names;
//! 4. on any failure before the end, remove every staged file and every
//!    link already made, so no mailbox keeps half a delivery.
//!
//! We do not use the `maildir` crate: it moves `tmp/`→`new/` with
//! `rename()`, which silently replaces a file of the same name, and it
//! never fsyncs the directory, so a message it reports delivered can vanish
//! in a power cut. Linking (EEXIST → another name) and fsyncing `new/` are
//! the two things this module exists for.
//!
//! [`pipe`] is the other kind of local delivery: a copy handed to a
//! command on its stdin (an alias destination `|…`).
//!
//! All disk work runs in `spawn_blocking`, so a slow disk stalls only the
//! transaction waiting for it. Concurrent transactions fdatasync their files
//! concurrently, which lets the device merge their flushes, and share `new/`
//! fsyncs through a group commit ([`dirsync`]). The copies of one
//! transaction are synced side by side too ([`parallel`]), so a message for
//! five mailboxes does not wait for ten flushes in a row.

mod cleanup;
mod dirsync;
pub(crate) mod lf;
mod maildir;
mod parallel;
pub mod pipe;
mod quota;

use std::fs::{DirBuilder, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use self::dirsync::DirSyncs;
use self::maildir::{KnownDirs, Names, PathError, Target};
use self::parallel::Parallel;
use crate::config::MaildirConfig;
use crate::directory::Mailbox;
use crate::envelope::Envelope;
use crate::spool::Spool;

/// The spool directory's name inside the root. It starts with a dot, so it
/// can never be a domain (domains cannot, and paths refuse leading dots).
pub const SPOOL_DIR: &str = ".letterbox-spool";

/// The Maildir++ folder quarantined mail goes to (`.Junk`), where Dovecot
/// and mail clients look for spam.
pub const JUNK: &str = "Junk";

/// The maildirs under one root. Cheap to clone: every clone shares the
/// same state.
#[derive(Debug, Clone)]
pub struct Maildirs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `<root>/<domain>/<local>/` holds each mailbox.
    root: PathBuf,
    /// Where spools past their memory limit go: under the root, so on its
    /// filesystem.
    spool_dir: PathBuf,
    /// Whether a `+tag` selects a Maildir++ folder.
    subaddress_folders: bool,
    /// Unique file names for this host and process.
    names: Names,
    /// Maildirs known to exist, to skip mkdir on the hot path.
    known: KnownDirs,
    /// Group commit of `new/` fsyncs across concurrent transactions.
    dir_syncs: DirSyncs,
    /// Runs the fsyncs of one transaction's copies side by side.
    parallel: Parallel,
}

/// A delivery that happened.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Where each copy landed in `new/`, in the order of the mailboxes.
    pub paths: Vec<PathBuf>,
}

/// Why a delivery did not happen. Nothing of the message is left in any
/// mailbox when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A copy would exceed its mailbox quota: 452 4.2.2.
    #[error("mailbox {mailbox} is over its quota")]
    QuotaExceeded { mailbox: String },
    /// Disk or filesystem failure: 451 4.3.0.
    #[error("maildir delivery failed at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl DeliveryError {
    /// An I/O failure, logged once with the path and errno for the operator.
    fn io((path, source): PathError) -> DeliveryError {
        tracing::error!(
            path = %path.display(),
            errno = source.raw_os_error(),
            error = %source,
            "maildir delivery failed; nothing delivered"
        );
        DeliveryError::Io { path, source }
    }
}

impl Maildirs {
    /// Creates the root (0700) if missing and the spool dir.
    pub fn new(config: &MaildirConfig, hostname: &str) -> io::Result<Maildirs> {
        let root = config.root.clone();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        // The root's own entry must be durable too: every maildir hangs off
        // it. Once per start, so the fsync costs nothing that matters.
        let parent = match root.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        maildir::fsync_dir(parent)?;
        let spool_dir = root.join(SPOOL_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spool_dir)?;
        Ok(Maildirs {
            inner: Arc::new(Inner {
                root,
                spool_dir,
                subaddress_folders: config.subaddress_folders,
                names: Names::new(hostname),
                known: KnownDirs::default(),
                dir_syncs: DirSyncs::default(),
                parallel: Parallel::default(),
            }),
        })
    }

    /// Directory for spool files (same filesystem as the root).
    pub fn spool_dir(&self) -> PathBuf {
        self.inner.spool_dir.clone()
    }

    /// Removes files older than 36 h in every tmp/ under the root; returns
    /// how many. Blocking: call from spawn_blocking.
    pub fn clean_tmp(&self) -> io::Result<usize> {
        cleanup::clean_tmp(&self.inner.root, SystemTime::now())
    }

    /// RCPT-time check: Ok(true) when the mailbox is already at or over its
    /// quota (always false when quota is 0).
    pub async fn is_over_quota(&self, mailbox: &Mailbox) -> io::Result<bool> {
        if mailbox.quota == 0 {
            return Ok(false);
        }
        let target = self.inner.target(mailbox, false)?;
        let (inner, quota) = (self.inner.clone(), mailbox.quota);
        tokio::task::spawn_blocking(move || {
            Ok(quota::usage(&target.mailbox, quota, &inner.names)? >= quota)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// All-or-nothing delivery of one message to every mailbox (already
    /// deduplicated). Ok only when every copy is durable in new/.
    pub async fn deliver(
        &self,
        envelope: &Envelope,
        spool: Arc<Spool>,
        mailboxes: &[Mailbox],
    ) -> Result<Delivered, DeliveryError> {
        self.deliver_with(envelope, spool, mailboxes, None).await
    }

    /// [`Maildirs::deliver`] as one part of a larger all-or-nothing
    /// delivery: `commit` runs (on the blocking pool) once every copy is
    /// linked into `new/` and durable there, and makes the other part
    /// durable (the queue entry). If it fails, every copy is removed again
    /// and the delivery fails; if the copies fail first, it never runs and
    /// is dropped (so what it would have committed is dropped too).
    pub async fn deliver_with(
        &self,
        envelope: &Envelope,
        spool: Arc<Spool>,
        mailboxes: &[Mailbox],
        commit: Option<Commit>,
    ) -> Result<Delivered, DeliveryError> {
        let copies: Vec<Copy> = mailboxes
            .iter()
            .map(|m| Copy {
                headers: trace_headers(envelope, m),
                mailbox: m.clone(),
                junk: envelope.quarantine,
            })
            .collect();
        let inner = self.inner.clone();
        let id = envelope.id.clone();
        let delivered = tokio::task::spawn_blocking(move || inner.deliver(&spool, &copies, commit))
            .await
            .map_err(|e| DeliveryError::io((self.inner.root.clone(), io::Error::other(e))))?;
        if let Ok(d) = &delivered {
            tracing::debug!(id, copies = d.paths.len(), "delivered to maildirs");
        }
        delivered
    }
}

/// The other part of an all-or-nothing delivery, made durable after the
/// maildir copies and before they are final (see [`Maildirs::deliver_with`]).
pub type Commit = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// One blocking step of a delivery, run beside its siblings.
type Task = Box<dyn FnOnce() -> Result<(), PathError> + Send>;

/// One mailbox's copy: the headers we prepend, already with LF endings.
struct Copy {
    mailbox: Mailbox,
    headers: Vec<u8>,
    /// Quarantined: into the mailbox's `.Junk` folder.
    junk: bool,
}

/// `Return-Path`, `Delivered-To`, `X-Original-To` for an alias, and the
/// `Received` field naming only the recipient that reached this mailbox.
fn trace_headers(envelope: &Envelope, m: &Mailbox) -> Vec<u8> {
    let mut h = format!(
        "Return-Path: <{}>\nDelivered-To: {}\n",
        envelope.sender, m.address
    );
    if let Some(original) = &m.original {
        h.push_str(&format!("X-Original-To: {original}\n"));
    }
    let mut h = h.into_bytes();
    h.extend_from_slice(&lf::to_lf(
        envelope
            .received_header(&recipient_of(envelope, m))
            .as_bytes(),
    ));
    h.extend_from_slice(&lf::to_lf(envelope.headers.as_bytes()));
    h
}

/// The recipient address, as the client gave it, that reached `m`: the
/// first RCPT whose route includes it. A mailbox not found there (a caller
/// that built its own list) is named by its original or own address.
fn recipient_of(envelope: &Envelope, m: &Mailbox) -> String {
    envelope
        .recipients
        .iter()
        .find(|r| r.route.mailboxes().iter().any(|x| x.address == m.address))
        .map(|r| r.address.clone())
        .or_else(|| m.original.clone())
        .unwrap_or_else(|| m.address.to_string())
}

/// One copy on its way.
struct Plan<'a> {
    copy: &'a Copy,
    target: Target,
    /// Size of the file in bytes: headers plus the body with LF endings.
    size: u64,
}

/// What a transaction has put on disk so far; dropped without
/// [`Staging::commit`], it removes all of it.
#[derive(Default)]
struct Staging {
    /// Files written in `tmp/`, with their `new/` directory and name.
    tmp: Vec<(PathBuf, PathBuf, String)>,
    /// Links made in `new/`.
    linked: Vec<PathBuf>,
    committed: bool,
}

impl Staging {
    fn commit(mut self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        self.committed = true;
        let tmp = self.tmp.drain(..).map(|(t, _, _)| t).collect();
        (tmp, std::mem::take(&mut self.linked))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut dirs: Vec<&Path> = Vec::new();
        for path in &self.linked {
            remove_logged(path);
            dirs.extend(path.parent());
        }
        // A link in a new/ that did get fsynced must not come back after a
        // crash: make the removals durable too.
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            if let Err(e) = maildir::fsync_dir(dir) {
                tracing::error!(path = %dir.display(), error = %e, "fsync after removing a partial delivery");
            }
        }
        for (path, _, _) in &self.tmp {
            remove_logged(path);
        }
    }
}

fn remove_logged(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::error!(path = %path.display(), error = %e, "could not remove a partial delivery");
    }
}

impl Inner {
    /// Where a mailbox's copy goes; an error for an unsafe path.
    fn target(&self, m: &Mailbox, junk: bool) -> io::Result<Target> {
        let folder = match &m.tag {
            _ if junk => Some(JUNK.to_string()),
            Some(tag) if self.subaddress_folders => maildir::folder_name(tag),
            _ => None,
        };
        Target::new(&self.root, &m.address.domain, &m.address.local, folder)
    }

    /// What a sync task that panicked reports: the delivery fails (451).
    fn panicked(&self) -> PathError {
        (
            self.root.clone(),
            io::Error::other("a delivery sync task panicked"),
        )
    }

    /// The blocking body of [`Maildirs::deliver`].
    fn deliver(
        self: &Arc<Self>,
        spool: &Spool,
        copies: &[Copy],
        commit: Option<Commit>,
    ) -> Result<Delivered, DeliveryError> {
        let body = spool.len() - spool.crlf_count();
        let mut plans = Vec::with_capacity(copies.len());
        for copy in copies {
            let a = &copy.mailbox.address;
            let target = self
                .target(&copy.mailbox, copy.junk)
                .map_err(|e| DeliveryError::io((self.root.join(&a.domain).join(&a.local), e)))?;
            let size = copy.headers.len() as u64 + body;
            plans.push(Plan { copy, target, size });
        }

        for p in &plans {
            maildir::ensure(&self.root, &p.target, &self.known).map_err(DeliveryError::io)?;
        }

        for p in plans.iter().filter(|p| p.copy.mailbox.quota > 0) {
            let quota = p.copy.mailbox.quota;
            let used = quota::usage(&p.target.mailbox, quota, &self.names)
                .map_err(|e| DeliveryError::io((p.target.mailbox.join(quota::MAILDIRSIZE), e)))?;
            if used.saturating_add(p.size) > quota {
                let mailbox = p.copy.mailbox.address.to_string();
                tracing::info!(
                    mailbox,
                    used,
                    size = p.size,
                    quota,
                    "over quota; nothing delivered"
                );
                return Err(DeliveryError::QuotaExceeded { mailbox });
            }
        }

        let mut staging = Staging::default();
        let mut buf = Vec::new();
        let mut syncs: Vec<Task> = Vec::with_capacity(plans.len());
        for p in &plans {
            let (tmp, name, file) = self.stage(p, spool, &mut buf).map_err(DeliveryError::io)?;
            let path = tmp.clone();
            // fdatasync: a new file's size is part of what it flushes.
            syncs.push(Box::new(move || file.sync_data().map_err(|e| (path, e))));
            staging
                .tmp
                .push((tmp, p.target.maildir().join("new"), name));
        }
        // Every copy is durable in tmp/ before any is linked into new/.
        for r in self.parallel.run(syncs) {
            r.unwrap_or_else(|_| Err(self.panicked()))
                .map_err(DeliveryError::io)?;
        }

        for (i, (tmp, new_dir, name)) in staging.tmp.iter().enumerate() {
            let linked = match maildir::link_new(tmp, new_dir, name, plans[i].size, &self.names) {
                Err((_, e)) if e.kind() == io::ErrorKind::NotFound => {
                    // new/ vanished under us; make it again, once.
                    self.known.forget(&plans[i].target.maildir());
                    maildir::ensure(&self.root, &plans[i].target, &self.known).and_then(|()| {
                        maildir::link_new(tmp, new_dir, name, plans[i].size, &self.names)
                    })
                }
                r => r,
            };
            staging.linked.push(linked.map_err(DeliveryError::io)?);
        }

        let mut new_dirs: Vec<PathBuf> = staging.tmp.iter().map(|(_, d, _)| d.clone()).collect();
        new_dirs.sort();
        new_dirs.dedup();
        let syncs: Vec<Task> = new_dirs
            .into_iter()
            .map(|dir| {
                let me = self.clone();
                Box::new(move || me.dir_syncs.sync(&dir).map_err(|e| (dir, e))) as Task
            })
            .collect();
        for r in self.parallel.run(syncs) {
            r.unwrap_or_else(|_| Err(self.panicked()))
                .map_err(DeliveryError::io)?;
        }

        // The copies are durable; the other part of the delivery commits
        // now, or the staging's drop takes every copy back out of new/.
        if let Some(commit) = commit {
            crate::blocking::allowed(commit)
                .map_err(|e| DeliveryError::io((self.root.clone(), e)))?;
        }

        // Durable. From here on nothing may fail the transaction.
        let (tmp, paths) = staging.commit();
        for t in &tmp {
            if let Err(e) = std::fs::remove_file(t) {
                tracing::warn!(path = %t.display(), error = %e, "could not remove the tmp name of a delivered copy");
            }
        }
        // Only mailboxes with a quota keep `maildirsize` (the directory feeds
        // Dovecot's quota too); probing it for the others is a wasted open.
        for p in plans.iter().filter(|p| p.copy.mailbox.quota > 0) {
            quota::record(&p.target.mailbox, p.size);
        }
        Ok(Delivered { paths })
    }

    /// Writes one copy into `tmp/`; returns its path, its name and the file,
    /// still to be synced. If `tmp/` vanished since we last looked, makes it
    /// again, once.
    fn stage(
        &self,
        p: &Plan<'_>,
        spool: &Spool,
        buf: &mut Vec<u8>,
    ) -> Result<(PathBuf, String, File), PathError> {
        let maildir = p.target.maildir();
        for attempt in 0..2 {
            let name = self.names.next(p.size);
            let tmp = maildir.join("tmp").join(&name);
            match maildir::write_copy(&tmp, &p.copy.headers, spool, buf) {
                Ok((file, n)) if n == p.size => return Ok((tmp, name, file)),
                Ok((_, n)) => {
                    let _ = std::fs::remove_file(&tmp);
                    let msg = format!("wrote {n} bytes, expected {}: the spool changed", p.size);
                    return Err((tmp, io::Error::new(io::ErrorKind::InvalidData, msg)));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                    self.known.forget(&maildir);
                    maildir::ensure(&self.root, &p.target, &self.known)?;
                }
                Err(e) => return Err((tmp, e)),
            }
        }
        unreachable!("the second attempt returns")
    }
}
