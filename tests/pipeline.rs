//! The pipeline seam: a session driven over an in-memory stream with a
//! pipeline of the test's own (no socket, no listener), checks at every
//! stage with each kind of verdict, and the wave-1 findings the seam
//! mended (the null forward-path, global connection limits, blocking work
//! kept off the runtime).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::server::{Client, TestServer, test_config};
use futures_util::future::BoxFuture;
use letterbox::delivery::Maildirs;
use letterbox::directory::Directory;
use letterbox::pipeline::{Check, CheckState, Facts, Header, Pipeline, Stage, Verdict};
use letterbox::reply::Reply;
use letterbox::runtime::Runtime;
use letterbox::sink::Sink;
use letterbox::smtp::Session;
use letterbox::smtp::session::Connection;
use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;

/// A runtime on a temp SQLite directory with example.org and alice, and
/// nothing listening.
struct Bare {
    runtime: Arc<Runtime>,
    root: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

async fn bare() -> Bare {
    let tmp = tempfile::tempdir().unwrap();
    let config = test_config(tmp.path());
    let directory = Directory::connect(&config.database.url, 2, Duration::ZERO)
        .await
        .unwrap();
    directory.migrate().await.unwrap();
    directory.domain_add("example.org").await.unwrap();
    for u in ["alice@example.org", "bob@example.org"] {
        directory.user_add(u, Some('+'), None, 0).await.unwrap();
    }
    let maildirs = Maildirs::new(&config.maildir, &config.hostname).unwrap();
    let sink = Sink::new(&config.sink, config.smtp.max_message_size.0);
    let root = config.maildir.root.clone();
    let runtime = Runtime::new(Arc::new(config), directory, maildirs, sink)
        .await
        .unwrap();
    Bare {
        runtime: Arc::new(runtime),
        root,
        _tmp: tmp,
    }
}

impl Bare {
    /// A session with `checks`, over an in-memory stream; the client side.
    fn session(&self, checks: Vec<Arc<dyn Check>>) -> Client<DuplexStream> {
        let pipeline = Arc::new(Pipeline::new(self.runtime.clone(), checks));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let conn = Connection::new("192.0.2.9".parse().unwrap());
        let session = Session::new(server, pipeline, conn, CancellationToken::new());
        tokio::spawn(session.run(true));
        Client::new(client)
    }

    fn inbox(&self, local: &str) -> Vec<String> {
        let dir = self.root.join("example.org").join(local).join("new");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }
}

/// A check that gives a fixed verdict at one stage and records what it saw.
struct Fixed {
    stage: Stage,
    verdict: Verdict,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Fixed {
    fn check(stage: Stage, verdict: Verdict) -> (Arc<dyn Check>, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let check = Arc::new(Fixed {
            stage,
            verdict,
            seen: seen.clone(),
        });
        (check, seen)
    }
}

struct FixedState {
    stage: Stage,
    verdict: Verdict,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Check for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }
    fn open(&self) -> Box<dyn CheckState> {
        Box::new(FixedState {
            stage: self.stage,
            verdict: self.verdict.clone(),
            seen: self.seen.clone(),
        })
    }
}

impl CheckState for FixedState {
    fn check<'a>(&'a mut self, stage: Stage, facts: Facts<'a>) -> BoxFuture<'a, Verdict> {
        let line = format!(
            "{stage:?} ip={} helo={:?} from={:?} rcpt={:?} rcpts={} id={} content={:?}",
            facts.ip,
            facts.helo,
            facts.sender,
            facts.rcpt.map(|r| r.address.as_str()),
            facts.recipients.len(),
            facts.id.is_some(),
            facts.content.map(|c| c.len()),
        );
        self.seen.lock().unwrap().push(line);
        let verdict = if stage == self.stage {
            self.verdict.clone()
        } else {
            Verdict::Continue
        };
        Box::pin(async move { verdict })
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().push("reset".into());
    }
}

const BODY: &str = "Subject: seam\r\n\r\nhello\r\n";

async fn through_rcpt(c: &mut Client<DuplexStream>) {
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-mx.example.org")
        .await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
}

#[tokio::test]
async fn a_check_sees_each_stage_with_what_is_known_then() {
    let b = bare().await;
    let (check, seen) = Fixed::check(Stage::Data, Verdict::Continue);
    let mut c = b.session(vec![check]);
    through_rcpt(&mut c).await;
    let reply = c.cmd_prefix("DATA", "354").await;
    assert_eq!(reply, "354 End data with <CR><LF>.<CR><LF>\r\n");
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    c.cmd("RSET", "250 2.0.0 Ok").await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            "Connect ip=192.0.2.9 helo=None from=None rcpt=None rcpts=0 id=false content=None",
            "reset",
            "Helo ip=192.0.2.9 helo=Some(\"client.example\") from=None rcpt=None rcpts=0 id=false content=None",
            "Mail ip=192.0.2.9 helo=Some(\"client.example\") from=Some(\"s@remote.example\") rcpt=None rcpts=0 id=true content=None",
            "Rcpt ip=192.0.2.9 helo=Some(\"client.example\") from=Some(\"s@remote.example\") rcpt=Some(\"alice@example.org\") rcpts=0 id=true content=None",
            &format!(
                "Data ip=192.0.2.9 helo=Some(\"client.example\") from=Some(\"s@remote.example\") rcpt=None rcpts=1 id=true content=Some({})",
                BODY.len()
            ),
            "reset",
            "reset",
        ]
    );
}

#[tokio::test]
async fn refusals_at_each_stage_use_the_checks_reply() {
    let b = bare().await;
    let own = Reply::new(554, "5.7.1", "Go away");
    // Connect: the reply replaces the greeting and the session ends.
    let (check, _) = Fixed::check(Stage::Connect, Verdict::reject(Some(own.clone())));
    let mut c = b.session(vec![check]);
    assert_eq!(c.reply().await, "554 5.7.1 Go away\r\n");
    assert_eq!(c.reply().await, "");

    // Helo: refused, and MAIL still needs a greeting.
    let (check, _) = Fixed::check(Stage::Helo, Verdict::tempfail(None));
    let mut c = b.session(vec![check]);
    c.greeting().await;
    c.cmd(
        "EHLO client.example",
        "451 4.7.1 Temporarily rejected by policy, try again later",
    )
    .await;
    c.cmd(
        "MAIL FROM:<s@remote.example>",
        "503 5.5.1 Send EHLO or HELO first",
    )
    .await;

    // Mail: no transaction begins.
    let (check, _) = Fixed::check(Stage::Mail, Verdict::reject(None));
    let mut c = b.session(vec![check]);
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd(
        "MAIL FROM:<s@remote.example>",
        "550 5.7.1 Rejected by policy",
    )
    .await;
    c.cmd("RCPT TO:<alice@example.org>", "503 5.5.1 Need MAIL command")
        .await;

    // Rcpt: that recipient only.
    let (check, _) = Fixed::check(Stage::Rcpt, Verdict::reject(Some(own.clone())));
    let mut c = b.session(vec![check]);
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "554 5.7.1 Go away")
        .await;
    c.cmd("DATA", "503 5.5.1 Need RCPT command").await;

    // Data: the message is refused and nothing is delivered.
    let (check, _) = Fixed::check(Stage::Data, Verdict::reject(Some(own)));
    let mut c = b.session(vec![check]);
    through_rcpt(&mut c).await;
    c.cmd_prefix("DATA", "354").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    assert_eq!(c.reply().await, "554 5.7.1 Go away\r\n");
    assert!(b.inbox("alice").is_empty());
}

#[tokio::test]
async fn a_421_from_a_check_closes_the_connection() {
    let b = bare().await;
    let bye = Reply::new(421, "4.7.0", "Milter says goodbye");
    const BYE: &str = "421 4.7.0 Milter says goodbye";
    let session = |stage| {
        let (check, _) = Fixed::check(stage, Verdict::tempfail(Some(bye.clone())));
        b.session(vec![check])
    };

    let mut c = session(Stage::Helo);
    c.greeting().await;
    c.cmd("EHLO client.example", BYE).await;
    assert_eq!(c.reply().await, "", "closed after the 421");

    let mut c = session(Stage::Mail);
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@remote.example>", BYE).await;
    assert_eq!(c.reply().await, "", "closed after the 421");

    let mut c = session(Stage::Rcpt);
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", BYE).await;
    assert_eq!(c.reply().await, "", "closed after the 421");

    let mut c = session(Stage::Data);
    through_rcpt(&mut c).await;
    c.cmd_prefix("DATA", "354").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    assert_eq!(c.reply().await, format!("{BYE}\r\n"));
    assert_eq!(c.reply().await, "", "closed after the 421");
    assert!(b.inbox("alice").is_empty());
}

#[tokio::test]
async fn headers_from_checks_land_below_received_and_discard_stores_nothing() {
    let b = bare().await;
    let spam = Header::new("X-Spam", "no").unwrap();
    let (at_rcpt, _) = Fixed::check(
        Stage::Rcpt,
        Verdict::AddHeaders(vec![Header::new("X-Checked-Rcpt", "1").unwrap()]),
    );
    let (at_data, _) = Fixed::check(Stage::Data, Verdict::AddHeaders(vec![spam]));
    let mut c = b.session(vec![at_rcpt, at_data]);
    through_rcpt(&mut c).await;
    c.cmd_prefix("DATA", "354").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    let reply = c.reply().await;
    let id = reply
        .trim_end()
        .strip_prefix("250 2.0.0 Ok: delivered as ")
        .unwrap();
    let inbox = b.inbox("alice");
    assert_eq!(inbox.len(), 1);
    let after_received = inbox[0]
        .split_once("\tfor <alice@example.org>; ")
        .unwrap()
        .1;
    let (_, rest) = after_received.split_once('\n').unwrap();
    assert_eq!(
        rest,
        "X-Checked-Rcpt: 1\nX-Spam: no\nSubject: seam\n\nhello\n"
    );
    assert!(inbox[0].contains(&format!(" id {id}\n")));

    // Discard: the client sees an accept, no mailbox sees the message.
    let (discard, _) = Fixed::check(Stage::Data, Verdict::Discard);
    let mut c = b.session(vec![discard]);
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd_prefix("DATA", "354").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    assert!(b.inbox("bob").is_empty());
}

/// A check that finishes only when `n` checks of its barrier run at once.
struct Together(Arc<tokio::sync::Barrier>);

struct TogetherState(Arc<tokio::sync::Barrier>);

impl Check for Together {
    fn name(&self) -> &str {
        "together"
    }
    fn open(&self) -> Box<dyn CheckState> {
        Box::new(TogetherState(self.0.clone()))
    }
}

impl CheckState for TogetherState {
    fn check<'a>(&'a mut self, stage: Stage, _: Facts<'a>) -> BoxFuture<'a, Verdict> {
        let barrier = self.0.clone();
        Box::pin(async move {
            if stage == Stage::Rcpt {
                barrier.wait().await;
            }
            Verdict::Continue
        })
    }
}

#[tokio::test]
async fn the_checks_of_a_stage_run_side_by_side() {
    let b = bare().await;
    // Three checks that each wait for all three: run one after another,
    // the first would wait for ever.
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let checks: Vec<Arc<dyn Check>> = (0..3)
        .map(|_| Arc::new(Together(barrier.clone())) as Arc<dyn Check>)
        .collect();
    let mut c = b.session(checks);
    c.patience = Duration::from_secs(10);
    through_rcpt(&mut c).await;
}

#[tokio::test]
async fn a_null_forward_path_is_a_syntax_error() {
    let s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<>", "250 2.1.0 Sender ok").await;
    c.cmd("RCPT TO:<>", "501 5.1.3 Bad recipient address syntax")
        .await;
}

#[tokio::test]
async fn connection_limits_are_shared_by_every_listener() {
    let s = TestServer::start(|c| {
        c.smtp.listen = vec![
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        ];
        c.smtp.max_connections = 2;
        c.smtp.max_connections_per_ip = 2;
    })
    .await;
    let addrs = s.running.as_ref().unwrap().smtp_addrs.clone();
    assert_eq!(addrs.len(), 2);
    let mut held = Vec::new();
    for addr in &addrs {
        let mut c = Client::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        c.greeting().await;
        held.push(c);
    }
    // Two listeners, but one count: the third connection is over the cap
    // whichever address it uses.
    for addr in &addrs {
        let mut c = Client::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        assert_eq!(
            c.reply().await,
            "421 4.7.0 Too many connections, try again later\r\n"
        );
    }
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = Client::new(tokio::net::TcpStream::connect(addrs[1]).await.unwrap());
    c.greeting().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_message_past_the_spool_memory_limit_is_written_off_the_runtime() {
    // In debug builds the spool panics if its file is written on the
    // runtime (letterbox::blocking), so this fails if the hand-off goes.
    let s = TestServer::start(|c| c.maildir.spool_memory_limit = letterbox::units::ByteSize(1024))
        .await;
    let mut c = s.connect().await;
    c.greeting().await;
    let body = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdef\r\n".repeat(20_000)
    );
    let reply = c
        .send_mail("s@remote.example", &["alice@example.org"], &body)
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let stored = std::fs::read(&s.new_files("alice@example.org")[0]).unwrap();
    assert!(stored.ends_with(&"0123456789abcdef\n".repeat(20_000).into_bytes()));
}

#[tokio::test(flavor = "current_thread")]
async fn tls_reload_reads_its_files_off_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["mx.example.org".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let s = TestServer::start(|c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
    })
    .await;
    let rt = s.running.as_ref().unwrap().runtime.clone();
    assert!(rt.reload_tls().await.unwrap());
    assert!(rt.tls_available());
}

#[tokio::test]
async fn edits_rewrite_the_message_and_quarantine_goes_to_junk() {
    let b = bare().await;
    let edits = vec![
        letterbox::pipeline::Edit::DeleteHeader {
            name: "x-forged".into(),
            index: 1,
        },
        letterbox::pipeline::Edit::ChangeHeader {
            name: "Subject".into(),
            index: 1,
            value: "[checked] seam".into(),
        },
    ];
    let (edit, _) = Fixed::check(Stage::Data, Verdict::Modify(edits));
    let (junk, _) = Fixed::check(Stage::Data, Verdict::Quarantine("looks like spam".into()));
    let mut c = b.session(vec![edit, junk]);
    through_rcpt(&mut c).await;
    c.cmd_prefix("DATA", "354").await;
    c.send(b"X-Forged: pass\r\nSubject: seam\r\n\r\nhello\r\n.\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    assert!(
        b.inbox("alice").is_empty(),
        "quarantined mail is not in INBOX"
    );
    let junk = b.root.join("example.org/alice/.Junk/new");
    let files: Vec<_> = std::fs::read_dir(&junk).unwrap().collect();
    assert_eq!(files.len(), 1);
    let stored = std::fs::read_to_string(files[0].as_ref().unwrap().path()).unwrap();
    let (_, rest) = stored
        .split_once("\tfor <alice@example.org>; ")
        .unwrap()
        .1
        .split_once('\n')
        .unwrap();
    assert_eq!(rest, "Subject: [checked] seam\n\nhello\n");
}

#[tokio::test]
async fn a_check_may_drop_and_add_local_recipients_only() {
    let b = bare().await;
    let edits = vec![
        letterbox::pipeline::Edit::DeleteRecipient("<alice@example.org>".into()),
        letterbox::pipeline::Edit::AddRecipient("<bob@example.org>".into()),
        letterbox::pipeline::Edit::AddRecipient("<someone@remote.example>".into()),
    ];
    let (edit, _) = Fixed::check(Stage::Data, Verdict::Modify(edits));
    let mut c = b.session(vec![edit]);
    through_rcpt(&mut c).await;
    c.cmd_prefix("DATA", "354").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    assert!(b.inbox("alice").is_empty());
    let bob = b.inbox("bob");
    assert_eq!(bob.len(), 1);
    assert!(bob[0].ends_with("\nSubject: seam\n\nhello\n"), "{}", bob[0]);
}
