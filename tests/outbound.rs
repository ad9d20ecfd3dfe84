//! The outbound queue end to end, on loopback only: a real DNS server
//! (dnsmasq) gives the test domains MX records pointing at 127.0.x.y;
//! the destinations are other letterbox instances listening there, or
//! Postfix's smtp-sink for a server that always refuses. Mail is put into
//! the sending server's queue through its pipeline, as a session would
//! (inbound SMTP does not accept remote recipients yet). Each test has its
//! own 127.0.N.0/24 so tests never share a destination.
//!
//! Needs the Debian packages dnsmasq and postfix (smtp-sink); smtp-sink,
//! the MTA-STS policy host (port 443) and the smarthost on port 465 need
//! root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns_server::{DnsServer, common_port, dns_with};
use common::server::TestServer;
use letterbox::config::Config;
use letterbox::directory::Route;
use letterbox::envelope::{Envelope, Received, Recipient};
use letterbox::pipeline::{Mode, Refusal};
use letterbox::queue::{Entry, Status};
use letterbox::spool::Spool;
use letterbox::units::Duration as Dur;
use mail_parser::MimeHeaders as _;

/// A letterbox destination on `ip:port` named `hostname`, serving `domain`
/// with `users`.
async fn destination(
    ip: &str,
    port: u16,
    hostname: &str,
    domain: &str,
    users: &[&str],
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    let s = TestServer::start(|c| {
        c.hostname = hostname.into();
        c.smtp.listen = vec![format!("{ip}:{port}").parse().unwrap()];
        tweak(c);
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

/// The sending server: example.org with alice and bob, the test's DNS,
/// remote port `port`, a retry every second.
async fn sender(dns: &DnsServer, port: u16, tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start(|c| {
        c.dns.servers = vec![dns.addr];
        c.dns.timeout = Dur::from_secs(2);
        c.outbound.port = port;
        c.outbound.connect_timeout = Dur::from_secs(3);
        c.queue.retry_schedule = vec![Dur::from_secs(1)];
        c.queue.scan_interval = Dur::from_secs(1);
        tweak(c);
    })
    .await
}

/// Hands a message from `from` to `to` to the server's pipeline, as a
/// session would at the end of DATA: local recipients resolved in the
/// directory, others routed Remote. Returns whether it was accepted.
async fn inject(s: &TestServer, from: &str, to: &[&str], subject: &str) -> bool {
    let pipeline = &s.running.as_ref().unwrap().pipeline;
    let mut recipients = Vec::new();
    for t in to {
        let r = match pipeline.recipient(t).await {
            Ok(r) => r,
            Err(Refusal::NotServed) => Recipient {
                address: t.to_string(),
                route: Arc::new(Route::Remote {
                    address: t.to_string(),
                }),
            },
            Err(e) => panic!("{t}: {e:?}"),
        };
        recipients.push(r);
    }
    let envelope = Envelope {
        id: letterbox::envelope::new_id(),
        sender: from.into(),
        recipients,
        received: Received {
            helo: "client.example".into(),
            rdns: None,
            ip: "127.0.0.1".parse().unwrap(),
            by: "mx.example.org".into(),
            with: "ESMTP".into(),
            tls: None,
            date: letterbox::envelope::rfc5322_now(),
        },
        headers: String::new(),
        quarantine: false,
    };
    let mut spool = Spool::new(1 << 20, None);
    let body = format!(
        "From: <{from}>\r\nTo: <{}>\r\nSubject: {subject}\r\nMessage-ID: <{}@example.org>\r\n\r\nHello.\r\n.a line with a dot\r\n",
        to.join(">, <"),
        envelope.id
    );
    spool.write(body.as_bytes()).unwrap();
    pipeline
        .deliver(&envelope, spool, None, Mode::AllOrNothing)
        .await
        .iter()
        .all(|o| o.is_ok())
}

/// Waits until `mailbox` on `s` holds `n` messages; returns their texts.
async fn wait_mail(s: &TestServer, mailbox: &str, n: usize, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
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
            queue(s)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sender's queue as it stands on disk.
fn queue(s: &TestServer) -> Vec<Entry> {
    letterbox::blocking::allowed(|| s.running.as_ref().unwrap().runtime.queue.scan().unwrap())
}

async fn wait_queue(
    s: &TestServer,
    what: &str,
    limit: Duration,
    done: impl Fn(&[Entry]) -> bool,
) -> Vec<Entry> {
    let deadline = Instant::now() + limit;
    loop {
        let queue = s.running.as_ref().unwrap().runtime.queue.clone();
        let q = letterbox::blocking::run("scan", move || queue.scan().unwrap())
            .await
            .unwrap();
        if done(&q) {
            return q;
        }
        assert!(Instant::now() < deadline, "queue never {what}: {q:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the first `id` in a `Received:` field written by `by`.
fn received_id(message: &str, by: &str) -> String {
    let at = message
        .find(&format!("by {by} with"))
        .unwrap_or_else(|| panic!("no Received by {by} in {message}"));
    let rest = &message[at..];
    let id = rest.split(" id ").nth(1).unwrap();
    id.split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap()
        .to_string()
}

/// The DSN's parts, checked for the multipart/report shape; returns the
/// delivery-status part's text.
fn check_dsn(dsn: &str) -> String {
    assert!(dsn.starts_with("Return-Path: <>\n"), "{dsn}");
    assert!(dsn.contains("\nFrom: Mail Delivery System <MAILER-DAEMON@mx.example.org>\n"));
    assert!(dsn.contains("\nAuto-Submitted: auto-replied\n"));
    assert!(
        dsn.contains("\nContent-Type: multipart/report; report-type=delivery-status;\n"),
        "{dsn}"
    );
    let parsed = mail_parser::MessageParser::default()
        .parse(dsn.as_bytes())
        .unwrap();
    let ct = parsed.content_type().unwrap();
    assert_eq!(
        (ct.ctype(), ct.subtype(), ct.attribute("report-type")),
        ("multipart", Some("report"), Some("delivery-status"))
    );
    let kinds: Vec<String> = parsed.parts[1..]
        .iter()
        .map(|p| {
            let ct = p.content_type().unwrap();
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ]
    );
    let at = dsn.find("Content-Type: message/delivery-status\n").unwrap();
    let end = dsn[at..].find("\n--").unwrap();
    dsn[at..at + end].to_string()
}

#[tokio::test]
async fn one_transaction_per_domain_local_copies_together_and_a_5xx_bounces() {
    let (a, b) = ("127.0.1.2", "127.0.1.3");
    let port = common_port(&[a, b]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=a.test,mx.a.test,10".into(),
            format!("host-record=mx.a.test,{a}"),
            "mx-host=b.test,mx.b.test,10".into(),
            format!("host-record=mx.b.test,{b}"),
        ],
    );
    let dest_a = destination(a, port, "mx.a.test", "a.test", &["carol", "dave"], |_| {}).await;
    let dest_b = destination(b, port, "mx.b.test", "b.test", &["erin"], |_| {}).await;
    let s = sender(&dns, port, |_| {}).await;

    let started = Instant::now();
    assert!(
        inject(
            &s,
            "alice@example.org",
            &[
                "carol@a.test",
                "dave@a.test",
                "erin@b.test",
                "nobody@a.test",
                "bob@example.org"
            ],
            "grouped",
        )
        .await
    );
    // The local copy is there when the pipeline answers.
    assert_eq!(s.new_files("bob@example.org").len(), 1);
    let carol = wait_mail(&dest_a, "carol@a.test", 1, Duration::from_secs(20)).await;
    let dave = wait_mail(&dest_a, "dave@a.test", 1, Duration::from_secs(20)).await;
    let erin = wait_mail(&dest_b, "erin@b.test", 1, Duration::from_secs(20)).await;
    eprintln!("delivered in {:?}", started.elapsed());
    // One transaction for a.test: both copies carry the id of the same
    // transaction at the destination.
    assert_eq!(
        received_id(&carol[0], "mx.a.test"),
        received_id(&dave[0], "mx.a.test")
    );
    for m in [&carol[0], &dave[0], &erin[0]] {
        assert!(m.contains("Subject: grouped\n"));
        assert!(
            m.contains("\n.a line with a dot\n"),
            "dot stuffing undone: {m}"
        );
        assert!(m.contains("Return-Path: <alice@example.org>\n"));
        assert!(
            m.contains("by mx.example.org with ESMTP id "),
            "our Received: {m}"
        );
    }
    // The unknown recipient bounced with the remote's own words.
    let dsn = wait_mail(&s, "alice@example.org", 1, Duration::from_secs(20)).await;
    let status = check_dsn(&dsn[0]);
    assert!(
        status.contains(
            "\nFinal-Recipient: rfc822; nobody@a.test\nAction: failed\nStatus: 5.1.1\n\
             Remote-MTA: dns; mx.a.test\nDiagnostic-Code: smtp; 550 5.1.1 No such user here\n"
        ),
        "{status}"
    );
    assert!(
        !status.contains("carol@a.test"),
        "only the failed recipient: {status}"
    );
    assert!(dsn[0].contains("Content-Type: text/rfc822-headers\n\nReceived: from client.example"));
    assert!(dsn[0].contains("\nSubject: grouped\n"));
    assert!(!dsn[0].contains("Hello."), "headers only");
    // Everything settled: the entry is gone.
    wait_queue(&s, "emptied", Duration::from_secs(10), |q| q.is_empty()).await;
}

#[tokio::test]
async fn a_tempfail_is_retried_until_it_is_delivered() {
    let a = "127.0.2.2";
    let port = common_port(&[a]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=a.test,mx.a.test,10".into(),
            format!("host-record=mx.a.test,{a}"),
        ],
    );
    let dest = destination(a, port, "mx.a.test", "a.test", &[], |_| {}).await;
    // A quota smaller than any message: 452 4.2.2 at the end of DATA.
    dest.directory
        .user_add("carol@a.test", Some('+'), None, 10)
        .await
        .unwrap();
    let s = sender(&dns, port, |_| {}).await;
    assert!(inject(&s, "alice@example.org", &["carol@a.test"], "retry me").await);
    let q = wait_queue(&s, "deferred", Duration::from_secs(20), |q| {
        q.first().is_some_and(|e| e.recipients[0].attempts >= 1)
    })
    .await;
    let r = &q[0].recipients[0];
    assert_eq!(r.status, Status::Queued);
    let err = r.last_error.as_deref().unwrap();
    assert!(
        err.contains("mx.a.test[127.0.2.2] said: 452 4.2.2"),
        "{err}"
    );
    assert!(dest.new_files("carol@a.test").is_empty());
    // The destination makes room; the next attempt delivers.
    dest.directory
        .user_set_quota("carol@a.test", Some('+'), 0)
        .await
        .unwrap();
    wait_mail(&dest, "carol@a.test", 1, Duration::from_secs(20)).await;
    wait_queue(&s, "emptied", Duration::from_secs(10), |q| q.is_empty()).await;
    assert!(
        s.new_files("alice@example.org").is_empty(),
        "no DSN for a delay"
    );
}

#[tokio::test]
async fn an_alias_forwards_to_another_server_with_the_local_copy_in_one_transaction() {
    let a = "127.0.8.2";
    let port = common_port(&[a]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=a.test,mx.a.test,10".into(),
            format!("host-record=mx.a.test,{a}"),
        ],
    );
    let dest = destination(a, port, "mx.a.test", "a.test", &["carol"], |_| {}).await;
    let s = sender(&dns, port, |_| {}).await;
    s.directory
        .alias_add("me@example.org", &["Carol@A.test".into()], Some('+'))
        .await
        .unwrap();
    // A forwarding alias has one destination only.
    let err = s
        .directory
        .alias_add("me@example.org", &["bob@example.org".into()], Some('+'))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("forwards to another server"),
        "{err}"
    );
    // Over SMTP, as any sender would: the remote copy and bob's local one.
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail(
            "someone@elsewhere.test",
            &["me@example.org", "bob@example.org"],
            "Subject: forwarded\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert_eq!(s.new_files("bob@example.org").len(), 1);
    let m = wait_mail(&dest, "carol@a.test", 1, Duration::from_secs(20)).await;
    assert!(
        m[0].contains("Return-Path: <someone@elsewhere.test>\n"),
        "{}",
        m[0]
    );
    assert!(
        m[0].contains("for <me@example.org>;"),
        "the forwarded copy names the alias: {}",
        m[0]
    );
    wait_queue(&s, "emptied", Duration::from_secs(10), |q| q.is_empty()).await;
}

#[tokio::test]
async fn null_mx_bounces_at_once_and_a_domain_without_mx_gets_its_address() {
    let a = "127.0.3.2";
    let port = common_port(&[a]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=null.test,.,0".into(),
            // No MX: the implicit MX is the domain's own address.
            format!("host-record=implicit.test,{a}"),
        ],
    );
    let dest = destination(
        a,
        port,
        "implicit.test",
        "implicit.test",
        &["frank"],
        |_| {},
    )
    .await;
    let s = sender(&dns, port, |_| {}).await;
    assert!(
        inject(
            &s,
            "alice@example.org",
            &["frank@implicit.test", "x@null.test"],
            "nullmx"
        )
        .await
    );
    wait_mail(&dest, "frank@implicit.test", 1, Duration::from_secs(20)).await;
    let dsn = wait_mail(&s, "alice@example.org", 1, Duration::from_secs(20)).await;
    let status = check_dsn(&dsn[0]);
    assert!(
        status.contains("\nFinal-Recipient: rfc822; x@null.test\nAction: failed\nStatus: 5.1.10\nLast-Attempt-Date: "),
        "{status}"
    );
    assert!(dsn[0].contains("<x@null.test>: null.test accepts no mail (null MX, RFC 7505)"));
    // A domain that does not exist fails for good too.
    assert!(inject(&s, "alice@example.org", &["y@nowhere.test"], "nx").await);
    let dsns = wait_mail(&s, "alice@example.org", 2, Duration::from_secs(20)).await;
    assert!(dsns.iter().any(|d| d.contains("Status: 5.1.2")), "{dsns:?}");
    wait_queue(&s, "emptied", Duration::from_secs(10), |q| q.is_empty()).await;
}

/// Postfix's smtp-sink on `ip:port`, with its extra arguments.
struct SmtpSink(Child);

impl SmtpSink {
    fn start(ip: &str, port: u16, args: &[&str]) -> SmtpSink {
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody", "-h", "sink.test"])
            .args(args)
            .arg(format!("{ip}:{port}"))
            .arg("10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("smtp-sink (Debian package postfix) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((ip, port)).is_err() {
            assert!(Instant::now() < deadline, "smtp-sink did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        SmtpSink(child)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_refusing_mx_bounces_and_one_that_defers_forever_expires() {
    let (soft, hard) = ("127.0.4.2", "127.0.4.3");
    let port = common_port(&[soft, hard]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=soft.test,mx.soft.test,10".into(),
            format!("host-record=mx.soft.test,{soft}"),
            "mx-host=hard.test,mx.hard.test,10".into(),
            format!("host-record=mx.hard.test,{hard}"),
        ],
    );
    let _soft = SmtpSink::start(soft, port, &["-r", "RCPT"]);
    let _hard = SmtpSink::start(hard, port, &["-f", "RCPT", "-B", "550 5.7.1 Go away"]);
    let s = sender(&dns, port, |c| c.queue.max_age = Dur::from_secs(4)).await;
    assert!(
        inject(
            &s,
            "alice@example.org",
            &["u@soft.test", "v@hard.test"],
            "expire"
        )
        .await
    );
    // The 5xx is reported at once, with smtp-sink's own words.
    let first = wait_mail(&s, "alice@example.org", 1, Duration::from_secs(10)).await;
    let status = check_dsn(&first[0]);
    assert!(
        status.contains("\nFinal-Recipient: rfc822; v@hard.test\nAction: failed\nStatus: 5.7.1\nRemote-MTA: dns; mx.hard.test\nDiagnostic-Code: smtp; 550 5.7.1 Go away\n"),
        "{status:?}"
    );
    assert!(!status.contains("u@soft.test"));
    let q = queue(&s);
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].recipients[0].status, Status::Queued);
    // The 4xx one is retried until queue.max_age, then returned.
    let both = wait_mail(&s, "alice@example.org", 2, Duration::from_secs(20)).await;
    let second = both
        .iter()
        .find(|d| d.contains("Final-Recipient: rfc822; u@soft.test"))
        .unwrap();
    let status = check_dsn(second);
    assert!(
        status.contains("\nFinal-Recipient: rfc822; u@soft.test\nAction: failed\nStatus: 4.3.0\nRemote-MTA: dns; mx.soft.test\nDiagnostic-Code: smtp; 450 4.3.0 Error: command failed\n"),
        "{status}"
    );
    assert!(
        second.contains("<u@soft.test>: message expired: not delivered within 4s"),
        "{second}"
    );
    wait_queue(&s, "emptied", Duration::from_secs(10), |q| q.is_empty()).await;
}

#[tokio::test]
async fn a_bounce_that_fails_is_not_bounced() {
    let hard = "127.0.6.2";
    let port = common_port(&[hard]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=hard.test,mx.hard.test,10".into(),
            format!("host-record=mx.hard.test,{hard}"),
        ],
    );
    let _hard = SmtpSink::start(hard, port, &["-f", "RCPT"]);
    let s = sender(&dns, port, |_| {}).await;
    // A DSN from <> to a remote sender that refuses it.
    assert!(inject(&s, "", &["w@hard.test"], "a bounce").await);
    wait_queue(&s, "emptied", Duration::from_secs(15), |q| q.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(queue(&s).is_empty(), "nothing new was queued");
}

/// A certificate authority for the MTA-STS test.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A certificate for `host`, written as `<dir>/<host>.{crt,key}`.
    fn issue(&self, dir: &Path, host: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{host}.crt")),
            dir.join(format!("{host}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// An HTTPS server on `ip:443` answering every request with `policy`.
async fn policy_host(
    ip: &str,
    cert: PathBuf,
    key: PathBuf,
    policy: &'static str,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = letterbox::blocking::run("test TLS files", move || {
        letterbox::tls::server_config(&cert, &key).unwrap()
    })
    .await
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind((ip, 443))
        .await
        .expect("binding port 443 needs root");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                assert!(req.starts_with(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n"));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{policy}",
                    policy.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    })
}

#[tokio::test]
async fn mta_sts_enforce_refuses_an_untrusted_certificate_and_opportunistic_tls_does_not() {
    let (bad_mx, good_mx, opp_mx, policy_ip) = ("127.0.5.2", "127.0.5.3", "127.0.5.4", "127.0.5.6");
    let port = common_port(&[bad_mx, good_mx, opp_mx]);
    let certs = tempfile::tempdir().unwrap();
    let trusted = Ca::new("letterbox test CA");
    let rogue = Ca::new("nobody trusts this CA");
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, trusted.cert.pem()).unwrap();
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=sts.test,mx.sts.test,10".into(),
            format!("host-record=mx.sts.test,{bad_mx}"),
            "txt-record=_mta-sts.sts.test,\"v=STSv1; id=20260101\"".into(),
            format!("host-record=mta-sts.sts.test,{policy_ip}"),
            "mx-host=good.test,mx.good.test,10".into(),
            format!("host-record=mx.good.test,{good_mx}"),
            "txt-record=_mta-sts.good.test,\"v=STSv1; id=20260101\"".into(),
            format!("host-record=mta-sts.good.test,{policy_ip}"),
            "mx-host=opp.test,mx.opp.test,10".into(),
            format!("host-record=mx.opp.test,{opp_mx}"),
        ],
    );
    let (c, k) = trusted.issue(certs.path(), "mta-sts.sts.test");
    // One policy host for both domains: SNI picks nothing, so its
    // certificate names both.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["mta-sts.sts.test".into(), "mta-sts.good.test".into()])
            .unwrap()
            .signed_by(&key, &trusted.cert, &trusted.key)
            .unwrap();
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let _policy = policy_host(
        policy_ip,
        c,
        k,
        "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmx: *.good.test\r\nmax_age: 86400\r\n",
    )
    .await;
    let tls = |ca: &Ca, host: &str| {
        let (c, k) = ca.issue(certs.path(), host);
        move |cfg: &mut Config| {
            cfg.tls.cert = Some(c);
            cfg.tls.key = Some(k);
        }
    };
    let bad = destination(
        bad_mx,
        port,
        "mx.sts.test",
        "sts.test",
        &["gina"],
        tls(&rogue, "mx.sts.test"),
    )
    .await;
    let good = destination(
        good_mx,
        port,
        "mx.good.test",
        "good.test",
        &["hank"],
        tls(&trusted, "mx.good.test"),
    )
    .await;
    let opp = destination(
        opp_mx,
        port,
        "mx.opp.test",
        "opp.test",
        &["ivy"],
        tls(&rogue, "mx.opp.test"),
    )
    .await;
    let s = sender(&dns, port, |c| c.outbound.ca_file = ca_file.clone()).await;

    assert!(
        inject(
            &s,
            "alice@example.org",
            &["gina@sts.test", "hank@good.test", "ivy@opp.test"],
            "sts"
        )
        .await
    );
    // A valid certificate for a listed MX: delivered, over TLS.
    let m = wait_mail(&good, "hank@good.test", 1, Duration::from_secs(20)).await;
    assert!(m[0].contains("with ESMTPS id"), "{}", m[0]);
    // Without a policy an untrusted certificate still gets the mail,
    // encrypted (opportunistic TLS).
    let m = wait_mail(&opp, "ivy@opp.test", 1, Duration::from_secs(20)).await;
    assert!(m[0].contains("with ESMTPS id"), "{}", m[0]);
    // Enforce with an untrusted certificate: not delivered, still queued,
    // and the entry says why.
    let q = wait_queue(&s, "deferred by MTA-STS", Duration::from_secs(20), |q| {
        q.first().is_some_and(|e| {
            e.recipients
                .iter()
                .any(|r| r.address == "gina@sts.test" && r.attempts >= 2)
        })
    })
    .await;
    let gina = q[0]
        .recipients
        .iter()
        .find(|r| r.address == "gina@sts.test")
        .unwrap();
    assert_eq!(gina.status, Status::Queued);
    let err = gina.last_error.as_deref().unwrap();
    assert!(
        err.contains("TLS required (MTA-STS policy of sts.test, enforce) but the handshake failed")
            && err.contains("not delivered"),
        "{err}"
    );
    assert!(bad.new_files("gina@sts.test").is_empty());
    assert!(
        s.new_files("alice@example.org").is_empty(),
        "a policy failure is not a bounce"
    );
}

/// Messages put straight into a queue directory (the server not running),
/// as the pipeline would: `n` messages from alice, each to every one of
/// `to`. Returns their ids.
fn fill_queue(dir: &Path, n: usize, to: &[&str]) -> Vec<String> {
    letterbox::blocking::allowed(|| {
        let queue = letterbox::queue::Queue::open(dir, false).unwrap();
        (0..n)
            .map(|i| {
                let envelope = Envelope {
                    id: format!("{:04}{}", i, letterbox::envelope::new_id()),
                    sender: "alice@example.org".into(),
                    recipients: vec![],
                    received: Received {
                        helo: "client.example".into(),
                        rdns: None,
                        ip: "127.0.0.1".parse().unwrap(),
                        by: "mx.example.org".into(),
                        with: "ESMTP".into(),
                        tls: None,
                        date: letterbox::envelope::rfc5322_now(),
                    },
                    headers: String::new(),
                    quarantine: false,
                };
                let mut spool = Spool::new(1 << 20, None);
                let body = format!(
                    "Subject: crash {i}\r\nMessage-ID: <m{i}@example.org>\r\n\r\nbody {i}\r\n"
                );
                spool.write(body.as_bytes()).unwrap();
                let rcpts: Vec<(String, Option<String>)> =
                    to.iter().map(|t| (t.to_string(), None)).collect();
                queue
                    .stage(&envelope, &spool, &rcpts)
                    .unwrap()
                    .commit()
                    .unwrap()
            })
            .collect()
    })
}

/// Reads a queue directory from outside the server.
fn scan(dir: &Path) -> Vec<Entry> {
    letterbox::blocking::allowed(|| {
        letterbox::queue::Queue::open(dir, false)
            .unwrap()
            .scan()
            .unwrap()
    })
}

/// The Message-IDs of every message in `mailbox`, sorted (duplicates kept).
fn message_ids(s: &TestServer, mailbox: &str) -> Vec<String> {
    let mut ids: Vec<String> = s
        .new_files(mailbox)
        .iter()
        .map(|f| {
            let m = std::fs::read_to_string(f).unwrap();
            let at = m.find("Message-ID: <").unwrap() + 13;
            m[at..at + m[at..].find('>').unwrap()].to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// The real binary with a full queue: SIGKILLed while one destination keeps
/// deferring, then restarted; meanwhile `letterbox queue` lists, shows,
/// bounces, removes and retries entries while the server runs. Every
/// message reaches each destination once, never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_full_queue_then_restart_delivers_each_message_once_and_the_cli_steers_it() {
    use common::process::{Process, Sections, admin, write_config};
    const N: usize = 30;
    let (a, b) = ("127.0.7.2", "127.0.7.3");
    let port = common_port(&[a, b]);
    let dns = dns_with(
        &["test"],
        &[
            "mx-host=a.test,mx.a.test,10".into(),
            format!("host-record=mx.a.test,{a}"),
            "mx-host=b.test,mx.b.test,10".into(),
            format!("host-record=mx.b.test,{b}"),
        ],
    );
    let dest_a = destination(a, port, "mx.a.test", "a.test", &["carol"], |_| {}).await;
    let sink_b = SmtpSink::start(b, port, &["-r", "RCPT"]);

    let tmp = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", tmp.path().join("letterbox.db").display());
    let config = write_config(tmp.path(), &db, &Sections::default());
    // This test's own DNS server replaces the closed one write_config names.
    let mut text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"1s\"\n", "");
    text.push_str(&format!(
        "[dns]\nservers = [\"{}\"]\ntimeout = \"2s\"\n\
         [outbound]\nport = {port}\nconnect_timeout = \"3s\"\n\
         [queue]\nretry_schedule = [\"1s\"]\nscan_interval = \"1s\"\n",
        dns.addr
    ));
    std::fs::write(&config, text).unwrap();
    let queue_dir = tmp.path().join("mail").join(letterbox::queue::QUEUE_DIR);
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || {
        admin(&cfg, &["domain", "add", "example.org"]);
        admin(&cfg, &["user", "add", "alice@example.org"]);
    })
    .await
    .unwrap();
    let ids = fill_queue(&queue_dir, N, &["carol@a.test", "erin@b.test"]);

    // The CLI on a queue with no server: every entry, exact fields.
    let cfg = config.clone();
    let listed = tokio::task::spawn_blocking(move || admin(&cfg, &["queue", "list", "--json"]))
        .await
        .unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entries = listed.as_array().unwrap();
    assert_eq!(entries.len(), N);
    let first = entries[0].as_object().unwrap();
    let mut keys: Vec<&str> = first.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["created", "id", "recipients", "sender", "size"]);
    assert_eq!(first["sender"], "alice@example.org");
    assert!(first["created"].as_str().unwrap().ends_with('Z'));
    let r0 = first["recipients"][0].as_object().unwrap();
    let mut keys: Vec<&str> = r0.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "address",
            "attempts",
            "last_error",
            "next_attempt",
            "status"
        ]
    );
    assert_eq!(
        (
            &r0["address"],
            &r0["status"],
            &r0["attempts"],
            &r0["last_error"]
        ),
        (
            &serde_json::json!("carol@a.test"),
            &serde_json::json!("queued"),
            &serde_json::json!(0),
            &serde_json::Value::Null
        )
    );

    // First run: a.test takes everything, b.test defers everything.
    let mut server = tokio::task::spawn_blocking({
        let cfg = config.clone();
        move || Process::serve(&cfg)
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = scan(&queue_dir);
        let done = q.len() == N
            && q.iter().all(|e| {
                e.recipients[0].status == Status::Delivered && e.recipients[1].attempts >= 1
            });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "first run never settled: {}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGKILL while b.test's attempts keep failing.
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10));
    assert_eq!(message_ids(&dest_a, "carol@a.test").len(), N);

    // Restarted; b.test still defers. The CLI works beside the server.
    let server = tokio::task::spawn_blocking({
        let cfg = config.clone();
        move || Process::serve(&cfg)
    })
    .await
    .unwrap();
    let (bounced, removed) = (ids[0].clone(), ids[1].clone());
    let cfg = config.clone();
    let (shown, bounce_out, remove_out, retry_out) = tokio::task::spawn_blocking({
        let (bounced, removed) = (bounced.clone(), removed.clone());
        move || {
            // A busy entry is reported, never waited for: try a few times.
            let run = |args: &[&str]| {
                for _ in 0..100 {
                    let out = common::process::letterbox(&cfg)
                        .args(args)
                        .output()
                        .unwrap();
                    if out.status.success() {
                        return String::from_utf8(out.stdout).unwrap();
                    }
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(err.contains("being delivered right now"), "{args:?}: {err}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                panic!("{args:?} stayed busy");
            };
            (
                run(&["queue", "show", &bounced, "--json"]),
                run(&["queue", "bounce", &bounced]),
                run(&["queue", "remove", &removed]),
                run(&["queue", "retry", "--all"]),
            )
        }
    })
    .await
    .unwrap();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["id"], bounced.as_str());
    assert_eq!(shown["recipients"][0]["status"], "delivered");
    assert_eq!(
        shown["recipients"][0]["next_attempt"],
        serde_json::Value::Null
    );
    assert_eq!(shown["recipients"][1]["status"], "queued");
    assert!(
        shown["recipients"][1]["last_error"]
            .as_str()
            .unwrap()
            .contains(
                "mx.b.test[127.0.7.3] said: 450 4.3.0 Error: command failed (in reply to RCPT TO)"
            ),
        "{shown}"
    );
    assert_eq!(
        bounce_out,
        format!("{bounced}: 1 recipient(s) will be returned to the sender\n")
    );
    assert_eq!(
        remove_out,
        format!("removed {removed} from the queue (its sender is not told)\n")
    );
    assert!(
        retry_out.contains("recipient(s) will be tried now"),
        "{retry_out}"
    );

    // The bounce reaches alice at once (the CLI woke the server).
    let alice = tmp.path().join("mail/example.org/alice/new");
    let deadline = Instant::now() + Duration::from_secs(20);
    let dsn = loop {
        if let Some(f) = std::fs::read_dir(&alice).ok().and_then(|mut d| d.next()) {
            break std::fs::read_to_string(f.unwrap().path()).unwrap();
        }
        assert!(Instant::now() < deadline, "no DSN: {}", server.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = check_dsn(&dsn);
    assert!(
        status.contains("\nFinal-Recipient: rfc822; erin@b.test\nAction: failed\nStatus: 5.0.0\n"),
        "{status}"
    );
    assert!(dsn.contains("<erin@b.test>: returned to the sender by the administrator"));
    assert!(dsn.contains("Message-ID: <m0@example.org>"));

    // b.test starts accepting: everything left goes there, once.
    drop(sink_b);
    let dest_b = destination(b, port, "mx.b.test", "b.test", &["erin"], |_| {}).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !scan(&queue_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "queue never emptied: {}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want_a: Vec<String> = {
        let mut v: Vec<String> = (0..N).map(|i| format!("m{i}@example.org")).collect();
        v.sort();
        v
    };
    let want_b: Vec<String> = want_a
        .iter()
        .filter(|m| *m != "m0@example.org" && *m != "m1@example.org")
        .cloned()
        .collect();
    assert_eq!(
        message_ids(&dest_a, "carol@a.test"),
        want_a,
        "a.test: each once"
    );
    assert_eq!(
        message_ids(&dest_b, "erin@b.test"),
        want_b,
        "b.test: each once, bar the bounced and the removed"
    );
    drop(server);
}

#[tokio::test]
async fn local_and_remote_copies_are_all_or_nothing() {
    let dns = dns_with(&["test"], &[]);
    let s = sender(&dns, 25, |_| {}).await;
    let pipeline = &s.running.as_ref().unwrap().pipeline;
    let queue_dir = s
        .running
        .as_ref()
        .unwrap()
        .runtime
        .queue
        .dir()
        .to_path_buf();
    // The queue cannot stage: no local copy is kept either.
    std::fs::remove_dir(queue_dir.join("tmp")).unwrap();
    std::fs::write(queue_dir.join("tmp"), "not a directory").unwrap();
    assert!(
        !inject(
            &s,
            "alice@example.org",
            &["bob@example.org", "x@far.test"],
            "q fails"
        )
        .await
    );
    assert!(s.new_files("bob@example.org").is_empty());
    std::fs::remove_file(queue_dir.join("tmp")).unwrap();
    std::fs::create_dir(queue_dir.join("tmp")).unwrap();
    // A local copy cannot be stored (over quota): nothing is queued.
    s.directory
        .user_set_quota("bob@example.org", Some('+'), 10)
        .await
        .unwrap();
    assert!(
        !inject(
            &s,
            "alice@example.org",
            &["bob@example.org", "x@far.test"],
            "md fails"
        )
        .await
    );
    assert!(queue(&s).is_empty());
    assert_eq!(std::fs::read_dir(queue_dir.join("tmp")).unwrap().count(), 0);
    assert!(s.new_files("bob@example.org").is_empty());
    // Over LMTP each recipient stands alone: the remote one is queued.
    let r = pipeline.recipient("bob@example.org").await.unwrap();
    let remote = Recipient {
        address: "x@far.test".into(),
        route: Arc::new(Route::Remote {
            address: "x@far.test".into(),
        }),
    };
    let envelope = Envelope {
        id: letterbox::envelope::new_id(),
        sender: "alice@example.org".into(),
        recipients: vec![r, remote],
        received: Received {
            helo: "client.example".into(),
            rdns: None,
            ip: "127.0.0.1".parse().unwrap(),
            by: "mx.example.org".into(),
            with: "LMTP".into(),
            tls: None,
            date: letterbox::envelope::rfc5322_now(),
        },
        headers: String::new(),
        quarantine: false,
    };
    let mut spool = Spool::new(1 << 20, None);
    spool.write(b"Subject: lmtp\r\n\r\nx\r\n").unwrap();
    let outcomes = pipeline
        .deliver(&envelope, spool, None, Mode::PerRecipient)
        .await;
    assert_eq!(
        outcomes,
        [Err(letterbox::pipeline::Failure::QuotaExceeded), Ok(())]
    );
    assert_eq!(queue(&s).len(), 1);
}

#[tokio::test]
async fn a_smarthost_takes_every_domain_in_one_transaction_and_routes_override_mx() {
    let (relay, route) = ("127.0.9.2", "127.0.9.3");
    let port = common_port(&[relay, route]);
    // No MX records at all: only the relay and the route can deliver.
    let dns = dns_with(&["test"], &[]);
    let hub = destination(
        relay,
        port,
        "smtp.provider.test",
        "x.test",
        &["xavier"],
        |_| {},
    )
    .await;
    hub.directory.domain_add("y.test").await.unwrap();
    hub.directory
        .user_add("yves@y.test", Some('+'), None, 0)
        .await
        .unwrap();
    let s = sender(&dns, port, |c| c.outbound.relay = format!("{relay}:{port}")).await;
    assert!(
        inject(
            &s,
            "alice@example.org",
            &["xavier@x.test", "yves@y.test"],
            "relayed"
        )
        .await
    );
    let x = wait_mail(&hub, "xavier@x.test", 1, Duration::from_secs(20)).await;
    let y = wait_mail(&hub, "yves@y.test", 1, Duration::from_secs(20)).await;
    assert_eq!(
        received_id(&x[0], "smtp.provider.test"),
        received_id(&y[0], "smtp.provider.test"),
        "one transaction to the smarthost"
    );
    let hop = destination(route, port, "mx.z.test", "z.test", &["zoe"], |_| {}).await;
    let s2 = sender(&dns, 25, |c| {
        c.outbound.routes = [("z.test".to_string(), format!("{route}:{port}"))].into();
    })
    .await;
    assert!(inject(&s2, "alice@example.org", &["zoe@z.test"], "routed").await);
    wait_mail(&hop, "zoe@z.test", 1, Duration::from_secs(20)).await;
}

/// The password of alice@example.org's account on the smarthost.
const HUB_PASSWORD: &str = "correct horse battery";

/// A smarthost that is a real letterbox: smtp.provider.test on `ip`
/// (port 25's listener on an ephemeral port), serving x.test (xavier) and
/// y.test (yves). It hosts example.org's accounts too, as a provider
/// would: alice@example.org logs in with [`HUB_PASSWORD`] and may send as
/// herself. `tweak` adds its TLS and submission listeners.
async fn smarthost(ip: &str, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let hub = destination(ip, 0, "smtp.provider.test", "x.test", &["xavier"], tweak).await;
    hub.directory.domain_add("y.test").await.unwrap();
    hub.directory
        .user_add("yves@y.test", Some('+'), None, 0)
        .await
        .unwrap();
    let hash = letterbox::blocking::run("hashing the hub's password", || {
        letterbox::password::hash(HUB_PASSWORD).unwrap()
    })
    .await
    .unwrap();
    hub.directory
        .user_set_password("alice@example.org", Some('+'), &hash)
        .await
        .unwrap();
    hub
}

/// Certificates for a test's smarthosts: a CA the sender trusts through
/// `outbound.ca_file`, in a directory that also holds password files.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            ca: Ca::new("letterbox test CA"),
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(pki.ca_file(), pki.ca.cert.pem()).unwrap();
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A hub config change: the certificate `ca` issued for `host`, and
    /// submission with STARTTLS on `starttls`, implicit TLS on `implicit`.
    fn listeners(
        &self,
        ca: &Ca,
        host: &str,
        starttls: Option<String>,
        implicit: Option<String>,
    ) -> impl FnOnce(&mut Config) + use<> {
        let (cert, key) = ca.issue(self.dir.path(), host);
        move |c: &mut Config| {
            c.tls.cert = Some(cert);
            c.tls.key = Some(key);
            c.submission.listen = starttls.iter().map(|a| a.parse().unwrap()).collect();
            c.submission.listen_tls = implicit.iter().map(|a| a.parse().unwrap()).collect();
        }
    }

    /// A password file holding exactly `text`.
    fn password_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A sender config change: every remote message to `relay`, logged in
    /// as alice@example.org with the password in `password_file`.
    fn relay_login(&self, relay: String, password_file: PathBuf) -> impl FnOnce(&mut Config) {
        let ca_file = self.ca_file();
        move |c: &mut Config| {
            c.outbound.relay = relay;
            c.outbound.relay_username = "alice@example.org".into();
            c.outbound.relay_password_file = password_file;
            c.outbound.ca_file = ca_file;
        }
    }
}

/// The first four lines of the `Received:` field `by` wrote, each line
/// without its newline.
fn received_by<'a>(message: &'a str, by: &str) -> Vec<&'a str> {
    let at = message
        .find(&format!("\n\tby {by} with "))
        .unwrap_or_else(|| panic!("no Received by {by} in {message}"));
    let start = message[..at].rfind("\nReceived: ").unwrap() + 1;
    message[start..].lines().take(4).collect()
}

/// What a message relayed by the sender carries once the hub delivered it
/// to `rcpt`: the hub's Received field on top, naming the sender's login
/// (ESMTPSA) and TLS, then ours. Returns the hub's transaction id.
fn check_relayed(message: &str, rcpt: &str) -> String {
    let id = received_id(message, "smtp.provider.test");
    let hub = received_by(message, "smtp.provider.test");
    assert_eq!(
        hub[..2],
        [
            "Received: from mx.example.org (unknown [127.0.0.1])".to_string(),
            format!("\tby smtp.provider.test with ESMTPSA id {id}"),
        ],
        "{message}"
    );
    assert!(
        hub[2].starts_with("\t(TLSv1.3:TLS13_") && hub[2].ends_with(')'),
        "{message}"
    );
    assert!(
        hub[3].starts_with(&format!("\tfor <{rcpt}>; ")),
        "{message}"
    );
    assert!(
        message.starts_with(&format!(
            "Return-Path: <alice@example.org>\nDelivered-To: {rcpt}\n{}\n",
            hub.join("\n")
        )),
        "the hub's Received field is on top: {message}"
    );
    let ours = received_id(message, "mx.example.org");
    assert_eq!(
        received_by(message, "mx.example.org")[1],
        format!("\tby mx.example.org with ESMTP id {ours}"),
        "{message}"
    );
    id
}

/// Issue #14: the smarthost on its STARTTLS submission port, the sender
/// logged in with the password file's first line (its newline is no part
/// of the password). Both remote domains go in one authenticated
/// transaction.
#[tokio::test]
async fn a_smarthost_login_over_starttls_relays_every_domain_in_one_transaction() {
    let ip = "127.0.10.2";
    let pki = Pki::new();
    let hub = smarthost(
        ip,
        pki.listeners(&pki.ca, ip, Some(format!("{ip}:0")), None),
    )
    .await;
    let relay = hub.running.as_ref().unwrap().submission_addrs[0];
    let dns = dns_with(&["test"], &[]);
    let password = pki.password_file("password", &format!("{HUB_PASSWORD}\n"));
    let s = sender(&dns, 25, pki.relay_login(relay.to_string(), password)).await;
    let x = relayed_in_one_transaction(&s, &hub, "relayed with a login").await;
    assert!(x.contains("\nSubject: relayed with a login\n"));
    assert!(
        hub.new_files("alice@example.org").is_empty(),
        "nothing bounced at the hub"
    );
}

/// A smarthost on port 465 is spoken to in TLS from the first byte
/// (RFC 8314), and the login goes inside it. Port 465 needs root.
#[tokio::test]
async fn a_smarthost_on_port_465_gets_implicit_tls_and_the_login() {
    let ip = "127.0.11.2";
    let pki = Pki::new();
    let hub = smarthost(
        ip,
        pki.listeners(&pki.ca, ip, None, Some(format!("{ip}:465"))),
    )
    .await;
    assert_eq!(
        hub.running.as_ref().unwrap().submissions_addrs[0],
        format!("{ip}:465").parse().unwrap(),
        "binding port 465 needs root"
    );
    let dns = dns_with(&["test"], &[]);
    // No newline at all at the end of the file: the same password.
    let password = pki.password_file("password", HUB_PASSWORD);
    let s = sender(&dns, 25, pki.relay_login(format!("{ip}:465"), password)).await;
    relayed_in_one_transaction(&s, &hub, "implicit TLS").await;
}

/// Sends from alice to xavier@x.test and yves@y.test through the smarthost
/// `hub`, and checks they arrived in one logged-in transaction and left
/// the queue; xavier's copy.
async fn relayed_in_one_transaction(s: &TestServer, hub: &TestServer, subject: &str) -> String {
    assert!(
        inject(
            s,
            "alice@example.org",
            &["xavier@x.test", "yves@y.test"],
            subject
        )
        .await
    );
    let x = wait_mail(hub, "xavier@x.test", 1, Duration::from_secs(20)).await;
    let y = wait_mail(hub, "yves@y.test", 1, Duration::from_secs(20)).await;
    assert_eq!(
        check_relayed(&x[0], "xavier@x.test"),
        check_relayed(&y[0], "yves@y.test"),
        "one transaction to the smarthost"
    );
    wait_queue(s, "emptied", Duration::from_secs(10), |q| q.is_empty()).await;
    x[0].clone()
}

/// Stops `s` and starts it again on the same config and files, its queue
/// kept: how an operator has it read its password file again.
async fn restart(s: &mut TestServer) {
    let running = s.running.take().unwrap();
    running.shutdown();
    running.wait().await;
    let running = letterbox::serve::start(s.config.clone()).await.unwrap();
    s.addr = running.smtp_addrs[0];
    s.running = Some(running);
}

/// The smarthost refuses the password: the message waits in the queue,
/// saying why, and is retried (a refused login is not a bounce). Once the
/// file holds the right password and the sender has read it again, the
/// message goes, once.
#[tokio::test]
async fn a_refused_smarthost_login_defers_until_the_password_is_fixed() {
    let ip = "127.0.12.2";
    let pki = Pki::new();
    let hub = smarthost(ip, |c| {
        pki.listeners(&pki.ca, ip, Some(format!("{ip}:0")), None)(c);
        // The sender's retries are not to lock it out of the hub.
        c.limits.auth_failures = "1000/10m".parse().unwrap();
    })
    .await;
    let relay = hub.running.as_ref().unwrap().submission_addrs[0];
    let dns = dns_with(&["test"], &[]);
    let password = pki.password_file("password", "correct horse\n");
    let mut s = sender(
        &dns,
        25,
        pki.relay_login(relay.to_string(), password.clone()),
    )
    .await;
    assert!(
        inject(
            &s,
            "alice@example.org",
            &["xavier@x.test", "yves@y.test"],
            "wrong password"
        )
        .await
    );
    let q = wait_queue(&s, "deferred twice", Duration::from_secs(20), |q| {
        q.first()
            .is_some_and(|e| e.recipients.iter().all(|r| r.attempts >= 2))
    })
    .await;
    assert_eq!(q.len(), 1);
    let want = format!(
        "{ip}[{ip}]:{}: refused our login: 535 5.7.8 Authentication credentials invalid",
        relay.port()
    );
    for r in &q[0].recipients {
        assert_eq!(r.status, Status::Queued, "{r:?}");
        assert_eq!(r.last_error.as_deref(), Some(want.as_str()), "{r:?}");
        assert_eq!(r.last_status.as_deref(), Some("4.7.8"), "{r:?}");
    }
    assert!(hub.new_files("xavier@x.test").is_empty());
    assert!(hub.new_files("yves@y.test").is_empty());
    assert!(
        s.new_files("alice@example.org").is_empty(),
        "a refused login is not a bounce"
    );

    // Fixed (by an editor that ends lines in CRLF), and read at restart.
    std::fs::write(&password, format!("{HUB_PASSWORD}\r\n")).unwrap();
    restart(&mut s).await;
    let x = wait_mail(&hub, "xavier@x.test", 1, Duration::from_secs(20)).await;
    let y = wait_mail(&hub, "yves@y.test", 1, Duration::from_secs(20)).await;
    assert_eq!(
        check_relayed(&x[0], "xavier@x.test"),
        check_relayed(&y[0], "yves@y.test")
    );
    wait_queue(&s, "emptied", Duration::from_secs(10), |q| q.is_empty()).await;
    // Once: nothing more arrives after the queue is empty.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hub.new_files("xavier@x.test").len(), 1);
    assert_eq!(hub.new_files("yves@y.test").len(), 1);
}

/// A peer that speaks just enough SMTP to offer AUTH without STARTTLS,
/// and would take any login and any message; it records what each
/// connection sent it, and whether that connection has ended.
struct RecordingPeer {
    addr: std::net::SocketAddr,
    sessions: Arc<std::sync::Mutex<Vec<Recorded>>>,
}

/// One connection to a [`RecordingPeer`].
#[derive(Default)]
struct Recorded {
    /// Every byte the client sent.
    bytes: Vec<u8>,
    /// The client closed the connection.
    ended: bool,
}

impl RecordingPeer {
    async fn start(ip: &str) -> RecordingPeer {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = sessions.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let all = all.clone();
                let n = {
                    let mut all = all.lock().unwrap();
                    all.push(Recorded::default());
                    all.len() - 1
                };
                tokio::spawn(async move {
                    let mut s = tokio::io::BufReader::new(tcp);
                    let _ = s.get_mut().write_all(b"220 relay.test ESMTP\r\n").await;
                    let mut in_data = false;
                    loop {
                        let mut line = Vec::new();
                        match s.read_until(b'\n', &mut line).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        all.lock().unwrap()[n].bytes.extend_from_slice(&line);
                        let text = String::from_utf8_lossy(&line).to_ascii_uppercase();
                        let reply: &[u8] = if in_data {
                            if line != b".\r\n" {
                                continue;
                            }
                            in_data = false;
                            b"250 2.0.0 taken\r\n"
                        } else if text.starts_with("EHLO") {
                            b"250-relay.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
                        } else if text.starts_with("AUTH") {
                            b"235 2.7.0 welcome\r\n"
                        } else if text.starts_with("DATA") {
                            in_data = true;
                            b"354 go on\r\n"
                        } else if text.starts_with("QUIT") {
                            b"221 2.0.0 bye\r\n"
                        } else {
                            b"250 2.0.0 ok\r\n"
                        };
                        if s.get_mut().write_all(reply).await.is_err() {
                            break;
                        }
                    }
                    all.lock().unwrap()[n].ended = true;
                });
            }
        });
        RecordingPeer { addr, sessions }
    }

    /// What each connection sent, once every one of them has ended.
    async fn ended_sessions(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let all = self.sessions.lock().unwrap();
                if all.iter().all(|r| r.ended) {
                    return all
                        .iter()
                        .map(|r| String::from_utf8_lossy(&r.bytes).into_owned())
                        .collect();
                }
            }
            assert!(Instant::now() < deadline, "a session never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A smarthost that offers no STARTTLS gets no password: not a real
/// letterbox (its port 25 offers no AUTH either), and not a peer that
/// offers AUTH in plaintext, which is shown to have received the EHLO and
/// nothing more. The message waits, saying why.
#[tokio::test]
async fn no_password_goes_to_a_smarthost_without_tls() {
    let (plain_hub, peer_ip) = ("127.0.13.2", "127.0.13.3");
    let pki = Pki::new();
    let dns = dns_with(&["test"], &[]);
    let password = pki.password_file("password", &format!("{HUB_PASSWORD}\n"));
    let refusal = |at: std::net::SocketAddr| {
        let ip = at.ip();
        vec![format!(
            "{ip}[{ip}]:{}: TLS required (the smarthost login) but STARTTLS is not offered; \
             not delivered",
            at.port()
        )]
    };
    let last_errors = |q: &[Entry]| -> Vec<String> {
        q.iter()
            .flat_map(|e| &e.recipients)
            .map(|r| r.last_error.clone().unwrap_or_default())
            .collect()
    };

    // A letterbox with no certificate: SMTP in plaintext only.
    let hub = smarthost(plain_hub, |_| {}).await;
    let s = sender(
        &dns,
        25,
        pki.relay_login(hub.addr.to_string(), password.clone()),
    )
    .await;
    assert!(inject(&s, "alice@example.org", &["xavier@x.test"], "no TLS").await);
    let q = wait_queue(&s, "deferred", Duration::from_secs(20), |q| {
        q.first().is_some_and(|e| e.recipients[0].attempts >= 1)
    })
    .await;
    assert_eq!(q[0].recipients[0].status, Status::Queued);
    assert_eq!(last_errors(&q), refusal(hub.addr));
    assert!(hub.new_files("xavier@x.test").is_empty());

    // A peer offering AUTH in plaintext, which takes any login; one
    // attempt, so its record is complete once that attempt is recorded.
    let peer = RecordingPeer::start(peer_ip).await;
    let s = sender(&dns, 25, |c| {
        pki.relay_login(peer.addr.to_string(), password.clone())(c);
        c.queue.retry_schedule = vec![Dur::from_secs(3600)];
    })
    .await;
    assert!(inject(&s, "alice@example.org", &["xavier@x.test"], "no TLS").await);
    let q = wait_queue(&s, "deferred", Duration::from_secs(20), |q| {
        q.first().is_some_and(|e| e.recipients[0].attempts >= 1)
    })
    .await;
    assert_eq!(last_errors(&q), refusal(peer.addr));
    assert_eq!(peer.ended_sessions().await, ["EHLO mx.example.org\r\n"]);
}

/// The smarthost we log in to must prove who it is: a certificate from a
/// CA the sender does not trust fails the handshake, before any login,
/// over STARTTLS and over implicit TLS alike.
#[tokio::test]
async fn a_smarthost_login_needs_a_certificate_the_sender_trusts() {
    let ip = "127.0.14.2";
    let pki = Pki::new();
    let rogue = Ca::new("nobody trusts this CA");
    let hub = smarthost(
        ip,
        pki.listeners(
            &rogue,
            ip,
            Some(format!("{ip}:0")),
            Some(format!("{ip}:465")),
        ),
    )
    .await;
    let starttls = hub.running.as_ref().unwrap().submission_addrs[0];
    let dns = dns_with(&["test"], &[]);
    let password = pki.password_file("password", &format!("{HUB_PASSWORD}\n"));
    for (relay, want) in [
        (
            starttls.to_string(),
            format!(
                "{ip}[{ip}]:{}: TLS required (the smarthost login) but the handshake failed: \
                 invalid peer certificate: UnknownIssuer; not delivered",
                starttls.port()
            ),
        ),
        (
            format!("{ip}:465"),
            format!(
                "{ip}[{ip}]:465: TLS required (the smarthost login) but the handshake failed: \
                 invalid peer certificate: UnknownIssuer; not delivered"
            ),
        ),
    ] {
        let s = sender(&dns, 25, pki.relay_login(relay.clone(), password.clone())).await;
        assert!(inject(&s, "alice@example.org", &["xavier@x.test"], "untrusted").await);
        let q = wait_queue(&s, "deferred", Duration::from_secs(20), |q| {
            q.first().is_some_and(|e| e.recipients[0].attempts >= 1)
        })
        .await;
        let r = &q[0].recipients[0];
        assert_eq!(r.status, Status::Queued, "{relay}");
        assert_eq!(r.last_error.as_deref(), Some(want.as_str()), "{relay}");
        assert_eq!(r.last_status.as_deref(), Some("4.7.5"), "{relay}");
    }
    assert!(hub.new_files("xavier@x.test").is_empty());
}

/// A relay pointed at a port that never asks for a password (here the
/// hub's port 25: STARTTLS with a trusted certificate, but no AUTH) is not
/// sent one, and the error says what the port offers; it used to get AUTH
/// PLAIN anyway and report "refused our login: 502 5.5.1 Command not
/// implemented", as if the password were wrong.
#[tokio::test]
async fn a_smarthost_port_that_offers_no_auth_is_not_sent_the_password() {
    let ip = "127.0.15.2";
    let pki = Pki::new();
    let hub = smarthost(ip, pki.listeners(&pki.ca, ip, None, None)).await;
    let dns = dns_with(&["test"], &[]);
    let password = pki.password_file("password", &format!("{HUB_PASSWORD}\n"));
    let s = sender(&dns, 25, pki.relay_login(hub.addr.to_string(), password)).await;
    assert!(inject(&s, "alice@example.org", &["xavier@x.test"], "port 25").await);
    let q = wait_queue(&s, "deferred", Duration::from_secs(20), |q| {
        q.first().is_some_and(|e| e.recipients[0].attempts >= 1)
    })
    .await;
    let r = &q[0].recipients[0];
    assert_eq!(r.status, Status::Queued);
    assert_eq!(
        r.last_error.as_deref(),
        Some(
            format!(
                "{ip}[{ip}]:{}: offers no AUTH; the relay password is not sent",
                hub.addr.port()
            )
            .as_str()
        )
    );
    assert!(hub.new_files("xavier@x.test").is_empty());
}
