//! Changes a check asks for in the message itself: header fields added,
//! inserted, changed or deleted, and the body replaced (what a milter may
//! do at end of message, and how forged Authentication-Results fields are
//! removed). They are applied once, after the data checks and before
//! delivery, by writing a new spool: the original is never changed in
//! place, so a failed rewrite leaves the message as received.
//!
//! Parsing is pure ([`Fields`]); [`rewrite`] does the I/O and blocks.

use std::io;

use bytes::Bytes;

use super::{Failure, Pipeline};
use crate::directory::Route;
use crate::envelope::Recipient;
use crate::spool::Spool;

/// The most header bytes a rewrite reads; a header section larger than
/// this cannot be edited (the delivery fails with 451 rather than
/// guessing where the header ends).
pub const MAX_HEADER: usize = 1 << 20;

/// One change to the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Appends a field at the end of the header section.
    AddHeader { name: String, value: String },
    /// Inserts a field before the `index`-th field (0: at the top).
    InsertHeader {
        index: usize,
        name: String,
        value: String,
    },
    /// Replaces the `index`-th field named `name` (1-based, as a milter's
    /// chgheader); one past the last adds it at the end.
    ChangeHeader {
        name: String,
        index: usize,
        value: String,
    },
    /// Removes the `index`-th field named `name` (1-based).
    DeleteHeader { name: String, index: usize },
    /// The whole body, CRLF line endings.
    ReplaceBody(Bytes),
    /// Deliver to this recipient too; only a local recipient (one the
    /// directory accepts, as at RCPT) is added, others are logged and
    /// ignored.
    AddRecipient(String),
    /// Deliver nothing to this recipient (normalized address). Over LMTP
    /// its RCPT is still answered 250: it was accepted, then dropped.
    DeleteRecipient(String),
}

/// Why an edit cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("header field {0:?} is not a valid field name")]
    BadName(String),
    #[error("the value of header field {0} holds a bare CR or LF")]
    BadValue(String),
    #[error("the header section is larger than {MAX_HEADER} bytes")]
    HeaderTooLarge,
    #[error("reading or writing the spool: {0}")]
    Io(#[from] io::Error),
}

/// The header section split into fields, each with its line ending and
/// folded lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    fields: Vec<Vec<u8>>,
}

impl Fields {
    /// Splits `header` (up to, not including, the empty line).
    pub fn parse(header: &[u8]) -> Fields {
        let mut fields: Vec<Vec<u8>> = Vec::new();
        for line in header.split_inclusive(|&b| b == b'\n') {
            let continuation = matches!(line.first(), Some(b' ' | b'\t'));
            match fields.last_mut() {
                Some(last) if continuation => last.extend_from_slice(line),
                _ => fields.push(line.to_vec()),
            }
        }
        Fields { fields }
    }

    fn name_of(field: &[u8]) -> &[u8] {
        let end = field.iter().position(|&b| b == b':').unwrap_or(0);
        field[..end].trim_ascii()
    }

    /// Position of the `index`-th (1-based) field named `name`.
    fn find(&self, name: &str, index: usize) -> Option<usize> {
        self.fields
            .iter()
            .enumerate()
            .filter(|(_, f)| Self::name_of(f).eq_ignore_ascii_case(name.as_bytes()))
            .nth(index.checked_sub(1)?)
            .map(|(i, _)| i)
    }

    /// Applies one header edit; body edits are not for this.
    pub fn apply(&mut self, edit: &Edit) -> Result<(), EditError> {
        match edit {
            Edit::AddHeader { name, value } => self.fields.push(render(name, value)?),
            Edit::InsertHeader { index, name, value } => {
                let at = (*index).min(self.fields.len());
                self.fields.insert(at, render(name, value)?);
            }
            Edit::ChangeHeader { name, index, value } => match self.find(name, *index) {
                // The field keeps the spelling of its name.
                Some(i) => {
                    let own = String::from_utf8_lossy(Self::name_of(&self.fields[i])).into_owned();
                    self.fields[i] = render(&own, value)?;
                }
                None => self.fields.push(render(name, value)?),
            },
            Edit::DeleteHeader { name, index } => {
                if let Some(i) = self.find(name, *index) {
                    self.fields.remove(i);
                }
            }
            Edit::ReplaceBody(_) | Edit::AddRecipient(_) | Edit::DeleteRecipient(_) => {}
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.fields.concat()
    }
}

/// `Name: value` with CRLF, folding kept: a line break inside the value
/// must be followed by white space (a continuation), and is written CRLF.
fn render(name: &str, value: &str) -> Result<Vec<u8>, EditError> {
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if !name_ok {
        return Err(EditError::BadName(name.to_string()));
    }
    let mut out = format!("{name}:").into_bytes();
    if !value.starts_with([' ', '\t']) {
        out.push(b' ');
    }
    let mut lines = value.split('\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.contains('\r') || line.contains('\0') {
            return Err(EditError::BadValue(name.to_string()));
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(next) = lines.peek()
            && !next.starts_with([' ', '\t'])
        {
            return Err(EditError::BadValue(name.to_string()));
        }
    }
    Ok(out)
}

/// Whether any of `edits` changes the message itself (not the recipients).
pub fn changes_content(edits: &[Edit]) -> bool {
    edits
        .iter()
        .any(|e| !matches!(e, Edit::AddRecipient(_) | Edit::DeleteRecipient(_)))
}

/// Writes a new spool holding `spool`'s message with `edits` applied, in
/// order; recipient edits are not for this. Blocking: call it through
/// [`crate::blocking::run`].
pub fn rewrite(spool: &Spool, edits: &[Edit]) -> Result<Spool, EditError> {
    crate::blocking::assert_off_runtime("rewriting a message");
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    // Read until the empty line that ends the header section.
    let body_start = loop {
        let scanned = head.len().saturating_sub(3);
        let n = spool.read_at(&mut buf, offset)?;
        head.extend_from_slice(&buf[..n]);
        offset += n as u64;
        if head.starts_with(b"\r\n") {
            break Some(0);
        }
        if let Some(i) = head[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(scanned + i + 2);
        }
        if n == 0 {
            break None;
        }
        if head.len() > MAX_HEADER {
            return Err(EditError::HeaderTooLarge);
        }
    };
    // No empty line: the whole message is header.
    let split = body_start.unwrap_or(head.len());
    let mut fields = Fields::parse(&head[..split]);
    let mut body: Option<&Bytes> = None;
    for e in edits {
        match e {
            Edit::ReplaceBody(b) => body = Some(b),
            Edit::AddRecipient(_) | Edit::DeleteRecipient(_) => {}
            other => fields.apply(other)?,
        }
    }
    let mut out = spool.empty_like();
    out.write(&fields.to_bytes())?;
    match body {
        Some(b) => {
            out.write(b"\r\n")?;
            out.write(b)?;
        }
        None => {
            // The empty line and the body as received: what is already
            // read, then the rest of the spool.
            out.write(&head[split..])?;
            loop {
                let n = spool.read_at(&mut buf, offset)?;
                if n == 0 {
                    break;
                }
                out.write(&buf[..n])?;
                offset += n as u64;
            }
        }
    }
    Ok(out)
}

impl Pipeline {
    /// Applies the recipient edits to `recipients`. Returns who gets the
    /// message, and for each of the given recipients its place among them
    /// (None: dropped). `in_memory` says whether the content is in memory:
    /// a sink recipient cannot be added to a message spooled on disk.
    pub async fn edit_recipients(
        &self,
        mut recipients: Vec<Recipient>,
        edits: &[Edit],
        in_memory: bool,
    ) -> (Vec<Recipient>, Vec<Option<usize>>) {
        let n = recipients.len();
        let mut dropped = vec![false; n];
        for e in edits {
            match e {
                Edit::DeleteRecipient(a) => {
                    let a = a.trim_start_matches('<').trim_end_matches('>');
                    match recipients
                        .iter()
                        .position(|r| r.address.eq_ignore_ascii_case(a))
                    {
                        Some(i) if i < n => dropped[i] = true,
                        Some(i) => {
                            recipients.remove(i);
                        }
                        None => tracing::info!(
                            rcpt = a,
                            "a check deleted a recipient the message did not have"
                        ),
                    }
                }
                Edit::AddRecipient(a) => {
                    let a = a.trim_start_matches('<').trim_end_matches('>');
                    match self.recipient(a).await {
                        Ok(r) if recipients.iter().any(|x| x.address == r.address) => {}
                        Ok(r) if matches!(*r.route, Route::Sink { .. }) && !in_memory => {
                            tracing::warn!(
                                rcpt = a,
                                "a check added a sink recipient to a message on disk; not added"
                            )
                        }
                        Ok(r) => recipients.push(r),
                        Err(why) => {
                            tracing::warn!(
                                rcpt = a,
                                ?why,
                                "a check added a recipient that is not local; not added"
                            )
                        }
                    }
                }
                _ => {}
            }
        }
        let mut places = Vec::with_capacity(n);
        let mut kept = Vec::with_capacity(recipients.len());
        for (i, r) in recipients.into_iter().enumerate() {
            if i < n {
                places.push((!dropped[i]).then_some(kept.len()));
            }
            if i >= n || !dropped[i] {
                kept.push(r);
            }
        }
        (kept, places)
    }

    /// The message with the content edits applied (a new spool), or the
    /// same spool when there are none.
    pub async fn edit_content(&self, spool: Spool, edits: Vec<Edit>) -> Result<Spool, Failure> {
        if !changes_content(&edits) {
            return Ok(spool);
        }
        let rewritten =
            crate::blocking::run("rewriting a message", move || rewrite(&spool, &edits)).await;
        match rewritten {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a check's change to the message failed");
                Err(Failure::Local)
            }
            Err(e) => {
                tracing::error!(error = %e, "a check's change to the message failed");
                Err(Failure::Local)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool(text: &str) -> Spool {
        let mut s = Spool::new(1 << 20, None);
        s.write(text.as_bytes()).unwrap();
        s
    }

    fn text(s: &Spool) -> String {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut s.reader(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    const MSG: &str = "Authentication-Results: mx.example.org; spf=pass\r\nFrom: a@b.example\r\nSubject: hi\r\n folded\r\nAuthentication-Results: other.example; dkim=pass\r\nAuthentication-Results: mx.example.org; dkim=pass\r\n\r\nbody\r\n";

    fn del(name: &str, index: usize) -> Edit {
        Edit::DeleteHeader {
            name: name.into(),
            index,
        }
    }

    #[test]
    fn deletes_by_name_and_index_from_the_bottom_up() {
        // Deleting the 3rd then the 1st keeps the indexes meaningful.
        let out = rewrite(
            &spool(MSG),
            &[
                del("authentication-results", 3),
                del("Authentication-Results", 1),
            ],
        )
        .unwrap();
        assert_eq!(
            text(&out),
            "From: a@b.example\r\nSubject: hi\r\n folded\r\nAuthentication-Results: other.example; dkim=pass\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn adds_inserts_changes_and_replaces_the_body() {
        let edits = [
            Edit::InsertHeader {
                index: 0,
                name: "X-Top".into(),
                value: "1".into(),
            },
            Edit::AddHeader {
                name: "X-Spam".into(),
                value: "yes\n\tscore=9".into(),
            },
            Edit::ChangeHeader {
                name: "subject".into(),
                index: 1,
                value: "[SPAM] hi".into(),
            },
            Edit::ChangeHeader {
                name: "X-New".into(),
                index: 1,
                value: "appended".into(),
            },
            Edit::ReplaceBody(Bytes::from_static(b"new body\r\n")),
        ];
        let out = rewrite(
            &spool("From: a@b.example\r\nSubject: hi\r\n\r\nold\r\n"),
            &edits,
        )
        .unwrap();
        assert_eq!(
            text(&out),
            "X-Top: 1\r\nFrom: a@b.example\r\nSubject: [SPAM] hi\r\nX-Spam: yes\r\n\tscore=9\r\nX-New: appended\r\n\r\nnew body\r\n"
        );
    }

    #[test]
    fn a_value_cannot_inject_a_field() {
        let e = Edit::AddHeader {
            name: "X-A".into(),
            value: "1\nBcc: victim@example.org".into(),
        };
        assert!(matches!(
            rewrite(&spool(MSG), &[e]),
            Err(EditError::BadValue(_))
        ));
        let e = Edit::AddHeader {
            name: "X A".into(),
            value: "1".into(),
        };
        assert!(matches!(
            rewrite(&spool(MSG), &[e]),
            Err(EditError::BadName(_))
        ));
    }

    #[test]
    fn a_message_without_a_body_or_empty_line_keeps_its_shape() {
        let out = rewrite(&spool("Subject: only\r\n"), &[del("X-None", 1)]).unwrap();
        assert_eq!(text(&out), "Subject: only\r\n");
        let out = rewrite(&spool("\r\nbody only\r\n"), &[]).unwrap();
        assert_eq!(text(&out), "\r\nbody only\r\n");
    }

    #[test]
    fn a_header_split_across_reads_is_found() {
        let long = format!("X-Long: {}\r\n", "a".repeat(70_000));
        let msg = format!("{long}Subject: s\r\n\r\nbody\r\n");
        let out = rewrite(&spool(&msg), &[del("Subject", 1)]).unwrap();
        assert_eq!(text(&out), format!("{long}\r\nbody\r\n"));
    }
}
