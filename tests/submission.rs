//! Submission (RFC 6409) on 587 with STARTTLS and 465 with implicit TLS:
//! exact dialogues over rustls, and the real clients people use (Python's
//! smtplib, swaks). Logins, the lockout after failed ones, who may send
//! as whom, relaying, and the Received header's ESMTPSA.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::server::{Client, TestServer};
use letterbox::config::Config;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const PASSWORD: &str = "correct horse battery";
const LOCKED: &str = "421 4.7.0 Too many failed logins from your address, try again later";
const AUTH_OK: &str = "235 2.7.0 Authentication successful";
const AUTH_FAILED: &str = "535 5.7.8 Authentication credentials invalid";

/// A server with submission on 127.0.0.1 (both ports), a certificate for
/// mx.example.org and 127.0.0.1, alice (with a password), bob
/// (receive-only), the alias team@ → alice and the catch-all @ → bob.
struct Sub {
    s: TestServer,
    /// The certificate, for clients that verify it.
    cert: PathBuf,
    der: Vec<u8>,
    starttls: SocketAddr,
    implicit: SocketAddr,
    _certs: tempfile::TempDir,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Sub {
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["mx.example.org".into(), "127.0.0.1".into()])
        .unwrap();
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let (c2, k2) = (cert.clone(), key.clone());
    let s = TestServer::start(move |c| {
        c.tls.cert = Some(c2);
        c.tls.key = Some(k2);
        c.submission.listen = vec!["127.0.0.1:0".parse().unwrap()];
        c.submission.listen_tls = vec!["127.0.0.1:0".parse().unwrap()];
        tweak(c);
    })
    .await;
    let hash = tokio::task::spawn_blocking(|| letterbox::password::hash(PASSWORD).unwrap())
        .await
        .unwrap();
    let d = &s.directory;
    d.user_set_password("alice@example.org", Some('+'), &hash)
        .await
        .unwrap();
    d.alias_add("team@example.org", &["alice@example.org".into()], Some('+'))
        .await
        .unwrap();
    d.alias_add("@example.org", &["bob@example.org".into()], Some('+'))
        .await
        .unwrap();
    let running = s.running.as_ref().unwrap();
    let (starttls, implicit) = (running.submission_addrs[0], running.submissions_addrs[0]);
    Sub {
        s,
        cert,
        der: ck.cert.der().to_vec(),
        starttls,
        implicit,
        _certs: certs,
    }
}

fn connector(der: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.to_vec().into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn plain(user: &str, password: &str) -> String {
    STANDARD.encode(format!("\0{user}\0{password}"))
}

impl Sub {
    /// Port 587: greeting, EHLO, STARTTLS, and EHLO again inside TLS;
    /// returns the client and the second EHLO reply.
    async fn starttls(&self) -> (Client<TlsStream<TcpStream>>, String) {
        let mut c = Client::new(TcpStream::connect(self.starttls).await.unwrap());
        c.greeting().await;
        let ehlo = c.cmd_prefix("EHLO client.example", "250-").await;
        assert!(ehlo.ends_with("250-CHUNKING\r\n250 STARTTLS\r\n"), "{ehlo}");
        c.cmd("STARTTLS", "220 2.0.0 Ready to start TLS").await;
        let tls = connector(&self.der)
            .connect("mx.example.org".try_into().unwrap(), c.stream.into_inner())
            .await
            .unwrap();
        let mut t = Client::new(tls);
        let ehlo = t.cmd_prefix("EHLO client.example", "250-").await;
        (t, ehlo)
    }

    /// Port 465: TLS, then the greeting and EHLO.
    async fn implicit(&self) -> Client<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.implicit).await.unwrap();
        let tls = connector(&self.der)
            .connect("mx.example.org".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut t = Client::new(tls);
        t.greeting().await;
        t.cmd_prefix("EHLO client.example", "250-").await;
        t
    }

    /// A session on 465 logged in as alice.
    async fn alice(&self) -> Client<TlsStream<TcpStream>> {
        let mut t = self.implicit().await;
        t.cmd(
            &format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD)),
            AUTH_OK,
        )
        .await;
        t
    }

    fn read(&self, mailbox: &str) -> Vec<String> {
        self.s
            .new_files(mailbox)
            .iter()
            .map(|p| String::from_utf8(std::fs::read(p).unwrap()).unwrap())
            .collect()
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of
/// characters within one line.
fn glob(pattern: &str, text: &str) -> bool {
    let pl: Vec<&str> = pattern.split('\n').collect();
    let tl: Vec<&str> = text.split('\n').collect();
    pl.len() == tl.len()
        && pl.iter().zip(&tl).all(|(p, t)| {
            let parts: Vec<&str> = p.split('*').collect();
            let mut rest = *t;
            for (i, part) in parts.iter().enumerate() {
                if i == 0 {
                    let Some(r) = rest.strip_prefix(part) else {
                        return false;
                    };
                    rest = r;
                } else if i == parts.len() - 1 {
                    return rest.ends_with(part);
                } else {
                    let Some(at) = rest.find(part) else {
                        return false;
                    };
                    rest = &rest[at + part.len()..];
                }
            }
            rest.is_empty()
        })
}

#[tokio::test]
async fn no_auth_without_tls_and_no_mail_without_auth() {
    let sub = start(|_| {}).await;
    // Port 587 before STARTTLS: no AUTH offered, none accepted, no MAIL.
    let mut c = Client::new(TcpStream::connect(sub.starttls).await.unwrap());
    c.greeting().await;
    c.cmd(
        "EHLO client.example",
        "250-mx.example.org greets client.example\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n\
         250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 STARTTLS",
    )
    .await;
    let ir = plain("alice@example.org", PASSWORD);
    c.cmd(
        &format!("AUTH PLAIN {ir}"),
        "538 5.7.11 Encryption required for requested authentication mechanism",
    )
    .await;
    c.cmd(
        "AUTH LOGIN",
        "538 5.7.11 Encryption required for requested authentication mechanism",
    )
    .await;
    c.cmd(
        "MAIL FROM:<alice@example.org>",
        "530 5.7.0 Authentication required",
    )
    .await;
    c.cmd("RCPT TO:<bob@example.org>", "503 5.5.1 Need MAIL command")
        .await;
    // Inside TLS, AUTH is offered; MAIL still needs it.
    let (mut t, ehlo) = sub.starttls().await;
    assert!(
        ehlo.ends_with("250-CHUNKING\r\n250 AUTH PLAIN LOGIN\r\n"),
        "{ehlo}"
    );
    t.cmd(
        "MAIL FROM:<alice@example.org>",
        "530 5.7.0 Authentication required",
    )
    .await;
    // On 465 the same, from the first byte.
    let mut t = sub.implicit().await;
    t.cmd(
        "MAIL FROM:<alice@example.org>",
        "530 5.7.0 Authentication required",
    )
    .await;
    t.cmd("STARTTLS", "503 5.5.1 TLS already active").await;
    // Port 25 never speaks AUTH.
    let mut mx = sub.s.connect().await;
    mx.greeting().await;
    let ehlo = mx.cmd_prefix("EHLO client.example", "250-").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    mx.cmd(
        &format!("AUTH PLAIN {ir}"),
        "502 5.5.1 Command not implemented",
    )
    .await;
    mx.cmd(
        "MAIL FROM:<a@b.example> AUTH=<>",
        "555 5.5.4 Unsupported parameter AUTH",
    )
    .await;
}

#[tokio::test]
async fn sasl_exchanges_plain_and_login() {
    let sub = start(|_| {}).await;
    let (mut t, _) = sub.starttls().await;
    // PLAIN with the empty challenge, LOGIN with both, and their endings.
    t.cmd("AUTH PLAIN", "334 ").await;
    t.cmd("*", "501 5.7.0 Authentication cancelled").await;
    t.cmd("AUTH PLAIN", "334 ").await;
    t.cmd("not base64!", "501 5.5.2 Cannot decode response")
        .await;
    t.cmd("AUTH PLAIN !!!", "501 5.5.2 Cannot decode response")
        .await;
    t.cmd(
        "AUTH CRAM-MD5",
        "504 5.5.4 Unrecognized authentication type",
    )
    .await;
    t.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    t.cmd(&STANDARD.encode("alice@example.org"), "334 UGFzc3dvcmQ6")
        .await;
    t.cmd("*", "501 5.7.0 Authentication cancelled").await;
    t.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    t.cmd(&STANDARD.encode("Alice@Example.ORG"), "334 UGFzc3dvcmQ6")
        .await;
    t.cmd(&STANDARD.encode(PASSWORD), AUTH_OK).await;
    t.cmd("AUTH PLAIN", "503 5.5.1 Already authenticated").await;
    t.cmd("MAIL FROM:<alice@example.org>", "250 2.1.0 Sender ok")
        .await;
    t.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;

    // LOGIN with the user name as initial response; PLAIN in one line.
    let (mut t, _) = sub.starttls().await;
    t.cmd(
        &format!("AUTH LOGIN {}", STANDARD.encode("alice@example.org")),
        "334 UGFzc3dvcmQ6",
    )
    .await;
    t.cmd(&STANDARD.encode(PASSWORD), AUTH_OK).await;
    let mut t = sub.implicit().await;
    t.cmd(
        "MAIL FROM:<alice@example.org>",
        "530 5.7.0 Authentication required",
    )
    .await;
    t.cmd(
        &format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD)),
        AUTH_OK,
    )
    .await;
    // Acting for someone else (an authorization identity) is not offered.
    let mut t = sub.implicit().await;
    let proxy = STANDARD.encode(format!("bob@example.org\0alice@example.org\0{PASSWORD}"));
    t.cmd(&format!("AUTH PLAIN {proxy}"), AUTH_FAILED).await;
    t.cmd(
        "MAIL FROM:<alice@example.org>",
        "530 5.7.0 Authentication required",
    )
    .await;
}

#[tokio::test]
async fn who_may_not_log_in() {
    // More failures than the default lockout allows.
    let sub = start(|c| c.limits.auth_failures = "10/10m".parse().unwrap()).await;
    let mut t = sub.implicit().await;
    // The wrong password, an unknown user, a receive-only user.
    t.cmd(
        &format!("AUTH PLAIN {}", plain("alice@example.org", "wrong")),
        AUTH_FAILED,
    )
    .await;
    t.cmd(
        &format!("AUTH PLAIN {}", plain("nobody@example.org", PASSWORD)),
        AUTH_FAILED,
    )
    .await;
    t.cmd(
        &format!("AUTH PLAIN {}", plain("bob@example.org", "")),
        AUTH_FAILED,
    )
    .await;
    // A disabled user, then a disabled domain.
    let d = &sub.s.directory;
    d.user_set_active("alice@example.org", Some('+'), false)
        .await
        .unwrap();
    t.cmd(
        &format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD)),
        AUTH_FAILED,
    )
    .await;
    d.user_set_active("alice@example.org", Some('+'), true)
        .await
        .unwrap();
    d.domain_set_active("example.org", false).await.unwrap();
    let mut t = sub.implicit().await;
    t.cmd(
        &format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD)),
        AUTH_FAILED,
    )
    .await;
    d.domain_set_active("example.org", true).await.unwrap();
    t.cmd(
        &format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD)),
        AUTH_OK,
    )
    .await;
}

#[tokio::test]
async fn failed_logins_lock_the_address_out_for_a_window() {
    let sub = start(|c| c.limits.auth_failures = "5/3s".parse().unwrap()).await;
    let mut t = sub.implicit().await;
    let wrong = format!("AUTH PLAIN {}", plain("alice@example.org", "wrong"));
    for _ in 0..5 {
        t.cmd(&wrong, AUTH_FAILED).await;
    }
    // Even the right password is refused now, and the session ends.
    let right = format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD));
    t.cmd(&right, LOCKED).await;
    assert_eq!(t.reply().await, "", "closed after the 421");
    // A new connection on either port is told at once.
    let tcp = TcpStream::connect(sub.implicit).await.unwrap();
    let tls = connector(&sub.der)
        .connect("mx.example.org".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut t = Client::new(tls);
    assert_eq!(t.reply().await, format!("{LOCKED}\r\n"));
    assert_eq!(t.reply().await, "");
    let mut c = Client::new(TcpStream::connect(sub.starttls).await.unwrap());
    assert_eq!(c.reply().await, format!("{LOCKED}\r\n"));
    // Port 25 is not a login port: it is not affected.
    let mut mx = sub.s.connect().await;
    mx.greeting().await;
    // Once the window has passed, the address may try again.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut t = sub.implicit().await;
    t.cmd(&right, AUTH_OK).await;
}

#[tokio::test]
async fn a_user_sends_only_as_their_own_addresses() {
    let sub = start(|_| {}).await;
    let mut t = sub.alice().await;
    // Their own address, a subaddress, an alias leading to them, and <>.
    for from in [
        "alice@example.org",
        "Alice+news@example.org",
        "team@example.org",
        "",
    ] {
        t.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0 Sender ok")
            .await;
        t.cmd("RSET", "250 2.0.0 Ok").await;
    }
    // Someone else's mailbox, an address only the catch-all reaches, a
    // domain we do not serve.
    for from in [
        "bob@example.org",
        "whoever@example.org",
        "alice@elsewhere.example",
    ] {
        t.cmd(
            &format!("MAIL FROM:<{from}>"),
            "553 5.7.1 Sender address not owned by the authenticated user",
        )
        .await;
    }
    // AUTH= is accepted where AUTH is offered, and its value ignored.
    t.cmd(
        "MAIL FROM:<alice@example.org> AUTH=<>",
        "250 2.1.0 Sender ok",
    )
    .await;
    t.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    // The From: header is held to the same rule, at the end of data.
    t.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    t.send(b"From: Bob <bob@example.org>\r\nSubject: forged\r\n\r\nx\r\n.\r\n")
        .await;
    assert_eq!(
        t.reply().await,
        "550 5.7.1 From header address not owned by the authenticated user\r\n"
    );
    t.cmd("MAIL FROM:<alice@example.org>", "250 2.1.0 Sender ok")
        .await;
    t.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    t.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    t.send(b"From: A <alice@example.org>\r\nFrom: ceo@example.org\r\n\r\nx\r\n.\r\n")
        .await;
    assert_eq!(
        t.reply().await,
        "550 5.7.1 From header address not owned by the authenticated user\r\n"
    );
    assert!(sub.read("bob@example.org").is_empty());
    // The alias in From: is theirs.
    let reply = t
        .send_mail_authed(
            "team@example.org",
            &["bob@example.org"],
            "From: Team <team@example.org>\r\nSubject: ok\r\n\r\nhello\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert_eq!(sub.read("bob@example.org").len(), 1);
}

trait Authed {
    async fn send_mail_authed(&mut self, from: &str, rcpts: &[&str], body: &str) -> String;
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Authed for Client<S> {
    /// MAIL, RCPTs and DATA in a session already past EHLO and AUTH.
    async fn send_mail_authed(&mut self, from: &str, rcpts: &[&str], body: &str) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0 Sender ok")
            .await;
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250 2.1.5 Recipient ok")
                .await;
        }
        self.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>")
            .await;
        self.send(body.as_bytes()).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

#[tokio::test]
async fn remote_recipients_are_accepted_and_queued_with_the_local_copy() {
    let sub = start(|_| {}).await;
    // Unauthenticated, a remote domain is not relayed (port 25).
    let mut mx = sub.s.connect().await;
    mx.greeting().await;
    mx.cmd_prefix("EHLO client.example", "250-").await;
    mx.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    mx.cmd(
        "RCPT TO:<friend@remote.example>",
        "550 5.7.1 Relay access denied",
    )
    .await;
    // Logged in, it is; the local part keeps its case.
    let mut t = sub.alice().await;
    t.cmd("MAIL FROM:<alice@example.org>", "250 2.1.0 Sender ok")
        .await;
    t.cmd("RCPT TO:<Friend@Remote.Example>", "250 2.1.5 Recipient ok")
        .await;
    t.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    t.cmd(
        "RCPT TO:<nobody@elsewhere.invalid>",
        "250 2.1.5 Recipient ok",
    )
    .await;
    // A local unknown user is still unknown; an address literal is refused.
    t.cmd(
        "RCPT TO:<x@[192.0.2.1]>",
        "501 5.1.3 Bad recipient address syntax",
    )
    .await;
    t.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    t.send(b"From: alice@example.org\r\nSubject: out\r\n\r\nhi\r\n.\r\n")
        .await;
    // One answer for all: the local copy is delivered and the remote
    // recipients wait in the queue, both durable before the 250.
    let reply = t.reply().await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert_eq!(sub.read("bob@example.org").len(), 1);
    let queue = sub.s.running.as_ref().unwrap().runtime.queue.clone();
    let entries = letterbox::blocking::run("scanning the queue", move || queue.scan().unwrap())
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    let queued: Vec<&str> = entries[0]
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(
        queued,
        ["Friend@remote.example", "nobody@elsewhere.invalid"]
    );
    assert_eq!(entries[0].sender, "alice@example.org");
}

#[tokio::test]
async fn delivered_with_esmtpsa_in_the_received_header() {
    let sub = start(|_| {}).await;
    let mut t = sub.alice().await;
    let reply = t
        .send_mail_authed(
            "alice@example.org",
            &["bob@example.org"],
            "From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let copies = sub.read("bob@example.org");
    assert_eq!(copies.len(), 1);
    let want = "Return-Path: <alice@example.org>\n\
                Delivered-To: bob@example.org\n\
                Received: from client.example (unknown [127.0.0.1])\n\
                \tby mx.example.org with ESMTPSA id *\n\
                \t(TLSv1.3:TLS13_*)\n\
                \tfor <bob@example.org>; * +0000\n\
                From: Alice <alice@example.org>\n\
                To: bob@example.org\n\
                Subject: hi\n\
                \n\
                body\n";
    assert!(glob(want, &copies[0]), "{}", copies[0]);
}

/// Runs a program on the blocking pool so the server keeps running.
async fn run(cmd: &'static str, args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(cmd)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("{cmd} is required for this test (install it as .ci/run does): {e}")
            })
    })
    .await
    .unwrap()
}

/// Python's smtplib as a mail client: STARTTLS on 587 and SMTP_SSL on
/// 465, verifying our certificate, logging in with PLAIN and LOGIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_submits_over_587_and_465() {
    let sub = start(|_| {}).await;
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{cafile}")
msg = b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: smtplib\r\n\r\nhello\r\n"

s = smtplib.SMTP("127.0.0.1", {starttls}, local_hostname="client.example")
s.ehlo()
assert not s.has_extn("auth"), "AUTH offered before TLS"
s.starttls(context=ctx)
s.ehlo()
assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"], s.esmtp_features
try:
    s.login("alice@example.org", "wrong")
    raise SystemExit("accepted a wrong password")
except smtplib.SMTPAuthenticationError as e:
    assert (e.smtp_code, e.smtp_error) == (535, b"5.7.8 Authentication credentials invalid"), e
s.user, s.password = "alice@example.org", "{password}"
code, text = s.auth("PLAIN", s.auth_plain)
assert (code, text) == (235, b"2.7.0 Authentication successful"), (code, text)
assert s.sendmail("alice@example.org", ["bob@example.org"], msg) == {{}}
try:
    s.sendmail("bob@example.org", ["bob@example.org"], msg)
    raise SystemExit("sent as someone else")
except smtplib.SMTPSenderRefused as e:
    assert (e.smtp_code, e.smtp_error) == (553, b"5.7.1 Sender address not owned by the authenticated user"), e
s.quit()

s = smtplib.SMTP_SSL("127.0.0.1", {implicit}, local_hostname="client.example", context=ctx)
s.ehlo()
assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"], s.esmtp_features
s.user, s.password = "alice@example.org", "{password}"
code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
assert (code, text) == (235, b"2.7.0 Authentication successful"), (code, text)
assert s.sendmail("alice+py@example.org", ["bob@example.org"], msg) == {{}}
s.quit()
print("ok")
"#,
        cafile = sub.cert.display(),
        starttls = sub.starttls.port(),
        implicit = sub.implicit.port(),
        password = PASSWORD,
    );
    let out = run("/usr/bin/python3", vec!["-c".into(), script]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let copies = sub.read("bob@example.org");
    assert_eq!(copies.len(), 2);
    for c in &copies {
        assert!(c.contains("\tby mx.example.org with ESMTPSA id "), "{c}");
    }
}

/// swaks, as an admin would test a server: both ports, both mechanisms,
/// and the wrong password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_submits_over_587_and_465() {
    let sub = start(|_| {}).await;
    let swaks = |port: u16, tls: &str, mech: &str, password: &str| {
        vec![
            "--server".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            tls.into(),
            "--ehlo".into(),
            "client.example".into(),
            "--auth".into(),
            mech.into(),
            "--auth-user".into(),
            "alice@example.org".into(),
            "--auth-password".into(),
            password.into(),
            "--from".into(),
            "alice@example.org".into(),
            "--to".into(),
            "bob@example.org".into(),
            "--header".into(),
            "Subject: via swaks".into(),
        ]
    };
    for (port, tls, mech) in [
        (sub.starttls.port(), "--tls", "PLAIN"),
        (sub.implicit.port(), "--tls-on-connect", "LOGIN"),
    ] {
        let out = run("swaks", swaks(port, tls, mech, PASSWORD)).await;
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{log}");
        assert!(log.contains(&format!("<~  {AUTH_OK}")), "{log}");
        assert!(log.contains("<~  250 2.0.0 Ok: delivered as "), "{log}");
    }
    let out = run(
        "swaks",
        swaks(sub.starttls.port(), "--tls", "PLAIN", "wrong"),
    )
    .await;
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains(&format!("<~* {AUTH_FAILED}")), "{log}");
    let copies = sub.read("bob@example.org");
    assert_eq!(copies.len(), 2);
    assert!(copies.iter().all(|c| c.contains(" with ESMTPSA id ")));
}

/// A check that records the user it is shown at MAIL and changes the
/// Subject at the end of data.
struct Editor {
    seen: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

struct EditorState {
    seen: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl letterbox::pipeline::Check for Editor {
    fn name(&self) -> &str {
        "editor"
    }
    fn open(&self) -> Box<dyn letterbox::pipeline::CheckState> {
        Box::new(EditorState {
            seen: self.seen.clone(),
        })
    }
}

impl letterbox::pipeline::CheckState for EditorState {
    fn check<'a>(
        &'a mut self,
        stage: letterbox::pipeline::Stage,
        facts: letterbox::pipeline::Facts<'a>,
    ) -> futures_util::future::BoxFuture<'a, letterbox::pipeline::Verdict> {
        use letterbox::pipeline::{Edit, Stage, Verdict};
        Box::pin(async move {
            match stage {
                Stage::Mail => {
                    self.seen
                        .lock()
                        .unwrap()
                        .push(facts.auth.map(str::to_string));
                    Verdict::Continue
                }
                Stage::Data => Verdict::Modify(vec![Edit::ChangeHeader {
                    name: "Subject".into(),
                    index: 1,
                    value: "[checked] hi".into(),
                }]),
                _ => Verdict::Continue,
            }
        })
    }
}

/// Checks see the logged-in user (`Facts::auth`, for hooks' AUTH_AS and a
/// milter's `{auth_authen}`), and the DKIM signature is made after their
/// edits, on the final content: dkimpy verifies the edited message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_see_the_user_and_signing_follows_their_edits() {
    use letterbox::dkim::{self, Algorithm};
    let sub = start(|_| {}).await;
    let key = letterbox::blocking::run("test key", || dkim::generate(Algorithm::Ed25519))
        .await
        .unwrap()
        .unwrap();
    let row = sub
        .s
        .directory
        .dkim_add("example.org", "s1", &key)
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let runtime = sub.s.running.as_ref().unwrap().runtime.clone();
    let pipeline = Arc::new(letterbox::pipeline::Pipeline::new(
        runtime,
        vec![Arc::new(Editor { seen: seen.clone() })],
    ));
    // A submission session over an in-memory stream, as if inside TLS.
    let (client, server) = tokio::io::duplex(64 * 1024);
    let mut conn = letterbox::smtp::session::Connection::new("192.0.2.9".parse().unwrap());
    conn.submission = true;
    conn.tls = Some("TLSv1.3:TEST".into());
    let session = letterbox::smtp::Session::new(
        server,
        pipeline,
        conn,
        tokio_util::sync::CancellationToken::new(),
    );
    tokio::spawn(session.run(true));
    let mut c = Client::new(client);
    c.greeting().await;
    let ehlo = c.cmd_prefix("EHLO client.example", "250-").await;
    assert!(ehlo.ends_with("250 AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    c.cmd(
        &format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD)),
        AUTH_OK,
    )
    .await;
    let reply = c
        .send_mail_authed(
            "alice@example.org",
            &["bob@example.org"],
            "From: alice@example.org\r\nSubject: hi\r\n\r\nbody\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert_eq!(
        *seen.lock().unwrap(),
        [Some("alice@example.org".to_string())]
    );
    let file = sub.s.new_files("bob@example.org").pop().unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\nSubject: [checked] hi\n"), "{text}");
    assert!(text.contains(" with ESMTPSA id "), "{text}");
    let script = format!(
        r#"
import dkim
record = {record:?}
name, _, value = record.partition(" IN TXT ")
def dnsfunc(n, timeout=5):
    n = n.decode() if isinstance(n, bytes) else n
    return value.strip()[1:-1].encode() if n.rstrip(".") == name.rstrip(".") else None
msg = open({path:?}, "rb").read().replace(b"\n", b"\r\n")
assert dkim.DKIM(msg).verify(dnsfunc=dnsfunc)
print("ok")
"#,
        record = row.dns_record(),
        path = file.display().to_string(),
    );
    let out = run("/usr/bin/python3", vec!["-c".into(), script]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
