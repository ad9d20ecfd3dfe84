//! Durable maildir delivery through the public API, asserting exact bytes
//! on disk, and the quota replies over SMTP. The disk-full test mounts a
//! tmpfs and so needs root.

mod common;

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::slice::from_ref;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use letterbox::address::Address;
use letterbox::config::MaildirConfig;
use letterbox::delivery::{DeliveryError, Maildirs};
use letterbox::directory::{Mailbox, Route};
use letterbox::envelope::{Envelope, Received, Recipient};
use letterbox::spool::Spool;
use letterbox::units::ByteSize;

const DATE: &str = "Sun, 22 Nov 2026 12:00:00 +0000";

fn config(root: &Path) -> MaildirConfig {
    MaildirConfig {
        root: root.to_path_buf(),
        spool_memory_limit: ByteSize(1 << 20),
        subaddress_folders: false,
    }
}

fn mailbox(local: &str, domain: &str) -> Mailbox {
    Mailbox {
        address: Address {
            local: local.into(),
            domain: domain.into(),
        },
        quota: 0,
        tag: None,
        original: None,
    }
}

/// An envelope whose recipients are `(address as given, mailboxes reached)`.
fn envelope(sender: &str, rcpts: &[(&str, &[Mailbox])]) -> Envelope {
    Envelope {
        id: "00000000deadbeef".into(),
        sender: sender.into(),
        recipients: rcpts
            .iter()
            .map(|(a, ms)| Recipient {
                address: (*a).into(),
                route: Arc::new(Route::Mailboxes(ms.to_vec())),
            })
            .collect(),
        received: Received {
            helo: "client.example".into(),
            rdns: None,
            ip: "192.0.2.1".parse().unwrap(),
            by: "mx.example.org".into(),
            with: "ESMTP".into(),
            tls: None,
            date: DATE.into(),
        },
        headers: String::new(),
        quarantine: false,
    }
}

fn memory_spool(content: &[u8]) -> Arc<Spool> {
    let mut s = Spool::new(usize::MAX, None);
    s.write(content).unwrap();
    Arc::new(s)
}

/// The stored file for `rcpt` reaching `delivered_to`, body already LF.
fn expected(
    sender: &str,
    delivered_to: &str,
    original: Option<&str>,
    rcpt: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut s = format!("Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n");
    if let Some(o) = original {
        s += &format!("X-Original-To: {o}\n");
    }
    s += &format!(
        "Received: from client.example (unknown [192.0.2.1])\n\tby mx.example.org with ESMTP id 00000000deadbeef\n\tfor <{rcpt}>; {DATE}\n"
    );
    let mut v = s.into_bytes();
    v.extend_from_slice(body);
    v
}

fn files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every file in any new/ or tmp/ of any maildir (and folder) under root.
fn all_mail(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for domain in files(root)
        .into_iter()
        .filter(|p| p.is_dir() && !p.file_name().unwrap().as_bytes().starts_with(b"."))
    {
        for mb in files(&domain).into_iter().filter(|p| p.is_dir()) {
            let mut maildirs = vec![mb.clone()];
            maildirs.extend(
                files(&mb)
                    .into_iter()
                    .filter(|p| p.is_dir() && p.file_name().unwrap().as_bytes().starts_with(b".")),
            );
            for m in maildirs {
                for sub in ["tmp", "new", "cur"] {
                    out.extend(files(&m.join(sub)));
                }
            }
        }
    }
    out
}

const BODY_CRLF: &[u8] = b"Subject: hi\r\n\r\nline one\r\nlone\rcr and bare\nlf\r\n";
const BODY_LF: &[u8] = b"Subject: hi\n\nline one\nlone\rcr and bare\nlf\n";

#[tokio::test]
async fn a_delivered_file_has_exact_bytes_modes_and_size() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mail");
    let md = Maildirs::new(&config(&root), "mx/1:a").unwrap();
    assert_eq!(mode(&root), 0o700);
    assert_eq!(md.spool_dir(), root.join(".letterbox-spool"));
    assert_eq!(mode(&md.spool_dir()), 0o700);

    let alice = mailbox("alice", "example.org");
    let env = envelope(
        "bob@sender.example",
        &[("alice@example.org", from_ref(&alice))],
    );
    let d = md
        .deliver(&env, memory_spool(BODY_CRLF), &[alice])
        .await
        .unwrap();

    let mb = root.join("example.org/alice");
    assert_eq!(d.paths.len(), 1);
    let path = &d.paths[0];
    assert_eq!(path.parent().unwrap(), mb.join("new"));
    let want = expected(
        "bob@sender.example",
        "alice@example.org",
        None,
        "alice@example.org",
        BODY_LF,
    );
    assert_eq!(std::fs::read(path).unwrap(), want);
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(
        name.ends_with(&format!(".mx\\0571\\072a,S={}", want.len())),
        "{name}"
    );
    assert_eq!(files(&mb.join("new")), vec![path.clone()]);
    assert!(files(&mb.join("tmp")).is_empty());
    assert!(files(&mb.join("cur")).is_empty());
    for d in [
        root.join("example.org"),
        mb.clone(),
        mb.join("tmp"),
        mb.join("new"),
        mb.join("cur"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    assert_eq!(mode(path), 0o600);
    assert!(!mb.join("maildirsize").exists(), "no quota, no maildirsize");
}

#[tokio::test]
async fn the_null_sender_and_an_alias_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let md = Maildirs::new(&config(tmp.path()), "mx").unwrap();
    let mut alice = mailbox("alice", "example.org");
    alice.original = Some("team@example.org".into());
    let env = envelope("", &[("team@example.org", from_ref(&alice))]);
    let d = md
        .deliver(&env, memory_spool(BODY_CRLF), &[alice])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&d.paths[0]).unwrap(),
        expected(
            "",
            "alice@example.org",
            Some("team@example.org"),
            "team@example.org",
            BODY_LF
        )
    );
}

#[tokio::test]
async fn a_mailbox_whose_path_is_a_file_fails_the_whole_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let md = Maildirs::new(&config(root), "mx").unwrap();
    let (alice, bob) = (
        mailbox("alice", "example.org"),
        mailbox("bob", "example.org"),
    );
    std::fs::create_dir_all(root.join("example.org")).unwrap();
    std::fs::write(root.join("example.org/bob"), "not a maildir").unwrap();
    let env = envelope(
        "s@x.example",
        &[
            ("alice@example.org", from_ref(&alice)),
            ("bob@example.org", from_ref(&bob)),
        ],
    );
    let err = md
        .deliver(&env, memory_spool(BODY_CRLF), &[alice, bob])
        .await
        .unwrap_err();
    match err {
        DeliveryError::Io { path, .. } => assert!(
            path.starts_with(root.join("example.org/bob")),
            "{}",
            path.display()
        ),
        e => panic!("{e:?}"),
    }
    assert_eq!(all_mail(root), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn a_link_failing_after_others_were_made_removes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let md = Maildirs::new(&config(root), "mx").unwrap();
    let (alice, bob) = (
        mailbox("alice", "example.org"),
        mailbox("bob", "example.org"),
    );
    let env = envelope(
        "s@x.example",
        &[
            ("alice@example.org", from_ref(&alice)),
            ("bob@example.org", from_ref(&bob)),
        ],
    );
    // Both maildirs exist and are remembered; then bob's new/ turns into a
    // file, so staging succeeds for both and linking fails for bob, after
    // alice's link was made.
    md.deliver(
        &env,
        memory_spool(b"first\r\n"),
        &[alice.clone(), bob.clone()],
    )
    .await
    .unwrap();
    let before = all_mail(root);
    assert_eq!(before.len(), 2);
    let bob_new = root.join("example.org/bob/new");
    for f in files(&bob_new) {
        std::fs::remove_file(f).unwrap();
    }
    std::fs::remove_dir(&bob_new).unwrap();
    std::fs::write(&bob_new, "").unwrap();
    let err = md
        .deliver(&env, memory_spool(b"second\r\n"), &[alice, bob])
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::Io { .. }), "{err:?}");
    let alice_new = files(&root.join("example.org/alice/new"));
    assert_eq!(alice_new.len(), 1);
    assert!(
        std::fs::read(&alice_new[0])
            .unwrap()
            .ends_with(b"\nfirst\n")
    );
    assert!(files(&root.join("example.org/alice/tmp")).is_empty());
    assert!(files(&root.join("example.org/bob/tmp")).is_empty());
}

#[tokio::test]
async fn unsafe_paths_and_a_missing_root_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mail");
    let md = Maildirs::new(&config(&root), "mx").unwrap();
    for (local, domain) in [
        ("..", "example.org"),
        ("alice", ".."),
        (".x", "example.org"),
        ("a/b", "example.org"),
        ("", "example.org"),
    ] {
        let m = mailbox(local, domain);
        let env = envelope("s@x.example", &[]);
        let err = md
            .deliver(&env, memory_spool(b"x\r\n"), &[m])
            .await
            .unwrap_err();
        assert!(
            matches!(err, DeliveryError::Io { .. }),
            "{local:?}@{domain:?}: {err:?}"
        );
    }
    assert_eq!(files(&root), vec![root.join(".letterbox-spool")]);

    std::fs::remove_dir_all(&root).unwrap();
    let alice = mailbox("alice", "example.org");
    let err = md
        .deliver(&envelope("", &[]), memory_spool(b"x\r\n"), &[alice])
        .await
        .unwrap_err();
    match &err {
        DeliveryError::Io { path, source } => {
            assert_eq!(path, &root.join("example.org"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        e => panic!("{e:?}"),
    }
    assert!(
        err.to_string().contains(&root.display().to_string()),
        "{err}"
    );
    assert!(!root.exists(), "delivery never recreates a missing root");
}

#[tokio::test]
async fn a_tag_selects_a_maildir_plus_plus_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut cfg = config(root);
    cfg.subaddress_folders = true;
    let md = Maildirs::new(&cfg, "mx").unwrap();
    let mut alice = mailbox("alice", "example.org");
    alice.tag = Some("Lists".into());
    let env = envelope(
        "s@x.example",
        &[("alice+lists@example.org", from_ref(&alice))],
    );
    let d = md
        .deliver(&env, memory_spool(BODY_CRLF), from_ref(&alice))
        .await
        .unwrap();
    let mb = root.join("example.org/alice");
    assert_eq!(d.paths[0].parent().unwrap(), mb.join(".lists/new"));
    assert_eq!(
        std::fs::read(&d.paths[0]).unwrap(),
        expected(
            "s@x.example",
            "alice@example.org",
            None,
            "alice+lists@example.org",
            BODY_LF
        )
    );
    let marker = mb.join(".lists/maildirfolder");
    assert_eq!(std::fs::read(&marker).unwrap(), b"");
    assert_eq!(mode(&marker), 0o600);
    for d in [
        mb.join(".lists"),
        mb.join(".lists/tmp"),
        mb.join(".lists/cur"),
        mb.join("tmp"),
        mb.join("new"),
        mb.join("cur"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    assert!(files(&mb.join("new")).is_empty());

    // An unsafe tag goes to the INBOX, as does every tag with folders off.
    alice.tag = Some("../evil".into());
    let d = md
        .deliver(&env, memory_spool(BODY_CRLF), from_ref(&alice))
        .await
        .unwrap();
    assert_eq!(d.paths[0].parent().unwrap(), mb.join("new"));
    let off = Maildirs::new(&config(root), "mx").unwrap();
    alice.tag = Some("lists".into());
    let d = off
        .deliver(&env, memory_spool(BODY_CRLF), &[alice])
        .await
        .unwrap();
    assert_eq!(d.paths[0].parent().unwrap(), mb.join("new"));
}

#[tokio::test]
async fn an_on_disk_spool_is_delivered_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let md = Maildirs::new(&config(root), "mx").unwrap();
    // 300 KiB of lines of every byte value except CR and LF, plus CRLFs
    // straddling the 64 KiB copy chunks and a few lone CRs.
    let mut content = Vec::new();
    let mut want = Vec::new();
    let line: Vec<u8> = (0u8..=255).filter(|b| *b != b'\r' && *b != b'\n').collect();
    let mut i = 0;
    while content.len() < 300 * 1024 {
        content.extend_from_slice(&line[..(i * 7) % line.len()]);
        want.extend_from_slice(&line[..(i * 7) % line.len()]);
        if i % 5 == 0 {
            content.push(b'\r');
            want.push(b'\r');
            content.push(b'x');
            want.push(b'x');
        }
        content.extend_from_slice(b"\r\n");
        want.push(b'\n');
        i += 1;
    }
    let mut spool = Spool::new(4096, Some(md.spool_dir()));
    // The test itself writes the spool file; the server never does so on
    // the runtime.
    letterbox::blocking::allowed(|| {
        for chunk in content.chunks(1000) {
            spool.write(chunk).unwrap();
        }
    });
    assert!(spool.on_disk());
    let alice = mailbox("alice", "example.org");
    let env = envelope("s@x.example", &[("alice@example.org", from_ref(&alice))]);
    let d = md.deliver(&env, Arc::new(spool), &[alice]).await.unwrap();
    let got = std::fs::read(&d.paths[0]).unwrap();
    assert_eq!(
        got,
        expected(
            "s@x.example",
            "alice@example.org",
            None,
            "alice@example.org",
            &want
        )
    );
    assert!(
        d.paths[0]
            .to_str()
            .unwrap()
            .ends_with(&format!(",S={}", got.len()))
    );
}

#[tokio::test]
async fn over_quota_delivers_nothing_and_maildirsize_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let md = Maildirs::new(&config(root), "mx").unwrap();
    let bob = mailbox("bob", "example.org");
    let mut alice = mailbox("alice", "example.org");
    let env = envelope(
        "s@x.example",
        &[
            ("alice@example.org", from_ref(&alice)),
            ("bob@example.org", from_ref(&bob)),
        ],
    );
    let size = expected(
        "s@x.example",
        "alice@example.org",
        None,
        "alice@example.org",
        BODY_LF,
    )
    .len() as u64;
    alice.quota = 2 * size + size / 2;
    let mb = root.join("example.org/alice");

    assert!(
        !md.is_over_quota(&alice).await.unwrap(),
        "a mailbox not made yet is empty"
    );
    assert!(
        !md.is_over_quota(&bob).await.unwrap(),
        "quota 0 is unlimited"
    );
    for _ in 0..2 {
        md.deliver(&env, memory_spool(BODY_CRLF), &[alice.clone(), bob.clone()])
            .await
            .unwrap();
    }
    let q = alice.quota;
    assert_eq!(
        std::fs::read_to_string(mb.join("maildirsize")).unwrap(),
        format!("{q}S\n0 0\n{size} 1\n{size} 1\n")
    );
    assert!(!md.is_over_quota(&alice).await.unwrap());

    let err = md
        .deliver(&env, memory_spool(BODY_CRLF), &[bob.clone(), alice.clone()])
        .await
        .unwrap_err();
    match err {
        DeliveryError::QuotaExceeded { mailbox } => assert_eq!(mailbox, "alice@example.org"),
        e => panic!("{e:?}"),
    }
    assert_eq!(files(&mb.join("new")).len(), 2);
    assert_eq!(
        files(&root.join("example.org/bob/new")).len(),
        2,
        "bob got nothing either"
    );
    assert!(files(&mb.join("tmp")).is_empty());
    assert!(files(&root.join("example.org/bob/tmp")).is_empty());

    // Exactly full is over for RCPT; a quota change recounts from the names.
    alice.quota = 2 * size;
    assert!(md.is_over_quota(&alice).await.unwrap());
    assert_eq!(
        std::fs::read_to_string(mb.join("maildirsize")).unwrap(),
        format!("{}S\n{} 2\n", 2 * size, 2 * size)
    );
}

#[tokio::test]
async fn a_maildirsize_written_by_dovecot_is_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let md = Maildirs::new(&config(root), "mx").unwrap();
    let mut alice = mailbox("alice", "example.org");
    alice.quota = 10_000;
    let mb = root.join("example.org/alice");
    for d in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(mb.join(d)).unwrap();
    }
    // Dovecot's deltas, including an expunge; the maildir itself is empty.
    std::fs::write(mb.join("maildirsize"), "10000S\n9000 3\n-500 -1\n1400 1\n").unwrap();
    assert!(!md.is_over_quota(&alice).await.unwrap());
    let env = envelope("", &[("alice@example.org", from_ref(&alice))]);
    let err = md
        .deliver(&env, memory_spool(BODY_CRLF), from_ref(&alice))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeliveryError::QuotaExceeded { .. }),
        "{err:?}"
    );
    std::fs::write(mb.join("maildirsize"), "10000S\n10000 3\n").unwrap();
    assert!(md.is_over_quota(&alice).await.unwrap());
    assert!(files(&mb.join("new")).is_empty() && files(&mb.join("tmp")).is_empty());
}

#[tokio::test]
async fn clean_tmp_removes_only_files_older_than_36_hours() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut cfg = config(root);
    cfg.subaddress_folders = true;
    let md = Maildirs::new(&cfg, "mx").unwrap();
    let mut alice = mailbox("alice", "example.org");
    alice.tag = Some("lists".into());
    md.deliver(&envelope("", &[]), memory_spool(b"x\r\n"), &[alice])
        .await
        .unwrap();
    let mb = root.join("example.org/alice");
    let now = SystemTime::now();
    let age = |h: u64| now - Duration::from_secs(h * 3600);
    let put = |p: PathBuf, mtime: SystemTime| {
        std::fs::File::create(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        p
    };
    let old_inbox = put(mb.join("tmp/old"), age(37));
    let old_folder = put(mb.join(".lists/tmp/old"), age(40));
    let young = put(mb.join("tmp/young"), age(35));
    let old_new = put(mb.join("new/old-but-delivered"), age(100));
    let old_spool = put(md.spool_dir().join("old"), age(100));

    assert_eq!(md.clean_tmp().unwrap(), 2);
    assert!(!old_inbox.exists() && !old_folder.exists());
    assert!(young.exists() && old_new.exists() && old_spool.exists());
    assert_eq!(md.clean_tmp().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_parallel_deliveries_all_land_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let md = Maildirs::new(&config(&root), "mx").unwrap();
    let (alice, bob) = (
        mailbox("alice", "example.org"),
        mailbox("bob", "example.org"),
    );
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (md, alice, bob) = (md.clone(), alice.clone(), bob.clone());
        tasks.push(tokio::spawn(async move {
            let env = envelope(
                "s@x.example",
                &[
                    ("alice@example.org", from_ref(&alice)),
                    ("bob@example.org", from_ref(&bob)),
                ],
            );
            let body = format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(i * 100));
            let d = md
                .deliver(&env, memory_spool(body.as_bytes()), &[alice, bob])
                .await
                .unwrap();
            (i, d.paths)
        }));
    }
    let mut names = HashSet::new();
    for t in tasks {
        let (i, paths) = t.await.unwrap();
        let body = format!("Subject: {i}\n\n{}\n", "x".repeat(i * 100));
        for (p, who) in paths.iter().zip(["alice", "bob"]) {
            let addr = format!("{who}@example.org");
            assert_eq!(
                std::fs::read(p).unwrap(),
                expected("s@x.example", &addr, None, &addr, body.as_bytes())
            );
            assert!(
                names.insert(p.file_name().unwrap().to_owned()),
                "name reused: {}",
                p.display()
            );
        }
    }
    assert_eq!(files(&root.join("example.org/alice/new")).len(), 50);
    assert_eq!(files(&root.join("example.org/bob/new")).len(), 50);
    assert!(files(&root.join("example.org/alice/tmp")).is_empty());
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let c = |s: &[u8]| CString::new(s).unwrap();
        let target = c(at.as_os_str().as_bytes());
        let opts = c(format!("size={size},mode=0700").as_bytes());
        let rc = unsafe {
            libc::mount(
                c(b"tmpfs").as_ptr(),
                target.as_ptr(),
                c(b"tmpfs").as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a tmpfs at {} failed: {} — this test needs root (CAP_SYS_ADMIN) to simulate a full disk",
            at.display(),
            std::io::Error::last_os_error()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "umount {}: {}",
                self.0.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

#[tokio::test]
async fn a_full_disk_fails_cleanly_and_keeps_earlier_mail() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _fs = Tmpfs::mount(&mnt, "1m");
    let root = mnt.join("mail");
    let md = Maildirs::new(&config(&root), "mx").unwrap();
    let (alice, bob) = (
        mailbox("alice", "example.org"),
        mailbox("bob", "example.org"),
    );
    let env = envelope(
        "s@x.example",
        &[
            ("alice@example.org", from_ref(&alice)),
            ("bob@example.org", from_ref(&bob)),
        ],
    );

    let mut delivered = Vec::new();
    let err = loop {
        let n = delivered.len();
        let body = format!("Subject: {n}\r\n\r\n{}\r\n", format!("{n:>9}").repeat(2000));
        match md
            .deliver(
                &env,
                memory_spool(body.as_bytes()),
                &[alice.clone(), bob.clone()],
            )
            .await
        {
            Ok(d) => delivered.push((n, d.paths)),
            Err(e) => break e,
        }
        assert!(n < 100, "a 1 MiB tmpfs never filled up");
    };
    match &err {
        DeliveryError::Io { source, path } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{err}");
            // A copy is 5 pages and 1 MiB holds 51 of them, so the disk fills
            // on bob's copy, after alice's was staged: that one was removed.
            assert!(
                path.starts_with(root.join("example.org/bob/tmp")),
                "{}",
                path.display()
            );
        }
        e => panic!("expected an I/O error, got {e:?}"),
    }
    assert!(!delivered.is_empty(), "the first delivery should fit");

    let mut expected_paths = Vec::new();
    for (n, paths) in &delivered {
        let body = format!("Subject: {n}\n\n{}\n", format!("{n:>9}").repeat(2000));
        for (p, who) in paths.iter().zip(["alice", "bob"]) {
            let addr = format!("{who}@example.org");
            assert_eq!(
                std::fs::read(p).unwrap(),
                expected("s@x.example", &addr, None, &addr, body.as_bytes())
            );
            expected_paths.push(p.clone());
        }
    }
    expected_paths.sort();
    assert_eq!(
        all_mail(&root),
        expected_paths,
        "nothing partial in new/, nothing left in tmp/"
    );
}

/// Quota over SMTP: a message that would take a mailbox past its quota is
/// refused `452 4.2.2` at the end of DATA and reaches none of its
/// recipients; once the mailbox is exactly full, RCPT itself is `452 4.2.2`
/// while other recipients are still accepted.
#[tokio::test]
async fn quota_is_452_at_the_end_of_data_and_then_at_rcpt() {
    const QUOTA: u64 = 2000;
    const FULL: &str = "452 4.2.2 Mailbox full, try again later";
    let s = common::server::TestServer::start(|_| {}).await;
    s.directory
        .user_add("carol@example.org", Some('+'), None, QUOTA)
        .await
        .unwrap();
    let body = |n: usize| format!("Subject: quota\r\n\r\n{}\r\n", "x".repeat(n));
    // What a body of `n` x's takes on disk, less our trace headers: its
    // three CRLFs become LFs.
    let lf_len = |n: usize| (body(n).len() - 3) as u64;
    let mut c = s.connect().await;
    c.greeting().await;

    let r = c
        .send_mail("s@remote.example", &["carol@example.org"], &body(1100))
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: delivered as "), "{r}");
    let first = s.new_files("carol@example.org");
    assert_eq!(first.len(), 1);
    let used = std::fs::metadata(&first[0]).unwrap().len();
    let headers = used - lf_len(1100);

    // Carol has room at RCPT time but not for this message: nobody gets it.
    let r = c
        .send_mail(
            "s@remote.example",
            &["alice@example.org", "carol@example.org"],
            &body(1100),
        )
        .await;
    assert_eq!(r, format!("{FULL}\r\n"));
    assert_eq!(s.new_files("carol@example.org"), first);
    assert_eq!(s.new_files("alice@example.org"), Vec::<PathBuf>::new());

    // A message that fills the quota exactly still fits...
    let n = (QUOTA - used - headers) as usize - lf_len(0) as usize;
    let r = c
        .send_mail("s@remote.example", &["carol@example.org"], &body(n))
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: delivered as "), "{r}");
    let files = s.new_files("carol@example.org");
    let sizes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!((files.len(), sizes), (2, QUOTA));

    // ...and then RCPT refuses carol, not alice.
    c.cmd_prefix("EHLO client.example", "250-mx.example.org")
        .await;
    c.cmd("MAIL FROM:<s@remote.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd("RCPT TO:<carol@example.org>", FULL).await;
    c.cmd("RCPT TO:<carol+tag@example.org>", FULL).await;
    c.cmd("RCPT TO:<alice@example.org>", "250 2.1.5 Recipient ok")
        .await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send(body(10).as_bytes()).await;
    c.send(b".\r\n").await;
    let r = c.reply().await;
    assert!(r.starts_with("250 2.0.0 Ok: delivered as "), "{r}");
    assert_eq!(s.new_files("alice@example.org").len(), 1);
    assert_eq!(s.new_files("carol@example.org").len(), 2);
}
