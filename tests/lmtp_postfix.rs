//! Postfix as a real LMTP client (RFC 2033) delivering into letterbox.
//! Each test runs letterbox in-process with an LMTP listener, a private
//! Postfix (tests/common/postfix.rs) whose `virtual_transport` is that
//! listener, over a unix socket (`lmtp:unix:/path`) or TCP
//! (`lmtp:inet:127.0.0.1:PORT`), and submits one message with three
//! recipients to Postfix's smtpd. Then it checks both ends: the maildirs
//! letterbox wrote, byte for byte, and what Postfix logged and kept queued.
//!
//! - `quota_*`: carol's mailbox is smaller than the message, so after the
//!   data letterbox answers 452 4.2.2 for her copy alone and 250 for
//!   alice's and bob's. Postfix must defer carol only; once her quota is
//!   raised and the queue flushed, her copy arrives exactly once and
//!   alice's and bob's are not sent again.
//! - `unknown_*`: nobody@example.org is refused at RCPT with 550 5.1.1;
//!   Postfix bounces it (the bounce comes back through letterbox to the
//!   sender) and delivers the others.
//!
//! SQLite always; PostgreSQL and MySQL/MariaDB when `LETTERBOX_TEST_POSTGRES`
//! / `LETTERBOX_TEST_MYSQL` are set (tests/common/db.rs). Needs root and
//! Postfix; without Postfix the suite is left out, except under `CI=true`.

mod common;

use std::path::{Path, PathBuf};

use common::db::{Backend, TestDb};
use common::postfix::{self, HOSTNAME, Postfix};
use common::server::TestServer;
use letterbox::config::ListenAddr;
use letterbox::smtp::server::Bound;

const SENDER: &str = "sender@example.org";
const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";
const CAROL: &str = "carol@example.org";
const NOBODY: &str = "nobody@example.org";

/// Carol's quota in bytes: far below the message (about 6 KiB).
const CAROL_QUOTA: u64 = 1000;

/// How Postfix reaches letterbox's LMTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `lmtp:unix:/path`
    Unix,
    /// `lmtp:inet:127.0.0.1:PORT`
    Inet,
}

macro_rules! suite {
    ($($name:ident: $scenario:ident on $backend:ident via $via:ident;)*) => {
        $(
            #[test]
            fn $name() {
                $scenario(Backend::$backend, Via::$via);
            }
        )*
    };
}

suite! {
    quota_on_sqlite_via_unix: quota on Sqlite via Unix;
    quota_on_sqlite_via_inet: quota on Sqlite via Inet;
    quota_on_postgres_via_unix: quota on Postgres via Unix;
    quota_on_postgres_via_inet: quota on Postgres via Inet;
    quota_on_mysql_via_unix: quota on MySql via Unix;
    quota_on_mysql_via_inet: quota on MySql via Inet;
    unknown_on_sqlite_via_unix: unknown on Sqlite via Unix;
    unknown_on_sqlite_via_inet: unknown on Sqlite via Inet;
    unknown_on_postgres_via_unix: unknown on Postgres via Unix;
    unknown_on_postgres_via_inet: unknown on Postgres via Inet;
    unknown_on_mysql_via_unix: unknown on MySql via Unix;
    unknown_on_mysql_via_inet: unknown on MySql via Inet;
}

/// letterbox with alice, bob, carol (small quota) and the sender, and a
/// private Postfix delivering example.org to it. Teardown, panics
/// included: Postfix stops, then letterbox, then the database goes.
struct Setup {
    postfix: Postfix,
    server: TestServer,
    /// letterbox's own runtime. The test's thread is none of its workers,
    /// so it may block on Postfix's commands and sockets while letterbox
    /// serves Postfix's LMTP client.
    rt: tokio::runtime::Runtime,
    _db: TestDb,
    via: Via,
    /// Postfix's name for the LMTP server in its maillog: `relay=<relay>`.
    relay: String,
    /// …and in the reasons it gives: `host <host> said: …`.
    host: String,
}

impl Setup {
    /// None when the backend's or Postfix's suite is left out.
    fn new(backend: Backend, via: Via) -> Option<Setup> {
        if !postfix::installed() {
            return None;
        }
        let work = postfix::workdir();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let db = rt.block_on(TestDb::new(backend, work.path()))?;
        let listen = match via {
            Via::Unix => ListenAddr::Unix(work.path().join("lmtp.sock")),
            Via::Inet => ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        };
        let url = db.url.clone();
        let server = rt.block_on(TestServer::start(move |c| {
            c.database.url = url;
            c.lmtp.listen = vec![listen];
        }));
        rt.block_on(async {
            for (user, quota) in [(CAROL, CAROL_QUOTA), (SENDER, 0)] {
                server
                    .directory
                    .user_add(user, Some('+'), None, quota)
                    .await
                    .unwrap();
            }
        });
        let bound = &server.running.as_ref().unwrap().lmtp;
        let (transport, host, relay) = match &bound[..] {
            [Bound::Unix(path)] => {
                postfix::give_postfix(path);
                // A unix socket has no host name: Postfix uses its own.
                let host = format!("{HOSTNAME}[{}]", path.display());
                (format!("lmtp:unix:{}", path.display()), host.clone(), host)
            }
            [Bound::Tcp(addr)] => {
                let host = format!("{ip}[{ip}]", ip = addr.ip());
                let relay = format!("{host}:{}", addr.port());
                (format!("lmtp:inet:{addr}"), host, relay)
            }
            other => panic!("one LMTP listener expected, got {other:?}"),
        };
        let postfix = Postfix::start(work, &transport);
        Some(Setup {
            postfix,
            server,
            rt,
            _db: db,
            via,
            relay,
            host,
        })
    }

    /// Files in the user's `new/`.
    fn files(&self, user: &str) -> Vec<PathBuf> {
        self.server.new_files(user)
    }

    /// The letterbox transaction ids of the copies Postfix reports sent to
    /// `rcpt`, from `status=sent (250 2.0.0 Ok: delivered as <id>)`.
    fn sent_ids(&self, rcpt: &str) -> Vec<String> {
        self.postfix
            .log_lines(rcpt, "sent")
            .iter()
            .map(|l| {
                self.assert_lmtp_line(l);
                let (_, reply) = l
                    .split_once(" status=sent (")
                    .unwrap_or_else(|| panic!("no reply in {l}"));
                reply
                    .strip_prefix("250 2.0.0 Ok: delivered as ")
                    .and_then(|r| r.strip_suffix(')'))
                    .unwrap_or_else(|| panic!("Postfix logged another reply: {l}"))
                    .to_string()
            })
            .collect()
    }

    /// A maillog line about a delivery attempt must come from Postfix's
    /// LMTP client talking to our listener.
    fn assert_lmtp_line(&self, line: &str) {
        assert!(
            line.contains(" postfix/lmtp[") && line.contains(&format!(" relay={}, ", self.relay)),
            "not an LMTP delivery to {}: {line}",
            self.relay
        );
    }

    /// Checks one stored copy: letterbox's trace fields for `rcpt`
    /// (transaction `lmtp_id`, from Postfix over LMTP), then Postfix's own
    /// Received field (queue id `queue_id`), then exactly `content`, with
    /// LF line endings.
    fn assert_copy(&self, file: &Path, rcpt: &str, lmtp_id: &str, queue_id: &str, content: &str) {
        let got = std::fs::read(file).unwrap();
        let text = String::from_utf8_lossy(&got);
        let ours = date_after(&text, &format!("\tfor <{rcpt}>; "));
        let theirs = date_after(&text, &format!(" (Postfix) with ESMTP id {queue_id};\n\t"));
        // A unix socket has no address to look up: letterbox names it
        // localhost; TCP here runs without reverse DNS.
        let rdns = match self.via {
            Via::Unix => "localhost",
            Via::Inet => "unknown",
        };
        let want = format!(
            "Return-Path: <{SENDER}>\n\
             Delivered-To: {rcpt}\n\
             Received: from {HOSTNAME} ({rdns} [127.0.0.1])\n\
             \tby mx.example.org with LMTP id {lmtp_id}\n\
             \tfor <{rcpt}>; {ours}\n\
             Received: from client.example (unknown [127.0.0.1])\n\
             \tby {HOSTNAME} (Postfix) with ESMTP id {queue_id};\n\
             \t{theirs}\n\
             {}",
            content.replace("\r\n", "\n")
        );
        assert!(
            got == want.as_bytes(),
            "{rcpt}'s copy {}: got\n{text}\nwant\n{want}",
            file.display()
        );
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Postfix first, so no LMTP session is cut off by letterbox going.
        self.postfix.stop();
        if let Some(running) = self.server.running.take() {
            running.shutdown();
            self.rt.block_on(running.wait());
        }
    }
}

/// The rest of the line after `marker` in a stored message.
fn date_after(text: &str, marker: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in\n{text}"))
        + marker.len();
    let end = text[at..].find('\n').map_or(text.len(), |e| e + at);
    text[at..end].to_string()
}

/// The message as submitted, lines ending CRLF: about 6 KiB, with lines
/// that need dot-stuffing on both hops, a long line, trailing white
/// space, a tab and 8-bit text.
fn content(subject: &str) -> String {
    let mut s = format!(
        "From: Sender <{SENDER}>\r\n\
         To: undisclosed-recipients:;\r\n\
         Date: Thu, 07 Dec 2023 10:00:00 +0000\r\n\
         Subject: {subject}\r\n\
         Message-ID: <{subject}@remote.example>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         Hello, this is {subject}. Grüße aus Köln.\r\n\
         .\r\n\
         ..two dots, and a line of one dot above\r\n\
         {long}\r\n\
         trailing spaces   \r\n\
         \tand a tab\r\n",
        long = "0123456789".repeat(90),
    );
    for i in 0..60 {
        s += &format!("padding line {i:02}: {}\r\n", "x".repeat(60));
    }
    s
}

/// Carol's copy is refused for her quota (452 4.2.2 after the data) while
/// alice's and bob's are delivered; Postfix defers hers alone, and after
/// her quota is raised a flush delivers it exactly once.
fn quota(backend: Backend, via: Via) {
    let Some(s) = Setup::new(backend, via) else {
        return;
    };
    let pf = &s.postfix;
    let content = content("quota");
    let queue_id = pf.send(SENDER, &[ALICE, BOB, CAROL], &content);

    pf.wait_for(
        "alice's and bob's copies sent, carol's deferred, in the maillog",
        |pf| {
            !pf.log_lines(ALICE, "sent").is_empty()
                && !pf.log_lines(BOB, "sent").is_empty()
                && !pf.log_lines(CAROL, "deferred").is_empty()
        },
    );
    let full = "452 4.2.2 Mailbox full, try again later (in reply to end of DATA command)";
    let deferred = pf.log_lines(CAROL, "deferred");
    assert_eq!(deferred.len(), 1, "{}", pf.diagnostics());
    let deferred = &deferred[0];
    s.assert_lmtp_line(deferred);
    assert!(
        deferred.contains(&format!("{queue_id}: to=<{CAROL}>,"))
            && deferred.contains(" dsn=4.2.2, ")
            && deferred.contains(&format!("(host {} said: {full})", s.host)),
        "carol's deferral: {deferred}"
    );
    let alice = s.sent_ids(ALICE);
    assert_eq!(alice.len(), 1, "{}", pf.diagnostics());
    assert_eq!(alice, s.sent_ids(BOB), "one LMTP transaction for both");

    // Postfix keeps carol's copy, and only hers, deferred with our reply.
    pf.wait_for("the message in the deferred queue", |pf| {
        pf.queue()
            .first()
            .is_some_and(|m| m["queue_name"] == "deferred")
    });
    let queue = pf.queue();
    assert_eq!(queue.len(), 1, "{queue:?}");
    let m = &queue[0];
    assert_eq!(m["queue_id"], queue_id.as_str(), "{m}");
    assert_eq!(m["sender"], SENDER, "{m}");
    let rcpts = m["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 1, "only carol stays queued: {m}");
    assert_eq!(rcpts[0]["address"], CAROL, "{m}");
    let reason = rcpts[0]["delay_reason"].as_str().unwrap_or_default();
    assert!(reason.ends_with(full), "carol's delay reason: {reason}");

    for user in [ALICE, BOB] {
        let files = s.files(user);
        assert_eq!(files.len(), 1, "{user}: {files:?}{}", pf.diagnostics());
        s.assert_copy(&files[0], user, &alice[0], &queue_id, &content);
    }
    assert!(s.files(CAROL).is_empty(), "carol got a copy over quota");
    assert!(s.files(SENDER).is_empty(), "a deferral is no bounce");

    // Room for carol: a flush sends her copy, and hers alone.
    s.rt.block_on(s.server.directory.user_set_quota(CAROL, Some('+'), 0))
        .unwrap();
    pf.flush();
    pf.wait_for("carol's copy sent after the flush, the queue empty", |pf| {
        !pf.log_lines(CAROL, "sent").is_empty() && pf.queue().is_empty()
    });
    let carol = s.sent_ids(CAROL);
    assert_eq!(carol.len(), 1, "{}", pf.diagnostics());
    assert_ne!(
        carol, alice,
        "carol's copy came in a transaction of its own"
    );
    let files = s.files(CAROL);
    assert_eq!(files.len(), 1, "carol: {files:?}{}", pf.diagnostics());
    s.assert_copy(&files[0], CAROL, &carol[0], &queue_id, &content);
    for user in [ALICE, BOB] {
        assert_eq!(s.sent_ids(user), alice, "{user} was sent again");
        assert_eq!(s.files(user).len(), 1, "{user} got a second copy");
    }
    assert_eq!(
        pf.log_lines(CAROL, "deferred").len(),
        1,
        "carol was tried again before the flush{}",
        pf.diagnostics()
    );
    assert!(s.files(SENDER).is_empty());
}

/// An unknown recipient is refused at RCPT (550 5.1.1); Postfix bounces it
/// to the sender, through letterbox, and delivers the others.
fn unknown(backend: Backend, via: Via) {
    let Some(s) = Setup::new(backend, via) else {
        return;
    };
    let pf = &s.postfix;
    let content = content("unknown");
    let queue_id = pf.send(SENDER, &[ALICE, NOBODY, BOB], &content);

    pf.wait_for(
        "alice's and bob's copies sent, nobody's bounced, the bounce delivered, the queue empty",
        |pf| {
            !pf.log_lines(ALICE, "sent").is_empty()
                && !pf.log_lines(BOB, "sent").is_empty()
                && !pf.log_lines(NOBODY, "bounced").is_empty()
                && !pf.log_lines(SENDER, "sent").is_empty()
                && pf.queue().is_empty()
        },
    );
    let unknown = "550 5.1.1 No such user here (in reply to RCPT TO command)";
    let bounced = pf.log_lines(NOBODY, "bounced");
    assert_eq!(bounced.len(), 1, "{}", pf.diagnostics());
    let bounced = &bounced[0];
    s.assert_lmtp_line(bounced);
    assert!(
        bounced.contains(&format!("{queue_id}: to=<{NOBODY}>,"))
            && bounced.contains(" dsn=5.1.1, ")
            && bounced.contains(&format!("(host {} said: {unknown})", s.host)),
        "nobody's bounce: {bounced}"
    );
    let log = pf.maillog();
    assert!(
        log.contains(&format!("{queue_id}: sender non-delivery notification: ")),
        "Postfix sent no bounce{}",
        pf.diagnostics()
    );
    assert!(pf.log_lines(NOBODY, "deferred").is_empty());

    let alice = s.sent_ids(ALICE);
    assert_eq!(alice.len(), 1, "{}", pf.diagnostics());
    assert_eq!(alice, s.sent_ids(BOB), "one LMTP transaction for both");
    for user in [ALICE, BOB] {
        let files = s.files(user);
        assert_eq!(files.len(), 1, "{user}: {files:?}{}", pf.diagnostics());
        s.assert_copy(&files[0], user, &alice[0], &queue_id, &content);
    }
    assert!(
        !s.server.root.join("example.org/nobody").exists(),
        "a maildir was made for an unknown user"
    );

    // The bounce came back to the sender through letterbox, from the null
    // sender, naming the refused recipient and letterbox's reply.
    let bounce_ids = s.sent_ids(SENDER);
    assert_eq!(bounce_ids.len(), 1, "{}", pf.diagnostics());
    let bounce_id = &bounce_ids[0];
    let files = s.files(SENDER);
    assert_eq!(files.len(), 1, "sender: {files:?}");
    let bounce = std::fs::read_to_string(&files[0]).unwrap();
    let head = format!("Return-Path: <>\nDelivered-To: {SENDER}\nReceived: from {HOSTNAME} (");
    assert!(
        bounce.starts_with(&head)
            && bounce.contains(&format!(" with LMTP id {bounce_id}\n\tfor <{SENDER}>; ")),
        "the bounce's trace fields:\n{bounce}"
    );
    // Postfix wraps the notification's lines at 76 columns, going on
    // with four spaces.
    let unfolded = bounce.replace("\n    ", " ");
    for want in [
        format!("<{NOBODY}>: host {} said: {unknown}", s.host),
        format!("Final-Recipient: rfc822; {NOBODY}"),
        "Status: 5.1.1".to_string(),
    ] {
        assert!(
            unfolded.contains(&want),
            "no {want:?} in the bounce:\n{bounce}"
        );
    }
    // The returned message (message/rfc822, 8bit) is the content as sent.
    assert!(
        bounce.contains(&content.replace("\r\n", "\n")),
        "the bounce does not return the message as sent:\n{bounce}"
    );
}
