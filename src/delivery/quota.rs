//! Quota against Maildir++'s `maildirsize`, the file Dovecot's quota plugin
//! (driver `maildir`) keeps too, so both see the same usage.
//!
//! The file's first line defines the quota (`<bytes>S`, maybe `,<n>C`);
//! every further line is a delta `<bytes> <count>` (either may be
//! negative). Usage is the sum. When the file is missing, unreadable, over
//! 5120 bytes, or defines another quota than the directory's, usage is
//! recounted from the maildirs and the file rewritten (Maildir++ rules).
//! The file is advisory: it is never fsynced.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::maildir::{FILE_MODE, Names};

/// The file's name inside the mailbox's own maildir.
pub(crate) const MAILDIRSIZE: &str = "maildirsize";
/// Maildir++: past this size the file is recalculated, which bounds it.
const MAX_FILE: u64 = 5120;

/// What a `maildirsize` file says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The byte quota on the first line, if it defines one.
    pub quota: Option<u64>,
    /// Sum of the byte deltas.
    pub bytes: i64,
    /// Sum of the message-count deltas.
    pub count: i64,
}

/// Parses a `maildirsize` file; None when it is malformed (so it is
/// recalculated rather than trusted).
pub(crate) fn parse(text: &str) -> Option<Parsed> {
    let mut lines = text.lines();
    let def = lines.next()?;
    let mut quota = None;
    for part in def.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(n) = part.strip_suffix('S') {
            quota = Some(n.parse().ok()?);
        } else if part.strip_suffix('C')?.parse::<u64>().is_err() {
            return None;
        }
    }
    let (mut bytes, mut count) = (0i64, 0i64);
    for line in lines {
        let mut f = line.split_whitespace();
        match (f.next(), f.next(), f.next()) {
            (None, _, _) => continue,
            (Some(b), Some(c), None) => {
                bytes = bytes.checked_add(b.parse().ok()?)?;
                count = count.checked_add(c.parse().ok()?)?;
            }
            _ => return None,
        }
    }
    Some(Parsed {
        quota,
        bytes,
        count,
    })
}

/// Bytes used by the mailbox at `mailbox` (all folders), for a quota of
/// `quota` bytes. Reads `maildirsize`, recounting and rewriting it when it
/// cannot be trusted. A mailbox that does not exist yet uses nothing.
pub(crate) fn usage(mailbox: &Path, quota: u64, names: &Names) -> io::Result<u64> {
    let path = mailbox.join(MAILDIRSIZE);
    match std::fs::File::open(&path) {
        Ok(mut f) => {
            let mut text = String::new();
            if f.metadata()?.len() <= MAX_FILE
                && f.read_to_string(&mut text).is_ok()
                && let Some(p) = parse(&text).filter(|p| p.quota == Some(quota))
            {
                return Ok(p.bytes.max(0) as u64);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let (bytes, count) = match recount(mailbox) {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if let Err(e) = rewrite(mailbox, quota, bytes, count, names) {
        tracing::warn!(path = %path.display(), error = %e, "could not rewrite maildirsize");
    }
    Ok(bytes)
}

/// Sums sizes and counts messages in `new/` and `cur/` of the mailbox and
/// of each of its Maildir++ folders (`.name/`). Sizes come from `,S=` in
/// the name when present, else from a stat.
pub(crate) fn recount(mailbox: &Path) -> io::Result<(u64, u64)> {
    let mut total = (0u64, 0u64);
    let mut maildirs = vec![mailbox.to_path_buf()];
    for entry in std::fs::read_dir(mailbox)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        if name.len() > 1 && name[0] == b'.' && name != b".." && entry.file_type()?.is_dir() {
            maildirs.push(entry.path());
        }
    }
    for m in maildirs {
        for sub in ["new", "cur"] {
            let dir = match std::fs::read_dir(m.join(sub)) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in dir {
                let entry = entry?;
                let size = match size_from_name(&entry.file_name().to_string_lossy()) {
                    Some(s) => s,
                    // Dovecot may move new/ → cur/ while we look.
                    None => match entry.metadata() {
                        Ok(md) => md.len(),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    },
                };
                total.0 += size;
                total.1 += 1;
            }
        }
    }
    Ok(total)
}

/// The `S=<size>` field of a maildir name, in the part before `:2,` flags.
pub(crate) fn size_from_name(name: &str) -> Option<u64> {
    let base = name.split(':').next()?;
    base.split(',')
        .skip(1)
        .find_map(|f| f.strip_prefix("S=")?.parse().ok())
}

/// Writes a fresh `maildirsize` the Maildir++ way: into `tmp/`, then
/// renamed over the old one.
fn rewrite(mailbox: &Path, quota: u64, bytes: u64, count: u64, names: &Names) -> io::Result<()> {
    let text = format!("{quota}S\n{bytes} {count}\n");
    let tmp = mailbox.join("tmp").join(names.next(text.len() as u64));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)?;
    let r = f
        .write_all(text.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, mailbox.join(MAILDIRSIZE)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Records a delivered message of `size` bytes, if the mailbox has a
/// `maildirsize`. One small O_APPEND write, so concurrent appends do not
/// interleave.
pub(crate) fn record(mailbox: &Path, size: u64) {
    let path = mailbox.join(MAILDIRSIZE);
    let r = OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{size} 1\n").as_bytes()));
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not update maildirsize")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_definition_and_deltas() {
        assert_eq!(
            parse("1000S\n100 1\n-40 -1\n  25   1 \n\n").unwrap(),
            Parsed {
                quota: Some(1000),
                bytes: 85,
                count: 1
            }
        );
        assert_eq!(parse("5000S,10C\n1 1\n").unwrap().quota, Some(5000));
        assert_eq!(parse("10C\n").unwrap().quota, None);
        assert_eq!(
            parse("\n7 1\n").unwrap(),
            Parsed {
                quota: None,
                bytes: 7,
                count: 1
            }
        );
        for bad in [
            "",
            "1000X\n",
            "1000S\n1\n",
            "1000S\nx 1\n",
            "1000S\n1 2 3\n",
            "abcS\n",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sizes_from_names() {
        assert_eq!(size_from_name("1.M2P3Q4.host,S=1234"), Some(1234));
        assert_eq!(
            size_from_name("1.M2P3Q4.host,S=1234,W=1300:2,S"),
            Some(1234)
        );
        assert_eq!(size_from_name("1.M2P3Q4.host,W=10,S=99:2,"), Some(99));
        assert_eq!(size_from_name("1.M2P3Q4.host:2,S"), None);
        assert_eq!(size_from_name("1.M2P3Q4.host"), None);
    }

    #[test]
    fn recounts_all_folders_and_writes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        for d in ["tmp", "new", "cur", ".lists/new", ".lists/cur"] {
            std::fs::create_dir_all(m.join(d)).unwrap();
        }
        std::fs::write(m.join("new/1.M1P1Q1.h,S=100"), "ignored").unwrap();
        std::fs::write(m.join("cur/2.M1P1Q1.h:2,S"), "12345").unwrap();
        std::fs::write(m.join(".lists/cur/3.M1P1Q1.h,S=20:2,"), "").unwrap();
        std::fs::write(m.join("tmp/4.M1P1Q1.h,S=999"), "").unwrap();
        let names = Names::new("h");
        assert_eq!(usage(m, 1000, &names).unwrap(), 125);
        assert_eq!(
            std::fs::read_to_string(m.join(MAILDIRSIZE)).unwrap(),
            "1000S\n125 3\n"
        );
        record(m, 10);
        assert_eq!(usage(m, 1000, &names).unwrap(), 135);
        // Another quota definition means recount.
        assert_eq!(usage(m, 2000, &names).unwrap(), 125);
        assert_eq!(
            std::fs::read_to_string(m.join(MAILDIRSIZE)).unwrap(),
            "2000S\n125 3\n"
        );
        assert_eq!(usage(&m.join("absent"), 1000, &names).unwrap(), 0);
    }
}
