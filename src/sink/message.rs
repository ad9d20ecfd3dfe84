//! What people see of a stored message: it is parsed (mail-parser) only
//! when asked for, into the JSON summary and detail types of the API.
//!
//! Every entry point here parses the whole message, and [`Message::detail`]
//! and [`Message::html`] also sanitize its HTML: work that grows with the
//! message and blocks. Call them on the blocking pool
//! ([`crate::blocking::run`]); in debug builds they panic on the runtime.

use std::borrow::Cow;

use mail_parser::{MessageParser, MimeHeaders};
use serde::Serialize;

use super::sanitize;
use super::store::Message;
use crate::blocking;

/// One line of a mailbox listing (and the payload of SSE and wait).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub id: String,
    /// The first From address as `Name <addr>` or `addr`; null when absent.
    pub from: Option<String>,
    /// Every To address, formatted like `from`.
    pub to: Vec<String>,
    pub subject: Option<String>,
    /// The Date header as RFC 3339, when it parses.
    pub date: Option<String>,
    /// Bytes of the raw message.
    pub size: usize,
    pub received_at: String,
    pub expires_at: String,
}

/// A header as written, unfolded; encoded words are left as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// An attachment's description; its bytes are served by index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attachment {
    pub index: usize,
    pub filename: Option<String>,
    pub content_type: String,
    /// Decoded bytes.
    pub size: usize,
}

/// Everything the page shows of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detail {
    #[serde(flatten)]
    pub summary: Summary,
    pub headers: Vec<Header>,
    pub text: Option<String>,
    /// Sanitized; null when the message has no HTML part.
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
}

/// An attachment's bytes and what to call them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentBody {
    pub filename: Option<String>,
    pub content_type: String,
    pub contents: Vec<u8>,
}

fn parse(raw: &[u8]) -> Option<mail_parser::Message<'_>> {
    MessageParser::default().parse(raw)
}

fn format_addr(addr: &mail_parser::Addr<'_>) -> Option<String> {
    let email = addr.address();
    match (addr.name().map(str::trim).filter(|n| !n.is_empty()), email) {
        (Some(name), Some(email)) => Some(format!("{name} <{email}>")),
        (None, Some(email)) => Some(email.to_string()),
        (Some(name), None) => Some(name.to_string()),
        (None, None) => None,
    }
}

fn content_type(part: &mail_parser::MessagePart<'_>) -> String {
    match part.content_type() {
        Some(ct) => match ct.subtype() {
            Some(sub) => format!("{}/{}", ct.ctype(), sub).to_ascii_lowercase(),
            None => ct.ctype().to_ascii_lowercase(),
        },
        None if part.is_message() => "message/rfc822".into(),
        None if part.is_text() => "text/plain".into(),
        None => "application/octet-stream".into(),
    }
}

fn summary_of(stored: &Message, parsed: Option<&mail_parser::Message<'_>>) -> Summary {
    Summary {
        id: stored.id.clone(),
        from: parsed
            .and_then(|m| m.from())
            .and_then(|a| a.first())
            .and_then(format_addr),
        to: parsed
            .and_then(|m| m.to())
            .map(|a| a.iter().filter_map(format_addr).collect())
            .unwrap_or_default(),
        subject: parsed.and_then(|m| m.subject()).map(str::to_string),
        date: parsed.and_then(|m| m.date()).map(|d| d.to_rfc3339()),
        size: stored.size(),
        received_at: rfc3339(stored.received_at),
        expires_at: rfc3339(stored.expires_at),
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Unfolds a raw header value (RFC 5322 §2.2.3) and trims it.
fn unfold(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    for piece in text.split('\n') {
        out.push_str(piece.strip_suffix('\r').unwrap_or(piece));
    }
    out.trim().to_string()
}

impl Message {
    /// The listing line. Nothing is parsed on store, so this is a full
    /// parse too: blocks (see the module docs).
    pub fn summary(&self) -> Summary {
        blocking::assert_off_runtime("parsing a sink message's summary");
        // Our trace header holds none of the fields a listing shows.
        summary_of(self, parse(self.content()).as_ref())
    }

    /// Everything shown when the message is opened. `images` keeps remote
    /// images in the sanitized HTML. Blocks (see the module docs).
    pub fn detail(&self, images: bool) -> Detail {
        blocking::assert_off_runtime("parsing a sink message");
        let whole = self.raw();
        let parsed = parse(&whole);
        let summary = summary_of(self, parsed.as_ref());
        let Some(m) = parsed else {
            return Detail {
                summary,
                headers: Vec::new(),
                text: Some(String::from_utf8_lossy(&whole).into_owned()),
                html: None,
                attachments: Vec::new(),
            };
        };
        let raw = m.raw_message();
        let headers = m
            .headers()
            .iter()
            .map(|h| Header {
                name: h.name().to_string(),
                value: unfold(
                    raw.get(h.offset_start() as usize..h.offset_end() as usize)
                        .unwrap_or_default(),
                ),
            })
            .collect();
        let html = m
            .html_part(0)
            .filter(|p| p.is_text_html())
            .and_then(|p| p.text_contents())
            .map(|h| sanitize::clean(h, images));
        let text = m.body_text(0).map(Cow::into_owned);
        let attachments = m
            .attachments()
            .enumerate()
            .map(|(index, part)| Attachment {
                index,
                filename: part.attachment_name().map(str::to_string),
                content_type: content_type(part),
                size: part.len(),
            })
            .collect();
        Detail {
            summary,
            headers,
            text,
            html,
            attachments,
        }
    }

    /// The sanitized HTML body alone; None when there is none. Blocks (see
    /// the module docs).
    pub fn html(&self, images: bool) -> Option<String> {
        blocking::assert_off_runtime("parsing a sink message's HTML body");
        let m = parse(self.content())?;
        let part = m.html_part(0).filter(|p| p.is_text_html())?;
        Some(sanitize::clean(part.text_contents()?, images))
    }

    /// Attachment number `index` (as listed in [`Detail::attachments`]).
    /// Blocks (see the module docs).
    pub fn attachment(&self, index: usize) -> Option<AttachmentBody> {
        blocking::assert_off_runtime("parsing a sink message's attachment");
        let m = parse(self.content())?;
        let part = m.attachments().nth(index)?;
        Some(AttachmentBody {
            filename: part.attachment_name().map(str::to_string),
            content_type: content_type(part),
            contents: part.contents().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::config::SinkConfig;
    use crate::sink::Sink;

    /// `raw` as the store holds it. The store needs a runtime; parsing
    /// blocks, so the tests parse on their own plain thread, after it.
    fn stored(raw: Bytes) -> Arc<Message> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sink = Sink::new(&SinkConfig::default(), 1 << 20);
            sink.insert("a@x.tmp.example.org", Duration::from_secs(3600), raw)
                .unwrap();
            sink.list("a@x.tmp.example.org").remove(0)
        })
    }

    /// tests/fixtures/sink/multipart-attachment.eml, from the shared corpus
    /// (thirdparty/018.eml, MIT), with CRLF line endings as SMTP hands them over.
    fn fixture() -> Bytes {
        let text = include_str!("../../tests/fixtures/sink/multipart-attachment.eml");
        Bytes::from(text.replace("\r\n", "\n").replace('\n', "\r\n"))
    }

    #[test]
    fn parses_a_multipart_message_with_an_attachment_on_demand() {
        let raw = fixture();
        let size = raw.len();
        let stored = stored(raw.clone());
        // Stored exactly as handed over.
        assert_eq!(stored.raw(), raw);

        let s = stored.summary();
        assert_eq!(s.id, stored.id);
        assert_eq!(s.from.as_deref(), Some("test@example.com"));
        assert_eq!(s.to, ["test@example.com"]);
        assert_eq!(
            s.subject.as_deref(),
            Some("29 (HTML + embedded image) + attachment")
        );
        assert_eq!(s.date.as_deref(), Some("2017-12-30T20:19:46+01:00"));
        assert_eq!(s.size, size);

        let d = stored.detail(false);
        assert_eq!(d.summary, s);
        assert_eq!(
            d.headers[0],
            Header {
                name: "To".into(),
                value: "test@example.com".into()
            }
        );
        let ua = d.headers.iter().find(|h| h.name == "User-Agent").unwrap();
        assert_eq!(
            ua.value,
            "Mozilla/5.0 (Windows NT 6.1; Win64; x64; rv:59.0) Gecko/20100101 Thunderbird/59.0a1"
        );
        assert_eq!(d.headers.len(), 9);
        assert_eq!(
            d.attachments,
            [
                Attachment {
                    index: 0,
                    filename: Some("kigaaldcbanejcbi.png".into()),
                    content_type: "image/png".into(),
                    size: 242,
                },
                Attachment {
                    index: 1,
                    filename: Some("attach2.png".into()),
                    content_type: "image/png".into(),
                    size: 158,
                },
            ]
        );
        let html = d.html.unwrap();
        assert!(html.contains("<p><tt>Search for höhö</tt></p>"), "{html}");
        assert!(!html.contains("<meta"), "{html}");
        assert_eq!(d.text.as_deref().map(str::trim), Some("Search for höhö"));

        let a = stored.attachment(1).unwrap();
        assert_eq!(a.filename.as_deref(), Some("attach2.png"));
        assert_eq!(&a.contents[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(a.contents.len(), 158);
        assert!(stored.attachment(2).is_none());
    }

    #[test]
    fn a_message_without_headers_still_shows() {
        let stored = stored(Bytes::from_static(b"just text\r\n"));
        let d = stored.detail(false);
        assert_eq!(d.summary.subject, None);
        assert_eq!(d.summary.from, None);
        assert!(d.summary.to.is_empty());
        assert!(d.html.is_none());
    }

    /// The guard release builds leave out is what makes a forgotten
    /// hand-off fail the sink's tests.
    #[cfg(debug_assertions)]
    #[tokio::test]
    async fn parsing_on_the_runtime_panics_in_debug_builds() {
        let sink = Sink::new(&SinkConfig::default(), 1 << 20);
        sink.insert("a@x.tmp.example.org", Duration::from_secs(3600), fixture())
            .unwrap();
        let stored = sink.list("a@x.tmp.example.org").remove(0);
        let on_runtime: [(&str, &dyn Fn()); 5] = [
            ("summary", &|| drop(stored.summary())),
            ("detail", &|| drop(stored.detail(false))),
            ("html", &|| drop(stored.html(false))),
            ("attachment", &|| drop(stored.attachment(0))),
            ("clean", &|| drop(sanitize::clean("<p>x</p>", false))),
        ];
        for (what, f) in on_runtime {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            assert!(caught.is_err(), "{what} must refuse to run on the runtime");
        }
        // The same work handed off runs.
        let summary = crate::blocking::run("test", move || stored.summary())
            .await
            .unwrap();
        assert!(summary.subject.is_some());
    }
}
