//! STARTTLS, timeouts on a paused clock, and real clients.

mod common;

use std::sync::Arc;

use common::server::{Client, TestServer};
use letterbox::smtp::Session;
use letterbox::smtp::session::Connection;
use tokio_util::sync::CancellationToken;

fn write_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["mx.example.org".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

fn connector(der: Vec<u8>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext_and_resets_state() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(certs.path());
    let s = TestServer::start(|c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
    })
    .await;
    let mut c = s.connect().await;
    c.greeting().await;
    let ehlo = c.cmd_prefix("EHLO client.example", "250-").await;
    assert!(ehlo.ends_with("250-CHUNKING\r\n250 STARTTLS\r\n"), "{ehlo}");
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    // The injected RCPT must never be executed inside TLS.
    c.send(b"STARTTLS\r\nRCPT TO:<alice@example.org>\r\n").await;
    assert_eq!(c.reply().await, "220 2.0.0 Ready to start TLS\r\n");
    let tcp = c.stream.into_inner();
    let tls = connector(der)
        .connect("mx.example.org".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut t = Client::new(tls);
    // State was reset: no transaction, and EHLO is needed again.
    t.cmd("RCPT TO:<alice@example.org>", "503 5.5.1 Need MAIL command")
        .await;
    t.cmd(
        "MAIL FROM:<a@b.example>",
        "503 5.5.1 Send EHLO or HELO first",
    )
    .await;
    let ehlo = t.cmd_prefix("EHLO client.example", "250-").await;
    assert!(
        ehlo.ends_with("250 CHUNKING\r\n"),
        "STARTTLS offered inside TLS: {ehlo}"
    );
    t.cmd("STARTTLS", "503 5.5.1 TLS already active").await;
    t.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    t.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    t.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    t.send(b"Subject: tls\r\n\r\nsecret\r\n.\r\n").await;
    assert!(t.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    let text =
        String::from_utf8(std::fs::read(&s.new_files("alice@example.org")[0]).unwrap()).unwrap();
    assert!(text.contains(" with ESMTPS id "), "{text}");
    assert!(text.contains("(TLSv1.3:TLS13_"), "{text}");
}

#[tokio::test]
async fn command_and_data_timeouts_on_a_paused_clock() {
    let s = TestServer::start(|_| {}).await;
    let ctx = s.running.as_ref().unwrap().pipeline.clone();
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();

    // DATA block timeout (180 s). The directory is consulted on a running
    // clock; it is paused only once the client stalls mid-message.
    let (client, server) = tokio::io::duplex(4096);
    let session = Session::new(
        server,
        ctx.clone(),
        Connection::new(ip),
        CancellationToken::new(),
    );
    let task = tokio::spawn(session.run(true));
    let mut c = Client::new(client);
    c.patience = std::time::Duration::from_secs(3600);
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    tokio::time::pause();
    c.send(b"Subject: stalled\r\n").await;
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    task.await.unwrap().unwrap();
    assert!(s.new_files("alice@example.org").is_empty());

    // Command timeout (300 s).
    let (client, server) = tokio::io::duplex(4096);
    let session = Session::new(server, ctx, Connection::new(ip), CancellationToken::new());
    let task = tokio::spawn(session.run(true));
    let mut c = Client::new(client);
    c.patience = std::time::Duration::from_secs(3600);
    c.greeting().await;
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn in_memory_stream_pregreet_is_refused() {
    let s = TestServer::start(|_| {}).await;
    let ctx = s.running.as_ref().unwrap().pipeline.clone();
    let (client, server) = tokio::io::duplex(4096);
    let mut c = Client::new(client);
    c.send(b"EHLO hasty.example\r\n").await;
    let session = Session::new(
        server,
        ctx,
        Connection::new("192.0.2.7".parse().unwrap()),
        CancellationToken::new(),
    );
    tokio::spawn(session.run(true));
    assert_eq!(
        c.reply().await,
        "554 5.5.0 Protocol error: talking before the greeting\r\n"
    );
}

/// Runs a blocking program on the blocking pool so the server keeps running.
async fn run(cmd: &'static str, args: Vec<String>, stdin: Option<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(cmd)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{cmd} is required for this test (install it as .ci/run does): {e}")
            });
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_delivers_over_starttls() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_cert(certs.path());
    let s = TestServer::start(|c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
    })
    .await;
    let out = run(
        "swaks",
        vec![
            "--server".into(),
            s.addr.ip().to_string(),
            "--port".into(),
            s.addr.port().to_string(),
            "--to".into(),
            "alice@example.org,bob@example.org".into(),
            "--from".into(),
            "sender@remote.example".into(),
            "--tls".into(),
            "--pipeline".into(),
            "--header".into(),
            "Subject: via swaks".into(),
        ],
        None,
    )
    .await;
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("<~  250 2.0.0 Ok: delivered as "), "{log}");
    assert_eq!(s.new_files("alice@example.org").len(), 1);
    assert_eq!(s.new_files("bob@example.org").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_client() {
    let s = TestServer::start(|_| {}).await;
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port})
code, _ = s.ehlo("client.example")
assert code == 250
assert s.has_extn("smtputf8") and s.has_extn("chunking") and s.has_extn("size")
refused = s.sendmail("sender@remote.example", ["alice@example.org"], b"Subject: smtplib\r\n\r\nhello\r\n")
assert refused == {{}}, refused
try:
    s.sendmail("sender@remote.example", ["nobody@example.org"], b"Subject: x\r\n\r\nx\r\n")
    raise SystemExit("accepted an unknown user")
except smtplib.SMTPRecipientsRefused as e:
    code, msg = e.recipients["nobody@example.org"]
    assert code == 550 and msg == b"5.1.1 No such user here", (code, msg)
s.quit()
print("ok")
"#,
        port = s.addr.port()
    );
    let out = run("python3", vec!["-c".into(), script], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    assert_eq!(s.new_files("alice@example.org").len(), 1);
}
