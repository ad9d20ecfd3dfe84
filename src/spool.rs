//! Where a message's content waits between DATA and delivery: memory up to
//! a threshold, then an unlinked temporary file on the maildir root's
//! filesystem, so a large message never sits whole in memory.
//!
//! The content is stored in canonical form: lines end in CRLF and dots are
//! already unstuffed. Delivery converts line endings as it copies.
//!
//! Writing needs `&mut self` (one session fills it); once finished, a spool
//! is read through `&self` with positional reads, so delivery can share it
//! as `Arc<Spool>` with blocking threads.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;

/// The content of one message being received.
#[derive(Debug)]
pub struct Spool {
    /// The content while it is small; empty once it moved to `file`.
    memory: Vec<u8>,
    /// The unlinked file holding the content past `memory_limit`.
    file: Option<std::fs::File>,
    len: u64,
    /// CRLF pairs in the content, counted as it is written, so delivery
    /// knows the size of an LF copy (`len - crlf`) without reading it twice.
    crlf: u64,
    /// Whether the last byte written was CR, for a CRLF split across writes.
    ends_in_cr: bool,
    /// Bytes kept in memory before moving to a file.
    memory_limit: usize,
    /// Directory for the file; None keeps everything in memory (the sink's
    /// rule: its messages never touch the disk).
    dir: Option<PathBuf>,
}

impl Spool {
    /// A spool that moves to a file in `dir` past `memory_limit` bytes, or
    /// never if `dir` is None.
    pub fn new(memory_limit: usize, dir: Option<PathBuf>) -> Spool {
        Spool {
            memory: Vec::new(),
            file: None,
            len: 0,
            crlf: 0,
            ends_in_cr: false,
            memory_limit,
            dir,
        }
    }

    /// Another handle on the same content, for a reader on another thread
    /// (the blocking pool): a file spool shares its file through a new
    /// descriptor, a memory spool is copied.
    pub fn try_clone(&self) -> io::Result<Spool> {
        Ok(Spool {
            memory: self.memory.clone(),
            file: self
                .file
                .as_ref()
                .map(std::fs::File::try_clone)
                .transpose()?,
            len: self.len,
            crlf: self.crlf,
            ends_in_cr: self.ends_in_cr,
            memory_limit: self.memory_limit,
            dir: self.dir.clone(),
        })
    }

    /// A new, empty spool with the same memory limit and directory.
    pub fn empty_like(&self) -> Spool {
        Spool::new(self.memory_limit, self.dir.clone())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many CRLF pairs the content holds: converting every CRLF to LF
    /// gives `len() - crlf_count()` bytes.
    pub fn crlf_count(&self) -> u64 {
        self.crlf
    }

    /// Whether the content has moved to disk.
    pub fn on_disk(&self) -> bool {
        self.file.is_some()
    }

    /// Whether appending `n` more bytes writes to a file, which blocks.
    pub fn would_block(&self, n: usize) -> bool {
        self.file.is_some() || (self.dir.is_some() && self.memory.len() + n > self.memory_limit)
    }

    /// Appends content. When [`Spool::would_block`] says so this writes a
    /// file: callers on the async runtime go through
    /// [`crate::blocking::run`] then.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.would_block(data.len()) {
            crate::blocking::assert_off_runtime("writing a spool file");
        }
        match &mut self.file {
            Some(f) => f.write_all(data)?,
            None => self.memory.extend_from_slice(data),
        }
        // Counted once the bytes are stored, so the counters describe what
        // is there even if moving to a file fails below.
        self.len += data.len() as u64;
        if self.ends_in_cr && data[0] == b'\n' {
            self.crlf += 1;
        }
        self.crlf += data.windows(2).filter(|w| w == b"\r\n").count() as u64;
        self.ends_in_cr = data[data.len() - 1] == b'\r';
        if self.file.is_none()
            && self.memory.len() > self.memory_limit
            && let Some(dir) = &self.dir
        {
            let mut f = tempfile::tempfile_in(dir)?;
            f.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.file = Some(f);
        }
        Ok(())
    }

    /// A second handle on the spool file, for reading it on another
    /// thread while the spool stays borrowed here; an error when the
    /// content is in memory (read it with [`Spool::as_memory`]).
    pub fn duplicate_file(&self) -> io::Result<std::fs::File> {
        match &self.file {
            Some(f) => f.try_clone(),
            None => Err(io::Error::other("the spool is in memory")),
        }
    }

    /// The whole content, if it is in memory.
    pub fn as_memory(&self) -> Option<&[u8]> {
        self.file.is_none().then_some(self.memory.as_slice())
    }

    /// The content as shared bytes, reading it back if on disk. For the
    /// sink, whose spools never go to disk, this is a move.
    pub fn to_bytes(&mut self) -> io::Result<Bytes> {
        match &self.file {
            None => Ok(Bytes::from(std::mem::take(&mut self.memory))),
            Some(_) => {
                let mut buf = Vec::with_capacity(self.len as usize);
                self.reader().read_to_end(&mut buf)?;
                Ok(Bytes::from(buf))
            }
        }
    }

    /// Reads content at `offset` into `buf`; returns how many bytes, 0 at
    /// the end. Positional, so any number of readers may share the spool.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let want = buf
            .len()
            .min((self.len - offset).min(usize::MAX as u64) as usize);
        match &self.file {
            None => {
                let start = offset as usize;
                buf[..want].copy_from_slice(&self.memory[start..start + want]);
                Ok(want)
            }
            Some(f) => loop {
                match f.read_at(&mut buf[..want], offset) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(0) if want > 0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "spool file shorter than its content",
                        ));
                    }
                    r => return r,
                }
            },
        }
    }

    /// A second descriptor of the spool's file, or None while the content
    /// is in memory: for positional reads on the blocking pool by code that
    /// holds the spool only by reference (the pool needs owned values).
    /// Duplicating a descriptor does not block.
    pub fn try_clone_file(&self) -> io::Result<Option<std::fs::File>> {
        self.file.as_ref().map(std::fs::File::try_clone).transpose()
    }

    /// A reader over the whole content from its start; independent of any
    /// other reader.
    pub fn reader(&self) -> SpoolReader<'_> {
        SpoolReader {
            spool: self,
            pos: 0,
        }
    }
}

/// A [`Read`] over a spool's content, by positional reads.
#[derive(Debug)]
pub struct SpoolReader<'a> {
    spool: &'a Spool,
    pos: u64,
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.spool.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_to_disk_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new(8, Some(dir.path().to_path_buf()));
        s.write(b"hello").unwrap();
        assert!(!s.on_disk());
        s.write(b" world\r\n").unwrap();
        assert!(s.on_disk());
        let mut out = String::new();
        s.reader().read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello world\r\n");
        assert_eq!(s.len(), 13);
        // unlinked: nothing visible in the directory
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn memory_only_never_touches_disk() {
        let mut s = Spool::new(4, None);
        s.write(b"0123456789").unwrap();
        assert!(!s.on_disk());
        assert_eq!(&s.to_bytes().unwrap()[..], b"0123456789");
    }

    #[test]
    fn shared_readers_read_independently_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new(2, Some(dir.path().to_path_buf()));
        s.write(b"abcdef").unwrap();
        let s = std::sync::Arc::new(s);
        let mut a = s.reader();
        let mut one = [0u8; 2];
        a.read_exact(&mut one).unwrap();
        let mut all = Vec::new();
        s.reader().read_to_end(&mut all).unwrap();
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).unwrap();
        assert_eq!(
            (&one[..], &all[..], &rest[..]),
            (&b"ab"[..], &b"abcdef"[..], &b"cdef"[..])
        );
        let mut buf = [0u8; 8];
        assert_eq!(s.read_at(&mut buf, 4).unwrap(), 2);
        assert_eq!(s.read_at(&mut buf, 6).unwrap(), 0);
    }

    #[test]
    fn counts_crlf_pairs_across_writes() {
        let mut s = Spool::new(1 << 20, None);
        for chunk in [&b"a\r"[..], b"\nb\rc\n\r", b"\n", b"\r\n\r\n", b"\r"] {
            s.write(chunk).unwrap();
        }
        // "a\r\nb\rc\n\r\n\r\n\r\n\r": CRLF at 1, 6, 8, 10; lone CR at 3 and at the end.
        assert_eq!(s.crlf_count(), 4);
    }
}
