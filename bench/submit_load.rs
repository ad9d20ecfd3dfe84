//! The client and the far end of the submission benchmark
//! (`bench/harness.py --submission`): mail clients that log in on a
//! submission port and send to a remote domain, and the "remote" server
//! that the queue under test delivers to, in one process so that one clock
//! covers both ends.
//!
//!   submit_load --cert PEM --password PW --sessions 20 --messages 6000
//!               --size 4096 --sink 127.0.0.2:0 [--dkim] [--sample FILE]
//!
//! 1. It listens on `--sink` and prints `sink ADDR:PORT`; the harness
//!    points the server's route for the remote domain there and starts it.
//! 2. It reads `go ADDR:PORT` (the server's submission port) from stdin and
//!    starts the clock. Each of `--sessions` sessions connects, EHLO,
//!    STARTTLS (the server's certificate must be the one in `--cert`:
//!    pinned, not chained), EHLO, AUTH PLAIN as `<session>@bench.test`,
//!    then sends its share of the messages one transaction after another
//!    on the same connection (MAIL, RCPT, DATA, no RSET, no pipelining),
//!    each from `<session>@bench.test` to `<session>@remote.bench.test`,
//!    and QUITs.
//! 3. The sink answers like smtp-sink (PIPELINING, any number of messages
//!    per connection, no STARTTLS) and checks every message: the body
//!    byte for byte, a Message-ID not seen before, a DKIM-Signature field
//!    when `--dkim` is given and none otherwise. When the last distinct
//!    message has arrived it prints one JSON line: `accepted_s` (the last
//!    session's 221), `delivered_s` (the last message at the sink), both
//!    from the first connect, and `tls`, the TLS versions the sessions
//!    negotiated.
//! 4. It keeps listening until stdin closes (the harness closes it once the
//!    server's queue is empty), so a message delivered twice is still
//!    counted, then prints a second JSON line with the totals and exits 1
//!    if anything was wrong.
//!
//! The message is `--size` bytes as the client sends it, headers included.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const DOMAIN: &str = "bench.test";
const REMOTE: &str = "remote.bench.test";

struct Args {
    cert: PathBuf,
    password: String,
    sessions: usize,
    messages: usize,
    size: usize,
    sink: SocketAddr,
    dkim: bool,
    sample: Option<PathBuf>,
    timeout: Duration,
}

fn parse() -> anyhow::Result<Args> {
    let (mut cert, mut password, mut sessions, mut messages, mut size, mut sink) =
        (None, None, None, None, None, None);
    let (mut dkim, mut sample, mut timeout) = (false, None, 600);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--dkim" {
            dkim = true;
            continue;
        }
        let value = it.next().ok_or(anyhow!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .with_context(|| format!("{flag} {value}"))
        };
        match flag.as_str() {
            "--cert" => cert = Some(PathBuf::from(&value)),
            "--password" => password = Some(value.clone()),
            "--sessions" => sessions = Some(number()?),
            "--messages" => messages = Some(number()?),
            "--size" => size = Some(number()?),
            "--sink" => sink = Some(value.parse().with_context(|| format!("--sink {value}"))?),
            "--sample" => sample = Some(PathBuf::from(&value)),
            "--timeout" => timeout = number()? as u64,
            _ => bail!("unknown flag {flag}"),
        }
    }
    let args = Args {
        cert: cert.ok_or(anyhow!("--cert is required"))?,
        password: password.ok_or(anyhow!("--password is required"))?,
        sessions: sessions.ok_or(anyhow!("--sessions is required"))?,
        messages: messages.ok_or(anyhow!("--messages is required"))?,
        size: size.ok_or(anyhow!("--size is required"))?,
        sink: sink.ok_or(anyhow!("--sink is required"))?,
        dkim,
        sample,
        timeout: Duration::from_secs(timeout),
    };
    if args.sessions == 0 || !args.messages.is_multiple_of(args.sessions) {
        bail!("--messages must be a multiple of a non-zero --sessions");
    }
    Ok(args)
}

// ---------------------------------------------------------------- the message

/// The body every message carries: lines of text, CRLF, none starting
/// with a dot, sized so that the whole message is about `size` bytes.
fn body(size: usize) -> Vec<u8> {
    // The header block below is about 250 bytes.
    let want = size.saturating_sub(256).max(80);
    let line = b"The quick brown fox jumps over the lazy dog, again and again, for the bench.\r\n";
    line.iter()
        .copied()
        .cycle()
        .take(want - want % line.len())
        .collect()
}

fn message(session: usize, n: usize, body: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "From: <{session}@{DOMAIN}>\r\n\
         To: <{session}@{REMOTE}>\r\n\
         Subject: submission bench {session} {n}\r\n\
         Date: Mon, 7 Dec 2026 12:00:00 +0000\r\n\
         Message-ID: <{session}.{n}@client.{DOMAIN}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n"
    )
    .into_bytes();
    m.extend_from_slice(body);
    m.extend_from_slice(b".\r\n");
    m
}

// ---------------------------------------------------------------- the client

/// The server's certificate, and nothing else, is trusted: the bench's
/// self-signed certificate needs no chain, and any other is refused.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client connection: replies are read whole, one at a time.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Sends `line` (if any) and reads the reply; its code must be `want`.
    async fn step(&mut self, line: &[u8], want: u16) -> anyhow::Result<String> {
        if !line.is_empty() {
            self.stream.write_all(line).await?;
            self.stream.flush().await?;
        }
        let mut reply = String::new();
        loop {
            let end = loop {
                if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                    break i;
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed; reply so far {reply:?}");
                }
                self.buf.extend_from_slice(&chunk[..n]);
            };
            let l: Vec<u8> = self.buf.drain(..=end).collect();
            let l = String::from_utf8_lossy(&l).trim_end().to_string();
            let last = l.as_bytes().get(3) != Some(&b'-');
            reply.push_str(&l);
            reply.push('\n');
            if last {
                break;
            }
        }
        if !reply.starts_with(&want.to_string()) {
            let sent = String::from_utf8_lossy(&line[..line.len().min(60)]);
            bail!("to {:?} the server said {reply:?}", sent.trim_end());
        }
        Ok(reply)
    }
}

async fn session(
    server: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    s: usize,
    per_session: usize,
    password: &str,
    body: &[u8],
) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(server).await?;
    tcp.set_nodelay(true)?;
    let mut c = Conn {
        stream: tcp,
        buf: Vec::new(),
    };
    c.step(b"", 220).await?;
    let ehlo = c.step(b"EHLO client.bench.test\r\n", 250).await?;
    if !ehlo.contains("STARTTLS") {
        bail!("no STARTTLS offered: {ehlo:?}");
    }
    c.step(b"STARTTLS\r\n", 220).await?;
    if !c.buf.is_empty() {
        bail!("the server sent more after its 220 to STARTTLS");
    }
    let name = ServerName::try_from("submission.bench.test")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, c.stream)
        .await?;
    let version = stream
        .get_ref()
        .1
        .protocol_version()
        .map_or("none".to_string(), |v| format!("{v:?}"));
    let mut c = Conn {
        stream,
        buf: Vec::new(),
    };
    let ehlo = c.step(b"EHLO client.bench.test\r\n", 250).await?;
    if !ehlo.contains("PLAIN") {
        bail!("no AUTH PLAIN offered after STARTTLS: {ehlo:?}");
    }
    let user = format!("{s}@{DOMAIN}");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    c.step(format!("AUTH PLAIN {token}\r\n").as_bytes(), 235)
        .await?;
    let mail = format!("MAIL FROM:<{user}>\r\n");
    let rcpt = format!("RCPT TO:<{s}@{REMOTE}>\r\n");
    for n in 0..per_session {
        c.step(mail.as_bytes(), 250).await?;
        c.step(rcpt.as_bytes(), 250).await?;
        c.step(b"DATA\r\n", 354).await?;
        c.step(&message(s, n, body), 250).await?;
    }
    c.step(b"QUIT\r\n", 221).await?;
    Ok(version)
}

// ---------------------------------------------------------------- the sink

#[derive(Default)]
struct Tally {
    /// Distinct messages (by Message-ID) received.
    distinct: usize,
    /// Messages received again.
    duplicates: usize,
    /// Messages whose body was not the one sent, or with no Message-ID:
    /// the first one ends the wait.
    damaged: usize,
    /// Messages with a DKIM-Signature field.
    signed: usize,
    connections: usize,
    seen: HashSet<Vec<u8>>,
    /// When the last distinct message arrived.
    last: Option<Instant>,
}

struct Sink {
    tally: Mutex<Tally>,
    body: Vec<u8>,
    want: usize,
    all_in: Notify,
    sample: Option<PathBuf>,
}

impl Sink {
    /// Checks one message as received (dot-stuffing undone, CRLF).
    fn record(&self, msg: &[u8]) {
        let split = msg.windows(4).position(|w| w == b"\r\n\r\n");
        let (head, body) = match split {
            Some(i) => (&msg[..i + 2], &msg[i + 4..]),
            None => (msg, &[][..]),
        };
        let mut id = None;
        let mut signed = false;
        for line in head.split(|&b| b == b'\n') {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with(b"message-id:") {
                id = Some(line[11..].trim_ascii().to_vec());
            } else if lower.starts_with(b"dkim-signature:") {
                signed = true;
            }
        }
        let mut t = self.tally.lock().unwrap();
        t.signed += signed as usize;
        let Some(id) = id.filter(|_| body == self.body) else {
            t.damaged += 1;
            // No need to wait for the rest: the run has failed.
            self.all_in.notify_one();
            return;
        };
        if !t.seen.insert(id) {
            t.duplicates += 1;
            return;
        }
        t.distinct += 1;
        if t.distinct == 1
            && let Some(path) = &self.sample
        {
            let _ = std::fs::write(path, msg);
        }
        if t.distinct == self.want {
            t.last = Some(Instant::now());
            self.all_in.notify_one();
        }
    }
}

async fn sink_connection(sink: Arc<Sink>, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    sink.tally.lock().unwrap().connections += 1;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut out = Vec::new();
    w.write_all(b"220 remote.bench.test ESMTP sink\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match &verb[..] {
            b"EHLO" => out.extend_from_slice(
                b"250-remote.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                  250-ENHANCEDSTATUSCODES\r\n250 SIZE 104857600\r\n",
            ),
            b"HELO" => out.extend_from_slice(b"250 remote.bench.test\r\n"),
            b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
            b"DATA" => {
                w.write_all(&out).await?;
                out.clear();
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut msg = Vec::with_capacity(sink.body.len() + 2048);
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    let l = if line.starts_with(b"..") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    msg.extend_from_slice(l);
                }
                sink.record(&msg);
                out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
            }
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                w.write_all(&out).await?;
                return Ok(());
            }
            _ => out.extend_from_slice(b"502 5.5.2 Error: command not recognized\r\n"),
        }
        // Pipelined commands are answered together, as a server must.
        if r.buffer().is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
    }
}

// ---------------------------------------------------------------- main

async fn run(args: Args) -> anyhow::Result<bool> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = CertificateDer::from_pem_file(&args.cert)
        .with_context(|| format!("--cert {}", args.cert.display()))?;
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { cert, provider }))
            .with_no_client_auth(),
    );
    let body = body(args.size);
    let sink = Arc::new(Sink {
        tally: Mutex::default(),
        body: body.clone(),
        want: args.messages,
        all_in: Notify::new(),
        sample: args.sample.clone(),
    });
    let listener = TcpListener::bind(args.sink)
        .await
        .with_context(|| format!("--sink {}", args.sink))?;
    println!("sink {}", listener.local_addr()?);
    {
        let sink = sink.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(sink_connection(sink.clone(), stream));
            }
        });
    }

    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut go = String::new();
    stdin.read_line(&mut go).await?;
    let server: SocketAddr = go
        .trim()
        .strip_prefix("go ")
        .ok_or(anyhow!("expected `go ADDR:PORT` on stdin, got {go:?}"))?
        .parse()?;

    let body: Arc<[u8]> = body.into();
    let password: Arc<str> = args.password.as_str().into();
    let per_session = args.messages / args.sessions;
    let t0 = Instant::now();
    let all_in = sink.all_in.notified();
    let sessions: Vec<_> = (0..args.sessions)
        .map(|s| {
            let (tls, body, password) = (tls.clone(), body.clone(), password.clone());
            tokio::spawn(async move {
                session(server, tls, s, per_session, &password, &body)
                    .await
                    .with_context(|| format!("session {s}"))
            })
        })
        .collect();
    let mut versions = std::collections::BTreeSet::new();
    let accepted = tokio::time::timeout(args.timeout, async {
        for s in sessions {
            versions.insert(s.await??);
        }
        anyhow::Ok(t0.elapsed())
    })
    .await
    .map_err(|_| anyhow!("the sessions did not finish within {:?}", args.timeout))??;
    let left = args.timeout.saturating_sub(t0.elapsed());
    let arrived = tokio::time::timeout(left, all_in).await.is_ok();
    if !arrived || sink.tally.lock().unwrap().damaged > 0 {
        let t = sink.tally.lock().unwrap();
        bail!(
            "{} of {} messages reached the sink intact (waited up to {:?}; {} damaged, {} twice)",
            t.distinct,
            args.messages,
            args.timeout,
            t.damaged,
            t.duplicates
        );
    }
    let delivered = sink.tally.lock().unwrap().last.expect("set with all_in") - t0;
    println!(
        "{{\"accepted_s\": {:.6}, \"delivered_s\": {:.6}, \"tls\": {:?}}}",
        accepted.as_secs_f64(),
        delivered.as_secs_f64(),
        versions.into_iter().collect::<Vec<_>>().join(" ")
    );

    // Until the harness has seen the server's queue empty.
    let mut rest = Vec::new();
    stdin.read_to_end(&mut rest).await?;
    let t = sink.tally.lock().unwrap();
    let signed_ok = if args.dkim {
        t.signed == t.distinct + t.duplicates + t.damaged
    } else {
        t.signed == 0
    };
    println!(
        "{{\"messages\": {}, \"duplicates\": {}, \"damaged\": {}, \"signed\": {}, \"connections\": {}}}",
        t.distinct, t.duplicates, t.damaged, t.signed, t.connections
    );
    Ok(t.distinct == args.messages && t.duplicates == 0 && t.damaged == 0 && signed_ok)
}

fn main() {
    let args = parse().unwrap_or_else(|e| {
        eprintln!("submit_load: {e:#}");
        std::process::exit(2);
    });
    // Two workers: the machine has two cores, and the servers under test
    // share them with this process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("submit_load: {e:#}");
            std::process::exit(1);
        }
    }
}
