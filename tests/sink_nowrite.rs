//! No byte of a sink message touches the disk. A test binary of its own:
//! `/proc/self/io` counts the whole process, so nothing else may run
//! alongside; the tests here take turns through [`ALONE`].
//!
//! `write_bytes` counts bytes this process caused to be sent to storage
//! (page-cache dirtying included), unlike `wchar`, which also counts
//! sockets and pipes. Files on a tmpfs would escape it, so the test also
//! checks that no new file is open and that the temporary directory did
//! not change.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::db::{Backend, TestDb};
use common::server::TestServer;
use letterbox::config::SinkConfig;
use letterbox::directory::Directory;
use letterbox::sink::Sink;

fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    let line = io.lines().find(|l| l.starts_with("write_bytes:")).unwrap();
    line["write_bytes:".len()..].trim().parse().unwrap()
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Regular files (deleted or not) this process holds open.
fn open_files() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.starts_with('/') && !p.starts_with("/dev/") && !p.starts_with("/proc/"))
        .collect()
}

/// Held for a whole test, setup and teardown included, so one test's
/// writes never land in another's measurement.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn sink_messages_never_touch_the_disk() {
    let _alone = ALONE.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let db = TestDb::new(Backend::Sqlite, tmp.path()).await.unwrap();
    // A resolve cache, so requests after the first do not even read the db.
    let directory = Directory::connect(&db.url, 2, Duration::from_secs(3600))
        .await
        .unwrap();
    directory.migrate().await.unwrap();
    directory.sink_add("*.tmp.example.org", 3600).await.unwrap();
    let sink = Sink::new(&SinkConfig::default(), 10 << 20);
    let router = sink.router(directory, Some('+'), Arc::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1/mailbox", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(sink.clone().serve(listener, router, shutdown.clone()));
    let http = reqwest::Client::new();
    // Warm up: the directory connection, the resolve cache, the client.
    for n in 0..4 {
        let r = http
            .get(format!("{base}/u{n}@a.tmp.example.org"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    let before = (
        write_bytes(),
        listing(tmp.path()),
        listing(&std::env::temp_dir()),
        open_files(),
    );
    let body = "x".repeat(4000);
    for n in 0..1000 {
        let raw = format!(
            "From: a@example.net\r\nTo: u{}@a.tmp.example.org\r\nSubject: {n}\r\n\r\n{body}\r\n",
            n % 4
        );
        sink.insert(
            &format!("u{}@a.tmp.example.org", n % 4),
            Duration::from_secs(3600),
            Bytes::from(raw),
        )
        .unwrap();
    }
    for n in 0..4 {
        let list: serde_json::Value = http
            .get(format!("{base}/u{n}@a.tmp.example.org"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list.as_array().unwrap().len(), 100);
        let id = list[0]["id"].as_str().unwrap();
        for tail in ["", "/source", "/html"] {
            http.get(format!("{base}/u{n}@a.tmp.example.org/{id}{tail}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
    }
    let after = (
        write_bytes(),
        listing(tmp.path()),
        listing(&std::env::temp_dir()),
        open_files(),
    );

    assert_eq!(before.0, after.0, "write_bytes grew");
    assert_eq!(before.1, after.1, "the test's directory changed");
    let new_in_tmp: Vec<_> = after.2.difference(&before.2).collect();
    let new_open: Vec<_> = after.3.difference(&before.3).collect();
    assert!(
        new_open.is_empty(),
        "files opened: {new_open:?}; new in temp dir: {new_in_tmp:?}"
    );
    assert_eq!(sink.usage().1, 400);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// Every file and directory under `dir`: kind, length and modification
/// time, so a file written, created, removed or touched shows up.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, (bool, u64, std::time::SystemTime)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.insert(
                e.path().display().to_string(),
                (meta.is_dir(), meta.len(), meta.modified().unwrap()),
            );
        }
    }
    out
}

/// Bytes the spool keeps in memory before moving to a file, for this test.
const SPOOL_LIMIT: u64 = 64 * 1024;
const TRANSACTIONS: usize = 1000;
const SESSIONS: usize = 4;

/// The sink mailboxes mail goes to, over three subdomains of the rule.
fn sink_boxes() -> Vec<String> {
    (0..20)
        .map(|n| format!("u{n}@run{}.tmp.example.org", n % 3))
        .collect()
}

/// Message `n`: every tenth is larger than the spool's memory limit.
fn content(n: usize, to: &str) -> String {
    let lines = if n.is_multiple_of(10) { 2000 } else { 20 };
    let mut body = format!("From: a@remote.example\r\nTo: {to}\r\nSubject: message {n}\r\n\r\n");
    for l in 0..lines {
        body.push_str(&format!(
            "{n:04} {l:04} abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
        ));
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_mail_over_smtp_never_touches_the_disk() {
    let _alone = ALONE.lock().await;
    let s = TestServer::start_with_sink(3600, |c| {
        // Every recipient is looked up once, during the warm-up below.
        c.database.cache_ttl = letterbox::units::Duration::from_secs(3600);
        c.maildir.spool_memory_limit = letterbox::units::ByteSize(SPOOL_LIMIT);
    })
    .await;
    let sink = s.running.as_ref().unwrap().runtime.sink.clone();
    let api = format!(
        "http://{}/api/v1/mailbox",
        s.running.as_ref().unwrap().http_addr.unwrap()
    );
    let tmp = s.root.parent().unwrap().to_path_buf();
    let spool = s.root.join(letterbox::delivery::SPOOL_DIR);
    assert!(spool.is_dir(), "the spool directory exists before the test");
    let boxes = sink_boxes();
    assert!(content(0, &boxes[0]).len() as u64 > 2 * SPOOL_LIMIT);

    // Warm up: every address resolved and cached (RCPT, then RSET), the
    // HTTP client connected. Database work is all done before the baseline.
    let http = reqwest::Client::new();
    {
        let mut c = s.connect().await;
        c.greeting().await;
        c.cmd_prefix("EHLO client.example", "250-mx.example.org")
            .await;
        c.cmd("MAIL FROM:<a@remote.example>", "250 2.1.0 Sender ok")
            .await;
        for b in boxes
            .iter()
            .map(String::as_str)
            .chain(["alice@example.org"])
        {
            c.cmd(&format!("RCPT TO:<{b}>"), "250 2.1.5 Recipient ok")
                .await;
        }
        c.cmd("RSET", "250 2.0.0 Ok").await;
        c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
            .await;
        let r = http
            .get(format!("{api}/{}", boxes[0]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }

    let before = (
        write_bytes(),
        tree(&tmp),
        listing(&std::env::temp_dir()),
        open_files(),
    );
    assert!(before.1.keys().any(|p| p.ends_with(".letterbox-spool")));

    // Several sessions at once, each pipelining its commands; DATA and
    // BDAT, one or two sink recipients, some messages past the spool limit.
    let mut sessions = Vec::new();
    for k in 0..SESSIONS {
        let mut c = s.connect().await;
        let boxes = boxes.clone();
        sessions.push(tokio::spawn(async move {
            c.greeting().await;
            c.cmd_prefix("EHLO client.example", "250-mx.example.org")
                .await;
            let mut copies = 0;
            for n in (k..TRANSACTIONS).step_by(SESSIONS) {
                let to = &boxes[n % boxes.len()];
                let mut rcpts = vec![to.as_str()];
                if n.is_multiple_of(5) {
                    rcpts.push(&boxes[(n + 7) % boxes.len()]);
                }
                copies += rcpts.len();
                let body = content(n, to);
                let mut head = "MAIL FROM:<a@remote.example>\r\n".to_string();
                for r in &rcpts {
                    head.push_str(&format!("RCPT TO:<{r}>\r\n"));
                }
                let bdat = n.is_multiple_of(3);
                if bdat {
                    head.push_str(&format!("BDAT {} LAST\r\n", body.len()));
                    c.send(head.as_bytes()).await;
                    c.send(body.as_bytes()).await;
                } else {
                    head.push_str("DATA\r\n");
                    c.send(head.as_bytes()).await;
                }
                assert_eq!(c.reply().await, "250 2.1.0 Sender ok\r\n");
                for _ in &rcpts {
                    assert_eq!(c.reply().await, "250 2.1.5 Recipient ok\r\n");
                }
                if !bdat {
                    assert_eq!(c.reply().await, "354 End data with <CR><LF>.<CR><LF>\r\n");
                    c.send(body.as_bytes()).await;
                    c.send(b".\r\n").await;
                }
                let reply = c.reply().await;
                assert!(
                    reply.starts_with("250 2.0.0 Ok: delivered as "),
                    "{n}: {reply}"
                );
            }
            c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
                .await;
            copies
        }));
    }
    let mut copies = 0;
    for t in sessions {
        copies += t.await.unwrap();
    }
    assert_eq!(copies, TRANSACTIONS + TRANSACTIONS / 5);
    assert_eq!(sink.usage().1, copies);

    // Read back over HTTP (also no write): a large one, byte for byte.
    let list: serde_json::Value = http
        .get(format!("{api}/{}", boxes[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let large = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["subject"] == "message 980")
        .expect("message 980 in its mailbox");
    let source = http
        .get(format!(
            "{api}/{}/{}/source",
            boxes[0],
            large["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let sent = content(980, &boxes[0]);
    assert!(sent.len() as u64 > SPOOL_LIMIT);
    assert!(
        source.ends_with(sent.as_bytes()),
        "message 980 came back altered"
    );

    let after = (
        write_bytes(),
        tree(&tmp),
        listing(&std::env::temp_dir()),
        open_files(),
    );
    assert_eq!(before.0, after.0, "write_bytes grew");
    assert_eq!(
        before.1, after.1,
        "the maildir root or the database changed"
    );
    let new_in_tmp: Vec<_> = after.2.difference(&before.2).collect();
    let new_open: Vec<_> = after.3.difference(&before.3).collect();
    assert!(
        new_open.is_empty(),
        "files opened: {new_open:?}; new in temp dir: {new_in_tmp:?}"
    );

    // The witnesses see writes: the same large message for a real mailbox
    // is spooled to a file and delivered to disk.
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail("a@remote.example", &["alice@example.org"], &sent)
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert!(
        write_bytes() > after.0,
        "write_bytes did not see a maildir delivery"
    );
    assert_ne!(tree(&tmp), after.1);
    assert_eq!(s.new_files("alice@example.org").len(), 1);
}
