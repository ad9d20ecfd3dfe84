//! A configured milter as a pipeline check: one milter connection per SMTP
//! connection, opened at the connect stage, told each stage in turn, and
//! its answers turned into verdicts; its end-of-message edits become the
//! pipeline's message edits (applied before delivery, in milter order).
//!
//! Several milters are several checks, so they run side by side; each
//! sees the message as received (Postfix shows a later milter the edits
//! of earlier ones), their edits are applied in configuration order, and
//! the first refusal in that order wins.
//!
//! A milter that is down, too slow or breaks the protocol gets
//! `default_action` for the rest of the connection, from MAIL on: the
//! client may still greet and quit (Postfix's `milter_default_action`).

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{
    ConnectInfo, EndOfMessage, HeloInfo, MailInfo, Milter, MilterError, Modification, RcptInfo,
    Response, TlsInfo,
};
use crate::config::{DefaultAction, MilterConfig};
use crate::pipeline::{Check, CheckState, Edit, Effects, Facts, Stage, Verdict};
use crate::reply::Reply;
use crate::spool::Spool;

/// Body bytes read from a spool file per hand-off to the blocking pool.
const BODY_CHUNK: usize = 64 * 1024;

/// One `[[milters]]` entry.
pub struct MilterCheck {
    config: Arc<MilterConfig>,
    hostname: Arc<str>,
    name: String,
}

impl MilterCheck {
    /// The check for one configured milter; `hostname` is macro `j`.
    pub fn new(config: MilterConfig, hostname: &str) -> MilterCheck {
        MilterCheck {
            name: format!("milter {}", config.address),
            config: Arc::new(config),
            hostname: hostname.into(),
        }
    }
}

impl Check for MilterCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&self) -> Box<dyn CheckState> {
        Box::new(State {
            config: self.config.clone(),
            hostname: self.hostname.clone(),
            milter: None,
            failed: false,
            done: Done::No,
            in_message: false,
        })
    }
}

/// What the milter already settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    No,
    /// It accepted the connection: it is asked nothing more.
    Connection,
    /// It accepted this message: it is asked nothing more until the next.
    Message,
}

struct State {
    config: Arc<MilterConfig>,
    hostname: Arc<str>,
    /// None before the connect stage, and after a failure.
    milter: Option<Milter>,
    /// The milter failed; `default_action` holds for this connection.
    failed: bool,
    done: Done,
    /// A message was begun with the milter and must be aborted before the
    /// next one.
    in_message: bool,
}

impl CheckState for State {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            if self.done == Done::Connection {
                return Verdict::Continue;
            }
            if self.failed {
                return self.default_verdict(stage);
            }
            match self.ask(stage, facts).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(milter = %self.config.address, ?stage, error = %e,
                        action = ?self.config.default_action, "milter failed; applying its default action");
                    self.milter = None;
                    self.failed = true;
                    self.default_verdict(stage)
                }
            }
        })
    }

    fn reset(&mut self) {
        if self.done == Done::Message {
            self.done = Done::No;
        }
    }
}

impl State {
    /// What `default_action` means at `stage`: nothing before MAIL, so a
    /// client can still say hello and goodbye.
    fn default_verdict(&self, stage: Stage) -> Verdict {
        if matches!(stage, Stage::Connect | Stage::Helo) {
            return Verdict::Continue;
        }
        match self.config.default_action {
            DefaultAction::Accept => Verdict::Continue,
            DefaultAction::Tempfail => Verdict::TempFail(Reply::filter_unavailable()),
            DefaultAction::Reject => Verdict::Reject(Reply::filter_rejected()),
        }
    }

    async fn ask(&mut self, stage: Stage, facts: Facts<'_>) -> Result<Verdict, MilterError> {
        if stage == Stage::Connect {
            let milter = Milter::connect(&self.config.address, self.config.timeout.0).await?;
            let milter = self.milter.insert(milter);
            let info = ConnectInfo {
                hostname: self.hostname.to_string(),
                daemon_name: "letterbox".into(),
                local: None,
                client: Some(SocketAddr::new(facts.ip, 0)),
                client_name: None,
                client_ptr: None,
            };
            let r = milter.connect_info(&info).await?;
            return Ok(self.verdict(stage, r));
        }
        let Some(milter) = self.milter.as_mut() else {
            // Never connected (a session without a connect stage).
            return Ok(Verdict::Continue);
        };
        if self.done == Done::Message && stage != Stage::Mail {
            return Ok(Verdict::Continue);
        }
        let response = match stage {
            Stage::Connect => unreachable!("handled above"),
            Stage::Helo => {
                let info = HeloInfo {
                    name: facts.helo.unwrap_or_default().to_string(),
                    tls: facts.tls.map(tls_info),
                };
                milter.helo(&info).await?
            }
            Stage::Mail => {
                if std::mem::take(&mut self.in_message) {
                    milter.abort().await?;
                }
                self.done = Done::No;
                self.in_message = true;
                let info = MailInfo {
                    sender: facts.sender.unwrap_or_default().to_string(),
                    args: Vec::new(),
                    queue_id: facts.id.unwrap_or_default().to_string(),
                    auth: facts.auth.map(|user| super::AuthInfo {
                        mechanism: String::new(),
                        username: user.to_string(),
                        author: None,
                    }),
                };
                milter.mail(&info).await?
            }
            Stage::Rcpt => {
                let info = RcptInfo {
                    recipient: facts.rcpt.map(|r| r.address.clone()).unwrap_or_default(),
                    args: Vec::new(),
                };
                milter.rcpt(&info).await?
            }
            Stage::Data => {
                let Some(content) = facts.content else {
                    return Ok(Verdict::Continue);
                };
                let r = milter.data().await?;
                if r != Response::Continue {
                    return Ok(self.verdict(stage, r));
                }
                let eom = send_message(milter, content).await?;
                self.in_message = false;
                return Ok(self.end_of_message(eom));
            }
        };
        Ok(self.verdict(stage, response))
    }

    /// A stage's response as a verdict; an accept stops the questions.
    fn verdict(&mut self, stage: Stage, r: Response) -> Verdict {
        match r {
            Response::Continue => Verdict::Continue,
            Response::Accept => {
                self.done = match stage {
                    Stage::Connect | Stage::Helo => Done::Connection,
                    _ => Done::Message,
                };
                Verdict::Accept
            }
            Response::Discard => Verdict::Discard,
            Response::Quarantine(reason) => Verdict::Quarantine(reason),
            refusal => match refusal.smtp_reply() {
                Some(r) => refusal_verdict(r),
                None => Verdict::Continue,
            },
        }
    }

    /// The verdict at the end of the message, with the milter's edits.
    fn end_of_message(&mut self, eom: EndOfMessage) -> Verdict {
        let quarantine = match &eom.response {
            Response::Quarantine(reason) => Some(reason.clone()),
            Response::Continue | Response::Accept => None,
            _ => return self.verdict(Stage::Data, eom.response),
        };
        let edits = eom
            .modifications
            .into_iter()
            .filter_map(|m| edit(&self.config.address, m))
            .collect();
        Verdict::Pass(Effects {
            edits,
            quarantine,
            ..Effects::default()
        })
    }
}

/// A refusal with the milter's own reply, by its class.
fn refusal_verdict(r: super::SmtpReply) -> Verdict {
    let status = r.enhanced.unwrap_or_default();
    let reply = Reply::new(r.code, status, r.text);
    if r.code / 100 == 4 {
        Verdict::tempfail(Some(reply))
    } else {
        Verdict::reject(Some(reply))
    }
}

/// A milter's modification as a pipeline edit; a sender change is not
/// supported (logged).
fn edit(milter: &str, m: Modification) -> Option<Edit> {
    Some(match m {
        Modification::AddHeader { name, value } => Edit::AddHeader { name, value },
        Modification::InsertHeader { index, name, value } => Edit::InsertHeader {
            index: index as usize,
            name,
            value,
        },
        Modification::ChangeHeader {
            index,
            name,
            value: Some(value),
        } => Edit::ChangeHeader {
            name,
            index: index as usize,
            value,
        },
        Modification::ChangeHeader {
            index,
            name,
            value: None,
        } => Edit::DeleteHeader {
            name,
            index: index as usize,
        },
        Modification::ReplaceBody(body) => Edit::ReplaceBody(body.into()),
        Modification::AddRecipient { recipient, .. } => Edit::AddRecipient(recipient),
        Modification::DeleteRecipient(r) => Edit::DeleteRecipient(r),
        Modification::ChangeSender { sender, .. } => {
            tracing::warn!(
                milter,
                sender,
                "a milter asked to change the sender; not supported, ignored"
            );
            return None;
        }
    })
}

/// `TLSv1.3:TLS13_AES_256_GCM_SHA384` as the milter's TLS macros.
fn tls_info(tls: &str) -> TlsInfo {
    let (version, cipher) = tls.split_once(':').unwrap_or((tls, ""));
    TlsInfo {
        version: version.to_string(),
        cipher: cipher.to_string(),
        ..TlsInfo::default()
    }
}

/// Streams the message to the milter: each header field, the end of the
/// headers, the body, the end of the message. A spool in memory is sent
/// as it is; one on disk is read in pieces off the runtime.
async fn send_message(milter: &mut Milter, content: &Spool) -> Result<EndOfMessage, MilterError> {
    if let Some(raw) = content.as_memory() {
        return milter.message(raw).await;
    }
    let (head, mut offset) = read_head(content).await?;
    let mut quarantine = None;
    let stop = |response| {
        Ok(EndOfMessage {
            response,
            modifications: Vec::new(),
        })
    };
    let mut pass = |r: Response| match r {
        Response::Continue => None,
        Response::Quarantine(reason) => {
            quarantine = Some(reason);
            None
        }
        other => Some(other),
    };
    for (name, value) in fields(&head) {
        if let Some(r) = pass(milter.header(&name, &value).await?) {
            return stop(r);
        }
    }
    if let Some(r) = pass(milter.end_of_headers().await?) {
        return stop(r);
    }
    loop {
        let chunk = read_chunk(content, offset).await?;
        if chunk.is_empty() {
            break;
        }
        offset += chunk.len() as u64;
        if let Some(r) = pass(milter.body(&chunk).await?) {
            return stop(r);
        }
    }
    let mut eom = milter.end_of_message().await?;
    if let (Some(reason), Response::Continue | Response::Accept) = (quarantine, &eom.response) {
        eom.response = Response::Quarantine(reason);
    }
    Ok(eom)
}

fn io_error(during: &'static str, e: impl std::fmt::Display) -> MilterError {
    MilterError::Io {
        during,
        source: std::io::Error::other(e.to_string()),
    }
}

/// The header section (without the empty line) and where the body starts.
async fn read_head(content: &Spool) -> Result<(Vec<u8>, u64), MilterError> {
    let mut head = Vec::new();
    let mut offset = 0u64;
    loop {
        let chunk = read_chunk(content, offset).await?;
        let scanned = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk);
        offset += chunk.len() as u64;
        if head.starts_with(b"\r\n") {
            return Ok((Vec::new(), 2));
        }
        if let Some(i) = head[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = scanned + i + 2;
            head.truncate(end);
            return Ok((head, end as u64 + 2));
        }
        if chunk.is_empty() || head.len() > crate::pipeline::edit::MAX_HEADER {
            // No empty line: all header, no body.
            let len = head.len() as u64;
            return Ok((head, len));
        }
    }
}

/// Up to [`BODY_CHUNK`] bytes at `offset`, read on the blocking pool.
async fn read_chunk(content: &Spool, offset: u64) -> Result<Vec<u8>, MilterError> {
    // The spool is borrowed; its file's reads are positional, so a
    // duplicate of the handle reads the same bytes on another thread.
    let file = content.duplicate_file().map_err(|e| io_error("body", e))?;
    let want = BODY_CHUNK.min(content.len().saturating_sub(offset) as usize);
    crate::blocking::run("reading a spool file", move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; want];
        file.read_exact_at(&mut buf, offset)?;
        Ok::<_, std::io::Error>(buf)
    })
    .await
    .map_err(|e| io_error("body", e))?
    .map_err(|e| io_error("body", e))
}

/// Header fields as (name, value after the colon, folding kept).
fn fields(head: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push_str(line);
            }
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line.trim_end(), ""));
        out.push((name.trim().to_string(), value.to_string()));
    }
    for (_, v) in &mut out {
        let trimmed = v.strip_suffix("\r\n").unwrap_or(v).len();
        v.truncate(trimmed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_keep_their_folding() {
        let head = b"Subject: a\r\n b\r\nFrom:x@y\r\n";
        assert_eq!(
            fields(head),
            vec![
                ("Subject".to_string(), " a\r\n b".to_string()),
                ("From".to_string(), "x@y".to_string())
            ]
        );
    }

    #[test]
    fn a_deleted_header_is_a_change_without_value() {
        let m = Modification::ChangeHeader {
            index: 2,
            name: "X-Spam".into(),
            value: None,
        };
        assert_eq!(
            edit("m", m),
            Some(Edit::DeleteHeader {
                name: "X-Spam".into(),
                index: 2
            })
        );
    }
}
