//! The command parser: one line in, one typed [`Command`] out. Pure, so it
//! is table-tested and fuzzed without sockets.
//!
//! smtp-proto does the RFC 5321 grammar (it drops source routes and
//! unquotes local parts); on top of it this module refuses what letterbox
//! does not advertise, so a client cannot slip in DSN, AUTH or other
//! parameters we would silently ignore.

use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, Error as ProtoError, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8,
    Request,
};

use crate::reply::Reply;
use crate::submission::sasl::Mechanism;

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// LMTP's greeting verb (RFC 2033 §4.1); SMTP answers it 502.
    Lhlo(String),
    Mail(MailFrom),
    Rcpt(String),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy,
    Expn,
    StartTls,
    /// AUTH (RFC 4954): the mechanism when it is one we offer, and the
    /// initial response as sent (`=` for an empty one). Only a submission
    /// port answers it; elsewhere it is 502.
    Auth {
        mechanism: Option<Mechanism>,
        initial: Option<String>,
    },
    /// A command we know but do not offer (ETRN, …).
    NotImplemented,
}

/// The reverse-path and the parameters of MAIL we support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// Empty for the null sender `<>`.
    pub address: String,
    /// SIZE=, when given (RFC 1870).
    pub size: Option<u64>,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// BODY=8BITMIME (RFC 6152).
    pub eight_bit: bool,
    /// AUTH= was given (RFC 4954 §5). The session refuses it where AUTH is
    /// not offered and otherwise ignores its value, as for `AUTH=<>`: we
    /// never pass an identity on that we did not check ourselves.
    pub auth: bool,
}

/// Parses one command line (with its line ending). Errors come back as the
/// reply to send.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(Reply::syntax("Command line is not valid UTF-8"));
    };
    let body = text.strip_suffix('\n').unwrap_or(text);
    let body = body.strip_suffix('\r').unwrap_or(body);
    // A CR or NUL inside a command is never legitimate, and smtp-proto
    // would quietly drop a CR inside an address.
    if body.bytes().any(|b| b == b'\r' || b == 0) {
        return Err(Reply::syntax("Command line contains CR or NUL"));
    }
    let mut normalized = Vec::with_capacity(body.len() + 2);
    normalized.extend_from_slice(body.as_bytes());
    normalized.extend_from_slice(b"\r\n");
    let request = Request::parse(&mut normalized.iter()).map_err(proto_error)?;
    Ok(match request {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        Request::Mail { from } => {
            let supported = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_SMTPUTF8;
            let unsupported = from.flags & !supported != 0
                || from.trans_id.is_some()
                || from.env_id.is_some()
                || from.solicit.is_some()
                || from.mtrk.is_some()
                || from.by != 0
                || from.hold_for != 0
                || from.hold_until != 0
                || from.mt_priority != 0;
            if unsupported {
                return Err(Reply::unsupported_parameter(mail_param_name(text)));
            }
            if !spellable(&from.address) {
                return Err(Reply::bad_sender());
            }
            Command::Mail(MailFrom {
                address: from.address.into_owned(),
                size: (from.size != 0).then_some(from.size as u64),
                smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
                eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
                auth: from.auth.is_some(),
            })
        }
        Request::Rcpt { to } => {
            if to.orcpt.is_some() || to.rrvs != 0 || to.flags != 0 {
                return Err(Reply::unsupported_parameter(mail_param_name(text)));
            }
            if !spellable(&to.address) {
                return Err(Reply::bad_recipient());
            }
            Command::Rcpt(to.address.into_owned())
        }
        Request::Data => Command::Data,
        Request::Bdat {
            chunk_size,
            is_last,
        } => Command::Bdat {
            size: chunk_size as u64,
            last: is_last,
        },
        Request::Rset => Command::Rset,
        Request::Noop { .. } => Command::Noop,
        Request::Quit => Command::Quit,
        Request::Help { .. } => Command::Help,
        Request::Vrfy { .. } => Command::Vrfy,
        Request::Expn { .. } => Command::Expn,
        Request::StartTls => Command::StartTls,
        Request::Lhlo { host } => Command::Lhlo(host.into_owned()),
        Request::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism: match mechanism {
                AUTH_PLAIN => Some(Mechanism::Plain),
                AUTH_LOGIN => Some(Mechanism::Login),
                _ => None,
            },
            initial: (!initial_response.is_empty()).then(|| initial_response.into_owned()),
        },
        Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
            Command::NotImplemented
        }
    })
}

/// Whether a path could have spelled `address`: a domain after the last
/// `@`. smtp-proto drops quotes wherever they are, so `<a@"x y">` gives the
/// domain `x y`, and `<a@".b <c@".d>` the sender `a@.b <c@.d`, which would
/// reach Return-Path (found by fuzzing, docs/fuzzing.md). A quoted local
/// part holding `@` still passes; the domain is checked in full later.
fn spellable(address: &str) -> bool {
    let Some((_, domain)) = address.rsplit_once('@') else {
        // The null sender, or <Postmaster>.
        return true;
    };
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || c == '-'
                        || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
                })
        })
}

/// The first parameter after the path, for the 555 reply text.
fn mail_param_name(line: &str) -> &str {
    line.split_once('>')
        .map(|(_, rest)| rest.trim())
        .and_then(|rest| rest.split([' ', '=', '\r', '\n']).next())
        .unwrap_or("")
}

fn proto_error(e: ProtoError) -> Reply {
    match e {
        ProtoError::UnknownCommand => Reply::unknown_command(),
        ProtoError::InvalidSenderAddress => Reply::bad_sender(),
        ProtoError::InvalidRecipientAddress => Reply::bad_recipient(),
        ProtoError::SyntaxError { syntax } => Reply::syntax(format!("Syntax: {syntax}")),
        ProtoError::InvalidParameter { param } => {
            Reply::syntax(format!("Invalid parameter {param}"))
        }
        ProtoError::UnsupportedParameter { param } => Reply::unsupported_parameter(&param),
        ProtoError::NeedsMoreData { .. }
        | ProtoError::ResponseTooLong
        | ProtoError::InvalidResponse { .. } => Reply::syntax("Syntax error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(address: &str) -> Command {
        Command::Mail(MailFrom {
            address: address.into(),
            size: None,
            smtputf8: false,
            eight_bit: false,
            auth: false,
        })
    }

    #[test]
    fn commands() {
        let table: &[(&str, Result<Command, &str>)] = &[
            (
                "EHLO client.example\r\n",
                Ok(Command::Ehlo("client.example".into())),
            ),
            (
                "ehlo [192.0.2.1]\r\n",
                Ok(Command::Ehlo("[192.0.2.1]".into())),
            ),
            ("HELO x\n", Ok(Command::Helo("x".into()))),
            ("EHLO\r\n", Err("501 5.5.4 Syntax: EHLO domain\r\n")),
            ("MAIL FROM:<a@b.example>\r\n", Ok(mail("a@b.example"))),
            ("MAIL FROM:<>\r\n", Ok(mail(""))),
            (
                "mail from:<a@b.example> SIZE=1000 BODY=8BITMIME SMTPUTF8\r\n",
                Ok(Command::Mail(MailFrom {
                    address: "a@b.example".into(),
                    size: Some(1000),
                    smtputf8: true,
                    eight_bit: true,
                    auth: false,
                })),
            ),
            (
                "MAIL FROM:<a@b.example> RET=FULL\r\n",
                Err("555 5.5.4 Unsupported parameter RET\r\n"),
            ),
            (
                "MAIL FROM:<a@b.example> AUTH=<>\r\n",
                Ok(Command::Mail(MailFrom {
                    address: "a@b.example".into(),
                    size: None,
                    smtputf8: false,
                    eight_bit: false,
                    auth: true,
                })),
            ),
            (
                "MAIL FROM:<a@b.example> FOO=bar\r\n",
                Err("555 5.5.4 Unsupported parameter FOO=BAR\r\n"),
            ),
            (
                "MAIL FROM:a@b.example\r\n",
                Err("501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]\r\n"),
            ),
            (
                "MAIL TO:<a@b>\r\n",
                Err("501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]\r\n"),
            ),
            (
                "RCPT TO:<u@example.org>\r\n",
                Ok(Command::Rcpt("u@example.org".into())),
            ),
            (
                "RCPT TO:<@relay.example,@x.example:u@example.org>\r\n",
                Ok(Command::Rcpt("u@example.org".into())),
            ),
            (
                "RCPT TO:<\"a@b\"@example.org>\r\n",
                Ok(Command::Rcpt("a@b@example.org".into())),
            ),
            // Quotes outside the local part (fuzzing, docs/fuzzing.md).
            (
                "MAIL FROM:<a@\".eL FROM:<a@\".eg>\r\n",
                Err("501 5.1.7 Bad sender address syntax\r\n"),
            ),
            (
                "MAIL FROM:<a@\"exa mple.org\">\r\n",
                Err("501 5.1.7 Bad sender address syntax\r\n"),
            ),
            (
                "RCPT TO:<alice@\"exa mple.org\">\r\n",
                Err("501 5.1.3 Bad recipient address syntax\r\n"),
            ),
            (
                "RCPT TO:<u@example.org> NOTIFY=NEVER\r\n",
                Err("555 5.5.4 Unsupported parameter NOTIFY\r\n"),
            ),
            (
                "RCPT TO:<a\0b@example.org>\r\n",
                Err("501 5.5.4 Command line contains CR or NUL\r\n"),
            ),
            (
                "RCPT TO:<a\rb@example.org>\r\n",
                Err("501 5.5.4 Command line contains CR or NUL\r\n"),
            ),
            ("DATA\r\n", Ok(Command::Data)),
            (
                "BDAT 100 LAST\r\n",
                Ok(Command::Bdat {
                    size: 100,
                    last: true,
                }),
            ),
            (
                "BDAT 0\r\n",
                Ok(Command::Bdat {
                    size: 0,
                    last: false,
                }),
            ),
            ("RSET\r\n", Ok(Command::Rset)),
            ("NOOP hello\r\n", Ok(Command::Noop)),
            ("QUIT\r\n", Ok(Command::Quit)),
            ("HELP\r\n", Ok(Command::Help)),
            ("VRFY root\r\n", Ok(Command::Vrfy)),
            ("EXPN list\r\n", Ok(Command::Expn)),
            ("STARTTLS\r\n", Ok(Command::StartTls)),
            (
                "AUTH PLAIN AGFiAGM=\r\n",
                Ok(Command::Auth {
                    mechanism: Some(Mechanism::Plain),
                    initial: Some("AGFiAGM=".into()),
                }),
            ),
            (
                "auth login\r\n",
                Ok(Command::Auth {
                    mechanism: Some(Mechanism::Login),
                    initial: None,
                }),
            ),
            (
                "AUTH PLAIN =\r\n",
                Ok(Command::Auth {
                    mechanism: Some(Mechanism::Plain),
                    initial: Some("=".into()),
                }),
            ),
            (
                "AUTH CRAM-MD5\r\n",
                Ok(Command::Auth {
                    mechanism: None,
                    initial: None,
                }),
            ),
            ("ETRN example.org\r\n", Ok(Command::NotImplemented)),
            ("FOO\r\n", Err("500 5.5.1 Command unrecognized\r\n")),
            ("\r\n", Err("500 5.5.1 Command unrecognized\r\n")),
        ];
        for (line, want) in table {
            let got = parse(line.as_bytes()).map_err(|r| r.to_wire());
            let want = want.clone().map_err(str::to_string);
            assert_eq!(got, want, "{line:?}");
        }
        assert_eq!(
            parse(b"MAIL FROM:<\xff@x>\r\n").unwrap_err().to_wire(),
            "501 5.5.4 Command line is not valid UTF-8\r\n"
        );
    }
}
