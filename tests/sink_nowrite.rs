//! No byte of a sink message touches the disk. A test binary of its own:
//! `/proc/self/io` counts the whole process, so nothing else may run
//! alongside.
//!
//! `write_bytes` counts bytes this process caused to be sent to storage
//! (page-cache dirtying included), unlike `wchar`, which also counts
//! sockets and pipes. Files on a tmpfs would escape it, so the test also
//! checks that no new file is open and that the temporary directory did
//! not change.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::db::{Backend, TestDb};
use letterbox::config::SinkConfig;
use letterbox::directory::Directory;
use letterbox::sink::Sink;

fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    let line = io.lines().find(|l| l.starts_with("write_bytes:")).unwrap();
    line["write_bytes:".len()..].trim().parse().unwrap()
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Regular files (deleted or not) this process holds open.
fn open_files() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.starts_with('/') && !p.starts_with("/dev/") && !p.starts_with("/proc/"))
        .collect()
}

#[tokio::test]
async fn sink_messages_never_touch_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let db = TestDb::new(Backend::Sqlite, tmp.path()).await.unwrap();
    // A resolve cache, so requests after the first do not even read the db.
    let directory = Directory::connect(&db.url, 2, Duration::from_secs(3600))
        .await
        .unwrap();
    directory.migrate().await.unwrap();
    directory.sink_add("*.tmp.example.org", 3600).await.unwrap();
    let sink = Sink::new(&SinkConfig::default(), 10 << 20);
    let router = sink.router(directory, Some('+'), Arc::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1/mailbox", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(sink.clone().serve(listener, router, shutdown.clone()));
    let http = reqwest::Client::new();
    // Warm up: the directory connection, the resolve cache, the client.
    for n in 0..4 {
        let r = http
            .get(format!("{base}/u{n}@a.tmp.example.org"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    let before = (
        write_bytes(),
        listing(tmp.path()),
        listing(&std::env::temp_dir()),
        open_files(),
    );
    let body = "x".repeat(4000);
    for n in 0..1000 {
        let raw = format!(
            "From: a@example.net\r\nTo: u{}@a.tmp.example.org\r\nSubject: {n}\r\n\r\n{body}\r\n",
            n % 4
        );
        sink.insert(
            &format!("u{}@a.tmp.example.org", n % 4),
            Duration::from_secs(3600),
            Bytes::from(raw),
        )
        .unwrap();
    }
    for n in 0..4 {
        let list: serde_json::Value = http
            .get(format!("{base}/u{n}@a.tmp.example.org"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list.as_array().unwrap().len(), 100);
        let id = list[0]["id"].as_str().unwrap();
        for tail in ["", "/source", "/html"] {
            http.get(format!("{base}/u{n}@a.tmp.example.org/{id}{tail}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
    }
    let after = (
        write_bytes(),
        listing(tmp.path()),
        listing(&std::env::temp_dir()),
        open_files(),
    );

    assert_eq!(before.0, after.0, "write_bytes grew");
    assert_eq!(before.1, after.1, "the test's directory changed");
    let new_in_tmp: Vec<_> = after.2.difference(&before.2).collect();
    let new_open: Vec<_> = after.3.difference(&before.3).collect();
    assert!(
        new_open.is_empty(),
        "files opened: {new_open:?}; new in temp dir: {new_in_tmp:?}"
    );
    assert_eq!(sink.usage().1, 400);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
