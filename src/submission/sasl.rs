//! The SASL side of AUTH (RFC 4954) for the two mechanisms a mail client
//! offers over TLS: PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login).
//! Pure: the session reads the lines, this decodes them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The mechanisms we offer, in the order EHLO lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

/// What EHLO says after `AUTH`.
pub const OFFERED: &str = "PLAIN LOGIN";

/// Why a client's response ended the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslError {
    /// The client sent `*` (RFC 4954 §4): 501 5.7.0.
    Cancelled,
    /// Not base64: 501 5.5.2.
    BadBase64,
}

/// A login name and password as the client sent them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a password in a log line.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Decodes one response line (its CRLF removed): `*` cancels, `=` is an
/// empty response (as an initial response, RFC 4954 §4), anything else is
/// base64.
pub fn decode(line: &str) -> Result<Vec<u8>, SaslError> {
    match line.trim() {
        "*" => Err(SaslError::Cancelled),
        "=" => Ok(Vec::new()),
        text => STANDARD.decode(text).map_err(|_| SaslError::BadBase64),
    }
}

/// Splits a PLAIN message, `authzid NUL authcid NUL passwd` (RFC 4616 §2).
/// None when it is malformed, or names an authorization identity other
/// than the login itself: acting for someone else is not offered.
pub fn plain(message: &[u8]) -> Option<Credentials> {
    let mut parts = message.split(|&b| b == 0);
    let (authzid, authcid, passwd) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let username = std::str::from_utf8(authcid).ok()?;
    let password = std::str::from_utf8(passwd).ok()?;
    if username.is_empty() || password.is_empty() {
        return None;
    }
    if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(authcid) {
        return None;
    }
    Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// A decoded LOGIN response (user name or password) as text.
pub fn login_text(response: Vec<u8>) -> Option<String> {
    String::from_utf8(response).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        assert_eq!(decode("*"), Err(SaslError::Cancelled));
        assert_eq!(decode("="), Ok(Vec::new()));
        assert_eq!(decode("dGVzdA=="), Ok(b"test".to_vec()));
        assert_eq!(decode("dGVzdA"), Err(SaslError::BadBase64));
        assert_eq!(decode("not base64!"), Err(SaslError::BadBase64));
    }

    #[test]
    fn plain_messages() {
        let creds = |u: &str, p: &str| {
            Some(Credentials {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(
            plain(b"\0alice@example.org\0pw"),
            creds("alice@example.org", "pw")
        );
        assert_eq!(
            plain(b"alice@example.org\0alice@example.org\0pw"),
            creds("alice@example.org", "pw")
        );
        // Acting as someone else, or a malformed message.
        assert_eq!(plain(b"bob@example.org\0alice@example.org\0pw"), None);
        assert_eq!(plain(b"alice@example.org\0pw"), None);
        assert_eq!(plain(b"\0alice@example.org\0pw\0x"), None);
        assert_eq!(plain(b"\0\0pw"), None);
        assert_eq!(plain(b"\0alice@example.org\0"), None);
        assert_eq!(plain(b"\0alice@example.org\0\xff"), None);
        let debug = format!("{:?}", creds("a@b", "secret").unwrap());
        assert!(!debug.contains("secret"), "{debug}");
    }
}
