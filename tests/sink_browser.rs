//! The sink's web page in a real browser: Debian's headless Chromium,
//! driven over WebDriver by its chromedriver, against an in-process
//! letterbox whose mail arrives over SMTP.
//!
//! A small HTTP listener on loopback stands in for the outside world: the
//! hostile message's scripts, handlers and links would call it, and its
//! remote image lives there. Its request log is the witness that nothing
//! ran and that the image was fetched only once asked for.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::TestServer;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// How long anything in the page may take to show up.
const PATIENCE: Duration = Duration::from_secs(20);
const BOX: &str = "signup@run1.tmp.example.org";

/// chromedriver in a process group of its own, so the browser it starts
/// goes with it. Killed (the whole group) when dropped, pass or fail.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        for program in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(program).exists(),
                "{program} is required for this test (Debian packages chromium and \
                 chromium-driver; install them as .ci/run does, see README, Prerequisites)"
            );
        }
        use std::os::unix::process::CommandExt;
        // --port=0: chromedriver picks a free port and says which. Without
        // --allowed-ips it listens on loopback only.
        let mut child = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        let log = Arc::new(Mutex::new(String::new()));
        {
            let (mut pipe, log) = (child.stderr.take().unwrap(), log.clone());
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                log.lock().unwrap().push_str(&text);
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            // Drained for chromedriver's whole life, so it never blocks on
            // a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut driver = Driver {
            child,
            url: String::new(),
        };
        let deadline = Instant::now() + PATIENCE;
        let port: u16 = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("started successfully on port ").nth(1) {
                        break rest.trim_end_matches('.').trim().parse().unwrap();
                    }
                }
                Err(_) => panic!("chromedriver did not say its port: {}", log.lock().unwrap()),
            }
        };
        driver.url = format!("http://127.0.0.1:{port}");
        driver
    }

    /// A new headless browser session with an empty profile in `profile`.
    async fn session(&self, profile: &Path) -> Client {
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        // chromedriver answers once it has bound; poll its status first.
        let deadline = Instant::now() + PATIENCE;
        let http = reqwest::Client::new();
        while http
            .get(format!("{}/status", self.url))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session from chromedriver")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group we created; no memory effects.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The outside world: an HTTP server on loopback that logs each request
/// line and answers with a 1×1 GIF.
struct Watcher {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

const GIF: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

impl Watcher {
    async fn start() -> Watcher {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let line = text.lines().next().unwrap_or("").to_string();
                    if line.is_empty() {
                        // A speculative connection that never asked anything.
                        return;
                    }
                    log.lock().unwrap().push(line);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nContent-Length: {}\r\n\
                         Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n",
                        GIF.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.write_all(GIF).await;
                });
            }
        });
        Watcher { addr, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Polls `probe` until it gives Some, up to [`PATIENCE`].
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// The `data-id` of each row of the list, top to bottom.
async fn row_ids(c: &Client) -> Vec<String> {
    let mut ids = Vec::new();
    for li in c
        .find_all(Locator::Css("ul#messages li.message"))
        .await
        .unwrap()
    {
        ids.push(li.attr("data-id").await.unwrap().unwrap_or_default());
    }
    ids
}

/// The page's list, as the API has it: ids newest first.
async fn api_ids(http: SocketAddr) -> Vec<String> {
    let list: serde_json::Value = reqwest::get(format!("http://{http}/api/v1/mailbox/{BOX}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn plain_mail() -> String {
    format!(
        "From: Alice <alice@example.net>\r\nTo: {BOX}\r\nSubject: plain hello\r\n\
         Date: Tue, 14 Dec 2021 11:48:25 +0100\r\n\r\nFirst line of the plain mail.\r\nSecond line.\r\n"
    )
}

/// HTML that would, if anything of it ran, call the watcher, change the
/// titles, leave a marker element and write to localStorage.
fn hostile_mail(w: SocketAddr) -> String {
    let html = format!(
        r#"<html><head><title>hostile</title><script>document.title = "pwned"; fetch("http://{w}/head-script");</script></head>
<body onload="fetch('http://{w}/onload')">
<p>Hello from the hostile mail</p>
<script>
document.title = "pwned";
var d = document.createElement("div"); d.id = "pwned"; document.body.appendChild(d);
try {{ localStorage.setItem("pwned", "1"); }} catch (e) {{}}
try {{ parent.document.title = "pwned"; }} catch (e) {{}}
fetch("http://{w}/script");
new Image().src = "http://{w}/script-image";
</script>
<img src="x" onerror="fetch('http://{w}/onerror')" alt="broken">
<svg onload="fetch('http://{w}/svg-onload')"><rect width="1" height="1"/></svg>
<a href="javascript:fetch('http://{w}/javascript-link')">click me</a>
<img src="http://{w}/remote.gif" alt="remote">
</body></html>"#
    );
    format!(
        "From: Mallory <mallory@example.net>\r\nTo: {BOX}\r\nSubject: hostile html\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n\
         --b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello from the hostile mail (text)\r\n\
         --b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{}\r\n--b--\r\n",
        html.replace('\n', "\r\n")
    )
}

async fn send(s: &TestServer, body: &str) {
    let mut c = s.connect().await;
    c.greeting().await;
    let reply = c.send_mail("sender@remote.example", &[BOX], body).await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");
    c.cmd("QUIT", "221 2.0.0 mx.example.org closing connection")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_mail_live_and_keeps_hostile_html_inert() {
    let s = TestServer::start_with_sink(3600, |_| {}).await;
    let http = s.running.as_ref().unwrap().http_addr.unwrap();
    let watcher = Watcher::start().await;

    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = driver.session(profile.path()).await;
    let outcome = std::panic::AssertUnwindSafe(scenario(&client, &s, http, &watcher))
        .catch_unwind()
        .await;
    if outcome.is_err()
        && let Ok(png) = client.screenshot().await
        && let Ok(file) = tempfile::Builder::new()
            .prefix("sink-browser-")
            .suffix(".png")
            .tempfile()
        && std::fs::write(file.path(), &png).is_ok()
        && let Ok((_, path)) = file.keep()
    {
        eprintln!("screenshot of the page at failure: {}", path.display());
    }
    let _ = client.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(c: &Client, s: &TestServer, http: SocketAddr, watcher: &Watcher) {
    c.goto(&format!("http://{http}/")).await.unwrap();
    assert_eq!(c.title().await.unwrap(), "letterbox sink");
    c.find(Locator::Css("#address"))
        .await
        .unwrap()
        .send_keys(BOX)
        .await
        .unwrap();
    c.find(Locator::Css("#open"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The event stream is open once the page says so.
    until("the page to go live", || async {
        (text_of(c, "#status").await == "live").then_some(())
    })
    .await;
    assert_eq!(
        text_of(c, "#empty").await,
        "No messages yet. New mail appears here as it arrives."
    );
    assert_eq!(text_of(c, "#count").await, "0 messages");
    // Set on this document: still there later means the page never reloaded.
    c.execute("window.__sameDocument = 42; return null;", vec![])
        .await
        .unwrap();

    // A plain message arrives over SMTP and shows up by itself.
    send(s, &plain_mail()).await;
    let ids = until("the first message in the list", || async {
        let ids = row_ids(c).await;
        (!ids.is_empty()).then_some(ids)
    })
    .await;
    assert_eq!(ids, api_ids(http).await);
    assert_eq!(text_of(c, "#count").await, "1 message");
    assert_eq!(
        text_of(c, "ul#messages li.message .subject").await,
        "plain hello"
    );
    assert_eq!(
        text_of(c, "ul#messages li.message .from").await,
        "Alice <alice@example.net>"
    );

    c.find(Locator::Css(&format!(
        "ul#messages li.message[data-id=\"{}\"]",
        ids[0]
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    until("the plain message to open", || async {
        (text_of(c, "#subject").await == "plain hello").then_some(())
    })
    .await;
    let meta = text_of(c, "#meta").await;
    assert!(
        meta.starts_with(&format!("From Alice <alice@example.net> to {BOX} · ")),
        "{meta}"
    );
    assert_eq!(
        text_of(c, "#text").await,
        "First line of the plain mail.\nSecond line."
    );
    assert!(
        !c.find(Locator::Css("#html-frame"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );
    // The headers, as a person opens them.
    c.find(Locator::Css("#headers-box summary"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let mut headers = Vec::new();
    for tr in c.find_all(Locator::Css("#headers tr")).await.unwrap() {
        let cells = tr.find_all(Locator::Css("td")).await.unwrap();
        headers.push((
            cells[0].text().await.unwrap(),
            cells[1].text().await.unwrap(),
        ));
    }
    assert_eq!(headers[0].0, "Received");
    assert_eq!(
        headers[1..],
        [
            ("From".to_string(), "Alice <alice@example.net>".to_string()),
            ("To".into(), BOX.into()),
            ("Subject".into(), "plain hello".into()),
            ("Date".into(), "Tue, 14 Dec 2021 11:48:25 +0100".into()),
        ]
    );

    // The hostile message arrives the same way, on top.
    send(s, &hostile_mail(watcher.addr)).await;
    let ids = until("the second message in the list", || async {
        let ids = row_ids(c).await;
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert_eq!(ids, api_ids(http).await);
    assert_eq!(
        text_of(c, "ul#messages li.message .subject").await,
        "hostile html"
    );
    assert_eq!(
        c.execute("return window.__sameDocument;", vec![])
            .await
            .unwrap(),
        42,
        "the page reloaded"
    );
    c.find(Locator::Css(&format!(
        "ul#messages li.message[data-id=\"{}\"]",
        ids[0]
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    until("the hostile message to open", || async {
        (text_of(c, "#subject").await == "hostile html").then_some(())
    })
    .await;
    let frame = c.find(Locator::Css("iframe#html-frame")).await.unwrap();
    assert!(frame.is_displayed().await.unwrap());
    assert_eq!(
        frame.attr("src").await.unwrap().unwrap(),
        format!("/api/v1/mailbox/{}/{}/html", urlencode(BOX), ids[0])
    );
    assert!(
        !c.find(Locator::Css("#text"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );
    let show_images = c.find(Locator::Css("#show-images")).await.unwrap();
    assert!(show_images.is_displayed().await.unwrap());

    // Inside the frame: the content is there, nothing of the script is.
    frame.clone().enter_frame().await.unwrap();
    let p = until("the HTML body in the frame", || async {
        c.find(Locator::Css("p")).await.ok()
    })
    .await;
    assert_eq!(p.text().await.unwrap(), "Hello from the hostile mail");
    assert!(c.find_all(Locator::Css("#pwned")).await.unwrap().is_empty());
    assert!(c.find_all(Locator::Css("script")).await.unwrap().is_empty());
    let images = c.find_all(Locator::Css("img")).await.unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].attr("src").await.unwrap(), None);
    assert_eq!(images[0].attr("onerror").await.unwrap(), None);
    assert_eq!(
        images[1].attr("data-src").await.unwrap().unwrap(),
        format!("http://{}/remote.gif", watcher.addr)
    );
    assert_eq!(
        images[1].attr("src").await.unwrap().unwrap(),
        letterbox::sink::sanitize::PLACEHOLDER
    );
    let link = c.find(Locator::LinkText("click me")).await.unwrap();
    assert_eq!(link.attr("href").await.unwrap(), None);
    link.click().await.unwrap();
    c.enter_parent_frame().await.unwrap();

    // The page itself is untouched.
    assert_eq!(c.title().await.unwrap(), "letterbox sink");
    assert_eq!(
        c.execute("return localStorage.length;", vec![])
            .await
            .unwrap(),
        0
    );
    assert_eq!(watcher.requests(), Vec::<String>::new());

    // Asked for, the remote image loads, and nothing else ever called out.
    show_images.click().await.unwrap();
    let requests = until("the remote image to be fetched", || async {
        let r = watcher.requests();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(requests, ["GET /remote.gif HTTP/1.1"]);
    assert!(!show_images.is_displayed().await.unwrap());
    let frame = c.find(Locator::Css("iframe#html-frame")).await.unwrap();
    assert_eq!(
        frame.attr("src").await.unwrap().unwrap(),
        format!(
            "/api/v1/mailbox/{}/{}/html?images=1",
            urlencode(BOX),
            ids[0]
        )
    );
    frame.enter_frame().await.unwrap();
    let remote = until("the remote image in the frame", || async {
        c.find(Locator::Css(&format!(
            "img[src=\"http://{}/remote.gif\"]",
            watcher.addr
        )))
        .await
        .ok()
    })
    .await;
    assert_eq!(remote.attr("alt").await.unwrap().as_deref(), Some("remote"));
    assert!(c.find_all(Locator::Css("#pwned")).await.unwrap().is_empty());
    c.enter_parent_frame().await.unwrap();
    assert_eq!(c.title().await.unwrap(), "letterbox sink");
    assert_eq!(watcher.requests(), ["GET /remote.gif HTTP/1.1"]);

    // Everything the page itself loaded came from letterbox: no CDN.
    let loaded = c
        .execute(
            "return performance.getEntriesByType('resource').map((e) => e.name);",
            vec![],
        )
        .await
        .unwrap();
    let loaded = loaded.as_array().unwrap();
    assert!(!loaded.is_empty());
    for url in loaded {
        let url = url.as_str().unwrap();
        assert!(url.starts_with(&format!("http://{http}/")), "{url}");
    }
}

/// `encodeURIComponent` for the characters an address has.
fn urlencode(s: &str) -> String {
    s.replace('@', "%40").replace('+', "%2B")
}
