//! The directory's behaviour, written once and run on every backend:
//! SQLite always, PostgreSQL and MySQL/MariaDB when `LETTERBOX_TEST_POSTGRES`
//! / `LETTERBOX_TEST_MYSQL` name a server (see tests/common/db.rs); under
//! CI a missing variable fails the suite instead of skipping it.
//!
//! Covers every admin operation (what it stores, what it refuses and that a
//! refusal changes nothing) and `Directory::resolve` routing: mailbox, alias,
//! recursive alias, alias loops, catch-all, subaddress, disabled user and
//! domain, sink rules, unknown user, foreign domain, pipe destinations and a
//! mailbox's own alias rows (a pipe or a forward beside its maildir), and
//! the `dovecot_passdb` view Dovecot logs in through.

mod common;

use std::time::Duration;

use common::db::{Backend, TestDb};
use letterbox::address::Address;
use letterbox::directory::{
    AliasRow, Directory, DirectoryError, DomainRow, Mailbox, Pipe, Route, SinkRuleRow, UserRow,
};

const PLUS: Option<char> = Some('+');

/// Regression: with no LETTERBOX_TEST_POSTGRES under CI, the PostgreSQL
/// suite passed green having run nothing. Under CI a missing backend
/// variable now panics, naming it; outside CI the suite is left out with
/// a note.
#[test]
fn a_backend_suite_does_not_skip_under_ci() {
    let panic_text = |backend: Backend, value: Option<&'static str>, ci: &'static str| {
        let err = std::panic::catch_unwind(|| backend.admin_url_from(value, Some(ci)))
            .expect_err("admin_url_from should have panicked");
        *err.downcast::<String>().unwrap()
    };
    assert_eq!(
        panic_text(Backend::Postgres, None, "true"),
        "CI is set, so the Postgres suite must run, not be skipped: \
         set LETTERBOX_TEST_POSTGRES to an admin URL (.ci/run does)"
    );
    assert_eq!(
        panic_text(Backend::MySql, Some(""), "1"),
        "CI is set, so the MySql suite must run, not be skipped: \
         set LETTERBOX_TEST_MYSQL to an admin URL (.ci/run does)"
    );
    let url = "postgres://postgres@127.0.0.1:5432/postgres";
    assert_eq!(
        Backend::Postgres.admin_url_from(Some(url), Some("true")),
        Some(url.to_string())
    );
    for ci in [None, Some(""), Some("false"), Some("FALSE"), Some("0")] {
        assert_eq!(Backend::Postgres.admin_url_from(None, ci), None, "{ci:?}");
        assert_eq!(Backend::MySql.admin_url_from(Some(""), ci), None, "{ci:?}");
    }
    assert!(common::db::is_ci(Some("true")) && common::db::is_ci(Some("yes")));
}

async fn run_on(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::new(backend, tmp.path()).await else {
        return;
    };
    let dir = Directory::connect(&db.url, 2, Duration::ZERO)
        .await
        .unwrap();
    dir.migrate().await.unwrap();
    dir.check_migrated().await.unwrap();
    // Migrating twice is a no-op, as `serve` and `migrate` both do it.
    dir.migrate().await.unwrap();
    assert_eq!(dir.backend(), expected_backend(backend));
    directory_suite(&dir).await;
    dir.close().await;
}

fn expected_backend(b: Backend) -> letterbox::directory::Backend {
    match b {
        Backend::Sqlite => letterbox::directory::Backend::Sqlite,
        Backend::Postgres => letterbox::directory::Backend::Postgres,
        Backend::MySql => letterbox::directory::Backend::MySql,
    }
}

#[tokio::test]
async fn directory_on_sqlite() {
    run_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn directory_on_postgres() {
    run_on(Backend::Postgres).await;
}

#[tokio::test]
async fn directory_on_mysql() {
    run_on(Backend::MySql).await;
}

/// The whole suite, on a migrated, empty directory.
async fn directory_suite(dir: &Directory) {
    domains(dir).await;
    users(dir).await;
    aliases(dir).await;
    sink_rules(dir).await;
    routing(dir).await;
    own_aliases_and_pipes(dir).await;
    dovecot_view(dir).await;
    removal(dir).await;
}

fn addr(s: &str) -> Address {
    Address::from_smtp(s).unwrap()
}

async fn route(dir: &Directory, rcpt: &str) -> Route {
    (*dir.resolve(&addr(rcpt), PLUS, &[]).await.unwrap()).clone()
}

fn mailbox(address: &str, tag: Option<&str>, original: Option<&str>) -> Mailbox {
    Mailbox {
        address: addr(address),
        quota: 0,
        tag: tag.map(str::to_string),
        original: original.map(str::to_string),
    }
}

fn domain_row(name: &str, active: bool, users: i64, aliases: i64) -> DomainRow {
    DomainRow {
        name: name.into(),
        active,
        users,
        aliases,
    }
}

fn user_row(address: &str, active: bool, quota: i64, receive_only: bool) -> UserRow {
    UserRow {
        address: address.into(),
        active,
        quota,
        receive_only,
    }
}

fn alias_row(source: &str, destinations: &[&str]) -> AliasRow {
    AliasRow {
        source: source.into(),
        destinations: destinations.iter().map(|d| d.to_string()).collect(),
        active: true,
    }
}

async fn domains(dir: &Directory) {
    assert_eq!(dir.domain_list().await.unwrap(), vec![]);
    assert_eq!(dir.domain_add("Example.ORG").await.unwrap(), "example.org");
    assert_eq!(
        dir.domain_add("bücher.example").await.unwrap(),
        "xn--bcher-kva.example"
    );
    assert_eq!(dir.domain_add("other.test").await.unwrap(), "other.test");

    let before = dir.domain_list().await.unwrap();
    assert!(matches!(
        dir.domain_add("EXAMPLE.org").await,
        Err(DirectoryError::Exists(_))
    ));
    assert!(matches!(
        dir.domain_add("a..b").await,
        Err(DirectoryError::Address(_))
    ));
    assert!(matches!(
        dir.domain_add("[127.0.0.1]").await,
        Err(DirectoryError::Address(_))
    ));
    assert!(matches!(
        dir.domain_set_active("nowhere.test", false).await,
        Err(DirectoryError::NotFound(_))
    ));
    assert!(matches!(
        dir.domain_remove("nowhere.test", false).await,
        Err(DirectoryError::NotFound(_))
    ));
    assert_eq!(dir.domain_list().await.unwrap(), before);

    assert_eq!(
        before,
        vec![
            domain_row("example.org", true, 0, 0),
            domain_row("other.test", true, 0, 0),
            domain_row("xn--bcher-kva.example", true, 0, 0),
        ]
    );
    assert_eq!(
        dir.domain_set_active("Other.Test", false).await.unwrap(),
        "other.test"
    );
    assert!(!dir.domain_list().await.unwrap()[1].active);
    assert_eq!(
        dir.domain_set_active("other.test", true).await.unwrap(),
        "other.test"
    );
    assert!(dir.domain_list().await.unwrap()[1].active);
}

async fn users(dir: &Directory) {
    let alice = dir
        .user_add("Alice@Example.ORG", PLUS, Some("{ARGON2ID}hash-a"), 0)
        .await
        .unwrap();
    assert_eq!(alice.to_string(), "alice@example.org");
    dir.user_add("bob@example.org", PLUS, None, 500 << 20)
        .await
        .unwrap();
    dir.user_add("Jörg@BÜCHER.example", PLUS, Some("{ARGON2ID}hash-j"), 0)
        .await
        .unwrap();
    dir.user_add("carol@other.test", PLUS, Some("{ARGON2ID}hash-c"), 0)
        .await
        .unwrap();

    let all = dir.user_list(None).await.unwrap();
    assert_eq!(
        all,
        vec![
            user_row("alice@example.org", true, 0, false),
            user_row("bob@example.org", true, 500 << 20, true),
            user_row("carol@other.test", true, 0, false),
            user_row("jörg@xn--bcher-kva.example", true, 0, false),
        ]
    );
    assert_eq!(
        dir.user_list(Some("OTHER.test")).await.unwrap(),
        vec![user_row("carol@other.test", true, 0, false)]
    );
    assert!(matches!(
        dir.user_list(Some("nowhere.test")).await,
        Err(DirectoryError::NotFound(_))
    ));

    // Every refusal leaves the table as it was.
    let refused: Vec<(&str, DirectoryError)> = vec![
        (
            "x@nowhere.test",
            dir.user_add("x@nowhere.test", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "ALICE@example.org",
            dir.user_add("ALICE@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "../x@example.org",
            dir.user_add("../x@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "a/b@example.org",
            dir.user_add("a/b@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            ".hidden@example.org",
            dir.user_add(".hidden@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "a\0b@example.org",
            dir.user_add("a\0b@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "a\nb@example.org",
            dir.user_add("a\nb@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "a+b@example.org",
            dir.user_add("a+b@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "65 octets",
            dir.user_add(&format!("{}@example.org", "a".repeat(65)), PLUS, None, 0)
                .await
                .unwrap_err(),
        ),
        (
            "quota",
            dir.user_add("big@example.org", PLUS, None, u64::MAX)
                .await
                .unwrap_err(),
        ),
    ];
    for (what, e) in &refused {
        let expected = match *what {
            "x@nowhere.test" => matches!(e, DirectoryError::NotFound(_)),
            "ALICE@example.org" => matches!(e, DirectoryError::Exists(_)),
            "quota" => matches!(e, DirectoryError::Conflict(_)),
            _ => matches!(e, DirectoryError::Address(_)),
        };
        assert!(expected, "{what}: {e:?}");
    }
    assert_eq!(dir.user_list(None).await.unwrap(), all);

    assert_eq!(
        dir.user_set_quota("bob@example.org", PLUS, 2 << 30)
            .await
            .unwrap()
            .to_string(),
        "bob@example.org"
    );
    assert_eq!(
        dir.user_set_password("bob@example.org", PLUS, "{ARGON2ID}hash-b")
            .await
            .unwrap()
            .to_string(),
        "bob@example.org"
    );
    assert_eq!(
        dir.user_list(Some("example.org")).await.unwrap()[1],
        user_row("bob@example.org", true, 2 << 30, false)
    );
    dir.user_set_active("bob@example.org", PLUS, false)
        .await
        .unwrap();
    assert!(!dir.user_list(Some("example.org")).await.unwrap()[1].active);
    dir.user_set_active("bob@example.org", PLUS, true)
        .await
        .unwrap();
    assert!(matches!(
        dir.user_set_active("nobody@example.org", PLUS, false).await,
        Err(DirectoryError::NotFound(_))
    ));
    assert!(matches!(
        dir.user_set_quota("nobody@example.org", PLUS, 0).await,
        Err(DirectoryError::NotFound(_))
    ));
    assert!(matches!(
        dir.user_set_password("nobody@example.org", PLUS, "x").await,
        Err(DirectoryError::NotFound(_))
    ));
    assert!(matches!(
        dir.user_remove("nobody@example.org", PLUS).await,
        Err(DirectoryError::NotFound(_))
    ));

    // Domain counts follow.
    assert_eq!(
        dir.domain_list().await.unwrap()[0],
        domain_row("example.org", true, 2, 0)
    );
}

async fn aliases(dir: &Directory) {
    let dests = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        dir.alias_add(
            "Postmaster@Example.org",
            &dests(&["ALICE@example.org", "bob@example.org", "alice@example.org"]),
            PLUS
        )
        .await
        .unwrap(),
        (
            "postmaster@example.org".to_string(),
            dests(&["alice@example.org", "bob@example.org"])
        )
    );
    // An alias of an alias, and one across domains.
    dir.alias_add(
        "abuse@example.org",
        &dests(&["postmaster@example.org"]),
        PLUS,
    )
    .await
    .unwrap();
    dir.alias_add(
        "team@other.test",
        &dests(&["carol@other.test", "alice@example.org"]),
        PLUS,
    )
    .await
    .unwrap();

    let all = dir.alias_list(None).await.unwrap();
    assert_eq!(
        all,
        vec![
            alias_row("abuse@example.org", &["postmaster@example.org"]),
            alias_row(
                "postmaster@example.org",
                &["alice@example.org", "bob@example.org"]
            ),
            alias_row(
                "team@other.test",
                &["alice@example.org", "carol@other.test"]
            ),
        ]
    );
    assert_eq!(
        dir.alias_list(Some("other.test")).await.unwrap(),
        all[2..].to_vec()
    );

    let refusals = [
        dir.alias_add("alice@example.org", &dests(&["bob@example.org"]), PLUS)
            .await
            .unwrap_err(),
        dir.alias_add("x@nowhere.test", &dests(&["bob@example.org"]), PLUS)
            .await
            .unwrap_err(),
        dir.alias_add("@nowhere.test", &dests(&["bob@example.org"]), PLUS)
            .await
            .unwrap_err(),
        // A destination elsewhere is forwarded, but only as an alias's one
        // destination.
        dir.alias_add(
            "x@example.org",
            &dests(&["stranger@elsewhere.test", "bob@example.org"]),
            PLUS,
        )
        .await
        .unwrap_err(),
        dir.alias_add(
            "x@example.org",
            &dests(&["bob@example.org", "ghost@example.org"]),
            PLUS,
        )
        .await
        .unwrap_err(),
        dir.alias_add("x@example.org", &dests(&["x@example.org"]), PLUS)
            .await
            .unwrap_err(),
        dir.alias_add("x@example.org", &[], PLUS).await.unwrap_err(),
        dir.alias_add("postmaster@example.org", &dests(&["bob@example.org"]), PLUS)
            .await
            .unwrap_err(),
        dir.alias_add("../x@example.org", &dests(&["bob@example.org"]), PLUS)
            .await
            .unwrap_err(),
        // A mailbox cannot be added over an alias either.
        dir.user_add("postmaster@example.org", PLUS, None, 0)
            .await
            .unwrap_err(),
    ];
    assert!(
        matches!(refusals[0], DirectoryError::Conflict(_)),
        "{:?}",
        refusals[0]
    );
    assert!(
        matches!(refusals[1], DirectoryError::NotFound(_)),
        "{:?}",
        refusals[1]
    );
    assert!(
        matches!(refusals[2], DirectoryError::NotFound(_)),
        "{:?}",
        refusals[2]
    );
    assert!(
        matches!(refusals[3], DirectoryError::Conflict(_)),
        "{:?}",
        refusals[3]
    );
    assert!(
        matches!(refusals[4], DirectoryError::NotFound(_)),
        "{:?}",
        refusals[4]
    );
    assert!(
        matches!(refusals[5], DirectoryError::Conflict(_)),
        "{:?}",
        refusals[5]
    );
    assert!(
        matches!(refusals[6], DirectoryError::Conflict(_)),
        "{:?}",
        refusals[6]
    );
    assert!(
        matches!(refusals[7], DirectoryError::Exists(_)),
        "{:?}",
        refusals[7]
    );
    assert!(
        matches!(refusals[8], DirectoryError::Address(_)),
        "{:?}",
        refusals[8]
    );
    assert!(
        matches!(refusals[9], DirectoryError::Conflict(_)),
        "{:?}",
        refusals[9]
    );
    assert_eq!(dir.alias_list(None).await.unwrap(), all);
    assert_eq!(dir.user_list(Some("example.org")).await.unwrap().len(), 2);

    // Adding to an existing alias extends it; removing one destination
    // keeps the rest.
    dir.alias_add("team@other.test", &dests(&["bob@example.org"]), PLUS)
        .await
        .unwrap();
    assert_eq!(
        dir.alias_remove("TEAM@other.test", Some("alice@example.org"), PLUS)
            .await
            .unwrap(),
        "team@other.test"
    );
    assert_eq!(
        dir.alias_list(Some("other.test")).await.unwrap(),
        vec![alias_row(
            "team@other.test",
            &["bob@example.org", "carol@other.test"]
        )]
    );
    assert!(matches!(
        dir.alias_remove("team@other.test", Some("alice@example.org"), PLUS)
            .await,
        Err(DirectoryError::NotFound(_))
    ));
    assert!(matches!(
        dir.alias_remove("nobody@other.test", None, PLUS).await,
        Err(DirectoryError::NotFound(_))
    ));
    assert_eq!(
        dir.alias_remove("team@other.test", None, PLUS)
            .await
            .unwrap(),
        "team@other.test"
    );
    assert_eq!(dir.alias_list(Some("other.test")).await.unwrap(), vec![]);
    assert_eq!(
        dir.domain_list().await.unwrap()[0],
        domain_row("example.org", true, 2, 2)
    );
}

async fn sink_rules(dir: &Directory) {
    assert_eq!(
        dir.sink_add("*.TMP.example.org", 3600).await.unwrap(),
        "*.tmp.example.org"
    );
    assert_eq!(dir.sink_add("exact.test", 60).await.unwrap(), "exact.test");
    let all = vec![
        SinkRuleRow {
            pattern: "*.tmp.example.org".into(),
            ttl_seconds: 3600,
            active: true,
        },
        SinkRuleRow {
            pattern: "exact.test".into(),
            ttl_seconds: 60,
            active: true,
        },
    ];
    assert_eq!(dir.sink_list().await.unwrap(), all);
    assert!(matches!(
        dir.sink_add("*.tmp.EXAMPLE.org", 10).await,
        Err(DirectoryError::Exists(_))
    ));
    assert!(matches!(
        dir.sink_add("a.*.org", 10).await,
        Err(DirectoryError::Address(_))
    ));
    assert!(matches!(
        dir.sink_add("*.", 10).await,
        Err(DirectoryError::Address(_))
    ));
    assert!(matches!(
        dir.sink_add("zero.test", 0).await,
        Err(DirectoryError::Conflict(_))
    ));
    assert!(matches!(
        dir.sink_remove("never.test").await,
        Err(DirectoryError::NotFound(_))
    ));
    assert_eq!(dir.sink_list().await.unwrap(), all);
}

async fn routing(dir: &Directory) {
    let alice = || mailbox("alice@example.org", None, None);

    // A mailbox, in any case; its quota comes along.
    assert_eq!(
        route(dir, "ALICE@Example.Org").await,
        Route::Mailboxes(vec![alice()])
    );
    let mut bob = mailbox("bob@example.org", None, None);
    bob.quota = 2 << 30;
    assert_eq!(
        route(dir, "bob@example.org").await,
        Route::Mailboxes(vec![bob.clone()])
    );
    assert_eq!(
        route(dir, "jörg@bücher.example").await,
        Route::Mailboxes(vec![mailbox("jörg@xn--bcher-kva.example", None, None)])
    );

    // +tag reaches the user and is kept for delivery.
    assert_eq!(
        route(dir, "alice+News@example.org").await,
        Route::Mailboxes(vec![mailbox("alice@example.org", Some("news"), None)])
    );
    // Without a delimiter, alice+news is just an unknown local part.
    assert_eq!(
        *dir.resolve(&addr("alice+news@example.org"), None, &[])
            .await
            .unwrap(),
        Route::UnknownUser
    );

    // An alias expands, recursively, each mailbox once, remembering the
    // recipient as given.
    let pm = Some("postmaster@example.org");
    let mut bob_pm = bob.clone();
    bob_pm.original = pm.map(str::to_string);
    assert_eq!(
        route(dir, "postmaster@example.org").await,
        Route::Mailboxes(vec![mailbox("alice@example.org", None, pm), bob_pm])
    );
    let ab = Some("abuse@example.org");
    let mut bob_ab = bob.clone();
    bob_ab.original = ab.map(str::to_string);
    assert_eq!(
        route(dir, "abuse@example.org").await,
        Route::Mailboxes(vec![mailbox("alice@example.org", None, ab), bob_ab])
    );

    // Unknown user in a served domain; a domain that is not ours.
    assert_eq!(route(dir, "nobody@example.org").await, Route::UnknownUser);
    assert_eq!(route(dir, "alice@elsewhere.test").await, Route::NotServed);

    // Alias loops stop: ring1 -> ring2 -> ring1 plus alice; and a ring with
    // no mailbox at all reaches nobody (and does not hang).
    let d = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    dir.alias_add("ring2@example.org", &d(&["alice@example.org"]), PLUS)
        .await
        .unwrap();
    dir.alias_add("ring1@example.org", &d(&["ring2@example.org"]), PLUS)
        .await
        .unwrap();
    dir.alias_add("ring2@example.org", &d(&["ring1@example.org"]), PLUS)
        .await
        .unwrap();
    assert_eq!(
        route(dir, "ring1@example.org").await,
        Route::Mailboxes(vec![mailbox(
            "alice@example.org",
            None,
            Some("ring1@example.org")
        )])
    );
    dir.alias_remove("ring2@example.org", Some("alice@example.org"), PLUS)
        .await
        .unwrap();
    assert_eq!(route(dir, "ring1@example.org").await, Route::UnknownUser);

    // The catch-all takes what nothing else does, but never shadows a
    // mailbox or an alias.
    dir.alias_add("@Example.org", &d(&["bob@example.org"]), PLUS)
        .await
        .unwrap();
    let mut bob_any = bob.clone();
    bob_any.original = Some("nobody@example.org".into());
    assert_eq!(
        route(dir, "nobody@example.org").await,
        Route::Mailboxes(vec![bob_any])
    );
    assert_eq!(
        route(dir, "alice@example.org").await,
        Route::Mailboxes(vec![alice()])
    );
    assert_eq!(route(dir, "ring1@example.org").await, {
        let mut b = bob.clone();
        b.original = Some("ring1@example.org".into());
        Route::Mailboxes(vec![b])
    });
    assert_eq!(
        route(dir, "carol@other.test").await,
        Route::Mailboxes(vec![mailbox("carol@other.test", None, None)])
    );
    assert_eq!(route(dir, "nobody@other.test").await, Route::UnknownUser);

    // A disabled user gets nothing directly (the catch-all still applies in
    // its domain); a disabled domain is not served at all.
    dir.user_set_active("carol@other.test", PLUS, false)
        .await
        .unwrap();
    assert_eq!(route(dir, "carol@other.test").await, Route::UnknownUser);
    dir.user_set_active("carol@other.test", PLUS, true)
        .await
        .unwrap();
    dir.domain_set_active("other.test", false).await.unwrap();
    assert_eq!(route(dir, "carol@other.test").await, Route::NotServed);
    dir.domain_set_active("other.test", true).await.unwrap();
    assert_eq!(
        route(dir, "carol@other.test").await,
        Route::Mailboxes(vec![mailbox("carol@other.test", None, None)])
    );
    dir.alias_remove("@example.org", None, PLUS).await.unwrap();

    // Sink rules: `*.d` covers names below d at any depth but not d itself;
    // an exact rule covers only its name.
    let sink = |pattern: &str, secs| Route::Sink {
        pattern: pattern.into(),
        ttl: Duration::from_secs(secs),
    };
    assert_eq!(
        route(dir, "x@a.tmp.example.org").await,
        sink("*.tmp.example.org", 3600)
    );
    assert_eq!(
        route(dir, "x@b.a.tmp.example.org").await,
        sink("*.tmp.example.org", 3600)
    );
    assert_eq!(route(dir, "x@tmp.example.org").await, Route::NotServed);
    assert_eq!(route(dir, "x@xtmp.example.org").await, Route::NotServed);
    assert_eq!(
        route(dir, "anyone@exact.test").await,
        sink("exact.test", 60)
    );
    assert_eq!(route(dir, "anyone@sub.exact.test").await, Route::NotServed);
    // Rules from the config file come after the database's.
    let static_rules = [("*.static.test".to_string(), Duration::from_secs(5))];
    assert_eq!(
        *dir.resolve(&addr("x@y.static.test"), PLUS, &static_rules)
            .await
            .unwrap(),
        sink("*.static.test", 5)
    );
    assert_eq!(
        *dir.resolve(&addr("x@y.static.test"), PLUS, &[])
            .await
            .unwrap(),
        Route::NotServed
    );
}

fn pipe(command: &str, owner: &str, extension: Option<&str>, original: Option<&str>) -> Pipe {
    Pipe {
        command: command.split(' ').map(str::to_string).collect(),
        owner: addr(owner),
        extension: extension.map(str::to_string),
        original: original.map(str::to_string),
    }
}

/// Pipe destinations, and a mailbox whose own alias rows say where its mail
/// goes (its own address among them is its maildir). Leaves the directory
/// as it found it.
async fn own_aliases_and_pipes(dir: &Directory) {
    let d = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let before = dir.alias_list(None).await.unwrap();
    let procmail = "|/usr/bin/procmail -m /etc/letterbox/alice.rc";
    let alice = || mailbox("alice@example.org", None, None);

    // The example: alice keeps her maildir and gets procmail too.
    // The command is stored with single spaces.
    assert_eq!(
        dir.alias_add(
            "Alice@example.org",
            &d(&[
                "alice@example.org",
                "|/usr/bin/procmail  -m /etc/letterbox/alice.rc"
            ]),
            PLUS
        )
        .await
        .unwrap(),
        (
            "alice@example.org".to_string(),
            d(&["alice@example.org", procmail])
        )
    );
    let alice_pipe = pipe(&procmail[1..], "alice@example.org", None, None);
    assert_eq!(
        route(dir, "alice@example.org").await,
        Route::WithPipes {
            mailboxes: vec![alice()],
            pipes: vec![alice_pipe.clone()],
        }
    );
    // Her tag reaches both: her folder and the pipe's EXTENSION.
    assert_eq!(
        route(dir, "alice+News@example.org").await,
        Route::WithPipes {
            mailboxes: vec![mailbox("alice@example.org", Some("news"), None)],
            pipes: vec![pipe(
                &procmail[1..],
                "alice@example.org",
                Some("news"),
                None
            )],
        }
    );
    // A disabled mailbox gets nothing, and neither do its pipes.
    dir.user_set_active("alice@example.org", PLUS, false)
        .await
        .unwrap();
    assert_eq!(route(dir, "alice@example.org").await, Route::UnknownUser);
    dir.user_set_active("alice@example.org", PLUS, true)
        .await
        .unwrap();

    // Through an alias: the pipe remembers who was written to.
    let pm = Some("postmaster@example.org");
    let mut bob = mailbox("bob@example.org", None, pm);
    bob.quota = 2 << 30;
    assert_eq!(
        route(dir, "postmaster@example.org").await,
        Route::WithPipes {
            mailboxes: vec![mailbox("alice@example.org", None, pm), bob.clone()],
            pipes: vec![pipe(&procmail[1..], "alice@example.org", None, pm)],
        }
    );

    // An alias that is only a pipe; the recipient's tag is its extension.
    dir.alias_add(
        "issues@example.org",
        &d(&["|/usr/local/bin/tracker --project web"]),
        PLUS,
    )
    .await
    .unwrap();
    assert_eq!(
        route(dir, "issues+Web@example.org").await,
        Route::WithPipes {
            mailboxes: vec![],
            pipes: vec![pipe(
                "/usr/local/bin/tracker --project web",
                "issues@example.org",
                Some("web"),
                None
            )],
        }
    );

    // Once alice's alias keeps her, more destinations may join it: a
    // forward to bob. Mailboxes forwarding to each other stop, each once.
    dir.alias_add("alice@example.org", &d(&["bob@example.org"]), PLUS)
        .await
        .unwrap();
    dir.alias_add(
        "bob@example.org",
        &d(&["bob@example.org", "alice@example.org"]),
        PLUS,
    )
    .await
    .unwrap();
    let mut bob_from_alice = bob.clone();
    bob_from_alice.original = Some("alice@example.org".into());
    assert_eq!(
        route(dir, "alice@example.org").await,
        Route::WithPipes {
            mailboxes: vec![alice(), bob_from_alice],
            pipes: vec![alice_pipe.clone()],
        }
    );

    // What stays refused, and changes nothing.
    let listed = dir.alias_list(None).await.unwrap();
    let refusals = [
        // A mailbox's alias without the mailbox shadows it.
        (
            dir.alias_add("carol@other.test", &d(&["|/usr/bin/procmail"]), PLUS)
                .await
                .unwrap_err(),
            "carol@other.test is a mailbox; an alias cannot shadow it",
        ),
        // Its own address goes only with the whole alias.
        (
            dir.alias_remove("alice@example.org", Some("alice@example.org"), PLUS)
                .await
                .unwrap_err(),
            "alice@example.org is a mailbox; without its own address its alias would shadow it: remove the whole alias (`letterbox alias remove alice@example.org`) or its other destinations",
        ),
        (
            dir.alias_add("x@example.org", &d(&["|procmail"]), PLUS)
                .await
                .unwrap_err(),
            "pipe command \"procmail\" must be an absolute path (no PATH is searched)",
        ),
        (
            dir.alias_add(
                "x@example.org",
                &d(&["|/usr/bin/procmail > /dev/null"]),
                PLUS,
            )
            .await
            .unwrap_err(),
            "pipe destination \"|/usr/bin/procmail > /dev/null\" contains '>': no shell runs it, so quoting, variables, redirection and pipelines do not work; put them in a script",
        ),
        // No mailbox or alias may look like a pipe.
        (
            dir.user_add("|x@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
            "local part \"|x\" may not start with \"|\", which marks a pipe command",
        ),
        (
            dir.alias_add("|x@example.org", &d(&["alice@example.org"]), PLUS)
                .await
                .unwrap_err(),
            "local part \"|x\" may not start with \"|\", which marks a pipe command",
        ),
        // A mailbox with alias rows is still a mailbox.
        (
            dir.user_add("alice@example.org", PLUS, None, 0)
                .await
                .unwrap_err(),
            "user alice@example.org exists already",
        ),
    ];
    for (e, text) in &refusals {
        assert_eq!(e.to_string(), *text);
    }
    assert_eq!(dir.alias_list(None).await.unwrap(), listed);

    // A pipe row is removed by its command as written.
    dir.alias_remove(
        "issues@example.org",
        Some("|/usr/local/bin/tracker  --project web"),
        PLUS,
    )
    .await
    .unwrap();
    for a in ["alice@example.org", "bob@example.org"] {
        dir.alias_remove(a, None, PLUS).await.unwrap();
    }
    assert_eq!(
        route(dir, "alice@example.org").await,
        Route::Mailboxes(vec![alice()])
    );

    // Removing a mailbox removes its own alias too: left behind, its pipe
    // would go on receiving the mail of a mailbox that is gone.
    dir.user_add("piped@example.org", PLUS, None, 0)
        .await
        .unwrap();
    dir.alias_add(
        "piped@example.org",
        &d(&["piped@example.org", "|/bin/cat"]),
        PLUS,
    )
    .await
    .unwrap();
    let (gone, pointing, own) = dir.user_remove("piped@example.org", PLUS).await.unwrap();
    assert_eq!(
        (gone.to_string(), pointing, own),
        ("piped@example.org".into(), 0, 2)
    );
    assert_eq!(route(dir, "piped@example.org").await, Route::UnknownUser);

    // A pipe command that names an address points at no mailbox: removing
    // that address's domain leaves it alone.
    dir.domain_add("gone.test").await.unwrap();
    dir.alias_add("fwd@other.test", &d(&["|/usr/bin/fwd a@gone.test"]), PLUS)
        .await
        .unwrap();
    dir.domain_remove("gone.test", true).await.unwrap();
    assert_eq!(
        dir.alias_list(Some("other.test"))
            .await
            .unwrap()
            .iter()
            .find(|a| a.source == "fwd@other.test"),
        Some(&alias_row("fwd@other.test", &["|/usr/bin/fwd a@gone.test"]))
    );
    dir.alias_remove("fwd@other.test", None, PLUS)
        .await
        .unwrap();
    assert_eq!(dir.alias_list(None).await.unwrap(), before);
}

async fn dovecot_view(dir: &Directory) {
    // user_password reads the dovecot_passdb view Dovecot is pointed at.
    let pw = |a: &'static str| async move { dir.user_password(&addr(a)).await.unwrap() };
    assert_eq!(
        pw("alice@example.org").await.as_deref(),
        Some("{ARGON2ID}hash-a")
    );
    assert_eq!(
        pw("jörg@xn--bcher-kva.example").await.as_deref(),
        Some("{ARGON2ID}hash-j")
    );
    assert_eq!(
        pw("carol@other.test").await.as_deref(),
        Some("{ARGON2ID}hash-c")
    );
    assert_eq!(pw("nobody@example.org").await, None);

    // Receive-only users have no row.
    dir.user_add("drop@example.org", PLUS, None, 0)
        .await
        .unwrap();
    assert_eq!(pw("drop@example.org").await, None);
    // Disabled users and users of disabled domains have none either.
    dir.user_set_active("alice@example.org", PLUS, false)
        .await
        .unwrap();
    assert_eq!(pw("alice@example.org").await, None);
    dir.user_set_active("alice@example.org", PLUS, true)
        .await
        .unwrap();
    dir.domain_set_active("other.test", false).await.unwrap();
    assert_eq!(pw("carol@other.test").await, None);
    dir.domain_set_active("other.test", true).await.unwrap();
    assert_eq!(
        pw("carol@other.test").await.as_deref(),
        Some("{ARGON2ID}hash-c")
    );
    dir.user_remove("drop@example.org", PLUS).await.unwrap();
}

async fn removal(dir: &Directory) {
    let before = dir.alias_list(None).await.unwrap();
    assert!(
        before
            .iter()
            .any(|a| a.destinations.contains(&"bob@example.org".to_string()))
    );

    // Removing a mailbox removes the alias destinations that pointed to it,
    // and an alias left without destinations goes with them.
    let (bob, dropped, _) = dir.user_remove("BOB@example.org", PLUS).await.unwrap();
    assert_eq!(
        (bob.to_string(), dropped),
        ("bob@example.org".to_string(), 1)
    );
    assert_eq!(
        dir.alias_list(Some("example.org")).await.unwrap(),
        vec![
            alias_row("abuse@example.org", &["postmaster@example.org"]),
            alias_row("postmaster@example.org", &["alice@example.org"]),
            alias_row("ring1@example.org", &["ring2@example.org"]),
            alias_row("ring2@example.org", &["ring1@example.org"]),
        ]
    );
    assert_eq!(route(dir, "bob@example.org").await, Route::UnknownUser);

    // A domain with users or aliases is only removed with force, and with
    // it go alias destinations elsewhere that pointed into it.
    let d = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    dir.alias_add("team@other.test", &d(&["alice@example.org"]), PLUS)
        .await
        .unwrap();
    dir.alias_add(
        "staff@other.test",
        &d(&["alice@example.org", "carol@other.test"]),
        PLUS,
    )
    .await
    .unwrap();
    let before = dir.domain_list().await.unwrap();
    assert!(matches!(
        dir.domain_remove("example.org", false).await,
        Err(DirectoryError::Conflict(_))
    ));
    assert_eq!(dir.domain_list().await.unwrap(), before);
    assert_eq!(
        dir.domain_remove("example.org", true).await.unwrap(),
        domain_row("example.org", true, 1, 4)
    );
    assert_eq!(
        dir.user_list(None)
            .await
            .unwrap()
            .iter()
            .filter(|u| u.address.ends_with("@example.org"))
            .count(),
        0
    );
    assert_eq!(route(dir, "alice@example.org").await, Route::NotServed);
    // Regression: `domain remove --force` left team@other.test pointing at
    // alice@example.org, so a later alice@example.org would get its mail.
    assert_eq!(
        dir.alias_list(Some("other.test")).await.unwrap(),
        vec![alias_row("staff@other.test", &["carol@other.test"])]
    );
    // Adding it again starts empty.
    dir.domain_add("example.org").await.unwrap();
    assert_eq!(dir.user_list(Some("example.org")).await.unwrap(), vec![]);
    assert_eq!(dir.alias_list(Some("example.org")).await.unwrap(), vec![]);

    // An empty domain goes without force.
    dir.domain_add("empty.test").await.unwrap();
    assert_eq!(
        dir.domain_remove("empty.test", false).await.unwrap(),
        domain_row("empty.test", true, 0, 0)
    );

    assert_eq!(
        dir.sink_remove("*.TMP.example.org").await.unwrap(),
        "*.tmp.example.org"
    );
    assert_eq!(route(dir, "x@a.tmp.example.org").await, Route::NotServed);
}
