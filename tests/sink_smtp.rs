//! The sink end to end: mail in over SMTP, read back over HTTP.

mod common;

use common::server::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_maildir_and_sink_transaction() {
    let s = TestServer::start(|c| {
        c.sink.enabled = true;
        c.sink.http_listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    s.directory
        .sink_add("*.tmp.example.org", 3600)
        .await
        .unwrap();
    let http = s.running.as_ref().unwrap().http_addr.unwrap();

    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail(
            "sender@remote.example",
            &["alice@example.org", "Signup@Run1.TMP.example.org"],
            "From: shop@remote.example\r\nSubject: welcome\r\n\r\nclick here\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    let id = reply.trim_end().rsplit(' ').next().unwrap().to_string();

    // The maildir copy is on disk.
    assert_eq!(s.new_files("alice@example.org").len(), 1);
    // The sink copy is in memory, under the lowercased address.
    let base = format!("http://{http}/api/v1/mailbox/signup@run1.tmp.example.org");
    let list: serde_json::Value = reqwest::get(&base).await.unwrap().json().await.unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["subject"], "welcome");
    assert_eq!(list[0]["from"], "shop@remote.example");
    let msg_id = list[0]["id"].as_str().unwrap();
    let source = reqwest::get(format!("{base}/{msg_id}/source"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let received = format!(
        "Received: from client.example (unknown [127.0.0.1])\r\n\tby mx.example.org with ESMTP id {id}\r\n\tfor <signup@run1.tmp.example.org>; "
    );
    assert!(source.starts_with(&received), "{source}");
    assert!(
        source.ends_with("\r\nFrom: shop@remote.example\r\nSubject: welcome\r\n\r\nclick here\r\n"),
        "{source:?}"
    );
    // Nothing of the sink copy reached the maildir root.
    let spool = s.root.join(letterbox::delivery::SPOOL_DIR);
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    assert!(!s.root.join("run1.tmp.example.org").exists());
    // A real mailbox is never shown by the sink.
    let real = reqwest::get(format!("http://{http}/api/v1/mailbox/alice@example.org"))
        .await
        .unwrap();
    assert_eq!(real.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_refuses_when_full_in_refuse_mode() {
    let s = TestServer::start(|c| {
        c.sink.enabled = true;
        c.sink.http_listen = "127.0.0.1:0".parse().unwrap();
        c.sink.when_full = letterbox::config::WhenFull::Refuse;
        c.sink.max_messages_per_mailbox = 1;
    })
    .await;
    s.directory
        .sink_add("*.tmp.example.org", 3600)
        .await
        .unwrap();
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c
        .send_mail(
            "a@b.example",
            &["x@t.tmp.example.org"],
            "Subject: 1\r\n\r\n1\r\n",
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    c.cmd("MAIL FROM:<a@b.example>", "250 2.1.0 Sender ok")
        .await;
    c.cmd(
        "RCPT TO:<x@t.tmp.example.org>",
        "452 4.3.1 Insufficient system storage, try again later",
    )
    .await;
}
