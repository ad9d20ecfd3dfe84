//! What the state file of a queue entry holds: the envelope and, per
//! recipient, where its delivery stands. Written as JSON; every field a
//! later version adds must have a default, so an older queue still reads.

use serde::{Deserialize, Serialize};

/// The state file's format version.
pub const VERSION: u32 = 1;

/// One queued message: its envelope and each recipient's state. The
/// content is the entry's message file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The state file's format, [`VERSION`].
    pub version: u32,
    /// The entry's name in the queue directory: the transaction's id.
    pub id: String,
    /// The reverse-path; empty for the null sender (a bounce: never
    /// bounced itself).
    pub sender: String,
    /// Bytes of the message file.
    pub size: u64,
    /// When it was queued (Unix seconds); `queue.max_age` counts from here.
    pub created: u64,
    /// The content holds bytes above 127: sent with BODY=8BITMIME.
    #[serde(default)]
    pub eight_bit: bool,
    /// An address needs SMTPUTF8 (non-ASCII sender or recipient).
    #[serde(default)]
    pub smtputf8: bool,
    /// How many DSNs were sent for this entry; names the next one, so a
    /// crash between sending one and recording it cannot send two.
    #[serde(default)]
    pub bounces: u32,
    pub recipients: Vec<RecipientState>,
}

/// Where one recipient's delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not yet delivered; tried again at `next_attempt`.
    Queued,
    /// The next hop accepted it (250 to DATA).
    Delivered,
    /// Permanently failed or expired; `notified` says whether the sender
    /// has been told.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
        }
    }
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientState {
    /// Where the copy goes (normalized).
    pub address: String,
    /// The recipient the client gave when it differs (an alias that
    /// forwards): the DSN's Original-Recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    pub status: Status,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When to try next (Unix seconds): a delivery while queued, the DSN
    /// while failed and not yet notified.
    pub next_attempt: u64,
    /// Why the last attempt did not deliver, for people.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The enhanced status code of the last failure (`5.1.1`), for the DSN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<String>,
    /// The server that gave the last answer, for the DSN's Remote-MTA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
    /// The remote's own reply (`550 5.1.1 No such user`), for the DSN's
    /// Diagnostic-Code; None when the failure was ours (DNS, a null MX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostic: Option<String>,
    /// Failed and the sender has been told (or there is nobody to tell).
    #[serde(default)]
    pub notified: bool,
}

impl RecipientState {
    /// A recipient not yet tried, due at `now`.
    pub fn new(address: String, original: Option<String>, now: u64) -> RecipientState {
        RecipientState {
            address,
            original,
            status: Status::Queued,
            attempts: 0,
            next_attempt: now,
            last_error: None,
            last_status: None,
            remote_mta: None,
            diagnostic: None,
            notified: false,
        }
    }

    /// The domain of the address (after the last `@`), lowercase.
    pub fn domain(&self) -> String {
        self.address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default()
    }

    /// Whether the scheduler has something to do for it at `now`.
    pub fn due(&self, now: u64) -> bool {
        self.pending() && self.next_attempt <= now
    }

    /// Whether anything is still to be done for it: a delivery, or the
    /// DSN of a failure.
    pub fn pending(&self) -> bool {
        match self.status {
            Status::Queued => true,
            Status::Failed => !self.notified,
            Status::Delivered => false,
        }
    }
}

impl Entry {
    /// The earliest time something is to be done, None when nothing is.
    pub fn next_due(&self) -> Option<u64> {
        self.recipients
            .iter()
            .filter(|r| r.pending())
            .map(|r| r.next_attempt)
            .min()
    }

    /// Whether every recipient is settled: delivered, or failed and told.
    pub fn finished(&self) -> bool {
        self.next_due().is_none()
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix seconds as RFC 3339 in UTC (`2026-12-07T10:57:34Z`).
pub fn rfc3339(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// Unix seconds as an RFC 5322 date (for the DSN).
pub fn rfc5322(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S +0000").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_reads_without_optional_fields() {
        let e = Entry {
            version: VERSION,
            id: "0011223344556677".into(),
            sender: "a@example.org".into(),
            size: 10,
            created: 100,
            eight_bit: false,
            smtputf8: false,
            bounces: 0,
            recipients: vec![RecipientState::new("b@example.net".into(), None, 100)],
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), e);
        let old = r#"{"version":1,"id":"x","sender":"","size":1,"created":5,
            "recipients":[{"address":"b@x.example","status":"queued","attempts":0,"next_attempt":5}]}"#;
        let e: Entry = serde_json::from_str(old).unwrap();
        assert_eq!(e.next_due(), Some(5));
        assert!(!e.finished());
    }

    #[test]
    fn due_and_finished() {
        let mut r = RecipientState::new("b@Example.NET".into(), None, 50);
        assert_eq!(r.domain(), "example.net");
        assert!(!r.due(49) && r.due(50));
        r.status = Status::Failed;
        assert!(r.pending());
        r.notified = true;
        assert!(!r.pending());
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
