//! LMTP (RFC 2033) with a real client, Python's smtplib.LMTP: LHLO, exact
//! per-recipient replies after the data, recipients checked at RCPT as
//! over SMTP, and the unix socket's mode and re-creation.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::db::{Backend, TestDb};
use common::server::{Client, TestServer};
use letterbox::config::ListenAddr;
use letterbox::smtp::server::Bound;

/// A server with LMTP on a unix socket and on loopback TCP, and a carol
/// whose quota is smaller than the test message; its directory on SQLite
/// in the server's temp dir, or at `db_url`.
async fn lmtp_server(
    dir: &Path,
    db_url: Option<&str>,
) -> (TestServer, PathBuf, std::net::SocketAddr) {
    let sock = dir.join("lmtp.sock");
    let s = TestServer::start(|c| {
        if let Some(url) = db_url {
            c.database.url = url.to_string();
        }
        c.lmtp.listen = vec![
            ListenAddr::Unix(sock.clone()),
            ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        ];
    })
    .await;
    s.directory
        .user_add("carol@example.org", Some('+'), None, 1000)
        .await
        .unwrap();
    let running = s.running.as_ref().unwrap();
    assert_eq!(running.lmtp[0], Bound::Unix(sock.clone()));
    let Bound::Tcp(tcp) = running.lmtp[1] else {
        panic!("second LMTP listener: {:?}", running.lmtp[1]);
    };
    (s, sock, tcp)
}

/// Runs a Python smtplib.LMTP dialogue against `target` (a socket path or
/// `host:port`) and returns what it printed: one line per reply.
async fn smtplib(target: &str, message: &str) -> String {
    let script = r#"
import smtplib, sys
target, message = sys.argv[1], sys.stdin.read()
if target.startswith("/"):
    c = smtplib.LMTP(target)
else:
    host, port = target.rsplit(":", 1)
    c = smtplib.LMTP(host, int(port))
code, text = c.ehlo("client.example")  # smtplib.LMTP sends LHLO
print(code, " / ".join(text.decode().split("\n")))
code, text = c.mail("sender@remote.example")
print(code, text.decode())
rcpts = ["alice@example.org", "nobody@example.org", "carol@example.org", "Bob@Example.ORG", "alice@example.org"]
accepted = 0
for r in rcpts:
    code, text = c.rcpt(r)
    print(code, text.decode())
    accepted += code == 250
code, text = c.data(message.encode())
print(code, text.decode())
for _ in range(accepted - 1):
    code, text = c.getreply()
    print(code, text.decode())
code, text = c.quit()
print(code, text.decode())
"#;
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(target)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs the LMTP client");
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(message.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the LMTP client finished")
        .unwrap();
    assert!(
        out.status.success(),
        "smtplib failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The message: a 5 KiB body, larger than carol's quota.
fn message() -> String {
    format!(
        "From: sender@remote.example\r\nSubject: lmtp\r\n\r\n{}",
        "lmtp body line\r\n".repeat(350)
    )
}

/// Replaces each delivery id by `<id>`, returning the ids seen.
fn ids(text: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut seen = Vec::new();
    for line in text.lines() {
        match line.rsplit_once(" delivered as ") {
            Some((head, id)) => {
                seen.push(id.to_string());
                out.push_str(&format!("{head} delivered as <id>\n"));
            }
            None => out.push_str(&format!("{line}\n")),
        }
    }
    (out, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_per_recipient_replies_on_sqlite() {
    smtplib_gets_one_exact_reply_per_recipient_on_both_sockets(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_per_recipient_replies_on_postgres() {
    smtplib_gets_one_exact_reply_per_recipient_on_both_sockets(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_per_recipient_replies_on_mysql() {
    smtplib_gets_one_exact_reply_per_recipient_on_both_sockets(Backend::MySql).await;
}

async fn smtplib_gets_one_exact_reply_per_recipient_on_both_sockets(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::new(backend, dir.path()).await else {
        return;
    };
    let url = (backend != Backend::Sqlite).then_some(db.url.as_str());
    let (s, sock, tcp) = lmtp_server(dir.path(), url).await;
    let body = message();
    for (round, target) in [sock.display().to_string(), tcp.to_string()]
        .iter()
        .enumerate()
    {
        let (text, ids) = ids(&smtplib(target, &body).await);
        assert_eq!(
            text,
            "250 mx.example.org greets client.example / PIPELINING / SIZE 26214400 / 8BITMIME / SMTPUTF8 / ENHANCEDSTATUSCODES / CHUNKING\n\
             250 2.1.0 Sender ok\n\
             250 2.1.5 Recipient ok\n\
             550 5.1.1 No such user here\n\
             250 2.1.5 Recipient ok\n\
             250 2.1.5 Recipient ok\n\
             250 2.1.5 Recipient ok\n\
             250 2.0.0 Ok: delivered as <id>\n\
             452 4.2.2 Mailbox full, try again later\n\
             250 2.0.0 Ok: delivered as <id>\n\
             250 2.0.0 Ok: delivered as <id>\n\
             221 2.0.0 mx.example.org closing connection\n",
            "round {round} on {target}"
        );
        assert!(
            ids.iter().all(|i| i == &ids[0]),
            "one id per message: {ids:?}"
        );
        // alice named twice still gets one copy per message.
        assert_eq!(s.new_files("alice@example.org").len(), round + 1);
        assert_eq!(s.new_files("bob@example.org").len(), round + 1);
        assert!(s.new_files("carol@example.org").is_empty());
        // Names sort by time only to the second: find this round's copy.
        let stored = s
            .new_files("bob@example.org")
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .find(|text| text.contains(&format!(" with LMTP id {}\n", ids[0])))
            .expect("bob's copy of this round");
        assert!(stored.starts_with("Return-Path: <sender@remote.example>\nDelivered-To: bob@example.org\nReceived: from client.example ("));
        assert!(stored.ends_with(&format!(
            "\nFrom: sender@remote.example\nSubject: lmtp\n\n{}",
            "lmtp body line\n".repeat(350)
        )));
    }
}

#[tokio::test]
async fn lhlo_is_the_greeting_verb_and_bdat_answers_per_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let (s, sock, _) = lmtp_server(dir.path(), None).await;
    let mut c = Client::new(tokio::net::UnixStream::connect(&sock).await.unwrap());
    assert_eq!(c.reply().await, "220 mx.example.org LMTP letterbox\r\n");
    c.cmd(
        "EHLO client.example",
        "500 5.5.1 Command unrecognized; use LHLO",
    )
    .await;
    c.cmd(
        "HELO client.example",
        "500 5.5.1 Command unrecognized; use LHLO",
    )
    .await;
    c.cmd(
        "MAIL FROM:<a@b.example>",
        "503 5.5.1 Send EHLO or HELO first",
    )
    .await;
    let lhlo = c
        .cmd_prefix("LHLO client.example", "250-mx.example.org")
        .await;
    assert!(!lhlo.contains("STARTTLS"), "{lhlo}");
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("RCPT TO:<carol@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("RCPT TO:<>", "501 5.1.3 Bad recipient address syntax")
        .await;
    let body = message();
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes())
        .await;
    c.send(body.as_bytes()).await;
    let first = c.reply().await;
    assert!(first.starts_with("250 2.0.0 Ok: delivered as "), "{first}");
    assert_eq!(
        c.reply().await,
        "452 4.2.2 Mailbox full, try again later\r\n"
    );
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;
    assert_eq!(s.new_files("alice@example.org").len(), 1);

    // A refusal of the message itself is owed to every recipient.
    let mut c = Client::new(tokio::net::UnixStream::connect(&sock).await.unwrap());
    c.reply().await;
    c.cmd_prefix("LHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    let big = "x".repeat(1000) + "\r\n";
    for _ in 0..27_000 {
        c.send(big.as_bytes()).await;
    }
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await, "552 5.3.4 Message too big\r\n");
    assert_eq!(c.reply().await, "552 5.3.4 Message too big\r\n");
    assert_eq!(s.new_files("alice@example.org").len(), 1);
}

#[tokio::test]
async fn the_unix_socket_is_0660_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run").join("lmtp.sock");
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    // A previous run's socket, left behind by a crash.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let s = TestServer::start(|c| c.lmtp.listen = vec![ListenAddr::Unix(sock.clone())]).await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let mut c = Client::new(tokio::net::UnixStream::connect(&sock).await.unwrap());
    assert_eq!(c.reply().await, "220 mx.example.org LMTP letterbox\r\n");
    drop(c);

    // Shutdown removes it.
    let running = { s }.running.take().unwrap();
    running.shutdown();
    running.wait().await;
    assert!(!sock.exists(), "socket left behind after shutdown");
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious.txt");
    std::fs::write(&path, "operator's file").unwrap();
    let mut config = common::server::test_config(dir.path());
    config.lmtp.listen = vec![ListenAddr::Unix(path.clone())];
    let err = match letterbox::serve::start(config).await {
        Ok(_) => panic!("started over a regular file"),
        Err(e) => format!("{e:#}"),
    };
    assert_eq!(
        err,
        format!(
            "cannot listen for LMTP on unix:{p}: {p} exists and is not a socket",
            p = path.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "operator's file");
}
