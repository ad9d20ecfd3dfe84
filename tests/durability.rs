//! The fsyncs happen before the 250, proved from the system calls.
//!
//! strace attaches to the real `letterbox serve` (all its threads, `-f`)
//! with `-tt -e trace=openat,fdatasync,fsync,linkat,link,write,sendto,
//! unlink,unlinkat`, and the test delivers two messages, each to two
//! mailboxes. For each copy the trace must show, in this order:
//! 1. its file in `tmp/` opened with O_CREAT|O_EXCL, mode 0600;
//! 2. fdatasync on that file's descriptor;
//! 3. the link from `tmp/` into `new/` (every copy of the message staged
//!    and synced before the first link: all or nothing);
//! 4. `new/` opened and fsynced, the fsync starting after the link ended;
//!
//! then the reply `250 2.0.0` written to the client's socket, starting after
//! all of that ended; and the `tmp/` name removed only after `new/` was
//! fsynced. Threads interleave (a call may be split into `<unfinished ...>`
//! and `<... resumed>` lines) and descriptor numbers are reused, so each
//! call keeps the line where it started and the line where it ended, and a
//! descriptor means the file of the latest `openat` that returned it.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{Process, Sections, admin, write_config};
use common::server::Client;

/// One system call in the trace.
#[derive(Debug)]
struct Call {
    name: String,
    /// The argument list as strace printed it, without the parentheses.
    args: String,
    ret: i64,
    /// Lines of the trace where the call started and where it returned.
    start: usize,
    end: usize,
}

impl Call {
    /// The `n`th quoted string among the arguments, unescaped only as far
    /// as `\"` and `\\` (paths here hold nothing else). strace shows at most
    /// 32 bytes of data buffers; paths are shown whole.
    fn string(&self, n: usize) -> Option<String> {
        let mut strings = Vec::new();
        let mut chars = self.args.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut s = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => s.push(chars.next()?),
                    '"' => break,
                    c => s.push(c),
                }
            }
            strings.push(s);
        }
        strings.into_iter().nth(n)
    }

    /// The first argument as a descriptor.
    fn fd(&self) -> i64 {
        self.args.split(',').next().unwrap().trim().parse().unwrap()
    }
}

/// The calls of a `strace -f -tt` trace, in the order they returned.
fn parse(trace: &str) -> Vec<Call> {
    // Per thread: a call that was interrupted by another thread's line.
    let mut pending: HashMap<&str, (String, String, usize)> = HashMap::new();
    let mut calls = Vec::new();
    for (i, line) in trace.lines().enumerate() {
        // "<tid> <time> <call>"
        let (tid, rest) = line.split_once(' ').unwrap();
        let (_time, call) = rest.trim_start().split_once(' ').unwrap();
        let (name, text, start) = if let Some(resumed) = call.strip_prefix("<... ") {
            let (name, tail) = resumed.split_once(" resumed>").unwrap();
            // A call already under way when strace attached has no start.
            let Some((pname, head, start)) = pending.remove(tid) else {
                continue;
            };
            assert_eq!(pname, name, "line {i}: {line}");
            (pname, format!("{head}{tail}"), start)
        } else if call.starts_with("+++") || call.starts_with("---") {
            continue; // exits and signals
        } else {
            let (name, text) = call.split_once('(').unwrap();
            if let Some(head) = text.strip_suffix(" <unfinished ...>") {
                pending.insert(tid, (name.to_string(), head.to_string(), i));
                continue;
            }
            (name.to_string(), text.to_string(), i)
        };
        // "<args>)<padding> = <ret>[ <errno text>]". A call that never
        // returned ("= ?", "<detached ...>") has no place in the order.
        let Some((args, ret)) = text
            .rsplit_once(" = ")
            .and_then(|(a, r)| Some((a.trim_end().strip_suffix(')')?, r)))
        else {
            continue;
        };
        let Ok(ret) = ret.split(' ').next().unwrap().parse() else {
            continue;
        };
        calls.push(Call {
            name,
            args: args.to_string(),
            ret,
            start,
            end: i,
        });
    }
    calls
}

/// The path behind `call`'s descriptor: the latest openat that returned
/// it before the call started.
fn file_of(calls: &[Call], call: &Call) -> Option<String> {
    calls
        .iter()
        .filter(|c| c.name == "openat" && c.ret == call.fd() && c.end < call.start)
        .max_by_key(|c| c.end)
        .and_then(|c| c.string(0))
}

/// strace attached to `pid`, writing to `out`. Returns once every thread
/// is attached.
fn strace(pid: i32, out: &Path) -> Child {
    let mut child = Command::new("strace")
        .args(["-f", "-tt", "-e"])
        .arg("trace=openat,fdatasync,fsync,linkat,link,write,sendto,unlink,unlinkat")
        .arg("-o")
        .arg(out)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("strace (Debian package strace) is needed for this test; see README, Prerequisites: {e}")
        });
    // "strace: Process <pid> attached with <n> threads", or without the
    // threads part; anything else first is an error such as EPERM.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Drains stderr for strace's whole life: with -f it reports every
        // new thread there, and a closed pipe would kill it (SIGPIPE).
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let attached = format!("strace: Process {pid} attached");
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) if line.starts_with(&attached) => child,
        Ok(line) => panic!("strace could not attach: {line}"),
        Err(e) => panic!("strace did not attach within 30 s: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsyncs_happen_before_the_250() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mail");
    let config = write_config(
        tmp.path(),
        &format!("sqlite://{}", tmp.path().join("letterbox.db").display()),
        &Sections::default(),
    );
    admin(&config, &["domain", "add", "example.org"]);
    admin(&config, &["user", "add", "alice@example.org"]);
    admin(&config, &["user", "add", "bob@example.org"]);
    let server = Process::serve(&config);
    let trace_file = tmp.path().join("trace");
    let mut tracer = strace(server.pid(), &trace_file);

    // Two messages: the first also creates the maildirs, the second takes
    // the steady path.
    let mut smtp = Client::new(tokio::net::TcpStream::connect(server.smtp).await.unwrap());
    smtp.greeting().await;
    let mut replies = Vec::new();
    for n in 0..2 {
        let body = format!("Subject: durable {n}\r\n\r\nkeep me\r\n");
        replies.push(
            smtp.send_mail(
                "sender@remote.example",
                &["alice@example.org", "bob@example.org"],
                &body,
            )
            .await,
        );
    }
    smtp.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;
    for r in &replies {
        assert!(r.starts_with("250 2.0.0 Ok: delivered as "), "{r:?}");
    }

    // SIGTERM makes strace detach and flush the trace.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tracer.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "strace did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let trace = std::fs::read_to_string(&trace_file).unwrap();
    check_order(&trace, &root, &replies);
}

/// The assertions of [`fsyncs_happen_before_the_250`] on the trace of two
/// messages to alice and bob, whose replies were `replies`.
fn check_order(trace: &str, root: &Path, replies: &[String]) {
    let calls = parse(trace);

    // The replies to the end of DATA, in the order they were written.
    let acks: Vec<&Call> = calls
        .iter()
        .filter(|c| {
            (c.name == "write" || c.name == "sendto")
                && c.string(0).is_some_and(|s| s.starts_with("250 2.0.0 "))
        })
        .collect();
    assert_eq!(acks.len(), 2, "{trace}");
    let mut after = 0;
    for (ack, reply) in acks.iter().zip(replies) {
        // strace shows the first 32 bytes of what was written.
        let shown = ack.string(0).unwrap();
        assert!(reply.starts_with(&shown), "{shown:?} is not {reply:?}");
        let this_message = |c: &&Call| c.start > after && c.start < ack.start;
        let mut synced = Vec::new();
        let mut linked = Vec::new();
        for mailbox in ["alice", "bob"] {
            let mb = root.join("example.org").join(mailbox);
            let (tmp_dir, new_dir) = (mb.join("tmp"), mb.join("new"));
            let what = |step: &str| format!("{mailbox}, message {ack:?}: {step}\n{trace}");

            let opens: Vec<&Call> = calls
                .iter()
                .filter(this_message)
                .filter(|c| c.name == "openat" && c.ret >= 0)
                .filter(|c| {
                    c.string(0)
                        .is_some_and(|p| Path::new(&p).parent() == Some(&tmp_dir))
                })
                .collect();
            assert_eq!(opens.len(), 1, "{}", what("one file opened in tmp/"));
            let open = opens[0];
            let tmp_path = open.string(0).unwrap();
            assert!(
                open.args.contains("O_CREAT") && open.args.contains("O_EXCL"),
                "{}",
                what("O_CREAT|O_EXCL")
            );
            assert!(open.args.ends_with(", 0600"), "{}", what("mode 0600"));

            let sync = calls
                .iter()
                .find(|c| {
                    c.name == "fdatasync"
                        && c.ret == 0
                        && file_of(&calls, c).as_deref() == Some(&tmp_path)
                })
                .unwrap_or_else(|| panic!("{}", what("fdatasync of the tmp file")));

            let links: Vec<&Call> = calls
                .iter()
                .filter(|c| {
                    (c.name == "linkat" || c.name == "link")
                        && c.string(0).as_deref() == Some(&tmp_path)
                })
                .collect();
            assert_eq!(links.len(), 1, "{}", what("one link"));
            let link = links[0];
            assert_eq!(link.ret, 0, "{}", what("the link succeeded"));
            let new_path = link.string(1).unwrap();
            assert_eq!(
                Path::new(&new_path).parent(),
                Some(new_dir.as_path()),
                "{}",
                what("linked into new/")
            );
            assert!(Path::new(&new_path).is_file(), "{}", what("still in new/"));
            assert!(sync.end < link.start, "{}", what("fdatasync before link"));

            let new_dir = new_dir.to_str().unwrap();
            let dir_sync = calls
                .iter()
                .filter(|c| c.name == "fsync" && c.ret == 0 && c.start > link.end)
                .find(|c| file_of(&calls, c).as_deref() == Some(new_dir))
                .unwrap_or_else(|| panic!("{}", what("fsync of new/ after the link")));
            assert!(
                dir_sync.end < ack.start,
                "{}",
                what("new/ fsynced before 250")
            );

            let unlink = calls
                .iter()
                .find(|c| {
                    (c.name == "unlink" || c.name == "unlinkat")
                        && c.string(0).as_deref() == Some(&tmp_path)
                })
                .unwrap_or_else(|| panic!("{}", what("tmp name removed")));
            assert_eq!(unlink.ret, 0, "{}", what("tmp name removed"));
            assert!(
                unlink.start > dir_sync.end,
                "{}",
                what("tmp name kept until new/ was fsynced")
            );
            synced.push(sync.end);
            linked.push(link.start);
        }
        assert!(
            synced.iter().max() < linked.iter().min(),
            "every copy synced before the first link\n{trace}"
        );
        after = ack.end;
    }
}
