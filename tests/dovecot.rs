//! Dovecot reads what letterbox writes. Each test makes a directory with
//! the admin CLI (domain, users with and without a password, an alias, a
//! catch-all), runs the real `letterbox serve`, sends mail over SMTP, and
//! starts a private Dovecot (`dovecot -F`) whose passdb is the
//! `dovecot_passdb` view of the same database and whose
//! `mail_location = maildir:<root>/%d/%n`. Python's imaplib then logs in
//! as each user and fetches every message, which must be byte for byte what
//! was sent plus our trace headers (IMAP serves CRLF where the files hold
//! LF). A wrong password and a receive-only user cannot log in.
//!
//! Dovecot 2.3 refuses mail access as root ("Mail access not allowed for
//! root", whatever `first_valid_uid` says), so letterbox and Dovecot's mail
//! processes run as `nobody` here, as production runs both as a `letterbox`
//! user. That takes root, as CI has.
//!
//! SQLite always; PostgreSQL and MySQL/MariaDB when `LETTERBOX_TEST_POSTGRES`
//! / `LETTERBOX_TEST_MYSQL` are set (tests/common/db.rs).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::db::{Backend, TestDb};
use common::process::{Process, Sections, letterbox, write_config};
use common::server::Client;
use serde_json::Value;

const SENDER: &str = "sender@remote.example";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_on_sqlite() {
    run_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_on_postgres() {
    run_on(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_on_mysql() {
    run_on(Backend::MySql).await;
}

/// The uid and gid of `nobody`, which letterbox and Dovecot's mail
/// processes run as.
fn nobody() -> (u32, u32) {
    // SAFETY: getuid has no preconditions.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "this test needs root: it runs letterbox and Dovecot's mail processes as nobody"
    );
    let name = std::ffi::CString::new("nobody").unwrap();
    // SAFETY: a valid C string; the result is read before any other
    // getpw* call in this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no user nobody on this machine");
    // SAFETY: non-null, points to libc's static passwd entry.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// One message as the test sends it.
struct Message {
    /// RCPT TO addresses, in order.
    rcpts: &'static [&'static str],
    /// The content without dot-stuffing, lines ending CRLF.
    content: String,
    /// The transaction id from the 250 reply.
    id: String,
}

fn content(subject: &str) -> String {
    format!(
        "From: Sender <{SENDER}>\r\n\
         To: undisclosed-recipients:;\r\n\
         Subject: {subject}\r\n\
         Message-ID: <{subject}@remote.example>\r\n\
         \r\n\
         Hello, this is {subject}.\r\n\
         .\r\n\
         ..two dots, and a line of one dot above\r\n\
         {long}\r\n\
         trailing spaces   \r\n\
         \tand a tab\r\n",
        long = "0123456789".repeat(90),
    )
}

/// RFC 5321 §4.5.2: a line starting with a dot gets one more.
fn dot_stuff(content: &str) -> String {
    content
        .split_inclusive("\r\n")
        .map(|l| {
            if l.starts_with('.') {
                format!(".{l}")
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// The file letterbox stores for `m` in `mailbox` (LF line endings), with
/// the date of the transaction's Received header.
fn stored(m: &Message, mailbox: &str, original: Option<&str>, rcpt: &str, date: &str) -> Vec<u8> {
    let mut s = format!("Return-Path: <{SENDER}>\nDelivered-To: {mailbox}\n");
    if let Some(o) = original {
        s += &format!("X-Original-To: {o}\n");
    }
    s += &format!(
        "Received: from client.example (unknown [127.0.0.1])\n\
         \tby mx.example.org with ESMTP id {id}\n\
         \tfor <{rcpt}>; {date}\n",
        id = m.id
    );
    s += &m.content.replace("\r\n", "\n");
    s.into_bytes()
}

fn crlf(lf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lf.len() + lf.len() / 20);
    for &b in lf {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// The transaction id and date in a stored or fetched message's Received
/// header, checking the date's shape (RFC 5322, UTC).
fn id_and_date(msg: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(msg);
    let id_at = text.find(" with ESMTP id ").expect("a Received header") + 15;
    let id = text[id_at..id_at + 16].to_string();
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
    let date_at = text[id_at..].find(">; ").unwrap() + id_at + 3;
    let end = text[date_at..].find(['\r', '\n']).unwrap() + date_at;
    let date = text[date_at..end].to_string();
    chrono::NaiveDateTime::parse_from_str(&date, "%a, %d %b %Y %H:%M:%S +0000")
        .unwrap_or_else(|e| panic!("Received date {date:?}: {e}"));
    (id, date)
}

/// A copy a user must find: the message, its `X-Original-To` (for an
/// alias or the catch-all), and the RCPT that reached the user.
type Copy<'a> = (&'a Message, Option<&'a str>, &'a str);

/// Byte equality, shown as text when it fails.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: got\n{}\nwant\n{}",
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(want)
    );
}

/// Remembers the date of the transaction `msg` belongs to, checking that
/// every copy of one transaction carries the same; returns it.
fn note_date(dates: &mut HashMap<String, String>, msg: &[u8]) -> String {
    let (id, date) = id_and_date(msg);
    let known = dates.entry(id.clone()).or_insert_with(|| date.clone());
    assert_eq!(*known, date, "copies of transaction {id} differ in date");
    date
}

/// An admin command as `uid`/`gid`, with `stdin`; panics unless it succeeds.
fn admin_as(config: &Path, (uid, gid): (u32, u32), args: &[&str], stdin: &str) {
    let mut child = letterbox(config)
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run letterbox");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "letterbox {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Dovecot's `driver` and `connect` for the test database.
fn dovecot_sql(backend: Backend, url: &str, dir: &Path) -> (&'static str, String) {
    if backend == Backend::Sqlite {
        return ("sqlite", dir.join("letterbox.db").display().to_string());
    }
    // scheme://user[:password]@host:port/dbname
    let rest = url.split_once("://").unwrap().1;
    let (user, rest) = rest.split_once('@').unwrap();
    let user = user.split(':').next().unwrap();
    let (hostport, dbname) = rest.split_once('/').unwrap();
    let (host, port) = hostport.split_once(':').unwrap();
    let driver = match backend {
        Backend::Postgres => "pgsql",
        _ => "mysql",
    };
    (
        driver,
        format!("host={host} port={port} dbname={dbname} user={user}"),
    )
}

/// A private Dovecot: its own config, base_dir, state_dir and log, on a
/// loopback port of its own. Stopped when dropped.
struct Dovecot {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Dovecot {
    fn start(dir: &Path, mail_root: &Path, sql: (&str, String), (uid, gid): (u32, u32)) -> Dovecot {
        std::fs::create_dir_all(dir).unwrap();
        let sql_conf = dir.join("dovecot-sql.conf.ext");
        std::fs::write(
            &sql_conf,
            format!(
                "driver = {}\nconnect = {}\n\
                 password_query = SELECT username AS user, password FROM dovecot_passdb WHERE username = '%u'\n",
                sql.0, sql.1
            ),
        )
        .unwrap();
        let log = dir.join("dovecot.log");
        let root = mail_root.display();
        // Dovecot cannot listen on port 0: take a free port and release it
        // just before Dovecot binds it. Another process may win the port in
        // between; then try again with another.
        for _attempt in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = dir.join("dovecot.conf");
            std::fs::write(
                &conf,
                format!(
                    r#"base_dir = {dir}/run
state_dir = {dir}/state
log_path = {log}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
login_greeting = Dovecot ready.
auth_verbose = yes
# No waiting after a failed login (the wrong-password cases), neither the
# fixed delay nor anvil's growing penalty per IP.
auth_failure_delay = 0
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:{root}/%d/%n
passdb {{
  driver = sql
  args = {sql_conf}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"#,
                    dir = dir.display(),
                    log = log.display(),
                    sql_conf = sql_conf.display(),
                ),
            )
            .unwrap();
            let _ = std::fs::remove_file(&log);
            let child = Command::new("dovecot")
                .arg("-F")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("dovecot (Debian package dovecot-imapd) is needed for this test; see README, Prerequisites: {e}")
                });
            let mut d = Dovecot {
                child,
                port,
                log: log.clone(),
            };
            match d.wait_ready() {
                Ok(()) => return d,
                Err(why) if why.contains("Address already in use") => continue,
                Err(why) => panic!("Dovecot did not start: {why}"),
            }
        }
        panic!("Dovecot found no free port in 3 tries");
    }

    /// Polls until the IMAP greeting arrives, up to 30 s. An error carries
    /// Dovecot's log and stderr when it exited instead.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return Err(format!("exited ({status}): {err}{}", self.log_text()));
            }
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line);
                assert!(
                    line.starts_with("* OK [CAPABILITY ") && line.ends_with("] Dovecot ready.\r\n"),
                    "port {} greets with {line:?}",
                    self.port
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no IMAP listener after 30 s: {}", self.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its children; SIGKILL if it hangs.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What imaplib saw for one login.
#[derive(Debug)]
enum Imap {
    /// Logged in: every message in the INBOX with its RFC822.SIZE.
    Messages(Vec<(Vec<u8>, u64)>),
    /// The LOGIN was refused with this text.
    Refused(String),
}

/// Logs in as each `(user, password)` with Python's imaplib and fetches
/// every message of the INBOX, read-only.
fn imap(port: u16, logins: &[(&str, &str)]) -> Vec<Imap> {
    const SCRIPT: &str = r#"
import imaplib, json, re, sys
spec = json.load(sys.stdin)
out = []
for user, password in spec["logins"]:
    m = imaplib.IMAP4("127.0.0.1", spec["port"])
    try:
        m.login(user, password)
    except imaplib.IMAP4.error as e:
        why = e.args[0]
        out.append({"refused": why.decode() if isinstance(why, bytes) else why})
        m.shutdown()
        continue
    typ, data = m.select("INBOX", readonly=True)
    assert typ == "OK", (typ, data)
    messages = []
    if int(data[0]) > 0:
        typ, data = m.fetch("1:*", "(RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK", (typ, data)
        for item in data:
            if isinstance(item, tuple):
                size = int(re.search(rb"RFC822\.SIZE (\d+)", item[0]).group(1))
                messages.append({"size": size, "hex": item[1].hex()})
    m.logout()
    out.append({"messages": messages})
print(json.dumps(out))
"#;
    let spec = serde_json::json!({ "port": port, "logins": logins });
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("python3 is required for this test (install it as .ci/run does): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "imaplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|r| match r.get("refused") {
            Some(why) => Imap::Refused(why.as_str().unwrap().to_string()),
            None => Imap::Messages(
                r["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        (
                            unhex(m["hex"].as_str().unwrap()),
                            m["size"].as_u64().unwrap(),
                        )
                    })
                    .collect(),
            ),
        })
        .collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Files in `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

async fn run_on(backend: Backend) {
    let who = nobody();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::os::unix::fs::chown(dir, Some(who.0), Some(who.1)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let Some(db) = TestDb::new(backend, dir).await else {
        return;
    };
    let root = dir.join("mail");
    let config = write_config(
        dir,
        &db.url,
        &Sections {
            database: "cache_ttl = \"0s\"",
            ..Sections::default()
        },
    );

    // The directory, through the admin CLI.
    let admin = |args: &[&str], stdin: &str| admin_as(&config, who, args, stdin);
    admin(&["domain", "add", "example.org"], "");
    admin(
        &["user", "add", "alice@example.org", "--password-stdin"],
        "alice's secret\n",
    );
    admin(
        &["user", "add", "carol@example.org", "--password-stdin"],
        "carol's secret\n",
    );
    admin(&["user", "add", "bob@example.org"], "");
    admin(
        &[
            "alias",
            "add",
            "postmaster@example.org",
            "alice@example.org",
        ],
        "",
    );
    admin(&["alias", "add", "@example.org", "carol@example.org"], "");

    let server = Process::serve_with(&config, |c| {
        c.uid(who.0).gid(who.1);
    });

    // The mail: one message to three mailboxes, then one each to the
    // alias, to the catch-all and to a +tag address.
    let mut sent = vec![
        Message {
            rcpts: &["alice@example.org", "carol@example.org", "bob@example.org"],
            content: content("to three mailboxes"),
            id: String::new(),
        },
        Message {
            rcpts: &["postmaster@example.org"],
            content: content("to the alias"),
            id: String::new(),
        },
        Message {
            rcpts: &["nobody-here@example.org"],
            content: content("to the catch-all"),
            id: String::new(),
        },
        Message {
            rcpts: &["alice+lists@example.org"],
            content: content("to a tag"),
            id: String::new(),
        },
    ];
    let mut smtp = Client::new(tokio::net::TcpStream::connect(server.smtp).await.unwrap());
    smtp.greeting().await;
    for m in &mut sent {
        let reply = smtp
            .send_mail(SENDER, m.rcpts, &dot_stuff(&m.content))
            .await;
        let id = reply
            .strip_prefix("250 2.0.0 Ok: delivered as ")
            .and_then(|r| r.strip_suffix("\r\n"))
            .unwrap_or_else(|| panic!("{reply:?}"));
        m.id = id.to_string();
    }
    smtp.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;

    // Bob has no login, so Dovecot never touches his maildir: his copy of
    // the first message is read from disk. Its Received date is the
    // transaction's; every other copy of it must carry the same.
    let mut dates: HashMap<String, String> = HashMap::new();
    let bob = files(&root.join("example.org/bob/new"));
    assert_eq!(bob.len(), 1, "{bob:?}");
    let bob_file = std::fs::read(&bob[0]).unwrap();
    let date = note_date(&mut dates, &bob_file);
    let want = stored(&sent[0], "bob@example.org", None, "bob@example.org", &date);
    assert_same(&bob_file, &want, "bob@example.org on disk");

    let dovecot = Dovecot::start(
        &dir.join("dovecot"),
        &root,
        dovecot_sql(backend, &db.url, dir),
        who,
    );
    let got = imap(
        dovecot.port,
        &[
            ("alice@example.org", "alice's secret"),
            ("carol@example.org", "carol's secret"),
            ("alice@example.org", "carol's secret"),
            ("bob@example.org", ""),
            ("bob@example.org", "alice's secret"),
        ],
    );
    assert_eq!(got.len(), 5);

    // What each user must find.
    let want: [(&str, Vec<Copy>); 2] = [
        (
            "alice@example.org",
            vec![
                (&sent[0], None, "alice@example.org"),
                (
                    &sent[1],
                    Some("postmaster@example.org"),
                    "postmaster@example.org",
                ),
                (&sent[3], None, "alice+lists@example.org"),
            ],
        ),
        (
            "carol@example.org",
            vec![
                (&sent[0], None, "carol@example.org"),
                (
                    &sent[2],
                    Some("nobody-here@example.org"),
                    "nobody-here@example.org",
                ),
            ],
        ),
    ];
    for ((mailbox, copies), seen) in want.iter().zip(&got) {
        let Imap::Messages(fetched) = seen else {
            panic!(
                "{mailbox} could not log in: {seen:?}\n{}",
                dovecot.log_text()
            );
        };
        for (msg, size) in fetched {
            assert_eq!(*size, msg.len() as u64, "RFC822.SIZE for {mailbox}");
        }
        let mut fetched: Vec<Vec<u8>> = fetched.iter().map(|(m, _)| m.clone()).collect();
        for f in &fetched {
            note_date(&mut dates, f);
        }
        let mut expected = Vec::new();
        for (m, original, rcpt) in copies {
            let date = dates
                .get(&m.id)
                .cloned()
                .unwrap_or_else(|| panic!("{mailbox} did not get transaction {}", m.id));
            expected.push(crlf(&stored(m, mailbox, *original, rcpt, &date)));
        }
        fetched.sort();
        expected.sort();
        assert_eq!(
            fetched.len(),
            expected.len(),
            "{mailbox}: {} messages",
            fetched.len()
        );
        for (f, e) in fetched.iter().zip(&expected) {
            assert_same(f, e, mailbox);
        }
    }

    // A wrong password, and a receive-only user with or without one.
    for refused in &got[2..] {
        match refused {
            Imap::Refused(why) => {
                assert_eq!(why, "[AUTHENTICATIONFAILED] Authentication failed.")
            }
            Imap::Messages(_) => panic!("a login that must fail succeeded"),
        }
    }
    let log = dovecot.log_text();
    let lines = |user: &str, reason: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("sql({user},127.0.0.1")) && l.contains(reason))
            .count()
    };
    assert_eq!(lines("alice@example.org", "Password mismatch"), 1, "{log}");
    assert_eq!(lines("bob@example.org", "unknown user"), 2, "{log}");
    // Dovecot found nothing wrong in the maildirs (a wrong ,S= is an Error).
    for bad in ["Error:", "Fatal:", "Panic:", "Warning:"] {
        assert!(!log.contains(bad), "Dovecot logged {bad}\n{log}");
    }
    drop(dovecot);
    drop(server);
}
