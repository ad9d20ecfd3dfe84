//! The real binary as a process: SIGHUP reloads TLS without dropping
//! sessions (and keeps the old certificate when the new one is broken),
//! the open files limit is raised at startup, 10,000 idle connections do
//! not exhaust the server, and each transaction logs one JSON line.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{Process, Sections, admin, letterbox, write_config};
use serde_json::{Value, json};

const EHLO_PLAIN: &str = "250-mx.example.org greets client.example\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING";

/// How long to wait for a reply or a log line before failing.
const PATIENCE: Duration = Duration::from_secs(30);

/// A temporary directory with a config file, example.org, alice and bob.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// `smtp` and `tls` are extra lines for those sections.
    fn new(smtp: &str, tls: &str) -> Setup {
        Setup::with_password(smtp, tls, None)
    }

    /// Alice gets `password`, set with `user add --password-stdin`.
    fn with_password(smtp: &str, tls: &str, password: Option<&str>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &format!("sqlite://{}", dir.path().join("letterbox.db").display()),
            &Sections {
                database: "cache_ttl = \"0s\"",
                smtp,
                tls,
                log: "format = \"json\"\nlevel = \"info\"",
                ..Sections::default()
            },
        );
        admin(&config, &["domain", "add", "example.org"]);
        match password {
            None => {
                admin(&config, &["user", "add", "alice@example.org"]);
            }
            Some(password) => add_with_password(&config, "alice@example.org", password),
        }
        admin(&config, &["user", "add", "bob@example.org"]);
        Setup { dir, config }
    }

    /// Files in the mailbox's new/.
    fn new_files(&self, local: &str) -> Vec<PathBuf> {
        let dir = self
            .dir
            .path()
            .join("mail/example.org")
            .join(local)
            .join("new");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }
}

/// `letterbox user add ADDRESS --password-stdin`.
fn add_with_password(config: &Path, address: &str, password: &str) {
    let mut add = letterbox(config)
        .args(["user", "add", address, "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- a blocking SMTP client ----

struct Client<S: Read + Write> {
    r: BufReader<S>,
}

impl Client<TcpStream> {
    fn connect(p: &Process) -> Client<TcpStream> {
        let s = TcpStream::connect(p.smtp).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        Client {
            // Small: the 10,000-connection test holds one per connection.
            r: BufReader::with_capacity(512, s),
        }
    }

    /// STARTTLS and the handshake, trusting `roots`.
    fn starttls(mut self, roots: &[&[u8]]) -> Client<Tls> {
        self.cmd("STARTTLS", "220 2.0.0 Ready to start TLS");
        assert!(self.r.buffer().is_empty(), "bytes after the 220");
        let tcp = self.r.into_inner();
        let mut store = rustls::RootCertStore::empty();
        for der in roots {
            store.add(der.to_vec().into()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
        let conn =
            rustls::ClientConnection::new(Arc::new(config), "mx.example.org".try_into().unwrap())
                .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        Client {
            r: BufReader::new(tls),
        }
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Client<Tls> {
    /// The certificate the server presented.
    fn peer_cert(&self) -> Vec<u8> {
        self.r.get_ref().conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// `TLSv1.3:TLS13_…`, as the server logs it.
    fn tls_description(&self) -> String {
        let conn = &self.r.get_ref().conn;
        let version = match conn.protocol_version().unwrap() {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            v => panic!("unexpected TLS version {v:?}"),
        };
        let suite = conn.negotiated_cipher_suite().unwrap().suite();
        format!("{version}:{}", suite.as_str().unwrap())
    }
}

impl<S: Read + Write> Client<S> {
    /// One whole reply, all its lines; "" at end of stream.
    fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).expect("reading a reply") == 0 {
                return out;
            }
            out.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return out;
            }
        }
    }

    fn send(&mut self, raw: &[u8]) {
        let s = self.r.get_mut();
        s.write_all(raw).unwrap();
        s.flush().unwrap();
    }

    /// Sends `line` and checks the reply is exactly `want` (without the final CRLF).
    fn cmd(&mut self, line: &str, want: &str) {
        self.send(format!("{line}\r\n").as_bytes());
        assert_eq!(self.reply(), format!("{want}\r\n"), "reply to {line:?}");
    }

    /// Sends `line`; returns the reply, which must start with `prefix`.
    fn cmd_prefix(&mut self, line: &str, prefix: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        let got = self.reply();
        assert!(got.starts_with(prefix), "reply to {line:?}: {got:?}");
        got
    }

    fn greeting(&mut self) {
        assert_eq!(self.reply(), "220 mx.example.org ESMTP letterbox\r\n");
    }

    fn ehlo(&mut self) {
        self.cmd_prefix(
            "EHLO client.example",
            "250-mx.example.org greets client.example\r\n",
        );
    }

    /// DATA with `content` (dot-stuffed, ending CRLF); returns the message
    /// id from `250 2.0.0 Ok: delivered as <id>`.
    fn data(&mut self, content: &str) -> String {
        self.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>");
        self.send(content.as_bytes());
        self.send(b".\r\n");
        let reply = self.reply();
        reply
            .strip_prefix("250 2.0.0 Ok: delivered as ")
            .and_then(|r| r.strip_suffix("\r\n"))
            .unwrap_or_else(|| panic!("not delivered: {reply:?}"))
            .to_string()
    }
}

// ---- the log ----

/// Every line of stderr, each of which must be one JSON event.
fn events(p: &Process) -> Vec<Value> {
    p.stderr()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn with_message<'a>(events: &'a [Value], message: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["fields"]["message"] == message)
        .collect()
}

/// Polls the log until `count` events have `message`; returns them.
fn wait_events(p: &Process, message: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let all = events(p);
        let found: Vec<Value> = with_message(&all, message).into_iter().cloned().collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the log never had {count} {message:?} events:\n{}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- certificates ----

struct Cert {
    cert: PathBuf,
    key: PathBuf,
}

impl Cert {
    fn paths(dir: &Path) -> Cert {
        Cert {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    /// The `[tls]` lines naming these files.
    fn config(&self) -> String {
        format!(
            "cert = \"{}\"\nkey = \"{}\"",
            self.cert.display(),
            self.key.display()
        )
    }

    /// Writes a new self-signed certificate for mx.example.org and its key
    /// over the files; returns the certificate's DER.
    fn write_new(&self) -> Vec<u8> {
        let ck = rcgen::generate_simple_self_signed(vec!["mx.example.org".into()]).unwrap();
        std::fs::write(&self.cert, ck.cert.pem()).unwrap();
        std::fs::write(&self.key, ck.key_pair.serialize_pem()).unwrap();
        ck.cert.der().to_vec()
    }
}

// ---- SIGHUP ----

#[test]
fn sighup_reloads_tls_without_dropping_sessions() {
    let certs = tempfile::tempdir().unwrap();
    let files = Cert::paths(certs.path());
    let a = files.write_new();
    let s = Setup::new("", &files.config());
    let p = Process::serve(&s.config);

    // A session inside TLS with certificate A, mid-transaction.
    let mut old = Client::connect(&p);
    old.greeting();
    old.ehlo();
    let mut old = old.starttls(&[&a]);
    assert_eq!(old.peer_cert(), a, "the first certificate");
    old.ehlo();
    old.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok");
    old.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok");
    // And a plaintext one that upgrades only after the reload.
    let mut plain = Client::connect(&p);
    plain.greeting();
    plain.ehlo();

    let b = files.write_new();
    assert_ne!(a, b);
    p.signal(libc::SIGHUP);
    let reloaded = wait_events(&p, "TLS certificate reloaded", 1);
    assert_eq!(reloaded[0]["level"], "INFO");

    // A new connection sees B.
    let mut new = Client::connect(&p);
    new.greeting();
    new.ehlo();
    let mut new = new.starttls(&[&a, &b]);
    assert_eq!(new.peer_cert(), b, "a new STARTTLS after SIGHUP");
    new.ehlo();
    new.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok");
    new.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok");
    new.data("Subject: after\r\n\r\nnew session\r\n");
    new.cmd("QUIT", "221 2.0.0 mx.example.org closing connection");

    // The old session goes on, on A, and completes its transaction.
    old.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok");
    old.data("Subject: before\r\n\r\nold session\r\n");
    old.cmd("QUIT", "221 2.0.0 mx.example.org closing connection");
    assert_eq!(old.peer_cert(), a);

    // The session that was plaintext during the reload upgrades with B.
    let mut plain = plain.starttls(&[&a, &b]);
    assert_eq!(
        plain.peer_cert(),
        b,
        "STARTTLS on a connection older than the reload"
    );
    plain.ehlo();
    plain.cmd("QUIT", "221 2.0.0 mx.example.org closing connection");

    let alice = s.new_files("alice");
    assert_eq!(alice.len(), 1);
    let text = std::fs::read_to_string(&alice[0]).unwrap();
    assert!(text.ends_with("Subject: before\n\nold session\n"), "{text}");
    let bob = s.new_files("bob");
    assert_eq!(bob.len(), 2, "bob has the old and the new session's mail");
}

#[test]
fn sighup_with_a_broken_key_keeps_the_old_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let files = Cert::paths(certs.path());
    let a = files.write_new();
    let s = Setup::new("", &files.config());
    let p = Process::serve(&s.config);

    // A new certificate, but the key file is garbage.
    let b = files.write_new();
    std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    p.signal(libc::SIGHUP);
    let failed = wait_events(&p, "TLS reload failed; keeping the previous certificate", 1);
    assert_eq!(failed[0]["level"], "ERROR");
    // rustls-pki-types' text, which spells the marker as bytes.
    let marker = format!("{:?}", b"PRIVATE KEY".to_vec());
    assert_eq!(
        failed[0]["fields"]["error"],
        format!(
            "TLS key {}: missing section end marker: {marker}",
            files.key.display()
        )
    );
    assert!(
        with_message(&events(&p), "TLS certificate reloaded").is_empty(),
        "{}",
        p.stderr()
    );

    let mut c = Client::connect(&p);
    c.greeting();
    c.ehlo();
    let mut c = c.starttls(&[&a, &b]);
    assert_eq!(c.peer_cert(), a, "the old certificate is still served");
    c.ehlo();
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok");
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok");
    c.data("Subject: still\r\n\r\nTLS works\r\n");
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection");
    assert_eq!(s.new_files("alice").len(), 1);
}

// ---- open files ----

fn nofile() -> libc::rlimit {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `l`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
    l
}

/// Starts the server with its open files limit set to `soft`/`hard` (as a
/// service manager would) instead of the test's own.
fn serve_with_nofile(config: &Path, soft: u64, hard: u64) -> Process {
    Process::serve_with(config, move |cmd| {
        // SAFETY: the closure runs between fork and exec and only calls
        // setrlimit, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
}

/// The open files limit of a process, from /proc/<pid>/limits: (soft, hard).
fn proc_nofile(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_low_open_files_limit_is_reported() {
    let s = Setup::new("", "");
    let p = serve_with_nofile(&s.config, 512, 512);
    // Logged before "ready", but stderr is read by another thread.
    wait_events(&p, "open files limit", 1);
    wait_events(
        &p,
        "open files limit is below smtp.max_connections plus headroom; raise the hard limit (LimitNOFILE=) or lower smtp.max_connections",
        1,
    );
    let all = events(&p);
    let info = with_message(&all, "open files limit");
    assert_eq!(info.len(), 1, "{}", p.stderr());
    assert_eq!(info[0]["level"], "INFO");
    assert_eq!(
        info[0]["fields"],
        json!({"message": "open files limit", "open_files": 512, "was": 512})
    );
    let warn: Vec<_> = all.iter().filter(|e| e["level"] == "WARN").collect();
    assert_eq!(warn.len(), 1, "{}", p.stderr());
    // 1000 connections + 16 database connections + 256 headroom.
    assert_eq!(
        warn[0]["fields"],
        json!({
            "message": "open files limit is below smtp.max_connections plus headroom; raise the hard limit (LimitNOFILE=) or lower smtp.max_connections",
            "open_files": 512,
            "needed": 1272,
            "max_connections": 1000,
        })
    );
}

/// How many idle connections the server must hold.
const IDLE: usize = 10_000;

#[test]
fn ten_thousand_idle_connections_do_not_exhaust_the_server() {
    // Our side needs a descriptor per connection too.
    let mut mine = nofile();
    let needed = IDLE as u64 + 1000;
    if mine.rlim_max < needed {
        // Root (as in CI) may raise the hard limit too.
        let raised = libc::rlimit {
            rlim_cur: needed,
            rlim_max: needed,
        };
        // SAFETY: setrlimit reads only `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            mine = raised;
        }
    }
    assert!(
        mine.rlim_max >= needed,
        "this test needs a hard open files limit of at least {needed} (ulimit -Hn is {}); \
         raise it (e.g. `ulimit -Hn 65536` as root, or LimitNOFILE= for the CI job)",
        mine.rlim_max
    );
    mine.rlim_cur = mine.rlim_max;
    // SAFETY: setrlimit reads only `mine`.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &mine) }, 0);

    let limit = IDLE + 100;
    let s = Setup::new(
        &format!("max_connections = {limit}\nmax_connections_per_ip = {limit}"),
        "",
    );
    // Started with the common soft default of 1024: the server must raise
    // it to the hard limit itself.
    let p = serve_with_nofile(&s.config, 1024, mine.rlim_max);
    wait_events(&p, "open files limit", 1);
    let all = events(&p);
    let info = with_message(&all, "open files limit");
    assert_eq!(
        info[0]["fields"],
        json!({"message": "open files limit", "open_files": mine.rlim_max, "was": 1024})
    );
    assert_eq!(proc_nofile(p.pid()), (mine.rlim_max, mine.rlim_max));
    let baseline = open_fds(p.pid());
    let rss_before = p.rss();

    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut c = Client::connect(&p);
        let greeting = c.reply();
        assert_eq!(
            greeting, "220 mx.example.org ESMTP letterbox\r\n",
            "connection {i}"
        );
        idle.push(c);
    }
    assert!(open_fds(p.pid()) >= baseline + IDLE);

    // One more still gets a whole transaction, reply for reply.
    let mut c = Client::connect(&p);
    c.greeting();
    c.cmd("EHLO client.example", EHLO_PLAIN);
    c.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok");
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok");
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok");
    let id = c.data("Subject: busy\r\n\r\nten thousand and one\r\n");
    assert!(!id.is_empty());
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection");
    assert_eq!(c.reply(), "", "closed after QUIT");
    assert_eq!(s.new_files("alice").len(), 1);
    assert_eq!(s.new_files("bob").len(), 1);

    let rss = p.rss();
    eprintln!(
        "letterbox RSS: {} KiB at start, {} KiB with {IDLE} idle connections",
        rss_before / 1024,
        rss / 1024,
    );
    assert!(
        rss < 256 << 20,
        "RSS {rss} bytes with {IDLE} idle connections"
    );

    // Close them all cleanly: QUIT on each, then read each 221.
    for c in &mut idle {
        c.send(b"QUIT\r\n");
    }
    for (i, c) in idle.iter_mut().enumerate() {
        assert_eq!(
            c.reply(),
            "221 2.0.0 mx.example.org closing connection\r\n",
            "connection {i}"
        );
    }
    drop(idle);
    assert!(
        events(&p).iter().all(|e| e["level"] != "WARN"),
        "{}",
        p.stderr()
    );
    // And the server lets go of every one of them.
    let deadline = Instant::now() + PATIENCE;
    while open_fds(p.pid()) > baseline + 100 {
        assert!(
            Instant::now() < deadline,
            "the server still holds {} descriptors (started with {baseline})",
            open_fds(p.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- the transaction log line ----

#[test]
fn each_transaction_logs_one_json_line_without_content_or_secrets() {
    let certs = tempfile::tempdir().unwrap();
    let files = Cert::paths(certs.path());
    let der = files.write_new();
    let password = "Tr0ub4dor&3-never-logged";
    let s = Setup::with_password("max_message_size = \"1K\"", &files.config(), Some(password));
    let p = Process::serve(&s.config);

    let secret_body = "The body text 5c1e-never-logged";
    let content = format!("Subject: log test\r\n\r\n{secret_body}\r\n");

    // Accepted, two recipients, over TLS.
    let mut c = Client::connect(&p);
    c.greeting();
    c.ehlo();
    let mut t = c.starttls(&[&der]);
    let tls = t.tls_description();
    t.ehlo();
    t.cmd("MAIL FROM:<sender@remote.example>", "250 2.1.0 Sender ok");
    t.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok");
    t.cmd("RCPT TO:<Bob@Example.ORG>", "250 2.1.5 Recipient ok");
    let id1 = t.data(&content);
    t.cmd("QUIT", "221 2.0.0 mx.example.org closing connection");

    // In plaintext: an unknown recipient beside an accepted one, then a
    // message over the size limit.
    let mut c = Client::connect(&p);
    c.greeting();
    c.cmd(
        "HELO plain.example",
        "250 mx.example.org greets plain.example",
    );
    c.cmd("MAIL FROM:<>", "250 2.1.0 Sender ok");
    c.cmd(
        "RCPT TO:<nobody@example.org>",
        "550 5.1.1 No such user here",
    );
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok");
    let id2 = c.data(&content);
    c.cmd("MAIL FROM:<big@remote.example>", "250 2.1.0 Sender ok");
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok");
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>");
    let big = format!("Subject: big\r\n\r\n{}\r\n", secret_body.repeat(40));
    c.send(big.as_bytes());
    c.send(b".\r\n");
    assert_eq!(c.reply(), "552 5.3.4 Message too big\r\n");
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection");

    let logged = wait_events(&p, "transaction", 3);
    assert_eq!(logged.len(), 3, "one line per transaction");
    let mut fields = Vec::new();
    for e in &logged {
        assert_eq!(e["level"], "INFO");
        assert_eq!(e["target"], "letterbox::smtp::data");
        let mut f = e["fields"].clone();
        let duration = f.as_object_mut().unwrap().remove("duration_ms");
        assert!(
            duration.as_ref().is_some_and(Value::is_u64),
            "duration_ms: {duration:?}"
        );
        fields.push(f);
    }
    assert_eq!(
        fields,
        vec![
            json!({
                "message": "transaction",
                "id": id1,
                "ip": "127.0.0.1",
                "helo": "client.example",
                "tls": tls,
                "from": "sender@remote.example",
                "rcpts": r#"[("alice@example.org", 250), ("Bob@Example.ORG", 250)]"#,
                "size": content.len(),
                "reply": format!("250 2.0.0 Ok: delivered as {id1}"),
            }),
            json!({
                "message": "transaction",
                "id": id2,
                "ip": "127.0.0.1",
                "helo": "plain.example",
                "tls": "no",
                "from": "",
                "rcpts": r#"[("nobody@example.org", 550), ("alice@example.org", 250)]"#,
                "size": content.len(),
                "reply": format!("250 2.0.0 Ok: delivered as {id2}"),
            }),
            json!({
                "message": "transaction",
                "id": "-",
                "ip": "127.0.0.1",
                "helo": "plain.example",
                "tls": "no",
                "from": "big@remote.example",
                "rcpts": r#"[("bob@example.org", 250)]"#,
                "size": big.len(),
                "reply": "552 5.3.4 Message too big",
            }),
        ]
    );

    let log = p.stderr();
    assert!(
        !log.contains("never-logged"),
        "content or a password in the log:\n{log}"
    );
    assert!(!log.contains("log test"), "a header in the log:\n{log}");
    assert!(
        !log.contains("argon2"),
        "a password hash in the log:\n{log}"
    );
    assert_eq!(s.new_files("alice").len(), 2);
    assert_eq!(s.new_files("bob").len(), 1);
}
