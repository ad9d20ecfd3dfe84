//! Delivery into pipe commands (`letterbox alias add x '|/path/to/program
//! args'`) with real processes: Debian's procmail delivering into a
//! maildir, small shell scripts for each exit status, the all-or-nothing
//! rule over SMTP (pipes first; a failed pipe fails the transaction and
//! nothing else is delivered) and per-recipient outcomes over LMTP, the
//! environment and the exact bytes on stdin, the timeout, running as
//! another user, and RCPT never naming a pipe.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::server::{Client, TestServer};
use letterbox::config::ListenAddr;
use letterbox::smtp::server::Bound;

const BODY: &str = "Subject: pipes\r\n\r\nbody\r\n";
const DEFERRED: &str = "451 4.3.0 Delivery command failed temporarily, try again later";

/// A directory others may read, for scripts and what they write.
struct Scripts(tempfile::TempDir);

impl Scripts {
    fn new() -> Scripts {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Scripts(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    fn dir(&self) -> String {
        self.0.path().display().to_string()
    }

    /// Writes an executable `/bin/sh` script; `{dir}` in `body` becomes
    /// this directory. Returns its path.
    fn write(&self, name: &str, body: &str) -> String {
        let path = self.path(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\n{}\n", body.replace("{dir}", &self.dir())),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

async fn alias(s: &TestServer, source: &str, destinations: &[&str]) {
    let d: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
    s.directory.alias_add(source, &d, Some('+')).await.unwrap();
}

async fn mail(s: &TestServer, rcpts: &[&str], body: &str) -> String {
    let mut c = s.connect().await;
    c.greeting().await;
    c.send_mail("s@remote.example", rcpts, body)
        .await
        .trim_end()
        .to_string()
}

fn delivered_id(reply: &str) -> String {
    reply
        .strip_prefix("250 2.0.0 Ok: delivered as ")
        .unwrap_or_else(|| panic!("not delivered: {reply}"))
        .to_string()
}

/// A message with its delivery id and the date of its Received field for
/// `rcpt` replaced by `<id>` and `<date>`.
fn normalized(text: &str, rcpt: &str, id: &str) -> String {
    let marker = format!("\tfor <{rcpt}>; ");
    let (head, rest) = text.split_once(&marker).expect("a Received field");
    let (_, tail) = rest.split_once('\n').unwrap();
    format!("{head}{marker}<date>\n{tail}").replace(id, "<id>")
}

fn files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn procmail_delivers_beside_the_mailbox_itself() {
    let d = Scripts::new();
    let rc = d.path("alice.rc");
    std::fs::write(&rc, format!("DEFAULT={}/Maildir/\n", d.dir())).unwrap();
    let s = TestServer::start(|_| {}).await;
    // The example: alice keeps her maildir and procmail gets a copy.
    alias(
        &s,
        "alice@example.org",
        &[
            "alice@example.org",
            &format!("|/usr/bin/procmail -m {}", rc.display()),
        ],
    )
    .await;
    let id = delivered_id(&mail(&s, &["alice@example.org"], BODY).await);
    let ours = s.new_files("alice@example.org");
    let theirs = files(&d.path("Maildir/new"));
    assert_eq!((ours.len(), theirs.len()), (1, 1));
    let ours = std::fs::read_to_string(&ours[0]).unwrap();
    assert_eq!(
        normalized(&ours, "alice@example.org", &id),
        "Return-Path: <s@remote.example>\n\
         Delivered-To: alice@example.org\n\
         Received: from client.example (unknown [127.0.0.1])\n\
         \tby mx.example.org with ESMTP id <id>\n\
         \tfor <alice@example.org>; <date>\n\
         Subject: pipes\n\
         \n\
         body\n"
    );
    // procmail stored exactly what it read: the same bytes as our copy.
    assert_eq!(std::fs::read_to_string(&theirs[0]).unwrap(), ours);
}

#[tokio::test(flavor = "current_thread")]
async fn the_command_gets_local8s_environment_and_the_message_with_lf() {
    let d = Scripts::new();
    let tracker = d.write("tracker", "env | sort > {dir}/env\ncat > {dir}/msg");
    // Past this the spool is a file, read back on the blocking pool (a
    // current-thread runtime panics in debug builds if it is read here).
    let s = TestServer::start(|c| c.maildir.spool_memory_limit = letterbox::units::ByteSize(1024))
        .await;
    alias(
        &s,
        "issues@example.org",
        &[&format!("|{tracker} --project web")],
    )
    .await;
    alias(&s, "team@example.org", &["issues@example.org"]).await;

    let id = delivered_id(&mail(&s, &["team@example.org"], BODY).await);
    assert_eq!(
        d.read("env"),
        "CLIENT_ADDRESS=127.0.0.1\nCLIENT_HELO=client.example\nCLIENT_HOSTNAME=unknown\n\
         CLIENT_PROTOCOL=ESMTP\nDOMAIN=example.org\nEXTENSION=\nHOME=/root\nLOCAL=issues\n\
         LOGNAME=issues\nORIGINAL_RECIPIENT=team@example.org\n\
         PATH=/usr/local/bin:/usr/bin:/bin\nPWD=/\nRECIPIENT=issues@example.org\n\
         SENDER=s@remote.example\nUSER=issues\n"
    );
    assert_eq!(
        normalized(&d.read("msg"), "team@example.org", &id),
        "Return-Path: <s@remote.example>\n\
         Delivered-To: issues@example.org\n\
         X-Original-To: team@example.org\n\
         Received: from client.example (unknown [127.0.0.1])\n\
         \tby mx.example.org with ESMTP id <id>\n\
         \tfor <team@example.org>; <date>\n\
         Subject: pipes\n\
         \n\
         body\n"
    );

    // Directly, with an extension, and a message on disk.
    let big = format!("Subject: big\r\n\r\n{}", "line\r\n".repeat(50_000));
    let id = delivered_id(&mail(&s, &["issues+web@example.org"], &big).await);
    let env = d.read("env");
    for want in [
        "EXTENSION=web\n",
        "LOCAL=issues+web\n",
        "RECIPIENT=issues+web@example.org\n",
        "ORIGINAL_RECIPIENT=issues+web@example.org\n",
        "USER=issues\n",
    ] {
        assert!(env.contains(want), "{want}: {env}");
    }
    assert_eq!(
        normalized(&d.read("msg"), "issues+web@example.org", &id),
        format!(
            "Return-Path: <s@remote.example>\n\
             Delivered-To: issues@example.org\n\
             Received: from client.example (unknown [127.0.0.1])\n\
             \tby mx.example.org with ESMTP id <id>\n\
             \tfor <issues+web@example.org>; <date>\n\
             Subject: big\n\n{}",
            "line\n".repeat(50_000)
        )
    );
}

/// Scripts for each exit status, and an alias per script.
async fn sysexits(s: &TestServer, d: &Scripts) {
    let scripts = [
        ("ok", "cat >/dev/null\necho ran >> {dir}/ok.count"),
        (
            "defer",
            "cat >/dev/null\necho 'mailbox locked' >&2\nexit 75",
        ),
        (
            "refuse",
            "cat >/dev/null\necho 'unknown project web' >&2\necho 'and more' >&2\nexit 1",
        ),
        ("silent", "exit 2"),
        ("crash", "kill -KILL $$"),
    ];
    for (name, body) in scripts {
        let program = d.write(name, body);
        alias(s, &format!("{name}@example.org"), &[&format!("|{program}")]).await;
    }
    alias(s, "ok2@example.org", &["ok@example.org"]).await;
}

#[tokio::test]
async fn over_smtp_pipes_run_first_and_one_failure_fails_everything() {
    let d = Scripts::new();
    let s = TestServer::start(|_| {}).await;
    sysexits(&s, &d).await;
    let ok_runs = || d.read("ok.count").lines().count();

    // 75: temporary; alice gets nothing, the pipe that succeeded ran once
    // (and will get a duplicate when the client retries).
    assert_eq!(
        mail(
            &s,
            &["alice@example.org", "ok@example.org", "defer@example.org"],
            BODY
        )
        .await,
        DEFERRED
    );
    assert!(s.new_files("alice@example.org").is_empty());
    assert_eq!(ok_runs(), 1);

    // Another status: permanent, with the first line of stderr.
    assert_eq!(
        mail(
            &s,
            &["alice@example.org", "ok@example.org", "refuse@example.org"],
            BODY
        )
        .await,
        "550 5.3.0 Delivery command failed: unknown project web"
    );
    assert!(s.new_files("alice@example.org").is_empty());
    assert_eq!(ok_runs(), 2);
    assert_eq!(
        mail(&s, &["silent@example.org"], BODY).await,
        "550 5.3.0 Delivery command failed: exit status 2"
    );
    // A signal is temporary, and a temporary failure wins over a permanent
    // one: the retry may deliver everything.
    assert_eq!(mail(&s, &["crash@example.org"], BODY).await, DEFERRED);
    assert_eq!(
        mail(&s, &["refuse@example.org", "defer@example.org"], BODY).await,
        DEFERRED
    );

    // All succeed: the copies go out, and a command two recipients reach
    // runs once.
    delivered_id(
        &mail(
            &s,
            &["alice@example.org", "ok@example.org", "ok2@example.org"],
            BODY,
        )
        .await,
    );
    assert_eq!(s.new_files("alice@example.org").len(), 1);
    assert_eq!(ok_runs(), 3);
}

#[tokio::test]
async fn over_lmtp_each_recipient_is_on_its_own() {
    let d = Scripts::new();
    let s = TestServer::start(|c| {
        c.lmtp.listen = vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())];
    })
    .await;
    sysexits(&s, &d).await;
    // bob: his maildir and the deferring pipe. His copy waits for the pipe.
    alias(
        &s,
        "bob@example.org",
        &["bob@example.org", "defer@example.org"],
    )
    .await;
    let Bound::Tcp(addr) = s.running.as_ref().unwrap().lmtp[0] else {
        panic!("LMTP on TCP")
    };
    let mut c = Client::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    assert_eq!(c.reply().await, "220 mx.example.org LMTP letterbox\r\n");
    c.cmd_prefix("LHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    for r in ["alice", "defer", "refuse", "ok", "bob", "ok2"] {
        c.cmd(
            &format!("RCPT TO:<{r}@example.org>"),
            "250 2.1.5 Recipient ok",
        )
        .await;
    }
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    let mut replies = Vec::new();
    for _ in 0..6 {
        let r = c.reply().await;
        replies.push(match r.rsplit_once(" delivered as ") {
            Some((head, _)) => format!("{head} delivered"),
            None => r.trim_end().to_string(),
        });
    }
    assert_eq!(
        replies,
        [
            "250 2.0.0 Ok: delivered",
            DEFERRED,
            "550 5.3.0 Delivery command failed: unknown project web",
            "250 2.0.0 Ok: delivered",
            DEFERRED,
            "250 2.0.0 Ok: delivered",
        ]
    );
    assert_eq!(s.new_files("alice@example.org").len(), 1);
    assert!(s.new_files("bob@example.org").is_empty());
    // ok and ok2 share one run.
    assert_eq!(d.read("ok.count").lines().count(), 1);
}

#[tokio::test]
async fn a_command_past_its_timeout_is_a_temporary_failure() {
    let d = Scripts::new();
    let slow = d.write("slow", "sleep 60 &\necho $! > {dir}/sleep.pid\nwait");
    let s = TestServer::start(|c| {
        c.delivery.pipe_timeout = letterbox::units::Duration::from_secs(1);
    })
    .await;
    alias(&s, "slow@example.org", &[&format!("|{slow}")]).await;
    let started = std::time::Instant::now();
    assert_eq!(
        mail(&s, &["alice@example.org", "slow@example.org"], BODY).await,
        "451 4.3.0 Delivery command timed out, try again later"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(s.new_files("alice@example.org").is_empty());
    let sleep = d.read("sleep.pid");
    // SIGKILL takes effect when the process next runs: give it a moment.
    let gone = |stat: &str| {
        stat.is_empty()
            || stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    };
    let read =
        || std::fs::read_to_string(format!("/proc/{}/stat", sleep.trim())).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gone(&read()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stat = read();
    assert!(
        stat.is_empty()
            || stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z'),
        "the command's child still runs: {stat}"
    );
}

#[tokio::test]
async fn commands_run_as_delivery_pipe_user() {
    let d = Scripts::new();
    let out = d.path("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let whoami = d.write(
        "whoami",
        "cat >/dev/null\necho \"$(id -u) $(id -g) $(id -G) $HOME\" > {dir}/out/id",
    );
    let s = TestServer::start(|c| c.delivery.pipe_user = Some("nobody".into())).await;
    alias(&s, "who@example.org", &[&format!("|{whoami}")]).await;
    delivered_id(&mail(&s, &["who@example.org"], BODY).await);
    assert_eq!(
        std::fs::read_to_string(out.join("id")).unwrap(),
        "65534 65534 65534 /nonexistent\n"
    );

    // An unknown user stops the server at start.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = common::server::test_config(tmp.path());
    config.delivery.pipe_user = Some("no-such-user".into());
    let err = match letterbox::serve::start(config).await {
        Ok(_) => panic!("started with an unknown pipe_user"),
        Err(e) => format!("{e:#}"),
    };
    assert_eq!(
        err,
        "delivery.pipe_user: no user named \"no-such-user\" on this system"
    );
}

#[tokio::test]
async fn no_recipient_address_is_ever_a_pipe() {
    let s = TestServer::start(|_| {}).await;
    // Even with a catch-all that would take any unknown local part.
    alias(&s, "@example.org", &["alice@example.org"]).await;
    let mut c = s.connect().await;
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    for rcpt in [
        "<|/bin/sh@example.org>",
        "<\"|/usr/bin/procmail -m /tmp/rc\"@example.org>",
    ] {
        c.cmd(&format!("RCPT TO:{rcpt}"), "550 5.1.1 No such user here")
            .await;
    }
    c.cmd("RCPT TO:<anyone@example.org>", "250 2.1.5 Recipient ok")
        .await;
}
