//! Service addresses as Postfix writes them (`inet:HOST:PORT`,
//! `inet6:[ADDR]:PORT`, `unix:/path`), and a connected byte stream to one.
//!
//! Milters and policy servers are both named this way in Postfix's
//! configuration, so operators can copy their lines over unchanged. The
//! Sendmail form `inet:PORT@HOST` (what OpenDKIM and rspamd print in their
//! own documentation) is accepted too.

#![warn(missing_docs)]

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Where a milter or policy server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP service. The host may be a name (resolved on the blocking
    /// pool at connect time) or an IPv4/IPv6 literal without brackets.
    Tcp {
        /// A name or an address literal.
        host: String,
        /// The TCP port.
        port: u16,
    },
    /// A UNIX-domain stream socket, by absolute or relative path.
    Unix(PathBuf),
}

/// Why an address string names no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad service address {address:?}: {why}")]
pub struct EndpointError {
    /// The string as given, for the operator's log.
    pub address: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Endpoint {
    /// Parses `inet:HOST:PORT`, `inet6:HOST:PORT` (HOST may be bracketed),
    /// `inet:PORT@HOST`, `unix:PATH` or `local:PATH`.
    pub fn parse(address: &str) -> Result<Endpoint, EndpointError> {
        let err = |why| EndpointError {
            address: address.to_string(),
            why,
        };
        let (transport, rest) = address
            .split_once(':')
            .ok_or_else(|| err("expected transport:endpoint"))?;
        match transport {
            "unix" | "local" => {
                if rest.is_empty() {
                    return Err(err("empty socket path"));
                }
                Ok(Endpoint::Unix(PathBuf::from(rest)))
            }
            "inet" | "inet6" | "tcp" => {
                let (host, port) = if let Some((port, host)) = rest.split_once('@') {
                    (host, port)
                } else {
                    rest.rsplit_once(':')
                        .ok_or_else(|| err("expected HOST:PORT or PORT@HOST"))?
                };
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                if host.is_empty() {
                    return Err(err("empty host"));
                }
                let port: u16 = port.parse().map_err(|_| err("port is not a number"))?;
                if port == 0 {
                    return Err(err("port 0"));
                }
                Ok(Endpoint::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            _ => Err(err("transport is not inet, inet6 or unix")),
        }
    }

    /// Opens a stream to the endpoint. The caller bounds the time.
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                // Small request/reply packets: no Nagle delay between them.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "inet:[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "inet:{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(s)
    }
}

/// A connected TCP or UNIX-domain stream.
#[derive(Debug)]
pub enum Stream {
    /// To an `inet:` endpoint.
    Tcp(TcpStream),
    /// To a `unix:` endpoint.
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_postfix_and_sendmail_forms() {
        let tcp = |h: &str, p| Endpoint::Tcp {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            Endpoint::parse("inet:127.0.0.1:8891"),
            Ok(tcp("127.0.0.1", 8891))
        );
        assert_eq!(
            Endpoint::parse("inet:localhost:10023"),
            Ok(tcp("localhost", 10023))
        );
        assert_eq!(Endpoint::parse("inet6:[::1]:11332"), Ok(tcp("::1", 11332)));
        assert_eq!(Endpoint::parse("inet6:::1:11332"), Ok(tcp("::1", 11332)));
        assert_eq!(
            Endpoint::parse("inet:8891@127.0.0.1"),
            Ok(tcp("127.0.0.1", 8891))
        );
        assert_eq!(
            Endpoint::parse("unix:/run/opendkim/opendkim.sock"),
            Ok(Endpoint::Unix("/run/opendkim/opendkim.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("local:private/policy"),
            Ok(Endpoint::Unix("private/policy".into()))
        );
    }

    #[test]
    fn refuses_what_names_no_endpoint() {
        for bad in [
            "",
            "127.0.0.1:25",
            "inet:",
            "inet:host",
            "inet::25",
            "inet:host:0",
            "inet:host:99999",
            "inet:host:x",
            "unix:",
            "smtp:host:25",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn displays_as_postfix_writes_it() {
        for s in ["inet:127.0.0.1:8891", "inet:[::1]:25", "unix:/tmp/x.sock"] {
            assert_eq!(Endpoint::parse(s).unwrap().to_string(), s);
        }
    }
}
