//! The SMTP engine over real TCP: every reply the issue lists, the relay
//! tricks, the smuggling variants, limits and STARTTLS.

mod common;

use common::server::TestServer;

const EHLO_PLAIN: &str = "250-mx.example.org greets client.example\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING";

#[tokio::test]
async fn ehlo_advertises_extensions_and_helo_is_plain() {
    let s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd("EHLO client.example", EHLO_PLAIN).await;
    c.cmd(
        "HELO client.example",
        "250 mx.example.org greets client.example",
    )
    .await;
    c.cmd("EHLO", "501 5.5.4 Syntax: EHLO domain").await;
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    c.cmd(
        "HELP",
        "214 2.0.0 See RFC 5321; letterbox accepts mail for its own domains only",
    )
    .await;
    c.cmd(
        "VRFY alice",
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
    )
    .await;
    c.cmd("EXPN staff", "502 5.5.1 EXPN not available").await;
    c.cmd("AUTH PLAIN AGFAYg==", "502 5.5.1 Command not implemented")
        .await;
    c.cmd("STARTTLS", "502 5.5.1 STARTTLS not available").await;
    c.cmd("FROB", "500 5.5.1 Command unrecognized").await;
    c.cmd("RSET", "250 2.0.0 Ok").await;
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;
    assert_eq!(c.reply().await, "");
}

#[tokio::test]
async fn bad_sequences() {
    let s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd(
        "MAIL FROM:<a@b.example>",
        "503 5.5.1 Send EHLO or HELO first",
    )
    .await;
    c.cmd("EHLO client.example", EHLO_PLAIN).await;
    c.cmd("RCPT TO:<alice@example.org>", "503 5.5.1 Need MAIL command")
        .await;
    c.cmd("DATA", "503 5.5.1 Need MAIL command").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("DATA", "503 5.5.1 Need RCPT command").await;
    c.cmd("MAIL FROM:<a@b.example>", "503 5.5.1 Nested MAIL command")
        .await;
    c.cmd(
        "MAIL FROM:a@b.example",
        "501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]",
    )
    .await;
    c.cmd(
        "MAIL FROM:<a@b.example> RET=HDRS",
        "555 5.5.4 Unsupported parameter RET",
    )
    .await;
}

#[tokio::test]
async fn recipients_are_checked_at_rcpt_time() {
    let s = TestServer::start(|_| {}).await;
    s.directory.domain_add("other.example").await.unwrap();
    s.directory
        .domain_set_active("other.example", false)
        .await
        .unwrap();
    s.directory
        .alias_add("info@example.org", &["alice@example.org".into()], Some('+'))
        .await
        .unwrap();
    s.directory.sink_add("*.tmp.example.org", 60).await.unwrap();
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd("EHLO client.example", EHLO_PLAIN).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    let table = [
        ("<alice@example.org>", "250 2.1.5 Recipient ok"),
        ("<ALICE@Example.ORG>", "250 2.1.5 Recipient ok"),
        ("<alice+news@example.org>", "250 2.1.5 Recipient ok"),
        ("<info@example.org>", "250 2.1.5 Recipient ok"),
        ("<x@deep.sub.tmp.example.org>", "250 2.1.5 Recipient ok"),
        ("<x@tmp.example.org>", "550 5.7.1 Relay access denied"),
        ("<nobody@example.org>", "550 5.1.1 No such user here"),
        ("<alice@other.example>", "550 5.7.1 Relay access denied"),
        ("<victim@gmail.com>", "550 5.7.1 Relay access denied"),
        // relay tricks
        (
            "<victim%gmail.com@example.org>",
            "550 5.1.1 No such user here",
        ),
        (
            "<gmail.com!victim@example.org>",
            "550 5.1.1 No such user here",
        ),
        (
            "<\"victim@gmail.com\"@example.org>",
            "550 5.1.1 No such user here",
        ),
        (
            "<@example.org:victim@gmail.com>",
            "550 5.7.1 Relay access denied",
        ),
        (
            "<@example.org,@mx.example.org:victim@gmail.com>",
            "550 5.7.1 Relay access denied",
        ),
        // smtp-proto refuses address literals as syntax: never accepted.
        (
            "<alice@[127.0.0.1]>",
            "501 5.1.3 Bad recipient address syntax",
        ),
        (
            "<victim@gmail.com@example.org>",
            "501 5.1.3 Bad recipient address syntax",
        ),
        ("<alice@example.org.>", "250 2.1.5 Recipient ok"),
        (
            "<jörg@example.org>",
            "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter",
        ),
        (
            "<alice@example.org> NOTIFY=NEVER",
            "555 5.5.4 Unsupported parameter NOTIFY",
        ),
    ];
    for (arg, want) in table {
        c.cmd(&format!("RCPT TO:{arg}"), want).await;
    }
}

#[tokio::test]
async fn directory_failure_is_temporary() {
    let s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    // Break the directory underneath the running server.
    let db = s
        .config
        .database
        .url
        .trim_start_matches("sqlite://")
        .to_string();
    let conn = rusqlite_free_drop(&db).await;
    assert!(conn);
    c.cmd(
        "RCPT TO:<alice@example.org>",
        "451 4.3.0 Temporary directory failure, try again later",
    )
    .await;
}

/// Drops the users table through a second connection.
async fn rusqlite_free_drop(path: &str) -> bool {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    sqlx::raw_sql("DROP VIEW dovecot_passdb; DROP TABLE users;")
        .execute(&mut conn)
        .await
        .is_ok()
}

#[tokio::test]
async fn smtputf8_addresses_work_when_asked_for() {
    let s = TestServer::start(|_| {}).await;
    s.directory
        .user_add("jörg@example.org", Some('+'), None, 0)
        .await
        .unwrap();
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd(
        "MAIL FROM:<andré@remote.example>",
        "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter",
    )
    .await;
    c.cmd(
        "MAIL FROM:<andré@remote.example> SMTPUTF8",
        "250 2.1.0 Sender ok",
    )
    .await;
    c.cmd("RCPT TO:<JÖRG@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(b"Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\nhi\r\n.\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    assert_eq!(s.new_files("jörg@example.org").len(), 1);
}

#[tokio::test]
async fn smuggling_variants_yield_one_message() {
    let variants: &[&[u8]] = &[
        b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\n", b"\n.\r", b"\0.\r\n",
    ];
    for v in variants {
        let s = TestServer::start(|_| {}).await;
        let mut c = s.connect().await;
        c.greeting().await;
        c.cmd_prefix("EHLO client.example", "250-").await;
        c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
            .await;
        c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
            .await;
        c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
        let mut body = b"Subject: first\r\n\r\nx".to_vec();
        body.extend_from_slice(v);
        body.extend_from_slice(b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nboo\r\n.\r\n");
        c.send(&body).await;
        let reply = c.reply().await;
        assert!(
            reply.starts_with("250 2.0.0 Ok: delivered as "),
            "{v:?}: {reply}"
        );
        c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
            .await;
        assert_eq!(s.new_files("alice@example.org").len(), 1, "{v:?}");
        assert!(
            s.new_files("bob@example.org").is_empty(),
            "variant {v:?} smuggled a message"
        );
    }
}

#[tokio::test]
async fn bare_lf_can_be_rejected() {
    let s = TestServer::start(|c| c.smtp.bare_lf = letterbox::config::BareLf::Reject).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(b"Subject: x\nbare\r\n.\r\n").await;
    assert_eq!(
        c.reply().await,
        "550 5.5.2 Bare LF line endings are not allowed; use CRLF\r\n"
    );
    assert!(s.new_files("alice@example.org").is_empty());
    // The session goes on with a clean slate.
    c.cmd("RCPT TO:<alice@example.org>", "503 5.5.1 Need MAIL command")
        .await;
}

#[tokio::test]
async fn size_limits() {
    let s = TestServer::start(|c| c.smtp.max_message_size = letterbox::units::ByteSize(1000)).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd(
        "MAIL FROM:<a@b.example> SIZE=1001",
        "552 5.3.4 Message size exceeds fixed maximum message size",
    )
    .await;
    c.cmd("MAIL FROM:<a@b.example> SIZE=1000", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    // Over the limit: read to the end (including what looks like commands),
    // then refuse, and deliver nothing.
    let mut big = "x".repeat(998) + "\r\n";
    big.push_str("QUIT\r\n");
    big.push_str(&"y".repeat(5000));
    big.push_str("\r\n.\r\n");
    c.send(big.as_bytes()).await;
    assert_eq!(c.reply().await, "552 5.3.4 Message too big\r\n");
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    assert!(s.new_files("alice@example.org").is_empty());
}

#[tokio::test]
async fn too_many_recipients() {
    let s = TestServer::start(|c| c.smtp.max_recipients = 2).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd(
        "RCPT TO:<bob+x@example.org>",
        "452 4.5.3 Too many recipients",
    )
    .await;
}

#[tokio::test]
async fn long_lines_are_refused_and_memory_stays_bounded() {
    let s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    // 1 MiB without a line end, then the end of it.
    let long = vec![b'A'; 1 << 20];
    c.send(&long).await;
    c.send(b"\r\n").await;
    assert_eq!(c.reply().await, "500 5.5.2 Line too long\r\n");
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    let line = format!("NOOP {}", "x".repeat(2048));
    c.cmd(&line, "500 5.5.2 Line too long").await;
}

#[tokio::test]
async fn too_many_errors_closes() {
    let s = TestServer::start(|c| c.smtp.max_errors = 3).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd("FOO", "500 5.5.1 Command unrecognized").await;
    c.cmd("FOO", "500 5.5.1 Command unrecognized").await;
    c.send(b"FOO\r\n").await;
    assert_eq!(c.reply().await, "500 5.5.1 Command unrecognized\r\n");
    assert_eq!(
        c.reply().await,
        "421 4.7.0 Too many errors, closing connection\r\n"
    );
    assert_eq!(c.reply().await, "");
}

#[tokio::test]
async fn connection_limits() {
    let s = TestServer::start(|c| {
        c.smtp.max_connections_per_ip = 2;
    })
    .await;
    let mut a = s.connect().await;
    a.greeting().await;
    let mut b = s.connect().await;
    b.greeting().await;
    let mut third = s.connect().await;
    assert_eq!(
        third.reply().await,
        "421 4.7.0 Too many connections from your address, try again later\r\n"
    );
    drop(a);
    // The slot comes back once the first session has ended.
    let mut ok = false;
    for _ in 0..100 {
        tokio::task::yield_now().await;
        let mut again = s.connect().await;
        if again.reply().await.starts_with("220 ") {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(ok);
    b.cmd("NOOP", "250 2.0.0 Ok").await;

    let s = TestServer::start(|c| c.smtp.max_connections = 1).await;
    let mut a = s.connect().await;
    a.greeting().await;
    let mut b = s.connect().await;
    assert_eq!(
        b.reply().await,
        "421 4.7.0 Too many connections, try again later\r\n"
    );
}

#[tokio::test]
async fn talking_before_the_greeting_is_refused() {
    let s = TestServer::start(|c| c.smtp.greeting_delay = letterbox::units::Duration::from_secs(1))
        .await;
    let mut c = s.connect().await;
    c.send(b"EHLO eager.example\r\n").await;
    assert_eq!(
        c.reply().await,
        "554 5.5.0 Protocol error: talking before the greeting\r\n"
    );
    assert_eq!(c.reply().await, "");
}

#[tokio::test]
async fn pipelining_and_delivery_of_the_received_header() {
    let s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.send(b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n").await;
    assert_eq!(c.reply().await, format!("{EHLO_PLAIN}\r\n"));
    assert_eq!(c.reply().await, "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.reply().await, "250 2.1.5 Recipient ok\r\n");
    assert_eq!(c.reply().await, "550 5.1.1 No such user here\r\n");
    assert_eq!(c.reply().await, "354 End data with <CR><LF>.<CR><LF>\r\n");
    c.send(b"Subject: hi\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
        .await;
    let done = c.reply().await;
    let id = done
        .strip_prefix("250 2.0.0 Ok: delivered as ")
        .unwrap()
        .trim_end()
        .to_string();
    assert_eq!(
        c.reply().await,
        "221 2.0.0 mx.example.org closing connection\r\n"
    );
    let files = s.new_files("alice@example.org");
    assert_eq!(files.len(), 1);
    let text = String::from_utf8(std::fs::read(&files[0]).unwrap()).unwrap();
    let received = format!(
        "Received: from client.example (unknown [127.0.0.1])\n\tby mx.example.org with ESMTP id {id}\n\tfor <alice@example.org>; "
    );
    assert!(text.contains(&received), "{text}");
    assert!(text.ends_with("Subject: hi\n\n.leading dot\n"), "{text:?}");
}

#[tokio::test]
async fn bdat_chunks_and_no_mixing() {
    let s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.send(b"BDAT 14\r\nSubject: b\r\n\r\n").await;
    assert_eq!(c.reply().await, "250 2.0.0 14 octets received\r\n");
    c.cmd("DATA", "503 5.5.1 DATA not allowed during BDAT transfer")
        .await;
    c.send(b"BDAT 8 LAST\r\n.x\r\n.\r\nz").await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    let text = std::fs::read(&s.new_files("alice@example.org")[0]).unwrap();
    assert!(
        text.ends_with(b"Subject: b\n\n.x\n.\nz"),
        "{:?}",
        String::from_utf8_lossy(&text)
    );
    // BDAT without a transaction still consumes its chunk.
    c.send(b"BDAT 6 LAST\r\nNOOP\r\n").await;
    assert_eq!(c.reply().await, "503 5.5.1 Need MAIL command\r\n");
    c.cmd("NOOP", "250 2.0.0 Ok").await;
}

#[tokio::test]
async fn graceful_shutdown_tells_idle_sessions() {
    let mut s = TestServer::start(|_| {}).await;
    let mut c = s.connect().await;
    c.greeting().await;
    let running = s.running.take().unwrap();
    running.shutdown();
    assert_eq!(
        c.reply().await,
        "421 4.3.2 Service shutting down, try again later\r\n"
    );
    running.wait().await;
    assert!(tokio::net::TcpStream::connect(s.addr).await.is_err());
}
