//! Connections to one policy server, kept open and reused.
//!
//! Each request takes an idle connection (or opens one), writes the
//! request, reads the answer and puts the connection back. A server may
//! close an idle connection at any time (postgrey does after its own
//! timeout, Postfix's spawn(8) servers after each use), so a reused
//! connection that fails before any answer arrives is dropped and the
//! request tried once more on a fresh one, as Postfix's attr_clnt does.
//! The whole request, retry included, is bounded by one timeout.

use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::{Instant, timeout_at};

use super::response::parse_response;
use super::{Action, PolicyError, PolicyRequest};
use crate::endpoint::{Endpoint, Stream};

/// Limits for one policy server.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    /// How long one request may take from start to answer, a reconnect
    /// included. Postfix's `smtpd_policy_service_timeout` is 100 s; a
    /// few seconds suit a server on the same host.
    pub timeout: Duration,
    /// Idle connections kept for reuse; more are closed after use. About
    /// the number of SMTP sessions that ask at the same moment.
    pub max_idle: usize,
    /// The largest answer accepted, in bytes; a bigger one is a protocol
    /// error, so a broken server cannot make us buffer without end.
    pub max_response: usize,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            timeout: Duration::from_secs(10),
            max_idle: 16,
            max_response: 8192,
        }
    }
}

/// A policy server, shared by every session that asks it.
#[derive(Debug)]
pub struct PolicyClient {
    /// Where it listens.
    endpoint: Endpoint,
    /// Limits.
    options: PolicyOptions,
    /// Connections between requests. A std mutex: it is only held to push
    /// or pop, never across an await.
    idle: Mutex<Vec<BufReader<Stream>>>,
}

/// How one attempt on one connection failed.
enum Failure {
    /// Before any byte of the answer: on a reused connection, the server
    /// probably closed it while idle, and a fresh one may work.
    BeforeAnswer(PolicyError),
    /// Anything else.
    Fatal(PolicyError),
}

impl PolicyClient {
    /// A client for the server at `address` (`inet:HOST:PORT`,
    /// `unix:/path`), each request bounded by `timeout`. Connects lazily.
    pub fn new(address: &str, timeout: Duration) -> Result<PolicyClient, PolicyError> {
        Ok(PolicyClient::with_options(
            Endpoint::parse(address)?,
            PolicyOptions {
                timeout,
                ..PolicyOptions::default()
            },
        ))
    }

    /// A client with all the limits given.
    pub fn with_options(endpoint: Endpoint, options: PolicyOptions) -> PolicyClient {
        PolicyClient {
            endpoint,
            options,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Where the server listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Asks the server about one stage and returns its action.
    pub async fn check(&self, request: &PolicyRequest) -> Result<Action, PolicyError> {
        let deadline = Instant::now() + self.options.timeout;
        let bytes = request.encode();
        let timeout = PolicyError::Timeout {
            after: self.options.timeout,
        };
        if let Some(mut conn) = self.take_idle() {
            match timeout_at(deadline, self.ask(&mut conn, &bytes)).await {
                Ok(Ok(action)) => {
                    self.put_idle(conn);
                    return Ok(action);
                }
                Ok(Err(Failure::BeforeAnswer(_))) => {} // stale; retry below
                Ok(Err(Failure::Fatal(e))) => return Err(e),
                Err(_) => return Err(timeout),
            }
        }
        let mut conn = match timeout_at(deadline, self.endpoint.connect()).await {
            Ok(Ok(s)) => BufReader::new(s),
            Ok(Err(source)) => {
                return Err(PolicyError::Connect {
                    endpoint: self.endpoint.to_string(),
                    source,
                });
            }
            Err(_) => return Err(timeout),
        };
        match timeout_at(deadline, self.ask(&mut conn, &bytes)).await {
            Ok(Ok(action)) => {
                self.put_idle(conn);
                Ok(action)
            }
            Ok(Err(Failure::BeforeAnswer(e) | Failure::Fatal(e))) => Err(e),
            Err(_) => Err(timeout),
        }
    }

    /// One request and answer on one connection.
    async fn ask(&self, conn: &mut BufReader<Stream>, request: &[u8]) -> Result<Action, Failure> {
        let io = |e: std::io::Error| Failure::BeforeAnswer(PolicyError::Io(e));
        conn.get_mut().write_all(request).await.map_err(io)?;
        conn.get_mut().flush().await.map_err(io)?;
        let max = self.options.max_response;
        let mut answer = Vec::with_capacity(128);
        loop {
            let line_start = answer.len();
            let eof = read_line(conn, &mut answer, max).await.map_err(|e| {
                let e = match e {
                    LineError::Io(e) => PolicyError::Io(e),
                    LineError::TooLong => {
                        PolicyError::Protocol(format!("answer longer than {max} bytes"))
                    }
                };
                if line_start == 0 {
                    Failure::BeforeAnswer(e)
                } else {
                    Failure::Fatal(e)
                }
            })?;
            if eof {
                return Err(if answer.is_empty() {
                    Failure::BeforeAnswer(PolicyError::Closed)
                } else {
                    Failure::Fatal(PolicyError::Closed)
                });
            }
            let line = &answer[line_start..];
            if line == b"\n" || line == b"\r\n" {
                return parse_response(&answer).map_err(Failure::Fatal);
            }
        }
    }

    fn take_idle(&self) -> Option<BufReader<Stream>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put_idle(&self, conn: BufReader<Stream>) {
        if !conn.buffer().is_empty() {
            // Bytes after the answer: the server is confused; do not
            // read them as the next answer.
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.options.max_idle {
            idle.push(conn);
        }
    }
}

enum LineError {
    Io(std::io::Error),
    TooLong,
}

/// Appends one line (with its LF) to `out`; `Ok(true)` at end of stream
/// with no complete line. Never lets `out` grow past `max`.
async fn read_line(
    conn: &mut BufReader<Stream>,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<bool, LineError> {
    loop {
        let buf = conn.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            return Ok(true);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if out.len() + take > max {
            return Err(LineError::TooLong);
        }
        out.extend_from_slice(&buf[..take]);
        conn.consume(take);
        if done {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyReply;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Reads one request (up to its blank line) from a server-side stream.
    async fn read_request(s: &mut BufReader<tokio::net::TcpStream>) -> Option<String> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            text.push_str(&line);
            if line == "\n" {
                return Some(text);
            }
        }
    }

    fn request() -> PolicyRequest {
        PolicyRequest {
            sender: "a@example.net".into(),
            recipient: "b@example.org".into(),
            client_address: Some("192.0.2.7".parse().unwrap()),
            ..Default::default()
        }
    }

    fn client(addr: std::net::SocketAddr, timeout: Duration) -> PolicyClient {
        PolicyClient::new(&format!("inet:{addr}"), timeout).unwrap()
    }

    #[tokio::test]
    async fn reuses_one_connection_for_many_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut n = 0;
            while let Some(req) = read_request(&mut s).await {
                assert!(req.starts_with("request=smtpd_access_policy\n"));
                n += 1;
                let answer = format!("action=DEFER_IF_PERMIT try {n}\nextra=ignored\n\n");
                s.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
            n
        });
        let c = client(addr, Duration::from_secs(5));
        for n in 1..=3 {
            assert_eq!(
                c.check(&request()).await.unwrap(),
                Action::DeferIfPermit(PolicyReply {
                    code: 450,
                    enhanced: "4.7.1".into(),
                    text: format!("try {n}")
                })
            );
        }
        drop(c);
        assert_eq!(server.await.unwrap(), 3, "one connection served all three");
    }

    #[tokio::test]
    async fn reconnects_when_the_server_closed_an_idle_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // Each connection answers once, then closes: as a server that
            // drops idle clients.
            for _ in 0..2 {
                let (s, _) = listener.accept().await.unwrap();
                let mut s = BufReader::new(s);
                read_request(&mut s).await.unwrap();
                s.get_mut().write_all(b"action=DUNNO\n\n").await.unwrap();
            }
        });
        let c = client(addr, Duration::from_secs(5));
        assert_eq!(c.check(&request()).await.unwrap(), Action::Dunno);
        // Let the server's close arrive before the idle connection is used.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.check(&request()).await.unwrap(), Action::Dunno);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_or_babbles_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            read_request(&mut s).await.unwrap();
            drop(s);
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(&[b'x'; 10000]).await.unwrap();
        });
        let c = client(addr, Duration::from_secs(5));
        let e = c.check(&request()).await.unwrap_err();
        assert!(matches!(e, PolicyError::Closed), "{e}");
        let e = c.check(&request()).await.unwrap_err();
        assert!(matches!(e, PolicyError::Protocol(_)), "{e}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let c = client(addr, Duration::from_millis(300));
        let start = std::time::Instant::now();
        let e = c.check(&request()).await.unwrap_err();
        assert!(matches!(e, PolicyError::Timeout { .. }), "{e}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        server.abort();
    }
}
