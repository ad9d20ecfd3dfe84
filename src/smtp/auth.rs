//! AUTH (RFC 4954) on a submission port: PLAIN and LOGIN, only inside TLS.
//! The exchange is read here; the credentials are checked by
//! `crate::submission::Logins`, which also counts failures per address.

use tokio::io::{AsyncRead, AsyncWrite};

use super::session::{Next, Read, Session};
use crate::reply::Reply;
use crate::submission::Login;
use crate::submission::sasl::{self, Credentials, Mechanism, SaslError};

/// Base64 of `Username:` and `Password:`, LOGIN's challenges.
const LOGIN_USERNAME: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

/// How an exchange ended early: the replies, and what follows.
type Ended = (Vec<Reply>, Next);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// `AUTH mechanism [initial-response]`; `mechanism` is None when it is
    /// not one we offer.
    pub(super) async fn auth(
        &mut self,
        mechanism: Option<Mechanism>,
        initial: Option<String>,
    ) -> std::io::Result<(Vec<Reply>, Next)> {
        let one = |r: Reply| Ok((vec![r], Next::Continue));
        // Never a password in plaintext: AUTH is neither offered nor
        // accepted before TLS (RFC 4954 §4, RFC 8314 §3).
        if self.conn.tls.is_none() {
            return one(Reply::auth_needs_tls());
        }
        if self.helo.is_none() || !self.esmtp {
            return one(Reply::bad_sequence("Send EHLO first"));
        }
        if self.auth.is_some() {
            return one(Reply::bad_sequence("Already authenticated"));
        }
        if self.tx.is_some() {
            return one(Reply::bad_sequence(
                "AUTH not allowed during a mail transaction",
            ));
        }
        let Some(mechanism) = mechanism else {
            return one(Reply::auth_unknown_mechanism());
        };
        let ip = self.conn.ip;
        if self.runtime().logins.locked(ip) {
            return Ok((vec![Reply::auth_locked_out()], Next::Close));
        }
        let creds = match self.credentials(mechanism, initial).await? {
            Ok(c) => c,
            Err(ended) => return Ok(ended),
        };
        let rt = self.pipeline.runtime.clone();
        match rt.logins.check(&rt.directory, ip, creds).await {
            Login::Ok(user) => {
                self.auth = Some(user);
                one(Reply::auth_ok())
            }
            Login::Failed => one(Reply::auth_failed()),
            Login::Locked => Ok((vec![Reply::auth_locked_out()], Next::Close)),
            Login::Unavailable => one(Reply::auth_unavailable()),
        }
    }

    /// Reads the credentials: None when the client sent something that is
    /// not a well-formed login (it counts as a failed one).
    async fn credentials(
        &mut self,
        mechanism: Mechanism,
        initial: Option<String>,
    ) -> std::io::Result<Result<Option<Credentials>, Ended>> {
        Ok(Ok(match mechanism {
            Mechanism::Plain => {
                let message = match initial {
                    Some(ir) => sasl::decode(&ir),
                    None => match self.challenge("").await? {
                        Ok(r) => r,
                        Err(ended) => return Ok(Err(ended)),
                    },
                };
                match message {
                    Ok(m) => sasl::plain(&m),
                    Err(e) => return Ok(Err(refused(e))),
                }
            }
            Mechanism::Login => {
                let user = match initial {
                    Some(ir) => sasl::decode(&ir),
                    None => match self.challenge(LOGIN_USERNAME).await? {
                        Ok(r) => r,
                        Err(ended) => return Ok(Err(ended)),
                    },
                };
                let user = match user {
                    Ok(u) => u,
                    Err(e) => return Ok(Err(refused(e))),
                };
                let password = match self.challenge(LOGIN_PASSWORD).await? {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => return Ok(Err(refused(e))),
                    Err(ended) => return Ok(Err(ended)),
                };
                match (sasl::login_text(user), sasl::login_text(password)) {
                    (Some(username), Some(password)) => Some(Credentials { username, password }),
                    _ => None,
                }
            }
        }))
    }

    /// Sends a `334` challenge and reads the client's response line.
    async fn challenge(
        &mut self,
        text: &'static str,
    ) -> std::io::Result<Result<Result<Vec<u8>, SaslError>, Ended>> {
        self.send_now(&Reply::auth_challenge(text)).await?;
        let timeout = self.config().smtp.command_timeout.0;
        Ok(match self.read_line(timeout).await? {
            Read::Line(line) => {
                let text = std::str::from_utf8(&line).unwrap_or("!");
                Ok(sasl::decode(text.trim_end_matches(['\r', '\n'])))
            }
            Read::TooLong => Err((vec![Reply::auth_line_too_long()], Next::Continue)),
            Read::Closed => Err((Vec::new(), Next::Close)),
            Read::TimedOut => Err((vec![Reply::timeout()], Next::Close)),
            Read::Shutdown => Err((vec![Reply::shutting_down()], Next::Close)),
        })
    }
}

/// The reply to a response that ended the exchange.
fn refused(e: SaslError) -> Ended {
    let reply = match e {
        SaslError::Cancelled => Reply::auth_cancelled(),
        SaslError::BadBase64 => Reply::auth_bad_base64(),
    };
    (vec![reply], Next::Continue)
}
