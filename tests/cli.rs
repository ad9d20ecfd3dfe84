//! The admin command line, run as the real binary against a throwaway
//! SQLite database in a temporary working directory: exact output of every
//! command, `--json` shapes, one-line errors that change nothing, config
//! loading and its errors, `check`, and passwords Dovecot verifies.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

use assert_cmd::Command;
use serde_json::{Value, json};

/// A temporary working directory with its own database. Every command runs
/// there with no `LETTERBOX_…` variable from the outside (the suites'
/// `LETTERBOX_TEST_…` included), so only what a test sets counts.
/// Turns off everything that would ask the system's resolver.
const NO_DNS: [(&str, &str); 5] = [
    ("LETTERBOX_SMTP__REVERSE_DNS", "false"),
    ("LETTERBOX_AUTH__SPF", "off"),
    ("LETTERBOX_AUTH__DKIM", "off"),
    ("LETTERBOX_AUTH__DMARC", "off"),
    ("LETTERBOX_AUTH__ARC", "off"),
];

/// What `check` says about DNS when nothing uses it.
const DNS_UNUSED: &str = "ok    dns: not used (smtp.reverse_dns, [auth] and [[dnsbl]] are off)";

struct Sandbox {
    dir: tempfile::TempDir,
    /// Set as `LETTERBOX_DATABASE__URL` unless None.
    db_url: Option<String>,
    env: Vec<(String, String)>,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let db_url = Some(format!("sqlite://{}", dir.path().join("test.db").display()));
        Sandbox {
            dir,
            db_url,
            env: Vec::new(),
        }
    }

    /// No database variable: the defaults or a config file decide.
    fn bare() -> Sandbox {
        Sandbox {
            db_url: None,
            ..Sandbox::new()
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn set(mut self, key: &str, value: &str) -> Sandbox {
        self.env.push((key.into(), value.into()));
        self
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::cargo_bin("letterbox").unwrap();
        for (k, _) in std::env::vars() {
            if k.starts_with("LETTERBOX_") {
                c.env_remove(k);
            }
        }
        if let Some(url) = &self.db_url {
            c.env("LETTERBOX_DATABASE__URL", url);
        }
        // Nothing that asks DNS, so `check` has no resolver to probe.
        for (k, v) in NO_DNS {
            c.env(k, v);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.current_dir(self.path()).args(args).write_stdin("");
        c
    }

    /// Runs a command that must succeed silently on stderr; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with_stdin(args, "")
    }

    fn ok_with_stdin(&self, args: &[&str], stdin: &str) -> String {
        let out = self.cmd(args).write_stdin(stdin).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert!(out.status.success(), "{args:?} failed: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
        stdout
    }

    /// Runs a command that must fail with exactly one line on stderr and
    /// nothing on stdout; that line.
    fn fail(&self, args: &[&str]) -> String {
        self.fail_with_stdin(args, "")
    }

    fn fail_with_stdin(&self, args: &[&str], stdin: &str) -> String {
        let out = self.cmd(args).write_stdin(stdin).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert!(!out.status.success(), "{args:?} succeeded: {stdout}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?} wrote more than one line: {stderr}"
        );
        assert!(
            stderr.starts_with("letterbox: ") && stderr.ends_with('\n'),
            "{args:?}: {stderr}"
        );
        stderr.trim_end().to_string()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// Everything the directory holds, as the list commands show it.
    fn snapshot(&self) -> Value {
        json!({
            "domains": self.json(&["domain", "list"]),
            "users": self.json(&["user", "list"]),
            "aliases": self.json(&["alias", "list"]),
            "sinks": self.json(&["sink", "list"]),
        })
    }

    fn db_file(&self) -> PathBuf {
        self.path().join("test.db")
    }
}

/// A directory with example.org, alice (login) and bob (receive-only).
fn populated() -> Sandbox {
    let s = Sandbox::new();
    s.ok(&["domain", "add", "example.org"]);
    s.ok_with_stdin(
        &["user", "add", "alice@example.org", "--password-stdin"],
        "alice pw\n",
    );
    s.ok(&["user", "add", "bob@example.org"]);
    s
}

#[test]
fn domain_commands() {
    let s = Sandbox::new();
    assert_eq!(s.ok(&["domain", "list"]), "");
    assert_eq!(s.json(&["domain", "list"]), json!([]));
    assert_eq!(
        s.ok(&["domain", "add", "Example.ORG"]),
        "added domain example.org\n"
    );
    assert_eq!(
        s.ok(&["domain", "add", "Bücher.example"]),
        "added domain xn--bcher-kva.example\n"
    );
    s.ok(&["user", "add", "alice@example.org"]);
    assert_eq!(
        s.ok(&["domain", "disable", "example.org"]),
        "disabled domain example.org\n"
    );
    assert_eq!(
        s.ok(&["domain", "list"]),
        "example.org\tdisabled\t1 users\t0 aliases\nxn--bcher-kva.example\tactive\t0 users\t0 aliases\n"
    );
    assert_eq!(
        s.json(&["domain", "list"]),
        json!([
            {"name": "example.org", "active": false, "users": 1, "aliases": 0},
            {"name": "xn--bcher-kva.example", "active": true, "users": 0, "aliases": 0},
        ])
    );
    assert_eq!(
        s.ok(&["domain", "enable", "EXAMPLE.org"]),
        "enabled domain example.org\n"
    );
    assert_eq!(
        s.ok(&["domain", "remove", "bücher.example"]),
        "removed domain xn--bcher-kva.example (0 users, 0 aliases); mail on disk was kept\n"
    );
    assert_eq!(
        s.fail(&["domain", "remove", "example.org"]),
        "letterbox: domain example.org still has 1 user(s) and 0 alias(es); remove them first or pass --force"
    );
    assert_eq!(
        s.ok(&["domain", "remove", "example.org", "--force"]),
        "removed domain example.org (1 users, 0 aliases); mail on disk was kept\n"
    );
    assert_eq!(s.json(&["user", "list"]), json!([]));
}

#[test]
fn user_commands() {
    let s = Sandbox::new();
    s.ok(&["domain", "add", "example.org"]);
    s.ok(&["domain", "add", "other.test"]);
    assert_eq!(
        s.ok(&["user", "add", "Bob@Example.org"]),
        "added user bob@example.org (receive-only: no password)\n"
    );
    assert_eq!(
        s.ok_with_stdin(
            &[
                "user",
                "add",
                "alice@example.org",
                "--password-stdin",
                "--quota",
                "500M"
            ],
            "pw\n"
        ),
        "added user alice@example.org\n"
    );
    assert_eq!(
        s.ok(&["user", "add", "carol@other.test", "--quota", "2G"]),
        "added user carol@other.test (receive-only: no password)\n"
    );
    assert_eq!(
        s.ok(&["user", "list"]),
        "alice@example.org\tactive\tlogin\tquota 500M\n\
         bob@example.org\tactive\treceive-only\tquota unlimited\n\
         carol@other.test\tactive\treceive-only\tquota 2G\n"
    );
    assert_eq!(
        s.ok(&["user", "list", "other.test"]),
        "carol@other.test\tactive\treceive-only\tquota 2G\n"
    );
    assert_eq!(
        s.json(&["user", "list", "example.org"]),
        json!([
            {"address": "alice@example.org", "active": true, "quota": 500 << 20, "receive_only": false},
            {"address": "bob@example.org", "active": true, "quota": 0, "receive_only": true},
        ])
    );
    assert_eq!(
        s.ok(&["user", "quota", "bob@example.org", "1G"]),
        "quota of bob@example.org set to 1G\n"
    );
    assert_eq!(
        s.ok(&["user", "quota", "alice@example.org", "0"]),
        "quota of alice@example.org set to unlimited\n"
    );
    assert_eq!(
        s.ok_with_stdin(
            &["user", "passwd", "bob@example.org", "--password-stdin"],
            "new\r\n"
        ),
        "password of bob@example.org changed\n"
    );
    assert_eq!(
        s.ok(&["user", "disable", "carol@other.test"]),
        "disabled user carol@other.test\n"
    );
    assert_eq!(
        s.ok(&["user", "list"]),
        "alice@example.org\tactive\tlogin\tquota unlimited\n\
         bob@example.org\tactive\tlogin\tquota 1G\n\
         carol@other.test\tdisabled\treceive-only\tquota 2G\n"
    );
    assert_eq!(
        s.ok(&["user", "enable", "carol@other.test"]),
        "enabled user carol@other.test\n"
    );
    assert_eq!(
        s.json(&["user", "list", "other.test"])[0]["active"],
        json!(true)
    );

    // Removing a mailbox keeps its mail and says where.
    std::fs::create_dir_all(s.path().join("mail/example.org/bob/new")).unwrap();
    std::fs::write(
        s.path().join("mail/example.org/bob/new/1.eml"),
        "Subject: kept\r\n\r\n",
    )
    .unwrap();
    s.ok(&[
        "alias",
        "add",
        "team@example.org",
        "bob@example.org",
        "alice@example.org",
    ]);
    assert_eq!(
        s.ok(&["user", "remove", "bob@example.org"]),
        "removed user bob@example.org; its mail stays in mail/example.org/bob\n\
         removed 1 alias destination(s) that pointed to it\n"
    );
    assert!(s.path().join("mail/example.org/bob/new/1.eml").exists());
    assert_eq!(
        s.ok(&["user", "remove", "carol@other.test"]),
        "removed user carol@other.test; its mail stays in mail/other.test/carol\n"
    );
    assert_eq!(
        s.ok(&["user", "list"]),
        "alice@example.org\tactive\tlogin\tquota unlimited\n"
    );
}

#[test]
fn alias_commands() {
    let s = populated();
    s.ok(&["domain", "add", "other.test"]);
    assert_eq!(
        s.ok(&[
            "alias",
            "add",
            "Postmaster@example.org",
            "alice@example.org",
            "BOB@example.org"
        ]),
        "added alias postmaster@example.org -> alice@example.org, bob@example.org\n"
    );
    assert_eq!(
        s.ok(&["alias", "add", "@example.org", "postmaster@example.org"]),
        "added alias @example.org -> postmaster@example.org\n"
    );
    assert_eq!(
        s.ok(&["alias", "add", "info@other.test", "alice@example.org"]),
        "added alias info@other.test -> alice@example.org\n"
    );
    assert_eq!(
        s.ok(&["alias", "list"]),
        "@example.org\tactive\tpostmaster@example.org\n\
         info@other.test\tactive\talice@example.org\n\
         postmaster@example.org\tactive\talice@example.org,bob@example.org\n"
    );
    assert_eq!(
        s.ok(&["alias", "list", "other.test"]),
        "info@other.test\tactive\talice@example.org\n"
    );
    assert_eq!(
        s.json(&["alias", "list", "example.org"]),
        json!([
            {"source": "@example.org", "destinations": ["postmaster@example.org"], "active": true},
            {"source": "postmaster@example.org", "destinations": ["alice@example.org", "bob@example.org"], "active": true},
        ])
    );
    assert_eq!(
        s.ok(&[
            "alias",
            "remove",
            "postmaster@example.org",
            "bob@example.org"
        ]),
        "removed destination bob@example.org from alias postmaster@example.org\n"
    );
    assert_eq!(
        s.ok(&["alias", "remove", "@Example.org"]),
        "removed alias @example.org\n"
    );
    assert_eq!(
        s.ok(&["alias", "remove", "info@other.test"]),
        "removed alias info@other.test\n"
    );
    assert_eq!(
        s.json(&["alias", "list"]),
        json!([{"source": "postmaster@example.org", "destinations": ["alice@example.org"], "active": true}])
    );
}

/// The issue's examples: an alias that is a pipe command, and a mailbox
/// whose own alias keeps its maildir and adds procmail.
#[test]
fn pipe_destinations_and_a_mailbox_beside_its_pipe() {
    let s = populated();
    assert_eq!(
        s.ok(&[
            "alias",
            "add",
            "issues@example.org",
            "|/usr/local/bin/tracker --project web"
        ]),
        "added alias issues@example.org -> |/usr/local/bin/tracker --project web\n"
    );
    assert_eq!(
        s.ok(&[
            "alias",
            "add",
            "alice@example.org",
            "alice@example.org",
            "|/usr/bin/procmail -m /etc/letterbox/alice.rc"
        ]),
        "added alias alice@example.org -> alice@example.org, |/usr/bin/procmail -m /etc/letterbox/alice.rc\n"
    );
    assert_eq!(
        s.ok(&["alias", "list"]),
        "alice@example.org\tactive\t\
         alice@example.org,|/usr/bin/procmail -m /etc/letterbox/alice.rc\n\
         issues@example.org\tactive\t|/usr/local/bin/tracker --project web\n"
    );
    let before = s.snapshot();
    for (args, message) in [
        (
            vec!["alias", "add", "bob@example.org", "|/usr/bin/procmail"],
            "bob@example.org is a mailbox; an alias cannot shadow it",
        ),
        (
            vec!["alias", "add", "x@example.org", "|procmail -m rc"],
            "pipe command \"procmail\" must be an absolute path (no PATH is searched)",
        ),
        (
            vec![
                "alias",
                "add",
                "x@example.org",
                "|/usr/bin/tracker \"two words\"",
            ],
            "pipe destination \"|/usr/bin/tracker \\\"two words\\\"\" contains '\"': no shell runs it, so quoting, variables, redirection and pipelines do not work; put them in a script",
        ),
        (
            vec!["alias", "remove", "alice@example.org", "alice@example.org"],
            "alice@example.org is a mailbox; without its own address its alias would shadow it: remove the whole alias (`letterbox alias remove alice@example.org`) or its other destinations",
        ),
        (
            vec!["user", "add", "|x@example.org"],
            "local part \"|x\" may not start with \"|\", which marks a pipe command",
        ),
    ] {
        assert_eq!(s.fail(&args), format!("letterbox: {message}"), "{args:?}");
    }
    assert_eq!(s.snapshot(), before);
    assert_eq!(
        s.ok(&[
            "alias",
            "remove",
            "alice@example.org",
            "|/usr/bin/procmail -m /etc/letterbox/alice.rc"
        ]),
        "removed destination |/usr/bin/procmail -m /etc/letterbox/alice.rc from alias alice@example.org\n"
    );
    s.ok(&[
        "alias",
        "add",
        "alice@example.org",
        "|/usr/bin/procmail -m /etc/letterbox/alice.rc",
    ]);
    // Removing the mailbox takes its own alias with it.
    assert_eq!(
        s.ok(&["user", "remove", "alice@example.org"]),
        "removed user alice@example.org; its mail stays in mail/example.org/alice\n\
         removed its own alias (2 destination(s))\n"
    );
    assert_eq!(
        s.ok(&["alias", "list"]),
        "issues@example.org\tactive\t|/usr/local/bin/tracker --project web\n"
    );
}

#[test]
fn sink_commands() {
    let s = Sandbox::new();
    assert_eq!(
        s.ok(&["sink", "add", "*.TMP.example.org"]),
        "added sink rule *.tmp.example.org (ttl 1h)\n"
    );
    assert_eq!(
        s.ok(&["sink", "add", "ci.example.net", "--ttl", "10m"]),
        "added sink rule ci.example.net (ttl 10m)\n"
    );
    assert_eq!(
        s.ok(&["sink", "list"]),
        "*.tmp.example.org\tactive\tttl 1h\nci.example.net\tactive\tttl 10m\n"
    );
    assert_eq!(
        s.json(&["sink", "list"]),
        json!([
            {"pattern": "*.tmp.example.org", "ttl_seconds": 3600, "active": true},
            {"pattern": "ci.example.net", "ttl_seconds": 600, "active": true},
        ])
    );
    assert_eq!(
        s.ok(&["sink", "remove", "*.tmp.example.org"]),
        "removed sink rule *.tmp.example.org\n"
    );
    // The default TTL comes from the config.
    let s2 = Sandbox::new().set("LETTERBOX_SINK__DEFAULT_TTL", "2d");
    assert_eq!(
        s2.ok(&["sink", "add", "x.test"]),
        "added sink rule x.test (ttl 2d)\n"
    );
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let s = populated();
    s.ok(&["alias", "add", "team@example.org", "alice@example.org"]);
    s.ok(&["sink", "add", "*.tmp.example.org"]);
    let before = s.snapshot();
    let long_domain = format!("{}.org", "d".repeat(59) + &".e".repeat(95));
    let over_254 = format!("{}@{long_domain}", "a".repeat(60));
    let over_64 = format!("{}@example.org", "a".repeat(65));
    let over_64_error = format!("local part \"{}\" is longer than 64 octets", "a".repeat(65));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["user", "add", "x@nowhere.test"],
            "domain nowhere.test is not served; add it first with `letterbox domain add nowhere.test`",
        ),
        (
            vec!["user", "add", "Alice@example.org"],
            "user alice@example.org exists already",
        ),
        (
            vec!["user", "add", "team@example.org"],
            "team@example.org is an alias; remove the alias first",
        ),
        (
            vec!["user", "add", "a/b@example.org"],
            r#"local part "a/b" contains '/', which is not allowed"#,
        ),
        (
            vec!["user", "add", "..@example.org"],
            r#"local part ".." may not start or end with a dot or contain "..""#,
        ),
        (
            vec!["user", "add", "a..b@example.org"],
            r#"local part "a..b" may not start or end with a dot or contain "..""#,
        ),
        (
            vec!["user", "add", ".hidden@example.org"],
            r#"local part ".hidden" may not start or end with a dot or contain "..""#,
        ),
        (
            vec!["user", "add", "a\u{1}b@example.org"],
            r#"local part "a\u{1}b" contains '\u{1}', which is not allowed"#,
        ),
        (
            vec!["user", "add", "a\nb@example.org"],
            r#"local part "a\nb" contains '\n', which is not allowed"#,
        ),
        (
            vec!["user", "add", "a\tb@example.org"],
            r#"local part "a\tb" contains '\t', which is not allowed"#,
        ),
        (
            vec!["user", "add", "a+b@example.org"],
            r#"local part "a+b" contains '+', which is not allowed"#,
        ),
        (vec!["user", "add", &over_64], &over_64_error),
        (
            vec!["user", "add", "noat"],
            r#""noat" is not an address of the form local@domain"#,
        ),
        (
            vec!["user", "remove", "ghost@example.org"],
            "user ghost@example.org does not exist",
        ),
        (
            vec!["user", "enable", "ghost@example.org"],
            "user ghost@example.org does not exist",
        ),
        (
            vec!["user", "quota", "ghost@example.org", "1G"],
            "user ghost@example.org does not exist",
        ),
        (
            vec!["user", "list", "nowhere.test"],
            "domain nowhere.test is not served; add it first with `letterbox domain add nowhere.test`",
        ),
        (
            vec!["domain", "add", "EXAMPLE.org"],
            "domain example.org exists already",
        ),
        (
            vec!["domain", "add", "bad_name.org"],
            r#"domain "bad_name.org" is not a valid domain name"#,
        ),
        (
            vec!["domain", "disable", "nowhere.test"],
            "domain nowhere.test does not exist",
        ),
        (
            vec!["domain", "remove", "example.org"],
            "domain example.org still has 2 user(s) and 1 alias(es); remove them first or pass --force",
        ),
        (
            vec!["alias", "add", "team@example.org", "alice@example.org"],
            "alias team@example.org already has one of those destinations",
        ),
        (
            vec![
                "alias",
                "add",
                "x@example.org",
                "stranger@elsewhere.test",
                "bob@example.org",
            ],
            "an alias that forwards to another server has that one destination only; x@example.org cannot have more (use one alias per destination)",
        ),
        (
            vec![
                "alias",
                "add",
                "x@example.org",
                "bob@example.org",
                "ghost@example.org",
            ],
            "destination ghost@example.org is neither a mailbox nor an alias here; a destination in a domain served here must exist",
        ),
        (
            vec!["alias", "add", "alice@example.org", "bob@example.org"],
            "alice@example.org is a mailbox; an alias cannot shadow it",
        ),
        (
            vec!["alias", "add", "@nowhere.test", "bob@example.org"],
            "domain nowhere.test is not served; add it first with `letterbox domain add nowhere.test`",
        ),
        (
            vec!["alias", "add", "../x@example.org", "bob@example.org"],
            r#"local part "../x" may not start or end with a dot or contain "..""#,
        ),
        (
            vec!["alias", "remove", "ghost@example.org"],
            "alias ghost@example.org does not exist",
        ),
        (
            vec!["sink", "add", "*.tmp.example.org"],
            "sink rule *.tmp.example.org exists already",
        ),
        (
            vec!["sink", "add", "a.*.org"],
            r#"domain "a.*.org" is not a valid domain name"#,
        ),
        (
            vec!["sink", "remove", "never.test"],
            "sink rule never.test does not exist",
        ),
    ];
    for (args, message) in &cases {
        assert_eq!(s.fail(args), format!("letterbox: {message}"), "{args:?}");
    }
    // Lengths: the address limit is checked with a valid local part.
    assert!(over_254.len() > 254 && long_domain.len() == 253);
    s.ok(&["domain", "add", &long_domain]);
    let before_long = s.snapshot();
    assert_eq!(
        s.fail(&["user", "add", &over_254]),
        format!("letterbox: address \"{over_254}\" is longer than 254 octets")
    );
    assert_eq!(s.snapshot(), before_long);
    s.ok(&["domain", "remove", &long_domain]);
    assert_eq!(s.snapshot(), before);
}

#[test]
fn passwords_verify_with_dovecot() {
    let s = Sandbox::new();
    s.ok(&["domain", "add", "example.org"]);
    s.ok_with_stdin(
        &["user", "add", "alice@example.org", "--password-stdin"],
        "correct horse battery\n",
    );
    let hash = passdb_hash(&s, "alice@example.org").expect("alice is in dovecot_passdb");
    assert!(hash.starts_with("{ARGON2ID}$argon2id$v=19$"), "{hash}");
    assert!(doveadm_verifies(&hash, "correct horse battery"));
    assert!(!doveadm_verifies(&hash, "wrong horse"));

    s.ok_with_stdin(
        &["user", "passwd", "alice@example.org", "--password-stdin"],
        "staple\n",
    );
    let new = passdb_hash(&s, "alice@example.org").unwrap();
    assert!(doveadm_verifies(&new, "staple"));
    assert!(!doveadm_verifies(&new, "correct horse battery"));

    // Receive-only users are not in the view at all.
    s.ok(&["user", "add", "bob@example.org"]);
    assert_eq!(passdb_hash(&s, "bob@example.org"), None);

    // Bad passwords are refused before anything is stored.
    assert_eq!(
        s.fail_with_stdin(
            &["user", "passwd", "alice@example.org", "--password-stdin"],
            "\n"
        ),
        "letterbox: no password on standard input"
    );
    assert_eq!(
        s.fail_with_stdin(
            &["user", "add", "carol@example.org", "--password-stdin"],
            ""
        ),
        "letterbox: no password on standard input"
    );
    assert_eq!(passdb_hash(&s, "alice@example.org").unwrap(), new);
    assert_eq!(s.json(&["user", "list"]).as_array().unwrap().len(), 2);
}

#[test]
fn passwd_needs_a_terminal_or_password_stdin() {
    let s = populated();
    let before = passdb_hash(&s, "alice@example.org");
    assert_eq!(
        s.fail(&["user", "passwd", "alice@example.org"]),
        "letterbox: standard input is not a terminal; pass --password-stdin to read the password from it"
    );
    assert_eq!(passdb_hash(&s, "alice@example.org"), before);
}

/// The hash Dovecot would read with the README's password_query.
fn passdb_hash(s: &Sandbox, user: &str) -> Option<String> {
    let url = format!("sqlite://{}", s.db_file().display());
    let user = user.to_string();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let row: Option<(String,)> =
                sqlx::query_as("SELECT password FROM dovecot_passdb WHERE username = ?")
                    .bind(user)
                    .fetch_optional(&mut c)
                    .await
                    .unwrap();
            row.map(|(p,)| p)
        })
}

fn doveadm_verifies(hash: &str, password: &str) -> bool {
    let out = StdCommand::new("doveadm").args(["pw", "-t", hash, "-p", password]).output().unwrap_or_else(|e| {
        panic!("doveadm (Debian package dovecot-core) is needed to check hashes; see README, Prerequisites: {e}")
    });
    out.status.success()
}

#[test]
fn config_errors_name_the_key_or_file() {
    let s = Sandbox::new();
    std::fs::write(
        s.path().join("unknown.toml"),
        "[smtp]\nlisten = [\"127.0.0.1:2525\"]\nmax_recipents = 10\n",
    )
    .unwrap();
    let e = s.fail(&["--config", "unknown.toml", "domain", "list"]);
    assert!(
        e.contains("max_recipents") && e.contains("unknown.toml"),
        "{e}"
    );

    std::fs::write(
        s.path().join("type.toml"),
        "[smtp]\nmax_recipients = \"many\"\n",
    )
    .unwrap();
    let e = s.fail(&["--config", "type.toml", "domain", "list"]);
    assert!(
        e.contains("max_recipients") && e.contains("type.toml"),
        "{e}"
    );

    let e = s.fail(&["--config", "missing.toml", "domain", "list"]);
    assert_eq!(
        e,
        "letterbox: config file missing.toml: No such file or directory (os error 2)"
    );

    let e = Sandbox::new()
        .set("LETTERBOX_SMTP__MAX_RECIPENTS", "10")
        .fail(&["domain", "list"]);
    assert!(e.to_lowercase().contains("max_recipents"), "{e}");
    let e = Sandbox::new()
        .set("LETTERBOX_SMTP__MAX_RECIPIENTS", "lots")
        .fail(&["domain", "list"]);
    assert!(e.to_lowercase().contains("max_recipients"), "{e}");

    // Inconsistent values are refused too.
    std::fs::write(
        s.path().join("tls.toml"),
        "[tls]\ncert = \"/etc/ssl/cert.pem\"\n",
    )
    .unwrap();
    assert_eq!(
        s.fail(&["--config", "tls.toml", "check"]),
        "letterbox: config: tls.cert and tls.key must be set together"
    );
}

#[test]
fn test_suite_variables_are_not_config() {
    // Regression: .ci/run exports these; they must not be read as keys.
    let s = Sandbox::new()
        .set(
            "LETTERBOX_TEST_POSTGRES",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .set("LETTERBOX_TEST_MYSQL", "mysql://root@127.0.0.1:3306/mysql");
    assert_eq!(
        s.ok(&["domain", "add", "example.org"]),
        "added domain example.org\n"
    );
}

#[test]
fn a_variable_outside_the_config_sections_is_ignored_with_a_warning() {
    // Regression: a wrapper's LETTERBOX_BIN made every command fail with
    // "unknown field: found `bin`". Only a variable whose first segment
    // names a section or top-level key is configuration.
    let out = Sandbox::new()
        .set("LETTERBOX_BOGUS", "1")
        .cmd(&["domain", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "letterbox: warning: ignoring environment variable LETTERBOX_BOGUS (not a configuration key)\n"
    );
}

#[test]
fn embedded_defaults_serve_a_newcomer() {
    let s = Sandbox::bare();
    assert_eq!(
        s.ok(&["migrate"]),
        "database sqlite://letterbox.db is migrated\n"
    );
    assert!(s.path().join("letterbox.db").is_file());
    assert_eq!(
        s.ok(&["check"]),
        "ok    config: built-in defaults (no config file found)\n\
         ok    database: sqlite://letterbox.db reachable and migrated\n\
         ok    maildir root: mail is writable\n\
         ok    tls: not configured; STARTTLS will not be offered\n\
         ok    lmtp: off\n\
         ok    dns: not used (smtp.reverse_dns, [auth] and [[dnsbl]] are off)\n"
    );
    assert!(s.path().join("mail").is_dir());
}

#[test]
fn config_file_in_the_working_directory_is_picked_up() {
    let s = Sandbox::bare();
    std::fs::write(
        s.path().join("letterbox.toml"),
        "[database]\nurl = \"sqlite://from-file.db\"\n\n[maildir]\nroot = \"spool\"\n",
    )
    .unwrap();
    assert_eq!(
        s.ok(&["domain", "add", "example.org"]),
        "added domain example.org\n"
    );
    assert!(s.path().join("from-file.db").is_file());
    assert!(!s.path().join("letterbox.db").exists());
    assert_eq!(
        s.ok(&["check"]),
        "ok    config: loaded letterbox.toml\n\
         ok    database: sqlite://from-file.db reachable and migrated\n\
         ok    maildir root: spool is writable\n\
         ok    tls: not configured; STARTTLS will not be offered\n\
         ok    lmtp: off\n\
         ok    dns: not used (smtp.reverse_dns, [auth] and [[dnsbl]] are off)\n"
    );

    // --config wins over ./letterbox.toml, and the environment over both.
    std::fs::write(
        s.path().join("other.toml"),
        "[database]\nurl = \"sqlite://other.db\"\n",
    )
    .unwrap();
    assert_eq!(s.ok(&["--config", "other.toml", "domain", "list"]), "");
    assert!(s.path().join("other.db").is_file());
    let env = Sandbox::bare().set("LETTERBOX_DATABASE__URL", "sqlite://env.db");
    std::fs::write(
        env.path().join("letterbox.toml"),
        "[database]\nurl = \"sqlite://from-file.db\"\n",
    )
    .unwrap();
    env.ok(&["domain", "add", "example.org"]);
    assert!(env.path().join("env.db").is_file() && !env.path().join("from-file.db").exists());
}

#[test]
fn check_reports_each_failure_on_its_line() {
    // A maildir root that cannot be created (a file is in the way; root
    // ignores permission bits, so a mode would prove nothing).
    let s = Sandbox::new().set("LETTERBOX_MAILDIR__ROOT", "blocker/mail");
    s.ok(&["migrate"]);
    std::fs::write(s.path().join("blocker"), "").unwrap();
    let out = s.cmd(&["check"]).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(lines[0].starts_with("ok    config: "), "{stdout}");
    assert!(lines[1].starts_with("ok    database: "), "{stdout}");
    assert!(
        lines[2].starts_with("FAIL  maildir root: blocker/mail: "),
        "{stdout}"
    );
    assert!(lines[3].starts_with("ok    tls: "), "{stdout}");
    assert_eq!(lines[4], "ok    lmtp: off", "{stdout}");
    assert_eq!(lines[5], DNS_UNUSED, "{stdout}");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "letterbox: 1 check(s) failed\n"
    );

    // An unreachable database (nothing listens on port 1) fails at once
    // with the cause.
    let s = Sandbox::new().set(
        "LETTERBOX_DATABASE__URL",
        "postgres://letterbox@127.0.0.1:1/letterbox",
    );
    let started = std::time::Instant::now();
    let out = s.cmd(&["check"]).output().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains(
            "FAIL  database: cannot connect to postgres://letterbox@127.0.0.1:1/letterbox: "
        ) && stdout.contains("refused"),
        "{stdout}"
    );

    // A database that was never migrated.
    let s = Sandbox::new();
    let out = s.cmd(&["check"]).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL  database: the database is not migrated")),
        "{stdout}"
    );
}
