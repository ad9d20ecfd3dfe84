//! Inbound trust against a real DNS server: SPF, DKIM, DMARC and ARC
//! verified into Authentication-Results, forged results removed, DNS
//! blocklists and allowlists, and what a dead DNS server does.
//!
//! Each test starts dnsmasq (tests/common/dns.rs) on a free loopback port
//! with the zone below, and a letterbox whose `[dns]` points at it; the
//! clients connect from 127.0.0.1. Signatures come from dkimpy
//! (tests/common/dkim.rs). The Authentication-Results text is asserted
//! exactly as it lands on disk.

mod common;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dkim::{self, Key};
use common::dns::{DnsServer, Zone};
use common::server::{Client, TestServer, test_config};
use futures_util::future::BoxFuture;
use letterbox::config::{AuthConfig, Config, DmarcPolicy, DnsblConfig, SpfPolicy, TagPolicy};
use tokio::io::{AsyncRead, AsyncWrite};

const LOCALHOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LISTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// A client address with a PTR record.
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// The test zone. SPF: pass.test, helo.test and mx.test (by its MX) allow
/// 127.0.0.1; fail.test and soft.test do not (-all, ~all); none.test has
/// no record; anything under .down is REFUSED. DKIM: key 0 at
/// sel._domainkey of pass.test and relay.test. DMARC: p=reject for
/// pass.test and reject.test, p=quarantine for quarantine.test, p=none for
/// monitor.test. PTR: 192.0.2.7 is client.test. DNSBL: 127.0.0.1 is on bl.test, wl.test and (with the
/// code 127.0.0.4) codes.test; ::1 is on bl.test.
fn zone(key: &Key) -> Zone {
    Zone::new()
        .txt("pass.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("helo.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("soft.test", "v=spf1 ip4:192.0.2.1 ~all")
        .txt("mx.test", "v=spf1 mx -all")
        .mx("mx.test", "mail.mx.test", 10)
        .a("mail.mx.test", LOCALHOST)
        .txt("sel._domainkey.pass.test", &key.record)
        .txt("sel._domainkey.relay.test", &key.record)
        .txt("_dmarc.pass.test", "v=DMARC1; p=reject")
        .txt("reject.test", "v=spf1 -all")
        .txt("_dmarc.reject.test", "v=DMARC1; p=reject")
        .txt("quarantine.test", "v=spf1 -all")
        .txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
        .txt("monitor.test", "v=spf1 -all")
        .txt("_dmarc.monitor.test", "v=DMARC1; p=none")
        .ptr(CLIENT, "client.test")
        .a("1.0.0.127.bl.test", LISTED)
        .a("1.0.0.127.wl.test", LISTED)
        .a("1.0.0.127.codes.test", Ipv4Addr::new(127, 0, 0, 4))
        .a(&format!("{}.bl.test", LOOPBACK6_NIBBLES), LISTED)
}

/// `::1` as a DNS list asks for it: its 32 nibbles, last first (RFC 5782
/// §2.4).
const LOOPBACK6_NIBBLES: &str = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0";

/// The DNS server and the published key, or None when the suite is
/// skipped (dnsmasq or dkimpy missing, CI not set).
fn setup() -> Option<(DnsServer, &'static [Key; 2])> {
    dkim::available()?;
    let keys = dkim::keys();
    let dns = DnsServer::start(&zone(&keys[0]))?;
    Some((dns, keys))
}

fn policy(spf: SpfPolicy, dkim: TagPolicy, dmarc: DmarcPolicy, arc: TagPolicy) -> AuthConfig {
    AuthConfig {
        spf,
        dkim,
        dmarc,
        arc,
        received_spf: false,
    }
}

const OFF: TagPolicy = TagPolicy::Off;
const TAG: TagPolicy = TagPolicy::Tag;

/// A server whose resolver is `dns`, with `auth`, then `tweak`.
async fn server(dns: &DnsServer, auth: AuthConfig, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let servers = dns.servers();
    let s = TestServer::start(move |c| {
        c.dns.servers = servers;
        c.dns.timeout = letterbox::units::Duration::from_secs(1);
        c.auth = auth;
        tweak(c);
    })
    .await;
    s.directory
        .alias_add(
            "postmaster@example.org",
            &["alice@example.org".into()],
            Some('+'),
        )
        .await
        .unwrap();
    s
}

/// A message from `from` (its From field), CRLF.
fn message(from: &str, subject: &str) -> String {
    format!(
        "From: Sender <{from}>\r\nTo: alice@example.org\r\nSubject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n\r\n\
         Hello.\r\n"
    )
}

/// One transaction after EHLO `helo`: MAIL FROM `from`, RCPT alice, DATA.
/// Returns the reply to the end of data.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    helo: &str,
    from: &str,
    body: &str,
) -> String {
    c.cmd_prefix(&format!("EHLO {helo}"), "250-").await;
    c.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    let stuffed = body.replace("\r\n.", "\r\n..");
    c.send(stuffed.as_bytes()).await;
    c.send(b".\r\n").await;
    c.reply().await
}

async fn connect(s: &TestServer) -> Client<tokio::net::TcpStream> {
    let mut c = s.connect().await;
    c.patience = Duration::from_secs(60);
    c.greeting().await;
    c
}

/// Files in `<root>/example.org/alice/<folder>new`, oldest name first.
fn mail(s: &TestServer, folder: &str) -> Vec<String> {
    let dir = s.root.join("example.org/alice").join(folder).join("new");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// The delivered message below our Received field: the fields checks
/// added, then the content.
fn below_received(stored: &str) -> &str {
    let (_, after) = stored
        .split_once("\tfor <alice@example.org>; ")
        .expect("a Received field");
    after.split_once('\n').unwrap().1
}

/// The Authentication-Results field of a stored copy, folded as on disk.
fn auth_results(stored: &str) -> String {
    let rest = below_received(stored);
    assert!(
        rest.starts_with("Authentication-Results: mx.example.org"),
        "{stored}"
    );
    let mut lines = rest.split_inclusive('\n');
    let mut field = lines.next().unwrap().to_string();
    for l in lines {
        if !l.starts_with('\t') {
            break;
        }
        field.push_str(l);
    }
    field
}

/// The one message in `folder` with this subject (the 250 comes after
/// the fsync, so it is there).
fn stored(s: &TestServer, folder: &str, subject: &str) -> String {
    let found: Vec<String> = mail(s, folder)
        .into_iter()
        .filter(|m| m.contains(&format!("\nSubject: {subject}\n")))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "messages with subject {subject:?} in {folder:?}"
    );
    found.into_iter().next().unwrap()
}

#[tokio::test]
async fn spf_results_for_each_kind_of_record() {
    let Some((dns, _)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::Tag, OFF, DmarcPolicy::Off, OFF),
        |_| {},
    )
    .await;
    let mut c = connect(&s).await;
    let cases = [
        (
            "client.example",
            "s@pass.test",
            "spf=pass smtp.mailfrom=s@pass.test",
        ),
        (
            "client.example",
            "s@fail.test",
            "spf=fail smtp.mailfrom=s@fail.test",
        ),
        (
            "client.example",
            "s@soft.test",
            "spf=softfail smtp.mailfrom=s@soft.test",
        ),
        (
            "client.example",
            "s@none.test",
            "spf=none smtp.mailfrom=s@none.test",
        ),
        (
            "client.example",
            "s@mx.test",
            "spf=pass smtp.mailfrom=s@mx.test",
        ),
        // REFUSED, as a resolver's SERVFAIL: an error, not "no record".
        (
            "client.example",
            "s@spf.down",
            "spf=temperror smtp.mailfrom=s@spf.down",
        ),
        // The null sender: the HELO name is checked (RFC 7208 §2.4).
        ("helo.test", "", "spf=pass smtp.helo=helo.test"),
    ];
    for (n, (helo, from, want)) in cases.iter().enumerate() {
        let subject = format!("spf{n}");
        let reply = send(&mut c, helo, from, &message("s@pass.test", &subject)).await;
        assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
        assert_eq!(
            auth_results(&stored(&s, "", &subject)),
            format!("Authentication-Results: mx.example.org;\n\t{want}\n"),
            "from {from:?}; queries:\n{}",
            dns.log()
        );
    }
}

#[tokio::test]
async fn received_spf_is_written_when_asked_for() {
    let Some((dns, _)) = setup() else { return };
    let mut auth = policy(SpfPolicy::Tag, OFF, DmarcPolicy::Off, OFF);
    auth.received_spf = true;
    let s = server(&dns, auth, |_| {}).await;
    let mut c = connect(&s).await;
    let reply = send(
        &mut c,
        "client.example",
        "s@fail.test",
        &message("s@fail.test", "r"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let stored = stored(&s, "", "r");
    assert!(
        below_received(&stored).starts_with(
            "Authentication-Results: mx.example.org;\n\tspf=fail smtp.mailfrom=s@fail.test\n\
             Received-SPF: fail (mx.example.org: domain of s@fail.test does not designate 127.0.0.1 as permitted sender)\n\
             \treceiver=mx.example.org; client-ip=127.0.0.1; envelope-from=\"s@fail.test\"; helo=client.example; identity=mailfrom;\n\
             From: "
        ),
        "{stored}"
    );
}

#[tokio::test]
async fn spf_reject_fail_answers_at_mail_from() {
    let Some((dns, _)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::RejectFail, OFF, DmarcPolicy::Off, OFF),
        |_| {},
    )
    .await;
    let mut c = connect(&s).await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd(
        "MAIL FROM:<s@fail.test>",
        "550 5.7.23 SPF check failed: fail.test does not allow 127.0.0.1 to send its mail",
    )
    .await;
    c.cmd(
        "MAIL FROM:<s@spf.down>",
        "451 4.7.24 SPF check of spf.down failed for a DNS error, try again later",
    )
    .await;
    // softfail, none and pass are only reported.
    for from in ["s@soft.test", "s@none.test", "s@pass.test"] {
        c.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0 Sender ok")
            .await;
        c.cmd("RSET", "250 2.0.0 Ok").await;
    }
}

#[tokio::test]
async fn dkim_pass_altered_body_unknown_wrong_and_unreachable_key() {
    let Some((dns, keys)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::Off, TAG, DmarcPolicy::Off, OFF),
        |_| {},
    )
    .await;
    let mut c = connect(&s).await;

    let signed = dkim::sign(
        &message("s@pass.test", "dkim"),
        "pass.test",
        "sel",
        &keys[0],
    );
    let altered = dkim::sign(
        &message("s@pass.test", "altered"),
        "pass.test",
        "sel",
        &keys[0],
    )
    .replace("Hello.\r\n", "Hello, altered.\r\n");
    let unknown = dkim::sign(
        &message("s@pass.test", "nokey"),
        "pass.test",
        "nokey",
        &keys[0],
    );
    let wrong = dkim::sign(
        &message("s@pass.test", "wrong"),
        "pass.test",
        "sel",
        &keys[1],
    );
    // REFUSED for the key: not "no key" but "try again".
    let refused = dkim::sign(
        &message("s@pass.test", "refused"),
        "key.down",
        "sel",
        &keys[0],
    );
    let b = |m: &str| dkim::header_b(m, "DKIM-Signature");
    let cases = [
        (
            signed.clone(),
            format!(
                "dkim=pass header.d=pass.test header.s=sel header.b={}",
                b(&signed)
            ),
        ),
        (
            altered.clone(),
            format!(
                "dkim=fail (body hash did not verify) header.d=pass.test header.s=sel header.b={}",
                b(&altered)
            ),
        ),
        (
            unknown.clone(),
            format!(
                "dkim=permerror (no key for signature) header.d=pass.test header.s=nokey header.b={}",
                b(&unknown)
            ),
        ),
        (
            wrong.clone(),
            format!(
                "dkim=fail (signature did not verify) header.d=pass.test header.s=sel header.b={}",
                b(&wrong)
            ),
        ),
        (
            refused.clone(),
            format!(
                "dkim=temperror (key lookup failed) header.d=key.down header.s=sel header.b={}",
                b(&refused)
            ),
        ),
        (message("s@pass.test", "unsigned"), "dkim=none".to_string()),
    ];
    let subjects = ["dkim", "altered", "nokey", "wrong", "refused", "unsigned"];
    for ((body, want), subject) in cases.iter().zip(subjects) {
        let reply = send(&mut c, "client.example", "s@pass.test", body).await;
        assert!(reply.starts_with("250 "), "{reply}");
        assert_eq!(
            auth_results(&stored(&s, "", subject)),
            format!("Authentication-Results: mx.example.org;\n\t{want}\n"),
            "queries:\n{}",
            dns.log()
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_large_message_on_disk_is_verified_off_the_runtime() {
    // Reading a spool file and parsing a large message assert (debug
    // builds) that they run on the blocking pool, so this fails if the
    // hand-off goes; on one thread a stall would show too.
    let Some((dns, keys)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::Off, TAG, DmarcPolicy::Off, OFF),
        |c| {
            c.maildir.spool_memory_limit = letterbox::units::ByteSize(64 * 1024);
        },
    )
    .await;
    let mut c = connect(&s).await;
    let big = message("s@pass.test", "big").replace(
        "Hello.\r\n",
        &"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(5_000),
    );
    let signed = dkim::sign(&big, "pass.test", "sel", &keys[0]);
    let reply = send(&mut c, "client.example", "s@pass.test", &signed).await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        auth_results(&stored(&s, "", "big")),
        format!(
            "Authentication-Results: mx.example.org;\n\tdkim=pass header.d=pass.test header.s=sel header.b={}\n",
            dkim::header_b(&signed, "DKIM-Signature")
        )
    );
}

#[tokio::test]
async fn dmarc_pass_reject_quarantine_and_none() {
    let Some((dns, keys)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::Tag, TAG, DmarcPolicy::Enforce, OFF),
        |_| {},
    )
    .await;
    let mut c = connect(&s).await;

    // Pass: SPF and DKIM both aligned with the From domain.
    let signed = dkim::sign(
        &message("s@pass.test", "pass"),
        "pass.test",
        "sel",
        &keys[0],
    );
    let reply = send(&mut c, "client.example", "s@pass.test", &signed).await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        auth_results(&stored(&s, "", "pass")),
        format!(
            "Authentication-Results: mx.example.org;\n\
             \tspf=pass smtp.mailfrom=s@pass.test;\n\
             \tdkim=pass header.d=pass.test header.s=sel header.b={};\n\
             \tdmarc=pass (p=reject dis=none) header.from=pass.test\n",
            dkim::header_b(&signed, "DKIM-Signature")
        )
    );

    // Relaxed alignment: SPF passed for pass.test, the From is a subdomain.
    let reply = send(
        &mut c,
        "client.example",
        "s@pass.test",
        &message("s@news.pass.test", "relaxed"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        auth_results(&stored(&s, "", "relaxed")),
        "Authentication-Results: mx.example.org;\n\
         \tspf=pass smtp.mailfrom=s@pass.test;\n\
         \tdkim=none;\n\
         \tdmarc=pass (p=reject dis=none) header.from=news.pass.test\n"
    );

    // p=reject: refused at the end of data, delivered nowhere.
    let reply = send(
        &mut c,
        "client.example",
        "s@reject.test",
        &message("s@reject.test", "reject"),
    )
    .await;
    assert_eq!(
        reply,
        "550 5.7.1 Message rejected by the DMARC policy of reject.test\r\n"
    );
    assert_eq!(mail(&s, "").len(), 2);

    // A DMARC record that cannot be looked up (REFUSED) is no "none".
    let reply = send(
        &mut c,
        "client.example",
        "s@pass.test",
        &message("s@from.down", "down"),
    )
    .await;
    assert_eq!(
        reply,
        "451 4.4.3 DMARC check of from.down failed for a DNS error, try again later\r\n"
    );

    // p=quarantine: into .Junk, tagged.
    let reply = send(
        &mut c,
        "client.example",
        "s@quarantine.test",
        &message("s@quarantine.test", "q"),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    assert_eq!(mail(&s, "").len(), 2);
    assert_eq!(
        auth_results(&stored(&s, ".Junk", "q")),
        "Authentication-Results: mx.example.org;\n\
         \tspf=fail smtp.mailfrom=s@quarantine.test;\n\
         \tdkim=none;\n\
         \tdmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test\n"
    );

    // p=none: delivered, tagged.
    let reply = send(
        &mut c,
        "client.example",
        "s@monitor.test",
        &message("s@monitor.test", "none"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        auth_results(&stored(&s, "", "none")),
        "Authentication-Results: mx.example.org;\n\
         \tspf=fail smtp.mailfrom=s@monitor.test;\n\
         \tdkim=none;\n\
         \tdmarc=fail (p=none dis=none) header.from=monitor.test\n"
    );
}

#[tokio::test]
async fn dmarc_tag_reports_without_acting() {
    let Some((dns, _)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::Tag, OFF, DmarcPolicy::Tag, OFF),
        |_| {},
    )
    .await;
    let mut c = connect(&s).await;
    let reply = send(
        &mut c,
        "client.example",
        "s@reject.test",
        &message("s@reject.test", "t"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        auth_results(&stored(&s, "", "t")),
        "Authentication-Results: mx.example.org;\n\
         \tspf=fail smtp.mailfrom=s@reject.test;\n\
         \tdmarc=fail (p=reject dis=none) header.from=reject.test\n"
    );
}

#[tokio::test]
async fn an_arc_chain_is_verified() {
    let Some((dns, keys)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::Off, OFF, DmarcPolicy::Off, TAG),
        |_| {},
    )
    .await;
    let mut c = connect(&s).await;
    let relayed = |subject| {
        format!(
            "Authentication-Results: relay.test; spf=pass smtp.mailfrom=s@pass.test\r\n{}",
            message("s@pass.test", subject)
        )
    };
    let seal = |m: &str| dkim::arc_seal(m, "relay.test", "sel", &keys[0], "relay.test");
    let sealed = seal(&relayed("arc"));
    let broken = seal(&relayed("broken")).replace("Hello.\r\n", "Hello, altered.\r\n");
    let unsealed = relayed("unsealed");
    for (body, want, subject) in [
        (&sealed, "arc=pass", "arc"),
        (&broken, "arc=fail (body hash did not verify)", "broken"),
        (&unsealed, "arc=none", "unsealed"),
    ] {
        let reply = send(&mut c, "client.example", "s@pass.test", body).await;
        assert!(reply.starts_with("250 "), "{reply}");
        let stored = stored(&s, "", subject);
        assert_eq!(
            auth_results(&stored),
            format!("Authentication-Results: mx.example.org;\n\t{want}\n")
        );
        // The relay's own results are its to keep.
        assert!(
            stored.contains("\nAuthentication-Results: relay.test; spf=pass"),
            "{stored}"
        );
    }
}

#[tokio::test]
async fn forged_authentication_results_are_removed() {
    let Some((dns, _)) = setup() else { return };
    let s = server(
        &dns,
        policy(SpfPolicy::Tag, OFF, DmarcPolicy::Off, OFF),
        |_| {},
    )
    .await;
    let mut c = connect(&s).await;
    let body = "Authentication-Results: mx.example.org; dkim=pass header.d=bank.example\r\n\
                Authentication-Results: relay.test; spf=pass smtp.mailfrom=s@pass.test\r\n\
                From: s@pass.test\r\n\
                authentication-results: (we promise) MX.Example.Org;\r\n\tdmarc=pass header.from=bank.example\r\n\
                Subject: forged\r\n\
                \r\n\
                body\r\n";
    let reply = send(&mut c, "client.example", "s@pass.test", body).await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        below_received(&stored(&s, "", "forged")),
        "Authentication-Results: mx.example.org;\n\
         \tspf=pass smtp.mailfrom=s@pass.test\n\
         Authentication-Results: relay.test; spf=pass smtp.mailfrom=s@pass.test\n\
         From: s@pass.test\n\
         Subject: forged\n\
         \n\
         body\n"
    );
}

#[tokio::test]
async fn a_listed_client_is_refused_but_postmaster_gets_its_mail() {
    let Some((dns, _)) = setup() else { return };
    let off = policy(SpfPolicy::Off, OFF, DmarcPolicy::Off, OFF);
    let s = server(&dns, off, |c| {
        c.dnsbl = vec![list("bl.test", 1, &[])];
    })
    .await;
    let mut c = connect(&s).await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@pass.test>", "250 2.1.0 Sender ok")
        .await;
    c.cmd(
        "RCPT TO:<alice@example.org>",
        "554 5.7.1 Service unavailable; client [127.0.0.1] is listed by bl.test; mail to postmaster is accepted",
    )
    .await;
    c.cmd("RCPT TO:<postmaster@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(message("s@pass.test", "to-postmaster").as_bytes())
        .await;
    c.send(b".\r\n").await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: delivered as "));
    assert_eq!(mail(&s, "").len(), 1);
    // The verdict stays for the connection's next transaction.
    c.cmd("MAIL FROM:<s@pass.test>", "250 2.1.0 Sender ok")
        .await;
    c.cmd_prefix("RCPT TO:<bob@example.org>", "554 5.7.1 ")
        .await;
}

#[tokio::test]
async fn an_ipv6_client_is_looked_up_by_its_nibbles() {
    let Some((dns, _)) = setup() else { return };
    let off = policy(SpfPolicy::Off, OFF, DmarcPolicy::Off, OFF);
    let s = server(&dns, off, |c| {
        c.smtp.listen = vec!["[::1]:0".parse().unwrap()];
        c.dnsbl = vec![list("bl.test", 1, &[])];
    })
    .await;
    assert!(s.addr.is_ipv6());
    let mut c = connect(&s).await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@pass.test>", "250 2.1.0 Sender ok")
        .await;
    c.cmd(
        "RCPT TO:<alice@example.org>",
        "554 5.7.1 Service unavailable; client [::1] is listed by bl.test; mail to postmaster is accepted",
    )
    .await;
    c.cmd("RCPT TO:<postmaster@example.org>", "250 2.1.5 Recipient ok")
        .await;
    assert!(
        dns.log().contains(&format!("{LOOPBACK6_NIBBLES}.bl.test")),
        "the nibble name was asked of the DNS server"
    );
}

fn list(zone: &str, weight: i32, codes: &[Ipv4Addr]) -> DnsblConfig {
    DnsblConfig {
        zone: zone.into(),
        weight,
        codes: codes.to_vec(),
    }
}

#[tokio::test]
async fn allowlists_weights_and_codes_decide_together() {
    let Some((dns, _)) = setup() else { return };
    let off = || policy(SpfPolicy::Off, OFF, DmarcPolicy::Off, OFF);
    let code4 = Ipv4Addr::new(127, 0, 0, 4);
    // (lists, threshold, the RCPT reply)
    let cases: Vec<(Vec<DnsblConfig>, i32, &str)> = vec![
        // An allowlist cancels the listing.
        (
            vec![list("bl.test", 1, &[]), list("wl.test", -1, &[])],
            1,
            "250 2.1.5 Recipient ok",
        ),
        // A code that is not wanted is no listing; a wanted one is.
        (
            vec![list("codes.test", 1, &[LISTED])],
            1,
            "250 2.1.5 Recipient ok",
        ),
        (
            vec![list("codes.test", 1, &[code4])],
            1,
            "554 5.7.1 Service unavailable; client [127.0.0.1] is listed by codes.test; mail to postmaster is accepted",
        ),
        // Below the threshold one list is not enough; two are.
        (vec![list("bl.test", 1, &[])], 2, "250 2.1.5 Recipient ok"),
        (
            vec![
                list("nx.test", 5, &[]),
                list("bl.test", 1, &[]),
                list("codes.test", 1, &[]),
            ],
            2,
            "554 5.7.1 Service unavailable; client [127.0.0.1] is listed by bl.test; mail to postmaster is accepted",
        ),
    ];
    for (lists, threshold, want) in cases {
        let s = server(&dns, off(), |c| {
            c.dnsbl = lists;
            c.smtp.dnsbl_threshold = threshold;
        })
        .await;
        let mut c = connect(&s).await;
        c.cmd_prefix("EHLO client.example", "250-").await;
        c.cmd("MAIL FROM:<s@pass.test>", "250 2.1.0 Sender ok")
            .await;
        c.cmd("RCPT TO:<alice@example.org>", want).await;
    }
}

#[tokio::test]
async fn a_dead_dns_server_accepts_nothing_wrongly() {
    let Some((mut dns, _)) = setup() else { return };
    // The defaults (SPF and DKIM tagged, DMARC enforced) and a DNSBL.
    let s = server(&dns, AuthConfig::default(), |c| {
        c.dnsbl = vec![list("bl.test", 1, &[])];
    })
    .await;
    let strict = server(
        &dns,
        policy(SpfPolicy::RejectFail, TAG, DmarcPolicy::Enforce, TAG),
        |_| {},
    )
    .await;
    let tagging = server(
        &dns,
        policy(SpfPolicy::Tag, OFF, DmarcPolicy::Off, OFF),
        |_| {},
    )
    .await;
    dns.stop();

    // A DNSBL that does not answer could list the client: RCPT is a
    // temporary failure, except for postmaster, who must reach a person.
    let mut c = connect(&s).await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@pass.test>", "250 2.1.0 Sender ok")
        .await;
    c.cmd(
        "RCPT TO:<alice@example.org>",
        "451 4.4.3 Cannot check your address against DNS blocklists now, try again later",
    )
    .await;
    c.cmd("RCPT TO:<postmaster@example.org>", "250 2.1.5 Recipient ok")
        .await;

    // DMARC that cannot be asked is a temporary failure, never an accept.
    let dmarc_only = server(&dns, AuthConfig::default(), |_| {}).await;
    let mut c = connect(&dmarc_only).await;
    let reply = send(
        &mut c,
        "client.example",
        "s@pass.test",
        &message("s@pass.test", "dead"),
    )
    .await;
    assert_eq!(
        reply,
        "451 4.4.3 DMARC check of pass.test failed for a DNS error, try again later\r\n"
    );
    assert!(mail(&dmarc_only, "").is_empty() && mail(&dmarc_only, ".Junk").is_empty());
    assert!(mail(&s, "").is_empty() && mail(&s, ".Junk").is_empty());

    // SPF under reject-fail: the MAIL reply waits and says try later.
    let mut c = connect(&strict).await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd(
        "MAIL FROM:<s@pass.test>",
        "451 4.7.24 SPF check of pass.test failed for a DNS error, try again later",
    )
    .await;

    // Where nothing is enforced, the failure is reported as one.
    let mut c = connect(&tagging).await;
    let reply = send(
        &mut c,
        "client.example",
        "s@pass.test",
        &message("s@pass.test", "tagged"),
    )
    .await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        auth_results(&stored(&tagging, "", "tagged")),
        "Authentication-Results: mx.example.org;\n\tspf=temperror smtp.mailfrom=s@pass.test\n"
    );
}

#[tokio::test]
async fn reverse_dns_goes_through_the_same_resolver() {
    let Some((dns, _)) = setup() else { return };
    let off = policy(SpfPolicy::Off, OFF, DmarcPolicy::Off, OFF);
    let s = server(&dns, off, |c| c.smtp.reverse_dns = true).await;
    let runtime = &s.running.as_ref().unwrap().runtime;
    // Not a loopback client: the resolver answers 127.0.0.0/8 itself
    // ("localhost", RFC 6761 §6.3) without asking any server.
    let name = runtime.start_rdns(CLIENT.into()).unwrap().await.unwrap();
    assert_eq!(
        name.as_deref(),
        Some("client.test"),
        "queries:\n{}",
        dns.log()
    );
}

/// A check that notes what `Facts::spf_pass` says at each stage.
struct SpfPassSeen(Arc<Mutex<Vec<String>>>);

struct SpfPassState(Arc<Mutex<Vec<String>>>);

impl letterbox::pipeline::Check for SpfPassSeen {
    fn name(&self) -> &str {
        "spf-pass-seen"
    }
    fn open(&self) -> Box<dyn letterbox::pipeline::CheckState> {
        Box::new(SpfPassState(self.0.clone()))
    }
}

impl letterbox::pipeline::CheckState for SpfPassState {
    fn check<'a>(
        &'a mut self,
        stage: letterbox::pipeline::Stage,
        facts: letterbox::pipeline::Facts<'a>,
    ) -> BoxFuture<'a, letterbox::pipeline::Verdict> {
        self.0
            .lock()
            .unwrap()
            .push(format!("{stage:?} {:?}", facts.spf_pass));
        Box::pin(async { letterbox::pipeline::Verdict::Continue })
    }
}

#[tokio::test]
async fn other_checks_see_whether_spf_passed_from_rcpt_on() {
    let Some((dns, _)) = setup() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    config.dns.servers = dns.servers();
    config.auth = policy(SpfPolicy::Tag, OFF, DmarcPolicy::Off, OFF);
    let directory =
        letterbox::directory::Directory::connect(&config.database.url, 2, Duration::ZERO)
            .await
            .unwrap();
    directory.migrate().await.unwrap();
    directory.domain_add("example.org").await.unwrap();
    directory
        .user_add("alice@example.org", Some('+'), None, 0)
        .await
        .unwrap();
    let maildirs = letterbox::delivery::Maildirs::new(&config.maildir, &config.hostname).unwrap();
    let sink = letterbox::sink::Sink::new(&config.sink, config.smtp.max_message_size.0);
    let runtime = Arc::new(
        letterbox::runtime::Runtime::new(Arc::new(config), directory, maildirs, sink)
            .await
            .unwrap(),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let checks = vec![
        letterbox::auth::Auth::check(&runtime).unwrap(),
        Arc::new(SpfPassSeen(seen.clone())) as Arc<dyn letterbox::pipeline::Check>,
    ];
    let pipeline = Arc::new(letterbox::pipeline::Pipeline::new(runtime, checks));
    let (client, server) = tokio::io::duplex(64 * 1024);
    let conn = letterbox::smtp::session::Connection::new(LOCALHOST.into());
    let session = letterbox::smtp::Session::new(
        server,
        pipeline,
        conn,
        tokio_util::sync::CancellationToken::new(),
    );
    tokio::spawn(session.run(true));
    let mut c = Client::new(client);
    c.greeting().await;
    for from in ["s@pass.test", "s@fail.test"] {
        let reply = send(&mut c, "client.example", from, &message(from, "seen")).await;
        assert!(reply.starts_with("250 "), "{reply}");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "Connect None",
            "Helo None",
            "Mail None",
            "Rcpt Some(\"pass.test\")",
            "Data Some(\"pass.test\")",
            "Helo None",
            "Mail None",
            "Rcpt None",
            "Data None",
        ]
    );
}

#[test]
fn check_says_whether_the_resolver_answers() {
    let Some((mut dns, _)) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let auth = format!(
        "spf = \"tag\"\n[dns]\nservers = [\"{}\"]\ntimeout = \"1s\"\n",
        dns.addr
    );
    let config = common::process::write_config(
        dir.path(),
        &format!("sqlite://{}", dir.path().join("letterbox.db").display()),
        &common::process::Sections {
            auth: &auth,
            ..Default::default()
        },
    );
    common::process::admin(&config, &["migrate"]);
    let check = || {
        let out = common::process::letterbox(&config)
            .arg("check")
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        (
            out.status.success(),
            stdout.lines().last().unwrap_or_default().to_string(),
        )
    };
    assert_eq!(check(), (true, format!("ok    dns: {} answers", dns.addr)));
    dns.stop();
    let (ok, line) = check();
    assert!(!ok);
    assert!(
        line.starts_with(&format!("FAIL  dns: {} does not answer: ", dns.addr)),
        "{line}"
    );
}
