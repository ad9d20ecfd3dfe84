//! The SMTP client (RFC 5321) that hands queued mail to the next hop: one
//! method per command, each returning the server's whole reply, with the
//! timeouts of RFC 5321 §4.5.3.2. STARTTLS turns the connection into a TLS
//! one in place; the message is streamed from its queue file with dot
//! stuffing, a chunk at a time, never read whole.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// RFC 5321 §4.5.3.2: how long each reply may take.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(300);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
pub const DATA_INIT_TIMEOUT: Duration = Duration::from_secs(120);
pub const DATA_BLOCK_TIMEOUT: Duration = Duration::from_secs(180);
pub const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest reply line we read (RFC 5321 §4.5.3.1.5 says 512).
const MAX_LINE: usize = 4096;
/// Most lines of one reply (a long EHLO list is a few dozen).
const MAX_LINES: usize = 100;
/// Message bytes read from the queue file at a time.
const CHUNK: usize = 64 * 1024;

/// A byte stream we can speak SMTP over: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One reply of the server: its code and the text of each line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Response {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced status code (RFC 3463) at the start of the text, if the
    /// server gave one of the right class.
    pub fn status(&self) -> Option<String> {
        let first = self.lines.first()?;
        let word = first.split_whitespace().next()?;
        let parts: Vec<&str> = word.split('.').collect();
        let ok = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && parts[0] == (self.code / 100).to_string();
        ok.then(|| word.to_string())
    }

    /// The status to report: the server's own, else one for its class.
    pub fn status_or_default(&self) -> String {
        self.status().unwrap_or_else(|| match self.code / 100 {
            2 => "2.0.0".into(),
            4 => "4.0.0".into(),
            _ => "5.0.0".into(),
        })
    }

    /// The reply on one line, as in logs and DSNs: `550 5.1.1 No such user`.
    pub fn one_line(&self) -> String {
        let text = self.lines.join(" ");
        crate::queue::dsn::ascii_line(&format!("{} {}", self.code, text.trim()))
    }
}

/// Why talking to the server failed (as opposed to the server refusing).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out waiting for the reply to {0}")]
    Timeout(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Caps {
    pub esmtp: bool,
    pub starttls: bool,
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// The SASL mechanisms of the AUTH line, uppercased: a password goes
    /// only to a server that asks for it by a mechanism we speak.
    pub auth: Vec<String>,
}

impl Caps {
    /// Whether the server lists `mechanism` (uppercase) in its AUTH line.
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m == mechanism)
    }

    fn parse(r: &Response) -> Caps {
        let mut caps = Caps {
            esmtp: true,
            ..Caps::default()
        };
        for line in r.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "STARTTLS" => caps.starttls = true,
                "SIZE" => caps.size = words.next().and_then(|n| n.parse().ok()).or(Some(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// TLS as negotiated on a connection.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// `TLSv1.3:TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// The server's chain, leaf first, to judge it after the fact.
    pub certs: Vec<CertificateDer<'static>>,
}

/// A connection to one SMTP server.
pub struct Client {
    io: BufReader<Box<dyn Io>>,
    pub caps: Caps,
    pub tls: Option<TlsInfo>,
}

impl Client {
    /// Wraps a connected stream and reads the greeting. The greeting is
    /// returned whatever its code: the caller decides.
    pub async fn greet(stream: Box<dyn Io>) -> Result<(Client, Response), ClientError> {
        let mut c = Client {
            io: BufReader::new(stream),
            caps: Caps::default(),
            tls: None,
        };
        let r = c.read_response(GREETING_TIMEOUT, "the greeting").await?;
        Ok((c, r))
    }

    async fn read_line(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        loop {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let room = MAX_LINE.saturating_sub(out.len());
            out.extend_from_slice(&buf[..take.min(room)]);
            self.io.consume(take);
            if done {
                return Ok(());
            }
        }
    }

    /// Reads one whole reply, all its lines.
    pub async fn read_response(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Response, ClientError> {
        let read = async {
            let mut lines = Vec::new();
            let mut line = Vec::new();
            loop {
                self.read_line(&mut line).await?;
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\r', '\n']);
                let bad = || ClientError::Protocol(format!("malformed reply line {text:?}"));
                if text.len() < 3 || !text.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                    return Err(bad());
                }
                let code: u16 = text[..3].parse().map_err(|_| bad())?;
                let more = text.as_bytes().get(3) == Some(&b'-');
                if lines.len() < MAX_LINES {
                    lines.push(text.get(4..).unwrap_or("").to_string());
                }
                if !more {
                    if !(200..600).contains(&code) {
                        return Err(bad());
                    }
                    return Ok(Response { code, lines });
                }
            }
        };
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| ClientError::Timeout(what))?
    }

    async fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let w = self.io.get_mut();
        tokio::time::timeout(COMMAND_TIMEOUT, async {
            w.write_all(data).await?;
            w.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout("sending a command"))??;
        Ok(())
    }

    /// Sends one command line and reads its reply.
    pub async fn command(
        &mut self,
        line: &str,
        limit: Duration,
        what: &'static str,
    ) -> Result<Response, ClientError> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.read_response(limit, what).await
    }

    /// EHLO, and HELO when the server does not know EHLO.
    pub async fn ehlo(&mut self, name: &str) -> Result<Response, ClientError> {
        let r = self
            .command(&format!("EHLO {name}"), COMMAND_TIMEOUT, "EHLO")
            .await?;
        if r.is_positive() {
            self.caps = Caps::parse(&r);
            return Ok(r);
        }
        if r.is_permanent() {
            let r = self
                .command(&format!("HELO {name}"), COMMAND_TIMEOUT, "HELO")
                .await?;
            self.caps = Caps::default();
            return Ok(r);
        }
        Ok(r)
    }

    /// STARTTLS and the handshake. `Ok(Err(reply))` when the server
    /// refused the command (the connection is still usable in plaintext).
    pub async fn starttls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Result<Client, (Client, Response)>, ClientError> {
        let r = self
            .command("STARTTLS", COMMAND_TIMEOUT, "STARTTLS")
            .await?;
        if r.code != 220 {
            return Ok(Err((self, r)));
        }
        // Anything the server sent after its 220 would be read as if it
        // came over TLS: a plaintext injection (CVE-2011-0411's mirror).
        if !self.io.buffer().is_empty() {
            return Err(ClientError::Protocol(
                "the server sent data after agreeing to STARTTLS".into(),
            ));
        }
        let stream = self.io.into_inner();
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = tokio::time::timeout(COMMAND_TIMEOUT, connector.connect(name, stream))
            .await
            .map_err(|_| ClientError::Timeout("the TLS handshake"))?
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let info = {
            let (_, conn) = tls.get_ref();
            TlsInfo {
                cipher: format!(
                    "{}:{}",
                    conn.protocol_version()
                        .and_then(|v| v.as_str())
                        .unwrap_or("TLS"),
                    conn.negotiated_cipher_suite()
                        .and_then(|c| c.suite().as_str())
                        .unwrap_or("unknown"),
                ),
                certs: conn
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default(),
            }
        };
        Ok(Ok(Client {
            io: BufReader::new(Box::new(tls)),
            caps: Caps::default(),
            tls: Some(info),
        }))
    }

    /// AUTH PLAIN (RFC 4616) with an initial response. The password is
    /// never logged: the command line is built here and sent, nothing more.
    pub async fn auth_plain(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<Response, ClientError> {
        use base64::Engine as _;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.command(&format!("AUTH PLAIN {token}"), COMMAND_TIMEOUT, "AUTH")
            .await
    }

    /// Sends DATA, then the message from `file` (CRLF text, not stuffed):
    /// dot-stuffed on the way, a chunk at a time, ended with CRLF.CRLF.
    /// Returns the reply to DATA when it is not 354, else the final reply.
    pub async fn data(
        &mut self,
        mut file: impl AsyncRead + Unpin,
    ) -> Result<Response, ClientError> {
        let r = self.command("DATA", DATA_INIT_TIMEOUT, "DATA").await?;
        if r.code != 354 {
            return Ok(r);
        }
        let mut chunk = vec![0u8; CHUNK];
        // Each stuffed chunk is written once the next one is read, so the
        // last goes out together with the final dot: a lone ".\r\n" behind
        // it would wait for the receiver's delayed ACK where Nagle is on.
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 8 + 5);
        let mut at_line_start = true;
        let mut last = [b'\r', b'\n'];
        loop {
            let n = file.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            self.write_data(&out).await?;
            out.clear();
            for &b in &chunk[..n] {
                // RFC 5321 §4.5.2: a line starting with "." gets another.
                if at_line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                at_line_start = b == b'\n';
            }
            last = match n {
                1 => [last[1], chunk[0]],
                _ => [chunk[n - 2], chunk[n - 1]],
            };
        }
        let end: &[u8] = if last == *b"\r\n" {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        };
        out.extend_from_slice(end);
        self.write_data(&out).await?;
        let w = self.io.get_mut();
        tokio::time::timeout(DATA_BLOCK_TIMEOUT, w.flush())
            .await
            .map_err(|_| ClientError::Timeout("sending the message"))??;
        self.read_response(DATA_END_TIMEOUT, "the end of the message")
            .await
    }

    /// Part of the message, within the time one block may take.
    async fn write_data(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        let w = self.io.get_mut();
        tokio::time::timeout(DATA_BLOCK_TIMEOUT, w.write_all(data))
            .await
            .map_err(|_| ClientError::Timeout("sending the message"))??;
        Ok(())
    }

    /// QUIT, politely and without waiting long.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.command("QUIT", COMMAND_TIMEOUT, "QUIT").await;
            let _ = self.io.get_mut().shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dialogue_with_stuffing_and_multiline_replies() {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut s = BufReader::new(theirs);
            let mut got = Vec::new();
            s.get_mut()
                .write_all(b"220 mx.example.net ESMTP\r\n")
                .await
                .unwrap();
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "EHLO mx.example.org\r\n");
            s.get_mut()
                .write_all(
                    b"250-mx.example.net\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
                )
                .await
                .unwrap();
            line.clear();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "DATA\r\n");
            s.get_mut().write_all(b"354 go\r\n").await.unwrap();
            loop {
                line.clear();
                s.read_line(&mut line).await.unwrap();
                if line == ".\r\n" {
                    break;
                }
                got.push(line.clone());
            }
            s.get_mut()
                .write_all(b"250 2.0.0 Ok queued\r\n")
                .await
                .unwrap();
            got
        });
        let (mut c, greeting) = Client::greet(Box::new(ours)).await.unwrap();
        assert_eq!(greeting.code, 220);
        c.ehlo("mx.example.org").await.unwrap();
        assert!(c.caps.starttls && c.caps.eight_bit_mime);
        assert_eq!(c.caps.size, Some(1000));
        let body: &[u8] = b"Subject: x\r\n\r\n.hidden\r\n..two\r\nlast line no CRLF";
        let r = c.data(body).await.unwrap();
        assert_eq!(r.status().as_deref(), Some("2.0.0"));
        assert_eq!(r.one_line(), "250 2.0.0 Ok queued");
        assert_eq!(
            server.await.unwrap(),
            [
                "Subject: x\r\n",
                "\r\n",
                "..hidden\r\n",
                "...two\r\n",
                "last line no CRLF\r\n"
            ]
        );
    }

    /// A peer whose replies are all ready, and which notes each write.
    struct Recorder {
        replies: std::io::Cursor<Vec<u8>>,
        writes: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let n = std::io::Read::read(&mut self.replies, buf.initialize_unfilled())?;
            buf.advance(n);
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.writes.lock().unwrap().push(data.to_vec());
            std::task::Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_final_dot_goes_out_with_the_end_of_the_message() {
        // Alone, ".\r\n" would wait for the peer's delayed ACK of the
        // segment before it wherever Nagle is on: 40 ms per message.
        let writes = std::sync::Arc::default();
        let peer = Recorder {
            replies: std::io::Cursor::new(b"220 mx ESMTP\r\n354 go\r\n250 2.0.0 Ok\r\n".to_vec()),
            writes: std::sync::Arc::clone(&writes),
        };
        let (mut c, _) = Client::greet(Box::new(peer)).await.unwrap();
        let body = format!("Subject: x\r\n\r\n{}end\r\n", "a".repeat(CHUNK));
        let r = c.data(body.as_bytes()).await.unwrap();
        assert_eq!(r.code, 250);
        let writes = writes.lock().unwrap();
        assert_eq!(writes.first().map(Vec::as_slice), Some(&b"DATA\r\n"[..]));
        assert_eq!(writes.concat(), format!("DATA\r\n{body}.\r\n").as_bytes());
        assert!(
            writes.last().unwrap().ends_with(b"aaend\r\n.\r\n"),
            "the dot came alone: {:?}",
            String::from_utf8_lossy(writes.last().unwrap())
        );
    }

    #[test]
    fn the_auth_line_lists_mechanisms() {
        let ehlo = |lines: &[&str]| {
            Caps::parse(&Response {
                code: 250,
                lines: lines.iter().map(|l| l.to_string()).collect(),
            })
        };
        let caps = ehlo(&["smtp.example.net", "SIZE 1000", "auth login Plain"]);
        assert_eq!(caps.auth, ["LOGIN", "PLAIN"]);
        assert!(caps.offers_auth("PLAIN"));
        let caps = ehlo(&["smtp.example.net", "AUTH LOGIN XOAUTH2"]);
        assert!(!caps.offers_auth("PLAIN"));
        // The greeting line is no capability.
        let caps = ehlo(&["AUTH PLAIN", "8BITMIME"]);
        assert!(caps.auth.is_empty() && caps.eight_bit_mime);
    }

    #[test]
    fn enhanced_status_must_match_the_class() {
        let r = |code, text: &str| Response {
            code,
            lines: vec![text.into()],
        };
        assert_eq!(r(550, "5.1.1 no").status().as_deref(), Some("5.1.1"));
        assert_eq!(r(450, "5.1.1 no").status(), None);
        assert_eq!(r(450, "try later").status_or_default(), "4.0.0");
    }
}
