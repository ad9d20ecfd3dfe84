//! An in-process letterbox on 127.0.0.1:0 with a temp SQLite directory and
//! maildir root, plus a line-oriented SMTP client for dialogue tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use letterbox::config::Config;
use letterbox::directory::Directory;
use letterbox::serve::Running;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct TestServer {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub directory: Directory,
    pub running: Option<Running>,
    pub config: Config,
    _tmp: tempfile::TempDir,
}

/// A config for tests: temp paths, port 0, no DNS (no reverse lookups,
/// no sender authentication, and a resolver on a closed loopback port, so
/// a lookup some path still makes fails at once and never leaves the
/// machine), no cache.
pub fn test_config(tmp: &std::path::Path) -> Config {
    let mut c = Config {
        hostname: "mx.example.org".into(),
        ..Config::default()
    };
    c.database.url = format!("sqlite://{}", tmp.join("letterbox.db").display());
    c.database.cache_ttl = letterbox::units::Duration::from_secs(0);
    c.smtp.listen = vec!["127.0.0.1:0".parse().unwrap()];
    c.smtp.reverse_dns = false;
    c.dns.servers = vec!["127.0.0.1:9".parse().unwrap()];
    c.dns.timeout = letterbox::units::Duration::from_secs(1);
    c.auth = letterbox::config::AuthConfig {
        spf: letterbox::config::SpfPolicy::Off,
        dkim: letterbox::config::TagPolicy::Off,
        dmarc: letterbox::config::DmarcPolicy::Off,
        arc: letterbox::config::TagPolicy::Off,
        received_spf: false,
    };
    c.sink.enabled = false;
    c.maildir.root = tmp.join("mail");
    c
}

impl TestServer {
    /// Starts a server with example.org, alice and bob, and lets `tweak`
    /// adjust the config first.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = test_config(tmp.path());
        tweak(&mut config);
        let directory = Directory::connect(&config.database.url, 2, Duration::ZERO)
            .await
            .unwrap();
        directory.migrate().await.unwrap();
        directory.domain_add("example.org").await.unwrap();
        directory
            .user_add("alice@example.org", Some('+'), None, 0)
            .await
            .unwrap();
        directory
            .user_add("bob@example.org", Some('+'), None, 0)
            .await
            .unwrap();
        let running = letterbox::serve::start(config.clone()).await.unwrap();
        TestServer {
            addr: running.smtp_addrs[0],
            root: config.maildir.root.clone(),
            directory,
            running: Some(running),
            config,
            _tmp: tmp,
        }
    }

    /// A server with the sink on (its web page on 127.0.0.1:0) and the rule
    /// `*.tmp.example.org` kept `ttl_secs`, after `tweak` adjusts the config.
    pub async fn start_with_sink(ttl_secs: u64, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let s = TestServer::start(|c| {
            c.sink.enabled = true;
            c.sink.http_listen = "127.0.0.1:0".parse().unwrap();
            tweak(c);
        })
        .await;
        s.directory
            .sink_add("*.tmp.example.org", ttl_secs)
            .await
            .unwrap();
        s
    }

    pub async fn connect(&self) -> Client<TcpStream> {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        Client::new(stream)
    }

    /// Files in `<root>/<domain>/<local>/new`, sorted by name.
    pub fn new_files(&self, mailbox: &str) -> Vec<PathBuf> {
        let (local, domain) = mailbox.split_once('@').unwrap();
        let dir = self.root.join(domain).join(local).join("new");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }
}

/// A plain SMTP client that checks exact replies.
pub struct Client<S> {
    pub stream: BufReader<S>,
    /// How long to wait for a reply before failing the test; tests on a
    /// paused clock raise it above the server's own timeouts.
    pub patience: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream: BufReader::new(stream),
            patience: Duration::from_secs(30),
        }
    }

    /// Reads one whole reply (all its lines), or "" at end of stream.
    pub async fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(self.patience, self.stream.read_line(&mut line))
                .await
                .expect("reply timed out")
                .unwrap_or(0);
            if n == 0 {
                return out;
            }
            out.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return out;
            }
        }
    }

    pub async fn send(&mut self, raw: &[u8]) {
        self.stream.get_mut().write_all(raw).await.unwrap();
    }

    /// Sends `line` + CRLF and asserts the reply equals `want` exactly
    /// (`want` without the final CRLF).
    pub async fn cmd(&mut self, line: &str, want: &str) {
        self.send(format!("{line}\r\n").as_bytes()).await;
        let got = self.reply().await;
        assert_eq!(got.trim_end_matches("\r\n"), want, "reply to {line:?}");
    }

    /// Asserts the reply starts with `prefix`.
    pub async fn cmd_prefix(&mut self, line: &str, prefix: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        let got = self.reply().await;
        assert!(got.starts_with(prefix), "reply to {line:?}: {got:?}");
        got
    }

    pub async fn greeting(&mut self) {
        assert_eq!(self.reply().await, "220 mx.example.org ESMTP letterbox\r\n");
    }

    /// Greeting, EHLO, MAIL, the RCPTs (each must be accepted) and DATA
    /// with `body` (already dot-stuffed, ending CRLF); returns the final reply.
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &str) -> String {
        self.cmd_prefix("EHLO client.example", "250-mx.example.org")
            .await;
        self.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0 Sender ok")
            .await;
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250 2.1.5 Recipient ok")
                .await;
        }
        self.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>")
            .await;
        self.send(body.as_bytes()).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}
