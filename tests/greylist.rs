//! Greylisting (`[greylist]`) on every backend: the first RCPT of a triplet
//! deferred with the exact reply, a retry before the delay deferred again,
//! a retry after it accepted and delivered, later mail not greylisted,
//! allowlisted clients never greylisted, an unretried triplet expired and
//! purged, a directory error answered 451 (never 250), the SPF skip, and
//! racing sessions on one triplet.
//!
//! SQLite always runs; PostgreSQL and MariaDB when `LETTERBOX_TEST_POSTGRES`
//! and `LETTERBOX_TEST_MYSQL` are set (see tests/common/mod.rs).

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::db::{Backend, TestDb};
use common::server::{Client, TestServer};
use letterbox::config::{Config, GreylistConfig};
use letterbox::directory::{Directory, GreylistTimes, Greylisting, Triplet};
use letterbox::greylist::{Greylist, network};
use letterbox::net::Network;
use letterbox::pipeline::{Check, Facts, Stage, Verdict};
use letterbox::reply::Reply;
use letterbox::smtp::Session;
use letterbox::smtp::session::Connection;
use letterbox::units;
use sqlx::Connection as _;
use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;

/// Runs a scenario once per backend: `<name>::sqlite`, `::postgres`, `::mysql`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(Backend::Sqlite, super::$name).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run(Backend::Postgres, super::$name).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                run(Backend::MySql, super::$name).await;
            }
        }
    )*};
}

on_every_backend!(
    the_first_attempt_is_deferred_and_a_retry_after_the_delay_passes,
    the_default_allow_list_is_loopback,
    an_allow_list_of_its_own_replaces_the_default,
    an_unretried_triplet_expires_and_is_purged,
    a_directory_error_is_451_never_250,
    spf_pass_for_a_domain_that_passed_before_skips_greylisting,
    racing_attempts_on_one_triplet_never_fail,
    each_state_lasts_as_configured,
);

/// A fresh database on `backend` (its URL), or the scenario is left out.
async fn run<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::new(backend, dir.path()).await else {
        return;
    };
    scenario(db.url.clone()).await;
    drop(db);
}

const GREYLISTED: &str = "450 4.7.1 Greylisted, try again later";
const UNAVAILABLE: &str = "451 4.3.0 Temporary directory failure, try again later";
const BODY: &str = "Subject: grey\r\n\r\nhello\r\n";
const DELAY: Duration = Duration::from_secs(1);

/// A server on the database at `url` with greylisting on, a 1s delay and
/// loopback not exempt, after `tweak`.
async fn server(url: &str, tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start(|c| {
        c.database.url = url.to_string();
        c.greylist.enabled = true;
        c.greylist.delay = units::Duration::from_secs(DELAY.as_secs());
        c.greylist.allow = Vec::new();
        tweak(c);
    })
    .await
}

/// A session of `s`'s own pipeline, as from `ip`, over an in-memory stream.
fn session_from(s: &TestServer, ip: &str) -> Client<DuplexStream> {
    let pipeline = s.running.as_ref().unwrap().pipeline.clone();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let conn = Connection::new(ip.parse().unwrap());
    tokio::spawn(Session::new(server, pipeline, conn, CancellationToken::new()).run(true));
    Client::new(client)
}

async fn hello<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(c: &mut Client<S>) {
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-mx.example.org")
        .await;
}

async fn data<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(c: &mut Client<S>) {
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn the_first_attempt_is_deferred_and_a_retry_after_the_delay_passes(url: String) {
    let s = server(&url, |_| {}).await;
    let mut c = s.connect().await;
    hello(&mut c).await;
    c.cmd("MAIL FROM:<Sender@Remote.EXAMPLE>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", GREYLISTED).await;
    // Too soon: deferred again, and the delay still runs from the first.
    c.cmd("RCPT TO:<Alice@example.org>", GREYLISTED).await;
    c.cmd("RSET", "250 2.0.0 Ok").await;

    tokio::time::sleep(DELAY + Duration::from_millis(200)).await;
    // The same triplet, however the client spells it, from a new session.
    let mut c = s.connect().await;
    hello(&mut c).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    // Another recipient is another triplet.
    c.cmd("RCPT TO:<bob@example.org>", GREYLISTED).await;
    data(&mut c).await;
    assert_eq!(s.new_files("alice@example.org").len(), 1);
    assert!(s.new_files("bob@example.org").is_empty());

    // A later message of the triplet is not greylisted (pass_for).
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    data(&mut c).await;
    assert_eq!(s.new_files("alice@example.org").len(), 2);

    let entries = s.directory.greylist_entries().await.unwrap();
    let summary: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.network.as_str(),
                e.sender.as_str(),
                e.recipient.as_str(),
                e.passed,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "127.0.0.0/24",
                "sender@remote.example",
                "alice@example.org",
                true
            ),
            (
                "127.0.0.0/24",
                "sender@remote.example",
                "bob@example.org",
                false
            ),
        ]
    );
}

async fn the_default_allow_list_is_loopback(url: String) {
    // The default allow list is loopback.
    assert_eq!(GreylistConfig::default().allow, Network::loopback());
    let s = server(&url, |c| c.greylist.allow = Network::loopback()).await;
    let mut c = s.connect().await;
    hello(&mut c).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    data(&mut c).await;
    assert!(s.directory.greylist_entries().await.unwrap().is_empty());
}

async fn an_allow_list_of_its_own_replaces_the_default(url: String) {
    // Loopback is greylisted now; the listed network is not.
    let s = server(&url, |c| {
        c.greylist.allow = vec!["192.0.2.0/24".parse().unwrap()];
    })
    .await;
    let mut c = s.connect().await;
    hello(&mut c).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", GREYLISTED).await;
    let mut c = session_from(&s, "192.0.2.77");
    hello(&mut c).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    let mut c = session_from(&s, "198.51.100.77");
    hello(&mut c).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", GREYLISTED).await;
}

async fn an_unretried_triplet_expires_and_is_purged(url: String) {
    let s = server(&url, |c| c.greylist.expire = units::Duration::from_secs(2)).await;
    let mut c = s.connect().await;
    hello(&mut c).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", GREYLISTED).await;
    assert_eq!(s.directory.greylist_entries().await.unwrap().len(), 1);
    // The purge runs every `expire` (2s): the row goes within two rounds.
    let gone = async {
        while !s.directory.greylist_entries().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("the unretried triplet was purged");
    // Its retry, long after the delay, starts over.
    c.cmd("RCPT TO:<alice@example.org>", GREYLISTED).await;
    assert_eq!(s.directory.greylist_entries().await.unwrap().len(), 1);
}

/// Runs one statement on the database at `url`, beside the server.
async fn execute(url: &str, sql: &'static str) {
    match letterbox::directory::backend_of(url).unwrap() {
        letterbox::directory::Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
        letterbox::directory::Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
        letterbox::directory::Backend::MySql => {
            let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
    }
}

async fn a_directory_error_is_451_never_250(url: String) {
    // Recipients are remembered, so only greylisting meets the failure.
    let s = server(&url, |c| {
        c.database.cache_ttl = units::Duration::from_secs(3600)
    })
    .await;
    let mut c = s.connect().await;
    hello(&mut c).await;
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", GREYLISTED).await;
    tokio::time::sleep(DELAY + Duration::from_millis(200)).await;

    // The table is gone: a query error.
    execute(&url, "DROP TABLE greylist").await;
    c.cmd("RCPT TO:<alice@example.org>", UNAVAILABLE).await;
    c.cmd("RCPT TO:<bob@example.org>", UNAVAILABLE).await;
    // The directory is down: no connection at all.
    s.running.as_ref().unwrap().runtime.directory.close().await;
    c.cmd("RCPT TO:<alice@example.org>", UNAVAILABLE).await;
    c.cmd("DATA", "503 5.5.1 Need RCPT command").await;
    assert!(s.new_files("alice@example.org").is_empty());
}

/// A directory on `url`, migrated, with nothing in it.
async fn directory(url: &str) -> Directory {
    let d = Directory::connect(url, 4, Duration::ZERO).await.unwrap();
    d.migrate().await.unwrap();
    d
}

async fn spf_pass_for_a_domain_that_passed_before_skips_greylisting(url: String) {
    let s = server(&url, |_| {}).await;
    // sender@remote.example passed greylisting from 192.0.2.0/24 before.
    let times = GreylistTimes {
        delay: DELAY,
        expire: Duration::from_secs(3600),
        passed_for: Duration::from_secs(3600),
    };
    let net: Network = "192.0.2.0/24".parse().unwrap();
    let passed = Triplet::new(net, "sender@remote.example", "bob@example.org");
    let now = now_ms();
    let d = &s.directory;
    assert_eq!(
        d.greylist(&passed, now - 5000, &times).await.unwrap(),
        Greylisting::New
    );
    assert_eq!(
        d.greylist(&passed, now - 2000, &times).await.unwrap(),
        Greylisting::Passed
    );

    // Another client, another sender of that domain, another recipient.
    let config = GreylistConfig {
        enabled: true,
        allow: Vec::new(),
        ..GreylistConfig::default()
    };
    let check = Greylist::new(&config, s.directory.clone());
    let rcpt = s
        .running
        .as_ref()
        .unwrap()
        .pipeline
        .recipient("alice@example.org")
        .await
        .unwrap();
    let mut state = check.open();
    let mut verdict = async |spf_pass: Option<&str>| {
        let facts = Facts {
            ip: "198.51.100.9".parse().unwrap(),
            helo: Some("mail.remote.example"),
            tls: None,
            id: Some("x"),
            sender: Some("newsletter@remote.example"),
            recipients: &[],
            rcpt: Some(&rcpt),
            content: None,
            local: false,
            spf_pass,
            spf: None,
            auth: None,
        };
        state.check(Stage::Rcpt, facts).await
    };
    let deferred = Verdict::TempFail(Reply::greylisted());
    assert_eq!(verdict(Some("remote.example")).await, Verdict::Continue);
    assert_eq!(verdict(Some("REMOTE.example")).await, Verdict::Continue);
    assert_eq!(verdict(None).await, deferred);
    assert_eq!(verdict(Some("other.example")).await, deferred);
    // Nothing was recorded for the skipped attempts.
    let entries = d.greylist_entries().await.unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0].network, "192.0.2.0/24");
    assert_eq!(
        entries[1].network,
        network("198.51.100.9".parse().unwrap()).to_string()
    );
}

async fn racing_attempts_on_one_triplet_never_fail(url: String) {
    let d = directory(&url).await;
    let times = GreylistTimes {
        delay: DELAY,
        expire: Duration::from_secs(3600),
        passed_for: Duration::from_secs(3600),
    };
    let t = Arc::new(Triplet::new(
        "203.0.113.0/24".parse().unwrap(),
        "sender@remote.example",
        "alice@example.org",
    ));
    let now = now_ms();
    for (at, passes) in [(now, false), (now + 1000, true), (now + 1001, true)] {
        let racers: Vec<_> = (0..16)
            .map(|_| {
                let (d, t) = (d.clone(), t.clone());
                tokio::spawn(async move { d.greylist(&t, at, &times).await })
            })
            .collect();
        for r in racers {
            let g = r.await.unwrap().expect("no racer fails");
            assert_eq!(g.passes(), passes, "{g:?} at +{}", at - now);
        }
    }
    assert_eq!(d.greylist_entries().await.unwrap().len(), 1);
}

async fn each_state_lasts_as_configured(url: String) {
    let d = directory(&url).await;
    let times = GreylistTimes {
        delay: Duration::from_secs(300),
        expire: Duration::from_secs(2 * 86400),
        passed_for: Duration::from_secs(35 * 86400),
    };
    let s = 1000;
    let day = 86400 * s;
    let t0 = 1_700_000_000_000i64;
    let net: Network = "2001:db8:1:2::/64".parse().unwrap();
    let a = Triplet::new(net, "", "alice@example.org");
    let b = Triplet::new(net, "sender@remote.example", "bob@example.org");
    use Greylisting::*;
    let steps = [
        (&a, t0, New),
        (&a, t0 + 300 * s - 1, TooSoon),
        (&a, t0 + 300 * s, Passed),
        (&a, t0 + 300 * s + 1, Known),
        (&a, t0 + 30 * day, Known),
        // pass_for counts from the last pass.
        (&a, t0 + 64 * day, Known),
        (&a, t0 + 99 * day, New),
        (&b, t0, New),
        // Unretried for `expire`: forgotten, purged or not.
        (&b, t0 + 2 * day, New),
        (&b, t0 + 2 * day + 300 * s, Passed),
    ];
    for (i, (t, at, want)) in steps.into_iter().enumerate() {
        assert_eq!(d.greylist(t, at, &times).await.unwrap(), want, "step {i}");
    }
    // a was seen again at +99d and is unretried; b last passed at +2d 5m.
    assert!(
        d.greylist_domain_passed("remote.example", t0 + 3 * day, times.passed_for)
            .await
            .unwrap()
    );
    assert!(
        !d.greylist_domain_passed("remote.example", t0 + 38 * day, times.passed_for)
            .await
            .unwrap()
    );
    assert_eq!(d.greylist_purge(t0 + 3 * day, &times).await.unwrap(), 0);
    assert_eq!(d.greylist_purge(t0 + 38 * day, &times).await.unwrap(), 1);
    let left = d.greylist_entries().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].recipient.as_str(), left[0].passed),
        ("alice@example.org", false)
    );
    assert_eq!(d.greylist_purge(t0 + 101 * day, &times).await.unwrap(), 1);
    assert!(d.greylist_entries().await.unwrap().is_empty());
}
