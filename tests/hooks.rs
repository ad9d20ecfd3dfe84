//! Command hooks (`[[hooks]]`) with real processes: small shell scripts
//! written into a temporary directory, run by an in-process server. Exact
//! replies and exact bytes on disk for each outcome: fields added, exit 20
//! and other exits with and without a reply of their own, a timeout (the
//! script's children killed with it), a crash, bad output, the environment
//! and the message on stdin, the order of several hooks, and a hook at
//! every stage.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::server::{Client, TestServer};
use letterbox::hooks::{Argv, HookConfig, OnFailure};
use letterbox::pipeline::Stage;
use tokio::net::TcpStream;

const BODY: &str = "Subject: hooks\r\n\r\nbody\r\n";
const TEMPFAIL: &str = "451 4.3.0 Temporary failure of a policy check, try again later";

/// A directory for the test's scripts and what they write.
struct Scripts(tempfile::TempDir);

impl Scripts {
    fn new() -> Scripts {
        Scripts(tempfile::tempdir().unwrap())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Writes an executable `/bin/sh` script; `{dir}` in `body` becomes
    /// this directory.
    fn write(&self, name: &str, body: &str) -> String {
        let path = self.path(name);
        let body = body.replace("{dir}", &self.0.path().display().to_string());
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

fn hook(stage: Stage, program: &str, on_failure: OnFailure) -> HookConfig {
    HookConfig {
        stage,
        command: Argv(vec![program.to_string()]),
        timeout: letterbox::units::Duration::from_secs(10),
        on_failure,
    }
}

async fn server(hooks: Vec<HookConfig>) -> TestServer {
    TestServer::start(|c| c.hooks = hooks).await
}

/// Greeting, then a whole message; the final reply without CRLF.
async fn mail(s: &TestServer, rcpts: &[&str], body: &str) -> String {
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c.send_mail("s@remote.example", rcpts, body).await;
    reply.trim_end().to_string()
}

/// The only copy in a mailbox, with its delivery id and date replaced by
/// `<id>` and `<date>`.
fn stored(s: &TestServer, mailbox: &str, id: &str) -> String {
    let files = s.new_files(mailbox);
    assert_eq!(files.len(), 1, "{mailbox}: {files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let marker = format!("\tfor <{mailbox}>; ");
    let (head, rest) = text.split_once(&marker).expect("a Received field");
    let (_, tail) = rest.split_once('\n').unwrap();
    format!("{head}{marker}<date>\n{tail}").replace(id, "<id>")
}

fn delivered_id(reply: &str) -> String {
    reply
        .strip_prefix("250 2.0.0 Ok: delivered as ")
        .unwrap_or_else(|| panic!("not delivered: {reply}"))
        .to_string()
}

#[tokio::test]
async fn an_accepting_hook_adds_its_fields_below_received() {
    let d = Scripts::new();
    // chasquid's own test hook folds a field; it arrives unfolded.
    let spam = d.write(
        "spam",
        "cat >/dev/null\necho 'X-Spam-Score: 1.5'\necho 'X-Checked: yes'\necho '  folded'",
    );
    let s = server(vec![hook(Stage::Data, &spam, OnFailure::Tempfail)]).await;
    let reply = mail(&s, &["alice@example.org"], BODY).await;
    let id = delivered_id(&reply);
    assert_eq!(
        stored(&s, "alice@example.org", &id),
        "Return-Path: <s@remote.example>\n\
         Delivered-To: alice@example.org\n\
         Received: from client.example (unknown [127.0.0.1])\n\
         \tby mx.example.org with ESMTP id <id>\n\
         \tfor <alice@example.org>; <date>\n\
         X-Spam-Score: 1.5\n\
         X-Checked: yes  folded\n\
         Subject: hooks\n\
         \n\
         body\n"
    );
}

#[tokio::test]
async fn refusals_use_the_last_line_when_it_is_a_reply_else_the_defaults() {
    let d = Scripts::new();
    // One script, chasquid-style: what it does depends on RCPT_TO.
    let judge = d.write(
        "judge",
        r#"cat >/dev/null
case "$RCPT_TO" in
  alice@example.org) echo "scanning"; echo "550 5.7.1 Spam score 15.2 (limit 5)"; exit 20 ;;
  bob@example.org) echo "spam detected"; exit 20 ;;
  carol@example.org) echo "451 4.7.1 Greylisted, try again in 5 minutes"; exit 1 ;;
  dave@example.org) echo "¡No pasarán!"; exit 1 ;;
  erin@example.org) echo "451 4.7.1 a temporary reply with exit 20"; exit 20 ;;
  frank@example.org) echo "554 5.7.1 a permanent reply with exit 75"; exit 75 ;;
esac"#,
    );
    let s = server(vec![hook(Stage::Data, &judge, OnFailure::Tempfail)]).await;
    for u in ["carol", "dave", "erin", "frank"] {
        s.directory
            .user_add(&format!("{u}@example.org"), Some('+'), None, 0)
            .await
            .unwrap();
    }
    for (rcpt, want) in [
        ("alice@example.org", "550 5.7.1 Spam score 15.2 (limit 5)"),
        ("bob@example.org", "550 5.7.1 Rejected by policy"),
        (
            "carol@example.org",
            "451 4.7.1 Greylisted, try again in 5 minutes",
        ),
        (
            "dave@example.org",
            "451 4.7.1 Temporarily rejected by policy, try again later",
        ),
        // A reply of the wrong class for the exit status is not used.
        ("erin@example.org", "550 5.7.1 Rejected by policy"),
        (
            "frank@example.org",
            "451 4.7.1 Temporarily rejected by policy, try again later",
        ),
    ] {
        assert_eq!(mail(&s, &[rcpt], BODY).await, want, "{rcpt}");
        assert!(s.new_files(rcpt).is_empty(), "{rcpt} got a copy");
    }
}

/// Whether a process is gone: no such pid, or a zombie left to whoever
/// inherited it (it was killed).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn a_hook_past_its_timeout_is_killed_with_its_children() {
    let d = Scripts::new();
    // The shell waits for a sleep of its own: killing only the shell would
    // leave the sleep running for a minute.
    let slow = d.write(
        "slow",
        "echo $$ > {dir}/shell.pid\nsleep 60 &\necho $! > {dir}/sleep.pid\nwait",
    );
    for (on_failure, want) in [
        (OnFailure::Tempfail, TEMPFAIL.to_string()),
        (OnFailure::Accept, "250 2.0.0 Ok: delivered as ".to_string()),
    ] {
        let mut h = hook(Stage::Data, &slow, on_failure);
        h.timeout = letterbox::units::Duration::from_secs(1);
        let s = server(vec![h]).await;
        let started = Instant::now();
        let reply = mail(&s, &["alice@example.org"], BODY).await;
        let took = started.elapsed();
        assert!(reply.starts_with(&want), "{on_failure:?}: {reply}");
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "{took:?}"
        );
        let (shell, sleep) = (d.read("shell.pid"), d.read("sleep.pid"));
        assert!(!shell.is_empty() && !sleep.is_empty());
        // The shell is our child: reaped, so gone entirely.
        assert!(
            !Path::new(&format!("/proc/{}", shell.trim())).exists(),
            "the hook's shell {shell} was not reaped"
        );
        // SIGKILL takes effect when the process next runs: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone(&sleep) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(&sleep), "the hook's sleep {sleep} still runs");
        assert_eq!(
            s.new_files("alice@example.org").len(),
            usize::from(on_failure == OnFailure::Accept)
        );
    }
}

#[tokio::test]
async fn a_crash_and_bad_output_are_failures() {
    let d = Scripts::new();
    let crash = d.write("crash", "cat >/dev/null\nkill -SEGV $$");
    let prose = d.write("prose", "cat >/dev/null\necho 'This is not a header'");
    let chatty = d.write(
        "chatty",
        "cat >/dev/null\nhead -c 100000 /dev/zero | tr '\\0' x >&2",
    );
    let unended = d.write("unended", "printf 'X-Post-DATA: no newline at the end'");
    for program in [&crash, &prose, &chatty, &unended] {
        let s = server(vec![hook(Stage::Data, program, OnFailure::Tempfail)]).await;
        assert_eq!(
            mail(&s, &["alice@example.org"], BODY).await,
            TEMPFAIL,
            "{program}"
        );
        assert!(s.new_files("alice@example.org").is_empty());

        // Under "accept" the message goes on, without anything from it.
        let s = server(vec![hook(Stage::Data, program, OnFailure::Accept)]).await;
        let id = delivered_id(&mail(&s, &["alice@example.org"], BODY).await);
        assert!(
            stored(&s, "alice@example.org", &id).ends_with("<date>\nSubject: hooks\n\nbody\n"),
            "{program}"
        );
    }
}

#[tokio::test]
async fn the_environment_is_chasquids_and_nothing_of_the_servers() {
    let d = Scripts::new();
    let dump = d.write("dump", "env | sort > {dir}/$STAGE.env\ncat >/dev/null");
    let s = server(vec![
        hook(Stage::Connect, &dump, OnFailure::Tempfail),
        hook(Stage::Rcpt, &dump, OnFailure::Tempfail),
        hook(Stage::Data, &dump, OnFailure::Tempfail),
    ])
    .await;
    let id = delivered_id(&mail(&s, &["alice@example.org", "bob@example.org"], BODY).await);
    // dash, the script's shell, exports its working directory: `/`.
    assert_eq!(
        d.read("connect.env"),
        "AUTH_AS=\nEHLO_DOMAIN=\nMAIL_FROM=\nMESSAGE_ID=\nON_TLS=0\n\
         PATH=/usr/local/bin:/usr/bin:/bin\nPWD=/\nRCPT_TO=\nREMOTE_ADDR=127.0.0.1\n\
         SPF_PASS=0\nSTAGE=connect\n"
    );
    // At rcpt the one being checked comes last; the run for bob overwrote
    // alice's.
    assert_eq!(
        d.read("rcpt.env"),
        format!(
            "AUTH_AS=\nEHLO_DOMAIN=client.example\nMAIL_FROM=s@remote.example\nMESSAGE_ID={id}\n\
             ON_TLS=0\nPATH=/usr/local/bin:/usr/bin:/bin\nPWD=/\n\
             RCPT_TO=alice@example.org bob@example.org\nREMOTE_ADDR=127.0.0.1\nSPF_PASS=0\nSTAGE=rcpt\n"
        )
    );
    assert_eq!(
        d.read("data.env"),
        d.read("rcpt.env").replace("STAGE=rcpt", "STAGE=data")
    );
}

#[tokio::test]
async fn the_hook_reads_the_message_as_received() {
    let d = Scripts::new();
    let copy = d.write("copy", "cat > {dir}/stdin");
    // A small message (in memory), then one past the spool's memory limit
    // (read back from its file on the blocking pool).
    let s = TestServer::start(|c| {
        c.hooks = vec![hook(Stage::Data, &copy, OnFailure::Tempfail)];
        c.maildir.spool_memory_limit = letterbox::units::ByteSize(1024);
    })
    .await;
    let small = "Subject: dots\r\n\r\n..leading dot\r\nbare\rcr\r\n";
    delivered_id(&mail(&s, &["alice@example.org"], small).await);
    assert_eq!(
        std::fs::read(d.path("stdin")).unwrap(),
        b"Subject: dots\r\n\r\n.leading dot\r\nbare\rcr\r\n"
    );
    let line = "0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let big = format!("Subject: big\r\n\r\n{}", line.repeat(30_000));
    delivered_id(&mail(&s, &["bob@example.org"], &big).await);
    assert_eq!(std::fs::read(d.path("stdin")).unwrap(), big.as_bytes());
}

#[tokio::test]
async fn a_hook_that_does_not_read_stdin_still_decides() {
    let d = Scripts::new();
    let early = d.write("early", "echo 'X-Early: yes'");
    let s = TestServer::start(|c| {
        c.hooks = vec![hook(Stage::Data, &early, OnFailure::Tempfail)];
        c.maildir.spool_memory_limit = letterbox::units::ByteSize(1024);
    })
    .await;
    let big = format!("Subject: big\r\n\r\n{}", "y\r\n".repeat(400_000));
    let id = delivered_id(&mail(&s, &["alice@example.org"], &big).await);
    assert!(stored(&s, "alice@example.org", &id).contains("<date>\nX-Early: yes\nSubject: big\n"));
}

#[tokio::test]
async fn the_first_refusal_wins_and_later_hooks_do_not_run() {
    let d = Scripts::new();
    let first = d.write("first", "echo 'X-First: 1'");
    let second = d.write("second", "echo 'X-Second: 2'");
    let refuse = d.write(
        "refuse",
        "echo '550 5.7.1 the second hook says no'\nexit 20",
    );
    let never = d.write("never", "touch {dir}/never-ran");
    let s = server(vec![
        hook(Stage::Data, &first, OnFailure::Tempfail),
        hook(Stage::Data, &refuse, OnFailure::Tempfail),
        hook(Stage::Data, &never, OnFailure::Tempfail),
    ])
    .await;
    assert_eq!(
        mail(&s, &["alice@example.org"], BODY).await,
        "550 5.7.1 the second hook says no"
    );
    assert!(!d.path("never-ran").exists(), "a hook ran after a refusal");

    // Without a refusal every hook runs, and their fields keep the order.
    let s = server(vec![
        hook(Stage::Data, &second, OnFailure::Tempfail),
        hook(Stage::Data, &first, OnFailure::Tempfail),
        hook(Stage::Data, &never, OnFailure::Tempfail),
    ])
    .await;
    let id = delivered_id(&mail(&s, &["alice@example.org"], BODY).await);
    assert!(
        stored(&s, "alice@example.org", &id)
            .ends_with("<date>\nX-Second: 2\nX-First: 1\nSubject: hooks\n\nbody\n")
    );
    assert!(d.path("never-ran").exists());
}

#[tokio::test]
async fn a_hook_at_every_stage() {
    let d = Scripts::new();
    // Each stage logs what it saw and refuses one thing of its own.
    let gate = d.write(
        "gate",
        r#"echo "$STAGE id=${MESSAGE_ID:+yes} helo=$EHLO_DOMAIN from=$MAIL_FROM to=$RCPT_TO" >> {dir}/log
case "$STAGE" in
  connect) [ -e {dir}/closed ] && { echo "554 5.7.1 closed for today"; exit 20; } ;;
  helo) [ "$EHLO_DOMAIN" = "bad.example" ] && { echo "550 5.7.1 not you"; exit 20; } ;;
  mail) [ "$MAIL_FROM" = "spammer@remote.example" ] && exit 20 ;;
  rcpt) case "$RCPT_TO" in *bob@example.org) echo "450 4.2.1 bob is busy"; exit 1 ;; esac ;;
  data) cat > /dev/null; echo "X-Stages: all" ;;
esac
exit 0"#,
    );
    let stages = [
        Stage::Connect,
        Stage::Helo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
    ];
    let s = server(
        stages
            .iter()
            .map(|&st| hook(st, &gate, OnFailure::Tempfail))
            .collect(),
    )
    .await;
    let mut c: Client<TcpStream> = s.connect().await;
    c.greeting().await;
    c.cmd("EHLO bad.example", "550 5.7.1 not you").await;
    c.cmd_prefix("EHLO client.example", "250-mx.example.org")
        .await;
    c.cmd(
        "MAIL FROM:<spammer@remote.example>",
        "550 5.7.1 Rejected by policy",
    )
    .await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("RCPT TO:<bob@example.org>", "450 4.2.1 bob is busy")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(format!("{BODY}.\r\n").as_bytes()).await;
    let id = delivered_id(c.reply().await.trim_end());
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;
    assert!(
        stored(&s, "alice@example.org", &id).contains("<date>\nX-Stages: all\nSubject: hooks\n")
    );
    assert!(s.new_files("bob@example.org").is_empty());
    assert_eq!(
        d.read("log"),
        "connect id= helo= from= to=\n\
         helo id= helo=bad.example from= to=\n\
         helo id= helo=client.example from= to=\n\
         mail id=yes helo=client.example from=spammer@remote.example to=\n\
         mail id=yes helo=client.example from=s@remote.example to=\n\
         rcpt id=yes helo=client.example from=s@remote.example to=alice@example.org\n\
         rcpt id=yes helo=client.example from=s@remote.example to=alice@example.org bob@example.org\n\
         data id=yes helo=client.example from=s@remote.example to=alice@example.org\n"
    );

    // A refusal at connect replaces the greeting and ends the session.
    std::fs::write(d.path("closed"), "").unwrap();
    let mut c = s.connect().await;
    assert_eq!(c.reply().await, "554 5.7.1 closed for today\r\n");
    assert_eq!(c.reply().await, "");
}
