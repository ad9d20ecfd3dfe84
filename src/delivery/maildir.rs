//! Maildir mechanics: where a mailbox lives, unique file names, creating
//! the directories, and staging a copy in `tmp/` then linking it into
//! `new/`.
//!
//! Names follow <https://cr.yp.to/proto/maildir.html> with Dovecot's
//! additions: `<secs>.M<usec>P<pid>Q<n>.<host>,S=<size>`, where `S=` is the
//! file's size in bytes, which Dovecot trusts instead of a stat.

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::lf::LfConverter;
use crate::spool::Spool;

/// Mode of every directory we create: only the mail system reads mail.
const DIR_MODE: u32 = 0o700;
/// Mode of every file we create.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Copy buffer for spool → maildir.
const COPY_CHUNK: usize = 64 * 1024;
/// Longest `+tag` that becomes a folder name.
const MAX_FOLDER: usize = 64;

/// Refuses a path component that could leave the root or hide: empty,
/// `.`/`..` or any leading dot, `/` or NUL. Directory values have been
/// checked by `address.rs` already; this is defence in depth.
pub(crate) fn check_component(s: &str) -> io::Result<()> {
    if s.is_empty() || s.starts_with('.') || s.contains('/') || s.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsafe maildir path component {s:?}"),
        ));
    }
    Ok(())
}

/// The Maildir++ folder (without its leading dot) for a subaddress tag, or
/// None when the tag is not a safe folder name and mail goes to the INBOX.
///
/// Beyond the local-part rules (non-empty, ≤ 64 bytes, no `/`, no leading
/// dot, no `..`, no control characters) this also refuses a trailing dot
/// (an empty level in Maildir++'s dot hierarchy), non-ASCII and `&`: Dovecot
/// reads folder names as modified UTF-7, where those would not mean what
/// the sender wrote.
pub(crate) fn folder_name(tag: &str) -> Option<String> {
    let tag = tag.to_lowercase();
    let ok = !tag.is_empty()
        && tag.len() <= MAX_FOLDER
        && !tag.starts_with('.')
        && !tag.ends_with('.')
        && !tag.contains("..")
        && tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'&');
    ok.then_some(tag)
}

/// Where one copy goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The mailbox's own maildir (its INBOX): `<root>/<domain>/<local>`.
    /// `maildirsize` lives here, covering every folder.
    pub mailbox: PathBuf,
    /// The folder within it, without the leading dot; None for the INBOX.
    pub folder: Option<String>,
}

impl Target {
    pub(crate) fn new(
        root: &Path,
        domain: &str,
        local: &str,
        folder: Option<String>,
    ) -> io::Result<Target> {
        check_component(domain)?;
        check_component(local)?;
        Ok(Target {
            mailbox: root.join(domain).join(local),
            folder,
        })
    }

    /// The maildir the copy lands in: the INBOX or `.<folder>`.
    pub(crate) fn maildir(&self) -> PathBuf {
        match &self.folder {
            Some(f) => self.mailbox.join(format!(".{f}")),
            None => self.mailbox.clone(),
        }
    }
}

/// Process-wide counter for the `Q<n>` part of names: unique within this
/// process even within one microsecond.
static DELIVERIES: AtomicU64 = AtomicU64::new(0);

/// Makes unique file names for this host and process.
#[derive(Debug)]
pub(crate) struct Names {
    /// The hostname with `/` and `:` escaped, as the maildir spec says.
    host: String,
    pid: u32,
}

impl Names {
    pub(crate) fn new(hostname: &str) -> Names {
        Names {
            host: escape_host(hostname),
            pid: std::process::id(),
        }
    }

    /// A fresh name for a file of `size` bytes.
    pub(crate) fn next(&self, size: u64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let n = DELIVERIES.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}.M{}P{}Q{}.{},S={}",
            now.as_secs(),
            now.subsec_micros(),
            self.pid,
            n,
            self.host,
            size
        )
    }
}

/// `/` → `\057` and `:` → `\072`: the one would make a path, the other
/// starts a maildir flags suffix.
pub(crate) fn escape_host(host: &str) -> String {
    host.replace('/', "\\057").replace(':', "\\072")
}

/// The maildirs known to exist, so steady-state delivery makes no mkdir or
/// stat calls. An entry is dropped again when a create meets ENOENT.
#[derive(Debug, Default)]
pub(crate) struct KnownDirs {
    /// Never held across I/O, so a std mutex is right.
    set: Mutex<HashSet<PathBuf>>,
}

impl KnownDirs {
    fn contains(&self, p: &Path) -> bool {
        self.set.lock().unwrap().contains(p)
    }

    fn insert(&self, p: PathBuf) {
        self.set.lock().unwrap().insert(p);
    }

    pub(crate) fn forget(&self, p: &Path) {
        self.set.lock().unwrap().remove(p);
    }
}

/// A failed filesystem call and the path it was about.
pub(crate) type PathError = (PathBuf, io::Error);

fn at<T>(path: &Path, r: io::Result<T>) -> Result<T, PathError> {
    r.map_err(|e| (path.to_path_buf(), e))
}

/// Makes sure the target's maildir (and, for a folder, the INBOX too) has
/// `tmp`, `new` and `cur`, creating what is missing below `root` with mode
/// 0700. Every directory created is made durable by fsyncing its parent.
/// The root itself is never created here: a missing root is an error.
pub(crate) fn ensure(root: &Path, target: &Target, known: &KnownDirs) -> Result<(), PathError> {
    let maildir = target.maildir();
    if known.contains(&maildir) {
        return Ok(());
    }
    // Every parent in the chain is fsynced, not just those of directories
    // we created: another thread (or a process that crashed) may have made
    // one a moment ago without its entry being durable yet. This path runs
    // once per maildir per process, so the few extra fsyncs do not matter.
    let mut parents: Vec<PathBuf> = Vec::new();
    let mut mkdir = |p: &Path| -> Result<(), PathError> {
        at(p, mkdir_0700(p))?;
        parents.push(p.parent().unwrap_or(root).to_path_buf());
        Ok(())
    };
    let domain = target.mailbox.parent().unwrap_or(root);
    mkdir(domain)?;
    let mut maildirs = vec![target.mailbox.clone()];
    if target.folder.is_some() {
        maildirs.push(maildir.clone());
    }
    for m in &maildirs {
        mkdir(m)?;
        for sub in ["tmp", "new", "cur"] {
            mkdir(&m.join(sub))?;
        }
    }
    if target.folder.is_some() {
        // Dovecot's Maildir++ marks a folder with an empty `maildirfolder`.
        let marker = maildir.join("maildirfolder");
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&marker)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err((marker, e)),
        }
    }
    parents.sort();
    parents.dedup();
    for dir in &parents {
        at(dir, fsync_dir(dir))?;
    }
    known.insert(maildir);
    Ok(())
}

/// Creates one directory unless a directory is already there; an error if
/// something else is.
fn mkdir_0700(p: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(DIR_MODE).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if std::fs::metadata(p)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::ENOTDIR))
            }
        }
        Err(e) => Err(e),
    }
}

/// fsync on a directory makes its entries (creations, links) durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `tmp/<name>` exclusively (mode 0600) and writes `headers`
/// (already LF) and the spool converted to LF. Returns the open file, not
/// yet synced (the caller fdatasyncs the copies of a transaction together),
/// and its size. On error nothing is left behind.
pub(crate) fn write_copy(
    path: &Path,
    headers: &[u8],
    spool: &Spool,
    buf: &mut Vec<u8>,
) -> io::Result<(File, u64)> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    match fill(&mut file, headers, spool, buf) {
        Ok(n) => Ok((file, n)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

fn fill(file: &mut File, headers: &[u8], spool: &Spool, buf: &mut Vec<u8>) -> io::Result<u64> {
    buf.clear();
    buf.extend_from_slice(headers);
    let mut conv = LfConverter::default();
    let mut written = 0u64;
    let mut push = |piece: &[u8], buf: &mut Vec<u8>| -> io::Result<()> {
        conv.push(piece, buf);
        if buf.len() >= COPY_CHUNK {
            file.write_all(buf)?;
            written += buf.len() as u64;
            buf.clear();
        }
        Ok(())
    };
    if let Some(content) = spool.as_memory() {
        // Read in place: a copy buffer per concurrent delivery is memory
        // that a 100-session load multiplies.
        for piece in content.chunks(COPY_CHUNK) {
            push(piece, buf)?;
        }
    } else {
        let mut chunk = vec![0u8; COPY_CHUNK];
        let mut offset = 0u64;
        loop {
            let n = spool.read_at(&mut chunk, offset)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            push(&chunk[..n], buf)?;
        }
    }
    conv.finish(buf);
    file.write_all(buf)?;
    written += buf.len() as u64;
    buf.clear();
    Ok(written)
}

/// Links a staged file into `new/` under `name`, choosing a fresh name from
/// `names` while one is taken. Returns the final path.
pub(crate) fn link_new(
    tmp: &Path,
    new_dir: &Path,
    name: &str,
    size: u64,
    names: &Names,
) -> Result<PathBuf, PathError> {
    let mut dest = new_dir.join(name);
    for _ in 0..8 {
        match std::fs::hard_link(tmp, &dest) {
            Ok(()) => return Ok(dest),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::warn!(path = %dest.display(), "maildir name taken; choosing another");
                dest = new_dir.join(names.next(size));
            }
            Err(e) => return Err((dest, e)),
        }
    }
    Err((
        dest,
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free maildir name after 8 tries",
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_components_are_refused() {
        for ok in ["alice", "example.org", "first.last", "jörg", "a+b"] {
            assert!(check_component(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "/abs", "a\0b", "../x"] {
            assert!(check_component(bad).is_err(), "{bad:?}");
        }
        assert!(Target::new(Path::new("/r"), "..", "alice", None).is_err());
        assert!(Target::new(Path::new("/r"), "example.org", "a/b", None).is_err());
        let t = Target::new(
            Path::new("/r"),
            "example.org",
            "alice",
            Some("lists".into()),
        )
        .unwrap();
        assert_eq!(t.maildir(), Path::new("/r/example.org/alice/.lists"));
        assert_eq!(t.mailbox, Path::new("/r/example.org/alice"));
    }

    #[test]
    fn folder_names() {
        assert_eq!(folder_name("Lists").as_deref(), Some("lists"));
        assert_eq!(folder_name("a.b").as_deref(), Some("a.b"));
        assert_eq!(
            folder_name(&"x".repeat(64)).as_deref(),
            Some("x".repeat(64).as_str())
        );
        for bad in [
            "",
            ".x",
            "x.",
            "a..b",
            "a/b",
            "a\0b",
            "a\tb",
            "a b",
            "caf\u{e9}",
            "a&b",
            "\u{7f}",
        ] {
            assert_eq!(folder_name(bad), None, "{bad:?}");
        }
        assert_eq!(folder_name(&"x".repeat(65)), None);
    }

    #[test]
    fn host_escaping() {
        assert_eq!(escape_host("mx.example.org"), "mx.example.org");
        assert_eq!(escape_host("a/b:c"), "a\\057b\\072c");
    }

    #[test]
    fn names_are_unique_and_well_formed() {
        let names = Names::new("mx/1:2");
        let a = names.next(42);
        let b = names.next(42);
        assert_ne!(a, b);
        let (secs, rest) = a.split_once(".M").unwrap();
        assert!(secs.parse::<u64>().unwrap() > 1_600_000_000);
        let (usec, rest) = rest.split_once('P').unwrap();
        assert!(usec.parse::<u32>().unwrap() < 1_000_000);
        let (pid, rest) = rest.split_once('Q').unwrap();
        assert_eq!(pid.parse::<u32>().unwrap(), std::process::id());
        let (q, rest) = rest.split_once('.').unwrap();
        q.parse::<u64>().unwrap();
        assert_eq!(rest, "mx\\0571\\0722,S=42");
        assert!(!a.contains(':') && !a.contains('/'));
    }

    #[test]
    fn a_taken_name_in_new_gets_another() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, new) = (dir.path().join("tmp"), dir.path().join("new"));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::create_dir(&new).unwrap();
        std::fs::write(tmp.join("n"), "mine").unwrap();
        std::fs::write(new.join("n"), "someone else's").unwrap();
        let names = Names::new("h");
        let got = link_new(&tmp.join("n"), &new, "n", 4, &names).unwrap();
        assert_ne!(got, new.join("n"));
        assert!(got.to_str().unwrap().ends_with(".h,S=4"));
        assert_eq!(std::fs::read(&got).unwrap(), b"mine");
        assert_eq!(std::fs::read(new.join("n")).unwrap(), b"someone else's");
    }

    #[test]
    fn copies_are_lf_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(4, Some(dir.path().to_path_buf()));
        // Chunks of the spool file meet in the middle of a CRLF.
        let mut body = b"x".repeat(COPY_CHUNK - 1);
        body.extend_from_slice(b"\r\nend\r\n");
        spool.write(&body).unwrap();
        let path = dir.path().join("copy");
        let mut buf = Vec::new();
        let (_, n) = write_copy(&path, b"H: v\n", &spool, &mut buf).unwrap();
        let mut want = b"H: v\n".to_vec();
        want.extend_from_slice(&b"x".repeat(COPY_CHUNK - 1));
        want.extend_from_slice(b"\nend\n");
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(n, want.len() as u64);
        assert_eq!(n, 5 + spool.len() - spool.crlf_count());
        assert!(write_copy(&path, b"", &spool, &mut buf).is_err(), "O_EXCL");
    }
}
