//! Where a message's content waits between DATA and delivery: memory up to
//! a threshold, then an unlinked temporary file on the maildir root's
//! filesystem, so a large message never sits whole in memory.
//!
//! The content is stored in canonical form: lines end in CRLF and dots are
//! already unstuffed. Delivery converts line endings as it copies.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use bytes::Bytes;

/// The content of one message being received.
#[derive(Debug)]
pub struct Spool {
    memory: Vec<u8>,
    file: Option<std::fs::File>,
    len: u64,
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
            memory_limit,
            dir,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the content has moved to disk.
    pub fn on_disk(&self) -> bool {
        self.file.is_some()
    }

    /// Appends content. When the memory limit is crossed this writes a file,
    /// which blocks: callers on the async runtime pass large chunks through
    /// `tokio::task::block_in_place` or accept the short stall, as the
    /// session does once per large message.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.len += data.len() as u64;
        if let Some(f) = &mut self.file {
            return f.write_all(data);
        }
        self.memory.extend_from_slice(data);
        if self.memory.len() > self.memory_limit {
            if let Some(dir) = &self.dir {
                let mut f = tempfile::tempfile_in(dir)?;
                f.write_all(&self.memory)?;
                self.memory = Vec::new();
                self.file = Some(f);
            }
        }
        Ok(())
    }

    /// The whole content, if it is in memory.
    pub fn as_memory(&self) -> Option<&[u8]> {
        self.file.is_none().then_some(self.memory.as_slice())
    }

    /// The content as shared bytes, reading it back if on disk. For the
    /// sink, whose spools never go to disk, this is a move.
    pub fn to_bytes(&mut self) -> io::Result<Bytes> {
        match &mut self.file {
            None => Ok(Bytes::from(std::mem::take(&mut self.memory))),
            Some(f) => {
                let mut buf = Vec::with_capacity(self.len as usize);
                f.seek(SeekFrom::Start(0))?;
                f.read_to_end(&mut buf)?;
                Ok(Bytes::from(buf))
            }
        }
    }

    /// A reader over the whole content from its start.
    pub fn reader(&mut self) -> io::Result<Box<dyn Read + Send + '_>> {
        match &mut self.file {
            None => Ok(Box::new(self.memory.as_slice())),
            Some(f) => {
                f.seek(SeekFrom::Start(0))?;
                Ok(Box::new(io::BufReader::with_capacity(64 * 1024, f)))
            }
        }
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
        s.reader().unwrap().read_to_string(&mut out).unwrap();
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
}
