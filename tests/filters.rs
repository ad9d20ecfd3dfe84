//! Milters and policy servers wired into the server, against the real
//! Debian programs: rspamd (GTUBE refused with its reply, its headers on
//! clean mail), OpenDKIM signing over TCP and a unix socket (verified by
//! dkimpy), postgrey greylisting, and what `default_action` does when a
//! milter or policy server is down or hangs.

mod common;

use std::time::Duration;

use common::daemons::{self, DkimSocket};
use common::server::{Client, TestServer};
use letterbox::config::{DefaultAction, MilterConfig, PolicyConfig, PolicyStage};
use tokio::net::TcpStream;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn milter(address: &str, timeout: u64, default_action: DefaultAction) -> MilterConfig {
    MilterConfig {
        address: address.into(),
        timeout: letterbox::units::Duration::from_secs(timeout),
        default_action,
    }
}

fn policy(address: &str, timeout: u64, default_action: DefaultAction) -> PolicyConfig {
    PolicyConfig {
        address: address.into(),
        stage: PolicyStage::Rcpt,
        timeout: letterbox::units::Duration::from_secs(timeout),
        default_action,
    }
}

fn message(from: &str, subject: &str, body: &str) -> String {
    format!(
        "From: Sender <{from}>\r\nTo: Alice <alice@example.org>\r\nSubject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example.net>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    )
}

/// Greeting, EHLO, MAIL, one RCPT (accepted), DATA with `body`; the final
/// reply.
async fn send(c: &mut Client<TcpStream>, from: &str, body: &str) -> String {
    c.send_mail(from, &["alice@example.org"], body).await
}

/// The one message in alice's inbox.
fn stored(s: &TestServer) -> String {
    let files = s.new_files("alice@example.org");
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::read_to_string(&files[0]).unwrap()
}

/// Starts a daemon on the blocking pool (they take seconds to start).
async fn start<T: Send + 'static>(f: impl FnOnce() -> Option<T> + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rspamd_refuses_gtube_with_its_reply_and_tags_clean_mail() {
    let Some(rspamd) = start(daemons::rspamd).await else {
        return;
    };
    let address = format!("inet:{}", rspamd.addr);
    let s = TestServer::start(|c| {
        c.milters = vec![milter(&address, 30, DefaultAction::Tempfail)];
    })
    .await;
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = send(
        &mut c,
        "spammer@example.net",
        &message("spammer@example.net", "gtube", GTUBE),
    )
    .await;
    assert_eq!(reply, "554 5.7.1 Gtube pattern\r\n");
    assert!(s.new_files("alice@example.org").is_empty());

    let mut c = s.connect().await;
    c.greeting().await;
    let reply = send(
        &mut c,
        "friend@example.net",
        &message(
            "friend@example.net",
            "hello",
            "A perfectly ordinary message.",
        ),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let text = stored(&s);
    for field in [
        "\nX-Spamd-Result: ",
        "\nX-Rspamd-Server: ",
        "\nX-Rspamd-Queue-Id: ",
        "\nX-Spam-Status: ",
    ] {
        assert!(text.contains(field), "no {field:?} in:\n{text}");
    }
    // rspamd's queue id is ours: the milter was told macro i.
    let id = reply.trim_end().rsplit(' ').next().unwrap();
    assert!(
        text.contains(&format!("\nX-Rspamd-Queue-Id: {id}\n")),
        "{text}"
    );
    assert!(
        text.ends_with("\n\nA perfectly ordinary message.\n"),
        "{text}"
    );
}

async fn opendkim_signs(socket: DkimSocket) {
    let Some(python) = daemons::dkimpy() else {
        return;
    };
    let Some(dkim) = start(move || daemons::opendkim(socket)).await else {
        return;
    };
    let address = dkim.address.clone();
    let s = TestServer::start(|c| {
        c.milters = vec![milter(&address, 30, DefaultAction::Tempfail)];
    })
    .await;
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = send(
        &mut c,
        "bob@example.org",
        &message(
            "bob@example.org",
            "signed",
            "Signed by OpenDKIM on the way in.",
        ),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let text = stored(&s);
    // The signature is inserted at the top of the message's own header,
    // below our trace fields.
    let content = text
        .split_once("\nDKIM-Signature: ")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("not signed:\n{text}"));
    let signed = format!("DKIM-Signature: {content}").replace('\n', "\r\n");
    let (ok, said) = daemons::dkimpy_verify(&python, signed.as_bytes(), &dkim.public_txt);
    assert!(ok, "dkimpy: {said}\n{signed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opendkim_signs_over_tcp() {
    opendkim_signs(DkimSocket::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opendkim_signs_over_a_unix_socket() {
    opendkim_signs(DkimSocket::Unix).await;
}

/// A TCP port where nothing listens.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("inet:{addr}")
}

#[tokio::test]
async fn a_milter_that_is_down_gets_its_default_action() {
    let down = closed_port();
    for (action, want) in [
        (
            DefaultAction::Tempfail,
            Some("451 4.7.1 Service unavailable - try again later"),
        ),
        (DefaultAction::Reject, Some("550 5.7.1 Command rejected")),
        (DefaultAction::Accept, None),
    ] {
        let s = TestServer::start(|c| c.milters = vec![milter(&down, 5, action)]).await;
        let mut c = s.connect().await;
        // A client can still greet: the default action starts at MAIL.
        c.greeting().await;
        c.cmd_prefix("EHLO client.example", "250-").await;
        match want {
            Some(reply) => c.cmd("MAIL FROM:<a@b.example>", reply).await,
            None => {
                c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
                    .await;
                c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
                    .await;
                c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
                c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
                assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
            }
        }
    }
}

#[tokio::test]
async fn a_milter_that_hangs_times_out_into_its_default_action() {
    // Accepts connections, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("inet:{}", listener.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let s =
        TestServer::start(|c| c.milters = vec![milter(&address, 1, DefaultAction::Tempfail)]).await;
    let mut c = s.connect().await;
    let started = std::time::Instant::now();
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd(
        "MAIL FROM:<a@b.example>",
        "451 4.7.1 Service unavailable - try again later",
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_milter_that_crashes_mid_session_gets_its_default_action() {
    // Accepts, then closes at once: a milter that died.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("inet:{}", listener.local_addr().unwrap());
    let _crash = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            drop(sock);
        }
    });
    let s =
        TestServer::start(|c| c.milters = vec![milter(&address, 5, DefaultAction::Reject)]).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "550 5.7.1 Command rejected")
        .await;
    assert!(s.new_files("alice@example.org").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgrey_defers_the_first_attempt_and_passes_a_retry() {
    for unix in [false, true] {
        let Some(grey) = start(move || daemons::postgrey(unix)).await else {
            return;
        };
        let address = grey.address.clone();
        let s = TestServer::start(|c| c.policy = vec![policy(&address, 10, DefaultAction::Accept)])
            .await;
        let mut c = s.connect().await;
        c.greeting().await;
        c.cmd_prefix("EHLO client.example", "250-").await;
        c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
            .await;
        let first = c
            .cmd_prefix("RCPT TO:<alice@example.org>", "450 4.2.0 Greylisted")
            .await;
        assert!(
            first.contains("postgrey") || first.contains("Greylisted"),
            "{first}"
        );
        c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
            .await;

        tokio::time::sleep(daemons::POSTGREY_DELAY + Duration::from_secs(1)).await;
        let mut c = s.connect().await;
        c.greeting().await;
        let body = "Subject: retry\r\n\r\nsecond try\r\n";
        let reply = c
            .send_mail("sender@remote.example", &["alice@example.org"], body)
            .await;
        assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
        let text = stored(&s);
        assert!(
            text.contains("\nX-Greylist: delayed "),
            "postgrey's PREPEND:\n{text}"
        );
        assert!(text.ends_with("\nSubject: retry\n\nsecond try\n"), "{text}");
    }
}

#[tokio::test]
async fn a_policy_server_that_is_down_or_hangs_gets_its_default_action() {
    let down = closed_port();
    let s = TestServer::start(|c| c.policy = vec![policy(&down, 2, DefaultAction::Accept)]).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hangs = format!("inet:{}", listener.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let s =
        TestServer::start(|c| c.policy = vec![policy(&hangs, 1, DefaultAction::Tempfail)]).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd(
        "RCPT TO:<alice@example.org>",
        "451 4.7.1 Service unavailable - try again later",
    )
    .await;
}
