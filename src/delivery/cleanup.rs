//! The `tmp/` sweeper. The maildir spec: a file left in `tmp/` for 36 hours
//! is debris of a delivery that died, and may be removed. Runs at startup;
//! walks `<root>/<domain>/<local>/tmp` and each folder's
//! `<root>/<domain>/<local>/.<folder>/tmp`. Dot entries at the root (the
//! spool directory) are not domains and are skipped.
//!
//! Age is the file's mtime: atime is unreliable under `noatime`/`relatime`.

use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Files in `tmp/` older than this are removed (maildir spec).
pub(crate) const TMP_MAX_AGE: Duration = Duration::from_secs(36 * 3600);

/// Removes stale files from every `tmp/` under `root`; returns how many.
/// Fails only if the root cannot be read; trouble further down is logged.
pub(crate) fn clean_tmp(root: &Path, now: SystemTime) -> io::Result<usize> {
    let mut removed = 0;
    for domain in subdirs(root)? {
        let Ok(mailboxes) = subdirs(&domain).inspect_err(|e| warn(&domain, e)) else {
            continue;
        };
        for mailbox in mailboxes {
            removed += sweep(&mailbox.join("tmp"), now);
            let Ok(folders) = std::fs::read_dir(&mailbox).inspect_err(|e| warn(&mailbox, e)) else {
                continue;
            };
            for entry in folders.flatten() {
                let name = entry.file_name();
                let name = name.as_encoded_bytes();
                if name.len() > 1
                    && name[0] == b'.'
                    && name != b".."
                    && entry.file_type().is_ok_and(|t| t.is_dir())
                {
                    removed += sweep(&entry.path().join("tmp"), now);
                }
            }
        }
    }
    Ok(removed)
}

/// Directories directly inside `dir` whose names do not start with a dot.
fn subdirs(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().as_encoded_bytes().starts_with(b".") && entry.file_type()?.is_dir() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Removes old regular files in one `tmp/`.
fn sweep(tmp: &Path, now: SystemTime) -> usize {
    let entries = match std::fs::read_dir(tmp) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(e) => {
            warn(tmp, &e);
            return 0;
        }
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let Ok(md) = entry.metadata() else { continue };
        let old = md
            .modified()
            .is_ok_and(|m| now.duration_since(m).is_ok_and(|age| age > TMP_MAX_AGE));
        if md.is_file() && old {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => warn(&entry.path(), &e),
            }
        }
    }
    if removed > 0 {
        tracing::info!(dir = %tmp.display(), removed, "removed stale files from maildir tmp");
    }
    removed
}

fn warn(path: &Path, e: &io::Error) {
    tracing::warn!(path = %path.display(), errno = e.raw_os_error(), error = %e, "tmp cleanup");
}
