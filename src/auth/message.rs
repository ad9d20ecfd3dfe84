//! The received message as DKIM, ARC and DMARC need it: its bytes and
//! `mail-auth`'s parse of them, held together.
//!
//! Parsing hashes the body for every signature, work proportional to the
//! size of the message, so a large message (or one spooled to disk, whose
//! reads block) is read and parsed on the blocking pool; verification, which
//! waits on DNS, then runs on the runtime against the parse. A [`Yoke`]
//! keeps the parse beside the bytes it borrows from, so the two can move
//! between threads together.

use std::io::{self, Read};

use mail_auth::AuthenticatedMessage;
use yoke::{Yoke, Yokeable};

use crate::spool::Spool;

/// Messages up to this size, in memory, are parsed on the runtime: hashing
/// them takes well under a millisecond.
pub const INLINE_LIMIT: u64 = 128 * 1024;

/// `mail-auth`'s parse; None when it found no header at all.
#[derive(Yokeable)]
pub struct Parsed<'a>(pub Option<AuthenticatedMessage<'a>>);

/// The message's bytes and their parse.
pub type Message = Yoke<Parsed<'static>, Vec<u8>>;

fn parse(bytes: Vec<u8>) -> Message {
    if bytes.len() as u64 > INLINE_LIMIT {
        crate::blocking::assert_off_runtime("parsing a large message for DKIM");
    }
    Yoke::attach_to_cart(bytes, |b| Parsed(AuthenticatedMessage::parse(b)))
}

/// Reads and parses the content, off the runtime unless it is small and
/// in memory.
pub async fn load(spool: &Spool) -> io::Result<Message> {
    if let Some(bytes) = spool.as_memory()
        && spool.len() <= INLINE_LIMIT
    {
        return Ok(parse(bytes.to_vec()));
    }
    let spool = spool.try_clone()?;
    crate::blocking::run("parsing a message for DKIM", move || {
        let bytes = match spool.as_memory() {
            Some(b) => b.to_vec(),
            None => {
                crate::blocking::assert_off_runtime("reading a spool file");
                let mut b = Vec::with_capacity(spool.len() as usize);
                spool.reader().read_to_end(&mut b)?;
                b
            }
        };
        Ok(parse(bytes))
    })
    .await
    .map_err(io::Error::other)?
}

/// The header section of the content (every field, up to the empty line),
/// read off the runtime when the content is on disk: for when nothing
/// needs the whole message parsed.
pub async fn head(spool: &Spool) -> io::Result<Vec<u8>> {
    if let Some(bytes) = spool.as_memory() {
        return Ok(header_of(bytes).to_vec());
    }
    let spool = spool.try_clone()?;
    crate::blocking::run("reading a message's header", move || {
        crate::blocking::assert_off_runtime("reading a spool file");
        let mut head = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0;
        loop {
            let n = spool.read_at(&mut buf, offset)?;
            head.extend_from_slice(&buf[..n]);
            offset += n as u64;
            let end = header_of(&head).len();
            if n == 0 || end < head.len() || head.len() > crate::pipeline::edit::MAX_HEADER {
                head.truncate(end);
                return Ok(head);
            }
        }
    })
    .await
    .map_err(io::Error::other)?
}

/// The header section of `message`: up to and including the CRLF that
/// ends the last field, before the empty line; all of it when there is
/// no empty line (as `pipeline::edit` reads it).
pub fn header_of(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_ends_at_the_empty_line() {
        assert_eq!(
            header_of(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"),
            b"A: 1\r\nB: 2\r\n"
        );
        assert_eq!(header_of(b"\r\nbody\r\n"), b"");
        assert_eq!(header_of(b"A: 1\r\n"), b"A: 1\r\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_message_on_disk_is_read_and_parsed_off_the_runtime() {
        // Reading the file asserts (debug builds) that it runs off the
        // runtime, so this fails if the hand-off goes.
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(16, Some(dir.path().to_path_buf()));
        let text = format!(
            "From: a@example.org\r\nSubject: s\r\n\r\n{}",
            "line\r\n".repeat(100)
        );
        crate::blocking::allowed(|| spool.write(text.as_bytes())).unwrap();
        assert!(spool.on_disk());
        let message = load(&spool).await.unwrap();
        let parsed = message.get().0.as_ref().unwrap();
        assert_eq!(parsed.from(), "a@example.org");
        assert_eq!(
            head(&spool).await.unwrap(),
            b"From: a@example.org\r\nSubject: s\r\n"
        );
    }
}
