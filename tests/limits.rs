//! Rate limits per client (`[limits]`): each limit crossed, with its exact
//! reply, and recovered once its window has passed; loopback exempt by
//! default and unix-socket clients never counted. The window and memory
//! bound are unit tests in `src/ratelimit.rs`.
//!
//! Windows are 3s here: long enough that a busy machine fills one before it
//! ends, short enough to wait out.

mod common;

use std::time::Duration;

use common::server::{Client, TestServer};
use letterbox::config::{Config, ListenAddr};
use letterbox::ratelimit::Rate;
use letterbox::smtp::Session;
use letterbox::smtp::server::Bound;
use letterbox::smtp::session::Connection;
use tokio_util::sync::CancellationToken;

const WINDOW: Duration = Duration::from_secs(3);
const BODY: &str = "Subject: rate\r\n\r\nhello\r\n";

fn rate(s: &str) -> Option<Rate> {
    Some(s.parse().unwrap())
}

/// A server whose loopback clients are rate limited, with only the limits
/// `tweak` sets.
async fn limited(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start(|c| {
        c.limits.exempt = Vec::new();
        c.limits.messages_per_ip = None;
        c.limits.recipients_per_ip = None;
        c.limits.connections_per_ip = None;
        tweak(c);
    })
    .await
}

/// Waits out one window, and a little.
async fn wait_window() {
    tokio::time::sleep(WINDOW + Duration::from_millis(200)).await;
}

#[tokio::test]
async fn connections_over_the_rate_get_421_before_the_greeting_then_recover() {
    let s = limited(|c| c.limits.connections_per_ip = rate("2/3s")).await;
    let mut first = s.connect().await;
    first.greeting().await;
    let mut second = s.connect().await;
    second.greeting().await;
    // Closing them changes nothing: the rate counts connections made.
    drop((first, second));
    let mut third = s.connect().await;
    assert_eq!(
        third.reply().await,
        "421 4.7.0 Too many connections from your address recently, try again later\r\n"
    );
    assert_eq!(third.reply().await, "", "closed after the 421");

    wait_window().await;
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail("s@remote.example", &["alice@example.org"], BODY)
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
}

#[tokio::test]
async fn messages_over_the_rate_get_450_at_mail_then_recover() {
    let s = limited(|c| c.limits.messages_per_ip = rate("2/3s")).await;
    let mut c = s.connect().await;
    c.greeting().await;
    for _ in 0..2 {
        let reply = c
            .send_mail("s@remote.example", &["alice@example.org"], BODY)
            .await;
        assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    }
    c.cmd(
        "MAIL FROM:<s@remote.example>",
        "450 4.7.1 Too many messages from your address recently, try again later",
    )
    .await;
    // Another connection from the same address is the same client.
    let mut other = s.connect().await;
    other.greeting().await;
    other.cmd_prefix("EHLO client.example", "250-").await;
    other
        .cmd(
            "MAIL FROM:<t@remote.example>",
            "450 4.7.1 Too many messages from your address recently, try again later",
        )
        .await;
    assert_eq!(s.new_files("alice@example.org").len(), 2);

    wait_window().await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert_eq!(s.new_files("alice@example.org").len(), 3);
}

#[tokio::test]
async fn a_message_refused_at_the_end_of_data_is_not_counted() {
    let s = limited(|c| {
        c.limits.messages_per_ip = rate("1/1m");
        c.smtp.max_message_size = letterbox::units::ByteSize(100);
    })
    .await;
    let mut c = s.connect().await;
    c.greeting().await;
    let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(200));
    let reply = c
        .send_mail("s@remote.example", &["alice@example.org"], &big)
        .await;
    assert_eq!(reply, "552 5.3.4 Message too big\r\n");
    // The refused one did not use the only message of the window.
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    c.cmd(
        "MAIL FROM:<s@remote.example>",
        "450 4.7.1 Too many messages from your address recently, try again later",
    )
    .await;
}

#[tokio::test]
async fn recipients_over_the_rate_get_450_at_rcpt_then_recover() {
    let s = limited(|c| c.limits.recipients_per_ip = rate("3/3s")).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    // Refused recipients do not count.
    c.cmd(
        "RCPT TO:<nobody@example.org>",
        "550 5.1.1 No such user here",
    )
    .await;
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    // Each RCPT answered 250 counts, a repeated one too.
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    let over = "450 4.7.1 Too many recipients from your address recently, try again later";
    c.cmd("RCPT TO:<bob@example.org>", over).await;
    c.cmd("RCPT TO:<bob@example.org>", over).await;

    wait_window().await;
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    assert_eq!(s.new_files("alice@example.org").len(), 1);
    assert_eq!(s.new_files("bob@example.org").len(), 1);
}

#[tokio::test]
async fn the_defaults_limit_remote_clients_and_leave_loopback_alone() {
    let defaults = Config::default().limits;
    assert_eq!(defaults.messages_per_ip, rate("60/1m"));
    assert_eq!(defaults.recipients_per_ip, rate("300/1m"));
    assert_eq!(defaults.connections_per_ip, rate("30/1m"));
    let s = TestServer::start(|c| {
        c.limits.connections_per_ip = rate("1/1m");
        c.limits.messages_per_ip = rate("1/1m");
    })
    .await;
    // Loopback (the default exempt list): never counted.
    for _ in 0..3 {
        let mut c = s.connect().await;
        c.greeting().await;
        let reply = c
            .send_mail("s@remote.example", &["alice@example.org"], BODY)
            .await;
        assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    }
    // A remote client (a session of the server's own pipeline, driven
    // over an in-memory stream as from 192.0.2.9) is.
    let remote = || {
        let pipeline = s.running.as_ref().unwrap().pipeline.clone();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let conn = Connection::new("192.0.2.9".parse().unwrap());
        tokio::spawn(Session::new(server, pipeline, conn, CancellationToken::new()).run(true));
        Client::new(client)
    };
    let mut c = remote();
    c.greeting().await;
    let reply = c
        .send_mail("s@remote.example", &["alice@example.org"], BODY)
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let mut c = remote();
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd(
        "MAIL FROM:<s@remote.example>",
        "450 4.7.1 Too many messages from your address recently, try again later",
    )
    .await;
}

#[tokio::test]
async fn unix_socket_clients_are_never_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lmtp.sock");
    let s = limited(|c| {
        c.limits.connections_per_ip = rate("1/1m");
        c.limits.messages_per_ip = rate("1/1m");
        c.limits.recipients_per_ip = rate("1/1m");
        c.lmtp.listen = vec![ListenAddr::Unix(sock.clone())];
    })
    .await;
    assert_eq!(
        s.running.as_ref().unwrap().lmtp[0],
        Bound::Unix(sock.clone())
    );
    for _ in 0..3 {
        let mut c = Client::new(tokio::net::UnixStream::connect(&sock).await.unwrap());
        assert_eq!(c.reply().await, "220 mx.example.org LMTP letterbox\r\n");
        c.cmd_prefix("LHLO client.example", "250-").await;
        for _ in 0..2 {
            c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
                .await;
            c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
                .await;
            c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
                .await;
            c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
            c.send(format!("{BODY}.\r\n").as_bytes()).await;
            for _ in 0..2 {
                let reply = c.reply().await;
                assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
            }
        }
    }
    assert_eq!(s.new_files("bob@example.org").len(), 6);
}
