//! The command parser (`letterbox::smtp::command::parse`) on arbitrary
//! lines. Beyond "does not panic", every input must satisfy:
//!
//! - determinism, and the line ending does not matter: a line ending in
//!   CRLF and the same line ending in a bare LF parse alike;
//! - a line holding CR or NUL (besides its ending) or invalid UTF-8 is
//!   refused, and the verb's case does not matter;
//! - an error is exactly one well-formed reply line: `5yz 5.y.z text` CRLF,
//!   with no CR or LF inside the text (client bytes echoed into a reply
//!   can never start a second reply), and bounded in length;
//! - a command's strings carry no CR, LF or NUL and are no longer than the
//!   line (bounded output);
//! - a parsed command, written back in canonical form, parses again to the
//!   identical command.

#![no_main]

use letterbox::smtp::command::{Command, MailFrom, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The session hands over lines ending in LF; the raw input too, in
    // case some path ever passes a line without one.
    let crlf = [data, b"\r\n"].concat();
    let lf = [data, b"\n"].concat();
    if !data.ends_with(b"\r") {
        assert_eq!(parse(&crlf), parse(&lf), "CRLF and LF endings differ");
    }
    for line in [data, &crlf[..], &lf[..]] {
        check(line);
    }
});

fn check(line: &[u8]) {
    let got = parse(line);
    assert_eq!(got, parse(line), "not deterministic");
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body.contains(&b'\r') || body.contains(&0) || std::str::from_utf8(line).is_err() {
        assert!(got.is_err(), "CR, NUL or invalid UTF-8 accepted: {got:?}");
    }
    // Verbs are case-insensitive.
    if line.len() >= 4 && line[..4].iter().all(u8::is_ascii_alphabetic) {
        let mut swapped = line.to_vec();
        for b in &mut swapped[..4] {
            *b ^= 0x20;
        }
        assert_eq!(parse(&swapped), got, "the verb's case changed the result");
    }
    match &got {
        Err(reply) => check_reply(&reply.to_wire(), line.len()),
        Ok(cmd) => {
            for s in strings(cmd) {
                assert!(
                    !s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                    "CR, LF or NUL in {cmd:?}"
                );
                assert!(s.len() <= line.len(), "output longer than input: {cmd:?}");
            }
            if let Some(canonical) = render(cmd) {
                assert_eq!(
                    parse(canonical.as_bytes()).as_ref(),
                    Ok(cmd),
                    "{canonical:?} (from {:?}) did not parse back",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
}

/// An error reply: one line, a 5xx code with a matching enhanced status.
fn check_reply(wire: &str, input_len: usize) {
    let text = wire.strip_suffix("\r\n").expect("reply ends with CRLF");
    assert!(!text.contains(['\r', '\n']), "reply spans lines: {wire:?}");
    let b = text.as_bytes();
    assert!(b.len() >= 10, "reply too short: {wire:?}");
    assert!(b[0] == b'5' && b[1].is_ascii_digit() && b[2].is_ascii_digit());
    assert_eq!(b[3], b' ', "{wire:?}");
    assert_eq!(
        &b[4..6],
        b"5.",
        "status class differs from the code: {wire:?}"
    );
    // Fixed text plus at most the echoed parameter name.
    assert!(text.len() <= 80 + input_len, "reply unbounded: {wire:?}");
}

fn strings(cmd: &Command) -> Vec<&str> {
    match cmd {
        Command::Ehlo(h) | Command::Helo(h) | Command::Lhlo(h) | Command::Rcpt(h) => vec![h],
        Command::Mail(m) => vec![&m.address],
        _ => vec![],
    }
}

/// The command as a well-behaved client would send it, or None for the
/// ones whose arguments the parser discards.
fn render(cmd: &Command) -> Option<String> {
    Some(match cmd {
        Command::Ehlo(h) => format!("EHLO {h}\r\n"),
        Command::Helo(h) => format!("HELO {h}\r\n"),
        Command::Lhlo(h) => format!("LHLO {h}\r\n"),
        Command::Mail(MailFrom {
            address,
            size,
            smtputf8,
            eight_bit,
        }) => {
            let mut s = if address.is_empty() {
                "MAIL FROM:<>".to_string()
            } else {
                format!("MAIL FROM:<{}>", path(address)?)
            };
            if let Some(n) = size {
                s += &format!(" SIZE={n}");
            }
            if *eight_bit {
                s += " BODY=8BITMIME";
            }
            if *smtputf8 {
                s += " SMTPUTF8";
            }
            s + "\r\n"
        }
        Command::Rcpt(a) => format!("RCPT TO:<{}>\r\n", path(a)?),
        Command::Data => "DATA\r\n".into(),
        Command::Bdat { size, last } => {
            format!("BDAT {size}{}\r\n", if *last { " LAST" } else { "" })
        }
        Command::Rset => "RSET\r\n".into(),
        Command::Noop => "NOOP\r\n".into(),
        Command::Quit => "QUIT\r\n".into(),
        Command::Help => "HELP\r\n".into(),
        Command::Vrfy => "VRFY x\r\n".into(),
        Command::Expn => "EXPN x\r\n".into(),
        Command::StartTls => "STARTTLS\r\n".into(),
        Command::NotImplemented => return None,
    })
}

/// An address as a path: the local part quoted unless it is a dot-atom
/// (RFC 5321 §4.1.2). None when no path spells it: smtp-proto drops quotes
/// wherever they are (`alice@"exa mple.org"` gives a domain with a space)
/// and keeps control characters that were inside quotes; the session
/// refuses such addresses (mail.rs, address.rs), so the parser need not.
fn path(address: &str) -> Option<String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return is_dot_atom(address).then(|| address.to_string());
    };
    let domain_ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || !c.is_ascii());
    if !domain_ok || local.chars().any(char::is_control) {
        return None;
    }
    if is_dot_atom(local) {
        return Some(address.to_string());
    }
    let mut q = String::from("\"");
    for c in local.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    Some(format!("{q}\"@{domain}"))
}

fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|atom| {
            !atom.is_empty()
                && atom.chars().all(|c| {
                    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
                })
        })
}
