//! SRS end to end, on loopback only, with tests/outbound.rs's setup: a real
//! DNS server (dnsmasq) gives the test domains MX records pointing at
//! 127.0.x.y, where other letterbox instances listen. An alias forwards
//! mail from a foreign sender with an SRS0 envelope sender; a bounce to
//! that address goes back to the sender; forged and expired SRS addresses
//! are refused at RCPT. Each test has its own 127.0.N.0/24 (20–21, apart
//! from tests/outbound.rs's).
//!
//! Needs the Debian package dnsmasq.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::dns_server::{DnsServer, common_port, dns_with};
use common::server::TestServer;
use letterbox::config::Config;
use letterbox::queue::Entry;
use letterbox::srs::Srs;
use letterbox::units::Duration as Dur;

const SECRET: &str = "a test secret, not for production";
const SRS_DOMAIN: &str = "fwd.example.org";

/// A letterbox destination on `ip:port` named `hostname`, serving `domain`
/// with `users`.
async fn destination(
    ip: &str,
    port: u16,
    hostname: &str,
    domain: &str,
    users: &[&str],
) -> TestServer {
    let s = TestServer::start(|c| {
        c.hostname = hostname.into();
        c.smtp.listen = vec![format!("{ip}:{port}").parse().unwrap()];
    })
    .await;
    s.directory.domain_add(domain).await.unwrap();
    for u in users {
        s.directory
            .user_add(&format!("{u}@{domain}"), Some('+'), None, 0)
            .await
            .unwrap();
    }
    s
}

/// The secret file, in a directory kept as long as the test runs.
fn secret_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("srs.secret");
    // A second line and surrounding blanks are not part of the secret.
    std::fs::write(&path, format!("  {SECRET}  \nignored\n")).unwrap();
    (dir, path)
}

/// The forwarding server: example.org with alice and bob, the alias
/// me@example.org → friend@a.test, SRS on in fwd.example.org (a domain it
/// does not serve), the test's DNS, a retry every second.
async fn forwarder(dns: &DnsServer, port: u16, secret: &Path) -> TestServer {
    let s = TestServer::start(|c: &mut Config| {
        c.dns.servers = vec![dns.addr];
        c.dns.timeout = Dur::from_secs(2);
        c.outbound.port = port;
        c.outbound.connect_timeout = Dur::from_secs(3);
        c.queue.retry_schedule = vec![Dur::from_secs(1)];
        c.queue.scan_interval = Dur::from_secs(1);
        c.srs.secret_file = secret.to_path_buf();
        c.srs.domain = SRS_DOMAIN.into();
    })
    .await;
    s.directory
        .alias_add("me@example.org", &["friend@a.test".into()], Some('+'))
        .await
        .unwrap();
    s
}

/// The checker the test uses: the same secret and domain as the server.
fn srs() -> Srs {
    Srs::new(
        SECRET.as_bytes(),
        SRS_DOMAIN,
        Duration::from_secs(21 * 86400),
    )
}

fn now() -> u64 {
    letterbox::srs::now()
}

/// Waits until `mailbox` on `s` holds `n` messages; returns their texts.
async fn wait_mail(s: &TestServer, mailbox: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let files = s.new_files(mailbox);
        if files.len() >= n {
            assert_eq!(files.len(), n, "{mailbox}: more messages than expected");
            return files
                .iter()
                .map(|f| std::fs::read_to_string(f).unwrap())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{mailbox} got {} of {n} messages; queue: {:#?}",
            files.len(),
            queue(s).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn queue(s: &TestServer) -> Vec<Entry> {
    let queue = s.running.as_ref().unwrap().runtime.queue.clone();
    letterbox::blocking::run("scan", move || queue.scan().unwrap())
        .await
        .unwrap()
}

async fn wait_empty_queue(s: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = queue(s).await;
        if q.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "queue never emptied: {q:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The address in a message's `Return-Path:` field.
fn return_path(message: &str) -> &str {
    let rest = message
        .strip_prefix("Return-Path: <")
        .unwrap_or_else(|| panic!("no Return-Path first: {message}"));
    &rest[..rest.find(">\n").unwrap()]
}

/// Whether `a` has postsrsd's SRS0 shape in `domain`:
/// `SRS0=HHHH=TT=orig-domain=orig-local@domain`, HHHH base64url, TT base32.
fn srs0_shaped(a: &str, orig_domain: &str, orig_local: &str, domain: &str) -> bool {
    let Some(rest) = a.strip_prefix("SRS0=") else {
        return false;
    };
    let (hash, rest) = rest.split_at(4.min(rest.len()));
    let hash_ok = hash.len() == 4
        && hash
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    let Some(rest) = rest.strip_prefix('=') else {
        return false;
    };
    let (tt, rest) = rest.split_at(2.min(rest.len()));
    let tt_ok = tt.len() == 2 && tt.bytes().all(|c| matches!(c, b'A'..=b'Z' | b'2'..=b'7'));
    hash_ok && tt_ok && rest == format!("={orig_domain}={orig_local}@{domain}")
}

#[tokio::test]
async fn forwarded_mail_leaves_with_an_srs_sender_and_its_bounce_comes_back() {
    let (a, e) = ("127.0.20.2", "127.0.20.3");
    let port = common_port(&[a, e]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=a.test,mx.a.test,10".into(),
            format!("host-record=mx.a.test,{a}"),
            "mx-host=elsewhere.test,mx.elsewhere.test,10".into(),
            format!("host-record=mx.elsewhere.test,{e}"),
        ],
    );
    let dest = destination(a, port, "mx.a.test", "a.test", &["friend"]).await;
    let origin = destination(e, port, "mx.elsewhere.test", "elsewhere.test", &["sender"]).await;
    let (_keep, secret) = secret_file();
    let s = forwarder(&dns, port, &secret).await;

    // A foreign sender's mail, forwarded by the alias.
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail(
            "sender@elsewhere.test",
            &["me@example.org"],
            "Subject: forwarded\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let m = wait_mail(&dest, "friend@a.test", 1).await;
    let srs_sender = return_path(&m[0]).to_string();
    assert!(
        srs0_shaped(&srs_sender, "elsewhere.test", "sender", SRS_DOMAIN),
        "{srs_sender}"
    );
    let local = srs_sender.rsplit_once('@').unwrap().0;
    assert_eq!(
        srs().reverse(local, now()).unwrap(),
        "sender@elsewhere.test"
    );
    // The same address as postsrsd's algorithm makes today.
    assert_eq!(srs().forward("sender@elsewhere.test", now()), srs_sender);
    wait_empty_queue(&s).await;

    // The destination's bounce, to the SRS address (not a domain the
    // forwarder serves): accepted, and queued to the original sender.
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail(
            "",
            &[&srs_sender],
            "From: MAILER-DAEMON@mx.a.test\r\nSubject: Undelivered Mail\r\n\r\nit bounced\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let bounce = wait_mail(&origin, "sender@elsewhere.test", 1).await;
    assert!(bounce[0].starts_with("Return-Path: <>\n"), "{}", bounce[0]);
    assert!(bounce[0].contains("Subject: Undelivered Mail\n"));
    wait_empty_queue(&s).await;

    // The same, lowercased by some relay on the way: still valid.
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO mx.a.test", "250-").await;
    c.cmd("MAIL FROM:<>", "250 2.1.0 Sender ok").await;
    c.cmd(
        &format!("RCPT TO:<{}>", srs_sender.to_lowercase()),
        "250 2.1.5 Recipient ok",
    )
    .await;
}

#[tokio::test]
async fn forged_and_expired_srs_addresses_are_refused_and_ours_kept() {
    let a = "127.0.21.2";
    let port = common_port(&[a]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=a.test,mx.a.test,10".into(),
            format!("host-record=mx.a.test,{a}"),
        ],
    );
    let dest = destination(a, port, "mx.a.test", "a.test", &["friend"]).await;
    let (_keep, secret) = secret_file();
    let s = forwarder(&dns, port, &secret).await;

    let good = srs().forward("sender@elsewhere.test", now());
    let (hash, rest) = good["SRS0=".len()..].split_at(4);
    // Another first character, not merely another case (the check ignores case).
    let first = if hash.starts_with(['a', 'A']) {
        'B'
    } else {
        'A'
    };
    let flipped = format!("{first}{}", &hash[1..]);
    let forged = format!("SRS0={flipped}{rest}");
    let expired = srs().forward("sender@elsewhere.test", now() - 22 * 86400);
    let other_secret = Srs::new(b"someone else's", SRS_DOMAIN, Duration::ZERO)
        .forward("sender@elsewhere.test", now());
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO mx.a.test", "250-").await;
    c.cmd("MAIL FROM:<>", "250 2.1.0 Sender ok").await;
    for bad in [&forged, &expired, &other_secret] {
        c.cmd(&format!("RCPT TO:<{bad}>"), "550 5.1.1 Invalid SRS address")
            .await;
    }
    // A non-SRS name in the SRS domain is not ours to take.
    c.cmd(
        &format!("RCPT TO:<postmaster@{SRS_DOMAIN}>"),
        "550 5.7.1 Relay access denied",
    )
    .await;
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;

    // An SRS address that stands for one of our own users is delivered to
    // the mailbox.
    let mut c = s.connect().await;
    c.greeting().await;
    let to_bob = srs().forward("bob@example.org", now());
    let reply = c
        .send_mail("", &[&to_bob], "Subject: back home\r\n\r\nhi\r\n")
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert_eq!(s.new_files("bob@example.org").len(), 1);

    // Our own user's mail, forwarded, keeps its sender: our SPF covers it.
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail(
            "alice@example.org",
            &["me@example.org"],
            "Subject: from alice\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let m = wait_mail(&dest, "friend@a.test", 1).await;
    assert_eq!(return_path(&m[0]), "alice@example.org");

    // A sender that is already SRS0 elsewhere (forwarded twice) leaves as
    // SRS1 with the first forwarder kept.
    let mut c = s.connect().await;
    c.greeting().await;
    let twice = "SRS0=abcd=XY=orig.test=carol@first.test";
    let reply = c
        .send_mail(twice, &["me@example.org"], "Subject: twice\r\n\r\nhi\r\n")
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let m = wait_mail(&dest, "friend@a.test", 2).await;
    let srs1 = m
        .iter()
        .map(|t| return_path(t))
        .find(|r| r.starts_with("SRS1="))
        .unwrap_or_else(|| panic!("no SRS1 sender: {m:?}"));
    assert_eq!(srs().forward(twice, now()), srs1);
    assert!(
        srs1.ends_with(&format!(
            "=first.test==abcd=XY=orig.test=carol@{SRS_DOMAIN}"
        )),
        "{srs1}"
    );
    assert_eq!(
        srs()
            .reverse(srs1.rsplit_once('@').unwrap().0, now())
            .unwrap(),
        twice
    );
    wait_empty_queue(&s).await;
}
