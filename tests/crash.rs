//! SIGKILL mid-stream loses nothing that got 250 and leaves nothing partial
//! in `new/`.
//!
//! The real binary serves twelve parallel sessions, each sending a stream
//! of distinct messages (a unique marker in the Subject, one to three
//! recipients, sizes from a few hundred bytes to 60 KiB, so many cross
//! `maildir.spool_memory_limit` and take the on-disk spool). Five times the
//! server is SIGKILLed at a random moment and restarted on the same root
//! and database; clients reconnect to its new port and go on with their
//! next message (never resending one whose reply was lost: it may have been
//! delivered). Afterwards:
//! - every message that got 250 is in the `new/` of each of its recipients
//!   exactly once, byte for byte, with the id of its 250;
//! - every file in any `new/` is a complete copy of a message that was sent
//!   to that mailbox (at most once), its `,S=` equal to its size;
//! - anything else is in a `tmp/` or the spool directory.

mod common;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{Process, Sections, admin, write_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SESSIONS: usize = 12;
const PER_SESSION: usize = 40;
const KILLS: usize = 5;
const USERS: usize = 4;
/// `maildir.spool_memory_limit` for the test: most messages exceed it.
const SPOOL_LIMIT: usize = 4096;
const SENDER: &str = "sender@remote.example";
/// Bound on the whole run, so a hang fails instead of stalling CI.
const DEADLINE: Duration = Duration::from_secs(120);

/// One message as sent.
struct Message {
    /// `s<session>-n<number>`, in the Subject.
    marker: String,
    /// Indexes of the users it is for.
    rcpts: Vec<usize>,
    /// Unstuffed, CRLF line endings.
    content: Vec<u8>,
}

fn user(i: usize) -> String {
    format!("u{i}@example.org")
}

/// A message with a size and recipients drawn from `rng`: about a third
/// small, a third around the spool limit, a third up to 60 KiB.
fn message(rng: &mut StdRng, session: usize, n: usize) -> Message {
    let marker = format!("s{session}-n{n}");
    let mut rcpts: Vec<usize> = (0..USERS).collect();
    for i in (1..USERS).rev() {
        rcpts.swap(i, rng.gen_range(0..=i));
    }
    rcpts.truncate(rng.gen_range(1..=3));
    let size = match rng.gen_range(0..3) {
        0 => rng.gen_range(100..1000),
        1 => rng.gen_range(SPOOL_LIMIT - 500..SPOOL_LIMIT + 500),
        _ => rng.gen_range(SPOOL_LIMIT..60 * 1024),
    };
    let mut content = format!(
        "From: <{SENDER}>\r\nSubject: crash test {marker}\r\nMessage-ID: <{marker}@remote.example>\r\n\r\n"
    )
    .into_bytes();
    while content.len() < size {
        let len = rng.gen_range(0..200);
        if rng.gen_ratio(1, 10) {
            content.push(b'.');
        }
        content.extend((0..len).map(|_| rng.gen_range(b' '..=b'~')));
        content.extend_from_slice(b"\r\n");
    }
    content.extend_from_slice(format!("end of {marker}\r\n").as_bytes());
    Message {
        marker,
        rcpts,
        content,
    }
}

/// What a transaction ended with, as far as the client knows.
enum Outcome {
    /// 250 with this id.
    Delivered(String),
    /// A complete reply other than 250: never expected here.
    Refused(String),
    /// The connection broke: the message may or may not have been delivered.
    Lost,
}

/// A blocking SMTP client, just enough for the test.
struct Smtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Smtp {
    fn connect(addr: SocketAddr) -> io::Result<Smtp> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut s = Smtp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        s.expect("", "220 mx.example.org ESMTP letterbox")?;
        s.expect("EHLO client.example\r\n", "250-mx.example.org")?;
        Ok(s)
    }

    /// One whole reply; an error at end of stream.
    fn reply(&mut self) -> io::Result<String> {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            out.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(out);
            }
        }
    }

    /// Sends `line` (unless empty) and reads the reply; an error unless it
    /// starts with `want`.
    fn expect(&mut self, line: &str, want: &str) -> io::Result<String> {
        self.writer.write_all(line.as_bytes())?;
        let r = self.reply()?;
        if r.starts_with(want) {
            Ok(r)
        } else {
            Err(io::Error::other(format!("{line:?} got {r:?}")))
        }
    }

    fn send(&mut self, m: &Message) -> Outcome {
        match self.try_send(m) {
            Ok(r) => match r
                .strip_prefix("250 2.0.0 Ok: delivered as ")
                .and_then(|id| id.strip_suffix("\r\n"))
            {
                Some(id) => Outcome::Delivered(id.to_string()),
                None => Outcome::Refused(r),
            },
            Err(_) => Outcome::Lost,
        }
    }

    fn try_send(&mut self, m: &Message) -> io::Result<String> {
        self.expect(&format!("MAIL FROM:<{SENDER}>\r\n"), "250 2.1.0")?;
        for &r in &m.rcpts {
            self.expect(&format!("RCPT TO:<{}>\r\n", user(r)), "250 2.1.5")?;
        }
        self.expect("DATA\r\n", "354 ")?;
        let mut data = Vec::with_capacity(m.content.len() + 64);
        for line in m.content.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        data.extend_from_slice(b".\r\n");
        self.writer.write_all(&data)?;
        self.reply()
    }
}

/// What the sessions and the killer share.
struct Shared {
    /// Where the current server listens.
    addr: Mutex<SocketAddr>,
    /// Messages that got 250 so far.
    delivered: AtomicUsize,
    /// Sessions that have sent all their messages.
    finished: AtomicUsize,
    start: Instant,
}

/// One session's life: every message in turn, reconnecting after the
/// server dies. Returns each message's outcome.
fn session(shared: &Shared, messages: &[Message]) -> Vec<Outcome> {
    let mut conn: Option<Smtp> = None;
    let mut outcomes = Vec::new();
    for m in messages {
        while conn.is_none() {
            assert!(
                shared.start.elapsed() < DEADLINE,
                "no server to reconnect to"
            );
            let addr = *shared.addr.lock().unwrap();
            match Smtp::connect(addr) {
                Ok(c) => conn = Some(c),
                // The server is down or restarting: poll for the new one.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let outcome = conn.as_mut().unwrap().send(m);
        match &outcome {
            Outcome::Delivered(_) => {
                shared.delivered.fetch_add(1, Ordering::SeqCst);
            }
            Outcome::Lost => conn = None,
            Outcome::Refused(_) => {}
        }
        outcomes.push(outcome);
    }
    if let Some(mut c) = conn {
        let _ = c.expect("QUIT\r\n", "221 ");
    }
    shared.finished.fetch_add(1, Ordering::SeqCst);
    outcomes
}

/// Entries of a directory, sorted; none when it does not exist.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    v.sort();
    v
}

fn name_of(p: &Path) -> &str {
    p.file_name().unwrap().to_str().unwrap()
}

/// `<secs>.M<usec>P<pid>Q<n>.mx.example.org,S=<size>`: the size, or None
/// when the name has another shape.
fn size_in_name(name: &str) -> Option<u64> {
    let (secs, rest) = name.split_once(".M")?;
    let (usec, rest) = rest.split_once('P')?;
    let (pid, rest) = rest.split_once('Q')?;
    let (q, rest) = rest.split_once('.')?;
    let size = rest.strip_prefix("mx.example.org,S=")?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (numeric(secs) && numeric(usec) && numeric(pid) && numeric(q) && numeric(size))
        .then(|| size.parse().unwrap())
}

/// Splits a stored copy into (id, date, the rest after our trace headers),
/// checking the trace headers name `mailbox`.
fn trace<'a>(file: &'a [u8], mailbox: &str, what: &str) -> (String, String, &'a [u8]) {
    let head = format!(
        "Return-Path: <{SENDER}>\nDelivered-To: {mailbox}\n\
         Received: from client.example (unknown [127.0.0.1])\n\tby mx.example.org with ESMTP id "
    );
    let rest = file
        .strip_prefix(head.as_bytes())
        .unwrap_or_else(|| panic!("{what}: trace headers: {}", String::from_utf8_lossy(file)));
    let (id, rest) = rest.split_at(16);
    let id = String::from_utf8(id.to_vec()).unwrap();
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{what}: id {id}");
    let for_line = format!("\n\tfor <{mailbox}>; ");
    let rest = rest
        .strip_prefix(for_line.as_bytes())
        .unwrap_or_else(|| panic!("{what}: Received for"));
    let end = rest.iter().position(|&b| b == b'\n').unwrap();
    let date = String::from_utf8(rest[..end].to_vec()).unwrap();
    (id, date, &rest[end + 1..])
}

#[test]
fn sigkill_mid_stream_keeps_every_acknowledged_message_whole() {
    let seed: u64 = std::env::var("LETTERBOX_TEST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test seed {seed} (set LETTERBOX_TEST_CRASH_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mail");
    let config = write_config(
        tmp.path(),
        &format!("sqlite://{}", tmp.path().join("letterbox.db").display()),
        &Sections {
            smtp: &format!("max_connections_per_ip = {}", SESSIONS * 4),
            maildir: &format!("spool_memory_limit = \"{SPOOL_LIMIT}\""),
            log: "level = \"warn\"",
            ..Sections::default()
        },
    );
    admin(&config, &["domain", "add", "example.org"]);
    for i in 0..USERS {
        admin(&config, &["user", "add", &user(i)]);
    }

    let plan: Vec<Vec<Message>> = (0..SESSIONS)
        .map(|s| (0..PER_SESSION).map(|n| message(&mut rng, s, n)).collect())
        .collect();
    let total = SESSIONS * PER_SESSION;

    let mut server = Process::serve(&config);
    let shared = Arc::new(Shared {
        addr: Mutex::new(server.smtp),
        delivered: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        start: Instant::now(),
    });
    let outcomes: Vec<Vec<Outcome>> = std::thread::scope(|scope| {
        let sessions: Vec<_> = plan
            .iter()
            .map(|msgs| {
                let shared = &shared;
                scope.spawn(move || session(shared, msgs))
            })
            .collect();
        // Kill after each seventh of the messages got 250, plus a random
        // few milliseconds, so kills land at varied points of transactions.
        for k in 1..=KILLS {
            let target = total * k / (KILLS + 2);
            while shared.delivered.load(Ordering::SeqCst) < target {
                assert!(
                    shared.finished.load(Ordering::SeqCst) < SESSIONS,
                    "the sessions finished before kill {k}"
                );
                assert!(
                    shared.start.elapsed() < DEADLINE,
                    "too slow before kill {k}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
            assert!(
                shared.finished.load(Ordering::SeqCst) < SESSIONS,
                "the sessions finished before kill {k}"
            );
            server.signal(libc::SIGKILL);
            server.wait_exit(Duration::from_secs(10));
            server = Process::serve(&config);
            *shared.addr.lock().unwrap() = server.smtp;
        }
        sessions.into_iter().map(|s| s.join().unwrap()).collect()
    });
    drop(server);

    // What the clients know: the id of each message that got 250.
    let mut by_marker: HashMap<&str, &Message> = HashMap::new();
    let mut acked: HashMap<&str, String> = HashMap::new();
    let (mut lost, mut on_disk_spool) = (0, 0);
    for (msgs, outs) in plan.iter().zip(&outcomes) {
        for (m, o) in msgs.iter().zip(outs) {
            by_marker.insert(&m.marker, m);
            match o {
                Outcome::Delivered(id) => {
                    acked.insert(&m.marker, id.clone());
                    if m.content.len() > SPOOL_LIMIT {
                        on_disk_spool += 1;
                    }
                }
                Outcome::Refused(r) => panic!("{} was refused: {r}", m.marker),
                Outcome::Lost => lost += 1,
            }
        }
    }
    eprintln!(
        "{} of {total} messages got 250, {lost} lost their reply in {KILLS} kills",
        acked.len()
    );
    assert_eq!(acked.len() + lost, total);
    assert!(
        on_disk_spool > 0,
        "no acknowledged message used the disk spool"
    );

    // What the disk holds. The root has the outbound queue and spool dirs
    // and the domain; the domain only the users' maildirs; a maildir only
    // tmp/, new/ and cur/.
    assert_eq!(
        entries(&root),
        vec![
            root.join(".letterbox-queue"),
            root.join(".letterbox-spool"),
            root.join("example.org")
        ]
    );
    let mut found: HashMap<(&str, usize), PathBuf> = HashMap::new();
    for (i, mb) in entries(&root.join("example.org")).iter().enumerate() {
        assert_eq!(mb, &root.join(format!("example.org/u{i}")));
        let mailbox = user(i);
        assert_eq!(
            entries(mb),
            vec![mb.join("cur"), mb.join("new"), mb.join("tmp")]
        );
        assert_eq!(entries(&mb.join("cur")), Vec::<PathBuf>::new());
        for file in entries(&mb.join("new")) {
            let what = file.display().to_string();
            let content = std::fs::read(&file).unwrap();
            assert_eq!(
                size_in_name(name_of(&file)),
                Some(content.len() as u64),
                "{what}: name and size"
            );
            let (id, date, body) = trace(&content, &mailbox, &what);
            chrono::NaiveDateTime::parse_from_str(&date, "%a, %d %b %Y %H:%M:%S +0000")
                .unwrap_or_else(|e| panic!("{what}: date {date:?}: {e}"));
            let marker = body
                .split(|&b| b == b'\n')
                .find_map(|l| l.strip_prefix(b"Subject: crash test "))
                .unwrap_or_else(|| panic!("{what}: no marker"));
            let marker = std::str::from_utf8(marker).unwrap();
            let m = by_marker
                .get(marker)
                .unwrap_or_else(|| panic!("{what}: unknown message {marker}"));
            assert!(
                m.rcpts.contains(&i),
                "{what}: {marker} was not for {mailbox}"
            );
            let lf: Vec<u8> = String::from_utf8(m.content.clone())
                .unwrap()
                .replace("\r\n", "\n")
                .into_bytes();
            assert!(body == lf, "{what}: {marker} is not what was sent");
            if let Some(want) = acked.get(marker) {
                assert_eq!(&id, want, "{what}: {marker} has another transaction's id");
            }
            if let Some(first) = found.insert((m.marker.as_str(), i), file.clone()) {
                panic!(
                    "{marker} is twice in {mailbox}: {} and {what}",
                    first.display()
                );
            }
        }
    }
    let unacked = found.keys().filter(|(m, _)| !acked.contains_key(m)).count();
    let staged: usize = (0..USERS)
        .map(|i| entries(&root.join(format!("example.org/u{i}/tmp"))).len())
        .sum();
    eprintln!("{unacked} copies delivered without a 250 seen, {staged} files left in tmp/");
    for marker in acked.keys() {
        for &i in &by_marker[marker].rcpts {
            assert!(
                found.contains_key(&(*marker, i)),
                "{marker} got 250 but is not in {}",
                user(i)
            );
        }
    }
}
