//! The sink's HTTP API over real HTTP: a directory on a throwaway SQLite
//! database, a Sink, its router served on 127.0.0.1:0, and messages
//! inserted with `Sink::insert` as the SMTP engine will.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::db::{Backend, TestDb};
use futures_util::StreamExt;
use letterbox::config::SinkConfig;
use letterbox::directory::Directory;
use letterbox::sink::Sink;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);
const BOX: &str = "signup+x@run1.tmp.example.org";

struct Server {
    base: String,
    sink: Sink,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _db: TestDb,
    _tmp: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let db = TestDb::new(Backend::Sqlite, tmp.path()).await.unwrap();
        let directory = Directory::connect(&db.url, 2, Duration::ZERO)
            .await
            .unwrap();
        directory.migrate().await.unwrap();
        directory.sink_add("*.tmp.example.org", 3600).await.unwrap();
        directory.domain_add("example.org").await.unwrap();
        directory
            .user_add("real@example.org", Some('+'), None, 0)
            .await
            .unwrap();
        let sink = Sink::new(&SinkConfig::default(), 10 << 20);
        let router = sink.router(directory, Some('+'), Arc::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sink.clone().serve(listener, router, shutdown.clone()));
        Server {
            base,
            sink,
            http: reqwest::Client::new(),
            shutdown,
            task,
            _db: db,
            _tmp: tmp,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.get(path).await;
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    /// Inserts a message and returns its id (the newest of the mailbox).
    async fn insert(&self, mailbox: &str, raw: &str) -> String {
        self.sink
            .insert(mailbox, HOUR, Bytes::from(raw.replace('\n', "\r\n")))
            .unwrap();
        let (_, list) = self.json(&format!("/api/v1/mailbox/{mailbox}")).await;
        list[0]["id"].as_str().unwrap().to_string()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn plain(subject: &str) -> String {
    format!(
        "From: Alice <alice@example.net>\nTo: {BOX}, bob@example.net\nSubject: {subject}\nDate: Tue, 14 Dec 2021 11:48:25 +0100\n\nHello {subject}\n"
    )
}

const HOSTILE: &str = "From: mallory@example.net\nTo: signup+x@run1.tmp.example.org\nSubject: hostile\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html; charset=utf-8\n\n<p onclick=\"steal()\">Hi<script>alert(1)</script></p><img src=\"x\" onerror=\"alert(2)\"><a href=\"javascript:alert(3)\">click</a><img src=\"https://tracker.example/p.gif\" alt=\"t\">\n--b\nContent-Type: text/html; name=\"../evil \\\"name\\\".html\"\nContent-Disposition: attachment; filename=\"../evil \\\"name\\\".html\"\n\n<script>alert(4)</script>\n--b--\n";

#[tokio::test]
async fn list_detail_source_and_delete() {
    let s = Server::start().await;
    let first = s.insert(BOX, &plain("one")).await;
    let second = s.insert(BOX, &plain("two")).await;
    assert_ne!(first, second);
    assert_eq!(first.len(), 16);

    // Newest first; the address is normalized (case) before lookup.
    let (status, list) = s
        .json("/api/v1/mailbox/SignUp+X@Run1.TMP.example.org")
        .await;
    assert_eq!(status, StatusCode::OK);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], second.as_str());
    assert_eq!(list[1]["id"], first.as_str());
    let size = plain("two").replace('\n', "\r\n").len();
    let summary = &list[0];
    assert_eq!(summary["from"], "Alice <alice@example.net>");
    assert_eq!(summary["to"], json!([BOX, "bob@example.net"]));
    assert_eq!(summary["subject"], "two");
    assert_eq!(summary["date"], "2021-12-14T11:48:25+01:00");
    assert_eq!(summary["size"], size);
    let received =
        chrono::DateTime::parse_from_rfc3339(summary["received_at"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(summary["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - received, chrono::Duration::seconds(3600));
    assert!(summary["received_at"].as_str().unwrap().ends_with('Z'));

    let (status, detail) = s.json(&format!("/api/v1/mailbox/{BOX}/{second}")).await;
    assert_eq!(status, StatusCode::OK);
    for key in [
        "id",
        "from",
        "to",
        "subject",
        "date",
        "size",
        "received_at",
        "expires_at",
    ] {
        assert_eq!(detail[key], summary[key], "{key}");
    }
    assert_eq!(
        detail["headers"][2],
        json!({"name": "Subject", "value": "two"})
    );
    assert_eq!(detail["text"], "Hello two\r\n");
    assert_eq!(detail["html"], Value::Null);
    assert_eq!(detail["attachments"], json!([]));

    let r = s
        .get(&format!("/api/v1/mailbox/{BOX}/{second}/source"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "message/rfc822");
    assert_eq!(
        r.bytes().await.unwrap(),
        plain("two").replace('\n', "\r\n").as_bytes()
    );

    // No HTML part: /html has nothing to show.
    let (status, err) = s
        .json(&format!("/api/v1/mailbox/{BOX}/{second}/html"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err, json!({"error": "the message has no HTML body"}));

    let r = s
        .http
        .delete(s.url(&format!("/api/v1/mailbox/{BOX}/{second}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s
        .http
        .delete(s.url(&format!("/api/v1/mailbox/{BOX}/{second}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (_, list) = s.json(&format!("/api/v1/mailbox/{BOX}")).await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    s.insert("other@run1.tmp.example.org", &plain("other"))
        .await;
    let r = s
        .http
        .delete(s.url(&format!("/api/v1/mailbox/{BOX}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/{BOX}")).await,
        (StatusCode::OK, json!([]))
    );
    assert_eq!(
        s.sink.usage(),
        (plain("other").replace('\n', "\r\n").len() as u64, 1)
    );
    s.stop().await;
}

#[tokio::test]
async fn not_found_and_bad_request() {
    let s = Server::start().await;
    let id = s.insert(BOX, &plain("one")).await;
    let nf = |e: &str| (StatusCode::NOT_FOUND, json!({ "error": e }));
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/{BOX}/0123456789abcdef"))
            .await,
        nf("no such message")
    );
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/{BOX}/0123456789abcdef/source"))
            .await,
        nf("no such message")
    );
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/{BOX}/{id}/attachments/0"))
            .await,
        nf("no such attachment")
    );
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/{BOX}/{id}/attachments/x"))
            .await,
        nf("no such attachment")
    );
    // The same id under another sink mailbox is not found.
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/else@run1.tmp.example.org/{id}"))
            .await,
        nf("no such message")
    );
    // A real mailbox, an unknown user of a served domain, a foreign domain:
    // never shown by the sink.
    for address in [
        "real@example.org",
        "real+tag@example.org",
        "nobody@example.org",
        "x@example.net",
        "x@tmp.example.org",
    ] {
        assert_eq!(
            s.json(&format!("/api/v1/mailbox/{address}")).await,
            nf("no such sink mailbox"),
            "{address}"
        );
        assert_eq!(
            s.json(&format!("/api/v1/mailbox/{address}/{id}")).await,
            nf("no such sink mailbox"),
            "{address}"
        );
    }
    let r = s
        .http
        .delete(s.url("/api/v1/mailbox/real@example.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    for bad in ["no-at-sign", "x@bad_domain!.org", "@run1.tmp.example.org"] {
        let (status, body) = s.json(&format!("/api/v1/mailbox/{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
    // No listing of mailboxes.
    assert_eq!(s.json("/api/v1/mailbox").await, nf("no such endpoint"));
    assert_eq!(s.json("/api/v1/mailboxes").await, nf("no such endpoint"));
    s.stop().await;
}

#[tokio::test]
async fn hostile_html_comes_out_inert() {
    let s = Server::start().await;
    let id = s.insert(BOX, HOSTILE).await;
    let (_, detail) = s.json(&format!("/api/v1/mailbox/{BOX}/{id}")).await;
    let placeholder = letterbox::sink::sanitize::PLACEHOLDER;
    let blocked = format!(
        "<p>Hi</p><img><a rel=\"noopener noreferrer\">click</a><img src=\"{placeholder}\" data-blocked=\"remote\" data-src=\"https://tracker.example/p.gif\" alt=\"t\">"
    );
    assert_eq!(detail["html"], blocked.as_str());
    let (_, with_images) = s
        .json(&format!("/api/v1/mailbox/{BOX}/{id}?images=1"))
        .await;
    assert_eq!(
        with_images["html"],
        "<p>Hi</p><img><a rel=\"noopener noreferrer\">click</a><img src=\"https://tracker.example/p.gif\" alt=\"t\">"
    );
    assert_eq!(
        detail["attachments"],
        json!([{"index": 0, "filename": "../evil \"name\".html", "content_type": "text/html", "size": 25}])
    );

    let r = s.get(&format!("/api/v1/mailbox/{BOX}/{id}/html")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-security-policy"],
        "sandbox; default-src 'none'; img-src data:"
    );
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let doc = r.text().await.unwrap();
    assert_eq!(
        doc,
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\"></head><body>{blocked}</body></html>\n"
        )
    );
    for bad in [
        "<script",
        "onclick",
        "onerror",
        "javascript:",
        " src=\"https:",
    ] {
        assert!(!doc.contains(bad), "{bad} in {doc}");
    }
    let r = s
        .get(&format!("/api/v1/mailbox/{BOX}/{id}/html?images=1"))
        .await;
    assert_eq!(
        r.headers()["content-security-policy"],
        "sandbox; default-src 'none'; img-src data: *"
    );
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("<img src=\"https://tracker.example/p.gif\" alt=\"t\">")
    );

    // The attachment downloads, never renders, under a safe name.
    let r = s
        .get(&format!("/api/v1/mailbox/{BOX}/{id}/attachments/0"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/html");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"evil _name_.html\"; filename*=UTF-8''evil%20%22name%22.html"
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(
        r.headers()["content-security-policy"],
        "sandbox; default-src 'none'"
    );
    assert_eq!(r.text().await.unwrap(), "<script>alert(4)</script>");
    s.stop().await;
}

#[tokio::test]
async fn the_page_is_served_with_a_nonce_csp() {
    let s = Server::start().await;
    let r = s.get("/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(nonce.len(), 32);
    assert_eq!(
        csp,
        format!(
            "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; \
             frame-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    );
    let page = r.text().await.unwrap();
    assert_eq!(page.matches(&format!("nonce=\"{nonce}\"")).count(), 2);
    assert!(!page.contains("{{NONCE}}"));
    assert!(!page.contains("http://") || page.matches("http://").count() == 0);
    assert!(page.contains("<iframe id=\"html-frame\" class=\"hidden\" sandbox "));
    // A fresh nonce each time.
    let again = s.get("/").await.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(again, csp);
    s.stop().await;
}

#[tokio::test]
async fn events_stream_announces_new_mail_for_that_mailbox_only() {
    let s = Server::start().await;
    let r = s.get(&format!("/api/v1/mailbox/{BOX}/events")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    // The handler subscribed before these headers were sent.
    let mut body = r.bytes_stream();
    s.sink
        .insert(
            "other@run1.tmp.example.org",
            HOUR,
            Bytes::from(plain("other").replace('\n', "\r\n")),
        )
        .unwrap();
    s.sink
        .insert(BOX, HOUR, Bytes::from(plain("fresh").replace('\n', "\r\n")))
        .unwrap();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = body.next().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let (_, list) = s.json(&format!("/api/v1/mailbox/{BOX}")).await;
    let id = list[0]["id"].as_str().unwrap();
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(lines[0], "event: message");
    assert_eq!(lines[1], format!("id: {id}"));
    let data: Value = serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(data, list[0]);
    assert_eq!(&lines[3..], ["", ""]);
    // Shutdown ends the stream, so graceful shutdown completes.
    s.shutdown.cancel();
    while let Some(chunk) = body.next().await {
        chunk.unwrap();
    }
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn wait_returns_the_next_message_or_204() {
    let s = Server::start().await;
    let first = s.insert(BOX, &plain("first")).await;

    // 204 on timeout.
    let r = s
        .get(&format!("/api/v1/mailbox/{BOX}/wait?timeout=1"))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // A message that arrived after `after` answers at once, even if it came
    // before the request: deterministic without timing.
    s.sink
        .insert(
            BOX,
            HOUR,
            Bytes::from(plain("second").replace('\n', "\r\n")),
        )
        .unwrap();
    let (status, summary) = s
        .json(&format!(
            "/api/v1/mailbox/{BOX}/wait?timeout=30&after={first}"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(summary["subject"], "second");
    let (_, list) = s.json(&format!("/api/v1/mailbox/{BOX}")).await;
    assert_eq!(summary, list[0]);

    // Without a later message, `after` waits for the next arrival.
    let second = summary["id"].as_str().unwrap().to_string();
    let waiter = {
        let url = s.url(&format!(
            "/api/v1/mailbox/{BOX}/wait?timeout=300&after={second}"
        ));
        let http = s.http.clone();
        tokio::spawn(async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    s.sink
        .insert(
            "other@run1.tmp.example.org",
            HOUR,
            Bytes::from(plain("other").replace('\n', "\r\n")),
        )
        .unwrap();
    s.sink
        .insert(BOX, HOUR, Bytes::from(plain("third").replace('\n', "\r\n")))
        .unwrap();
    assert_eq!(waiter.await.unwrap()["subject"], "third");

    for bad in ["x", "-1", "NaN"] {
        let (status, body) = s
            .json(&format!("/api/v1/mailbox/{BOX}/wait?timeout={bad}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(
            body,
            json!({"error": "timeout must be a number of seconds"})
        );
    }
    assert_eq!(
        s.json("/api/v1/mailbox/real@example.org/wait?timeout=1")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    s.stop().await;
}

#[tokio::test]
async fn expired_messages_vanish_from_the_api() {
    let s = Server::start().await;
    s.sink
        .insert(
            BOX,
            Duration::from_secs(1),
            Bytes::from(plain("short").replace('\n', "\r\n")),
        )
        .unwrap();
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/{BOX}"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The wait below ends at its 2 s timeout; by then the purge task has run.
    assert_eq!(
        s.get(&format!("/api/v1/mailbox/{BOX}/wait?timeout=2"))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.json(&format!("/api/v1/mailbox/{BOX}")).await,
        (StatusCode::OK, json!([]))
    );
    assert_eq!(s.sink.usage(), (0, 0));
    s.stop().await;
}

/// A message with an HTML body and an attachment: every sink endpoint that
/// shows it parses it, and some sanitize its HTML.
fn rich(subject: &str) -> Bytes {
    Bytes::from(
        format!(
            "From: Alice <alice@example.net>\nTo: {BOX}\nSubject: {subject}\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html; charset=utf-8\n\n<p onclick=\"x()\">Hello <b>{subject}</b></p>\n--b\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=\"a.pdf\"\nContent-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--b--\n"
        )
        .replace('\n', "\r\n"),
    )
}

/// Parsing and sanitizing block, so the handlers hand them to the blocking
/// pool. Done on the runtime instead, the debug guard in the parser panics
/// the handler and the client gets no answer at all: this test then fails
/// on the first endpoint that forgot.
#[tokio::test]
async fn parsing_and_sanitizing_run_off_the_runtime() {
    let s = Server::start().await;
    async fn ok(s: &Server, path: &str) -> reqwest::Response {
        let r = s
            .http
            .get(s.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: no answer ({e})"));
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r
    }
    let mailbox = format!("/api/v1/mailbox/{BOX}");
    let events = ok(&s, &format!("{mailbox}/events")).await;
    s.sink.insert(BOX, HOUR, rich("first")).unwrap();

    let list: Value = ok(&s, &mailbox).await.json().await.unwrap();
    assert_eq!(list[0]["subject"], "first");
    let id = list[0]["id"].as_str().unwrap().to_string();
    for images in ["", "?images=1"] {
        let detail: Value = ok(&s, &format!("{mailbox}/{id}{images}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(detail["html"], "<p>Hello <b>first</b></p>");
        assert_eq!(detail["attachments"][0]["filename"], "a.pdf");
        let html = ok(&s, &format!("{mailbox}/{id}/html{images}")).await;
        assert!(
            html.text()
                .await
                .unwrap()
                .contains("<body><p>Hello <b>first</b></p></body>")
        );
    }
    let attachment = ok(&s, &format!("{mailbox}/{id}/attachments/0")).await;
    assert_eq!(&attachment.bytes().await.unwrap()[..], b"%PDF-1.4\n");

    // The live announcements carry a summary too.
    let mut body = events.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = body
            .next()
            .await
            .expect("events: the stream ended before announcing the message")
            .expect("events: the stream broke before announcing the message");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.contains("\"subject\":\"first\""), "{text}");
    s.sink.insert(BOX, HOUR, rich("second")).unwrap();
    let next: Value = ok(&s, &format!("{mailbox}/wait?timeout=30&after={id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(next["subject"], "second");
    // A wait answered by the arrival itself, not by what is already held,
    // when the waiter has subscribed within the pause (it answers either
    // way, thanks to `after`).
    let second = next["id"].as_str().unwrap();
    let waiter = {
        let url = s.url(&format!("{mailbox}/wait?timeout=300&after={second}"));
        let http = s.http.clone();
        tokio::spawn(async move { http.get(url).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.sink.insert(BOX, HOUR, rich("third")).unwrap();
    let r = waiter.await.unwrap().expect("wait: no answer");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["subject"], "third");
    drop(body);
    s.stop().await;
}
