//! The fields we write about a message's authentication, and the forged
//! ones we remove.
//!
//! Authentication-Results (RFC 8601) is one field, prepended to every copy,
//! our `hostname` its authserv-id, one result per line:
//!
//! ```text
//! Authentication-Results: mx.example.org;
//!     spf=pass smtp.mailfrom=alice@example.com;
//!     dkim=pass header.d=example.com header.s=sel header.b=AbCdEfGh;
//!     dmarc=pass (p=reject dis=none) header.from=example.com;
//!     arc=none
//! ```
//!
//! Every value that came from the client (addresses, names, signature
//! tags) is written as it is only when it is a plain token or address;
//! otherwise it is quoted, so no value can end a result or the field.

use mail_auth::dkim::Signature;
use mail_auth::{DkimOutput, DkimResult, Error, SpfResult};

use super::spf::{Identity, SpfVerdict, word};
use crate::pipeline::{Edit, Header};

/// The field name, as we write it and look for it.
pub const AUTHENTICATION_RESULTS: &str = "Authentication-Results";

/// The Authentication-Results field: `authserv_id` and each result on a
/// line of its own, or `none` when there is no result.
pub fn authentication_results(authserv_id: &str, results: &[String]) -> Option<Header> {
    let mut value = pvalue(authserv_id);
    if results.is_empty() {
        value.push_str("; none");
    }
    for r in results {
        value.push_str(";\r\n\t");
        value.push_str(r);
    }
    Header::folded(AUTHENTICATION_RESULTS, &value)
}

/// `spf=…` with the identity checked.
pub fn spf(v: &SpfVerdict) -> String {
    match &v.identity {
        Identity::MailFrom(address) => format!(
            "spf={} smtp.mailfrom={}",
            word(v.result),
            mailfrom(address, &v.domain)
        ),
        Identity::Helo(name) => format!("spf={} smtp.helo={}", word(v.result), pvalue(name)),
    }
}

/// `dkim=…` for one signature; `temporary` when its key lookup failed for
/// a reason other than "no such key".
pub fn dkim(output: &DkimOutput, temporary: bool) -> String {
    let (result, reason) = dkim_result(output.result(), temporary);
    let mut s = format!("dkim={result}");
    if let Some(reason) = reason {
        s.push_str(&format!(" ({reason})"));
    }
    if let Some(sig) = output.signature() {
        s.push_str(&signature_props(sig));
    }
    s
}

fn signature_props(sig: &Signature) -> String {
    let mut s = format!(" header.d={} header.s={}", pvalue(&sig.d), pvalue(&sig.s));
    // RFC 6008: enough of the signature to tell several apart.
    if sig.b.len() >= 6 {
        s.push_str(" header.b=");
        s.push_str(&base64(&sig.b[..6]));
    }
    s
}

/// RFC 8601's DKIM result word and a reason, for mail-auth's result.
fn dkim_result(r: &DkimResult, temporary: bool) -> (&'static str, Option<&'static str>) {
    match r {
        DkimResult::Pass => ("pass", None),
        DkimResult::None => ("none", None),
        DkimResult::TempError(e) => ("temperror", Some(reason(e))),
        _ if temporary => ("temperror", Some("key lookup failed")),
        // RFC 6376 §6.1.3: a body that does not match its hash fails.
        DkimResult::Neutral(Error::FailedBodyHashMatch) => {
            ("fail", Some(reason(&Error::FailedBodyHashMatch)))
        }
        DkimResult::Fail(e) => ("fail", Some(reason(e))),
        DkimResult::Neutral(e) => ("neutral", Some(reason(e))),
        DkimResult::PermError(e) => ("permerror", Some(reason(e))),
    }
}

/// `arc=…` for the chain (RFC 8617 §10.1).
pub fn arc(r: &DkimResult, temporary: bool) -> String {
    match r {
        DkimResult::Pass => "arc=pass".into(),
        DkimResult::None => "arc=none".into(),
        DkimResult::TempError(e) => format!("arc=temperror ({})", reason(e)),
        _ if temporary => "arc=temperror (key lookup failed)".into(),
        DkimResult::Fail(e) | DkimResult::Neutral(e) | DkimResult::PermError(e) => {
            format!("arc=fail ({})", reason(e))
        }
    }
}

/// DMARC's result as we report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

/// What was done with a message that failed DMARC (`dis=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    None,
    Quarantine,
    Reject,
}

impl Disposition {
    fn word(self) -> &'static str {
        match self {
            Disposition::None => "none",
            Disposition::Quarantine => "quarantine",
            Disposition::Reject => "reject",
        }
    }
}

/// `dmarc=…`: the result, the domain's policy and what we did (as Gmail
/// writes it: `(p=reject dis=none)`), and the From domain.
pub fn dmarc(
    result: DmarcResult,
    policy: Option<Disposition>,
    dis: Disposition,
    from: Option<&str>,
) -> String {
    let word = match result {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail => "fail",
        DmarcResult::None => "none",
        DmarcResult::TempError => "temperror",
        DmarcResult::PermError => "permerror",
    };
    let mut s = format!("dmarc={word}");
    if let Some(p) = policy {
        s.push_str(&format!(" (p={} dis={})", p.word(), dis.word()));
    }
    if let Some(from) = from {
        s.push_str(&format!(" header.from={}", pvalue(from)));
    }
    s
}

/// The Received-SPF field (RFC 7208 §9.1).
pub fn received_spf(
    v: &SpfVerdict,
    receiver: &str,
    ip: std::net::IpAddr,
    helo: &str,
) -> Option<Header> {
    let (identity, whose) = match &v.identity {
        Identity::MailFrom(a) => ("mailfrom", a.as_str()),
        Identity::Helo(h) => ("helo", h.as_str()),
    };
    let whose = comment_text(whose);
    let receiver_c = comment_text(receiver);
    let ip = ip.to_canonical();
    let comment = match v.result {
        SpfResult::Pass => format!("domain of {whose} designates {ip} as permitted sender"),
        SpfResult::Fail => format!("domain of {whose} does not designate {ip} as permitted sender"),
        SpfResult::SoftFail => {
            format!("domain of transitioning {whose} does not designate {ip} as permitted sender")
        }
        SpfResult::Neutral => format!("{ip} is neither permitted nor denied by domain of {whose}"),
        SpfResult::None => format!("domain of {whose} does not designate permitted sender hosts"),
        SpfResult::TempError => format!("temporary DNS error looking up the SPF record of {whose}"),
        SpfResult::PermError => format!("the SPF record of {whose} cannot be evaluated"),
    };
    let envelope_from = match &v.identity {
        Identity::MailFrom(a) => a.clone(),
        Identity::Helo(h) => format!("postmaster@{h}"),
    };
    let value = format!(
        "{} ({receiver_c}: {comment})\r\n\treceiver={}; client-ip={ip}; envelope-from={}; helo={}; identity={identity};",
        word(v.result),
        kv_value(receiver),
        quoted(&envelope_from),
        kv_value(helo),
    );
    Header::folded("Received-SPF", &value)
}

/// The forged Authentication-Results fields in a header section: those
/// that claim `authserv_id` (ours), which only we may write. Deleting them
/// as a milter would (1-based among fields of that name), last first, so
/// that each index still points where it did.
pub fn forged(header: &[u8], authserv_id: &str) -> Vec<Edit> {
    let mut index = 0;
    let mut found = Vec::new();
    for field in fields(header) {
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            continue;
        };
        if !field[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(AUTHENTICATION_RESULTS.as_bytes())
        {
            continue;
        }
        index += 1;
        if authserv_id_of(&field[colon + 1..])
            .is_some_and(|id| id.eq_ignore_ascii_case(authserv_id))
        {
            found.push(index);
        }
    }
    found
        .into_iter()
        .rev()
        .map(|index| Edit::DeleteHeader {
            name: AUTHENTICATION_RESULTS.into(),
            index,
        })
        .collect()
}

/// The header fields of a header section, each with its folded lines,
/// split as `pipeline::edit` splits them, so indexes agree.
fn fields(header: &[u8]) -> Vec<&[u8]> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for line in header.split_inclusive(|&b| b == b'\n') {
        let end = start + line.len();
        match ranges.last_mut() {
            Some(r) if matches!(line.first(), Some(b' ' | b'\t')) => r.1 = end,
            _ => ranges.push((start, end)),
        }
        start = end;
    }
    ranges.into_iter().map(|(a, b)| &header[a..b]).collect()
}

/// The authserv-id an Authentication-Results value starts with, after
/// any white space and comments (RFC 8601 §2.2).
fn authserv_id_of(value: &[u8]) -> Option<String> {
    let mut i = 0;
    skip_cfws(value, &mut i);
    let rest = value.get(i..)?;
    let id: Vec<u8> = if rest.first() == Some(&b'"') {
        let mut out = Vec::new();
        let mut escaped = false;
        for &b in &rest[1..] {
            match b {
                _ if escaped => {
                    out.push(b);
                    escaped = false;
                }
                b'\\' => escaped = true,
                b'"' => break,
                _ => out.push(b),
            }
        }
        out
    } else {
        rest.iter()
            .take_while(|&&b| !b.is_ascii_whitespace() && b != b';' && b != b'(')
            .copied()
            .collect()
    };
    (!id.is_empty()).then(|| String::from_utf8_lossy(&id).into_owned())
}

/// Skips folding white space and (nested) comments.
fn skip_cfws(v: &[u8], i: &mut usize) {
    loop {
        while *i < v.len() && v[*i].is_ascii_whitespace() {
            *i += 1;
        }
        if v.get(*i) != Some(&b'(') {
            return;
        }
        let mut depth = 0;
        while *i < v.len() {
            match v[*i] {
                b'\\' => *i += 1,
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        *i += 1;
                        break;
                    }
                }
                _ => {}
            }
            *i += 1;
        }
    }
}

/// What mail-auth's error means, in a few words for a comment.
fn reason(e: &Error) -> &'static str {
    match e {
        Error::ParseError => "parse error",
        Error::MissingParameters => "missing tag",
        Error::NoHeadersFound => "no signed header fields",
        Error::CryptoError(_) | Error::FailedVerification => "signature did not verify",
        Error::Io(_) => "i/o error",
        Error::Base64 => "bad base64",
        Error::UnsupportedVersion => "unsupported version",
        Error::UnsupportedAlgorithm => "unsupported algorithm",
        Error::UnsupportedCanonicalization => "unsupported canonicalization",
        Error::UnsupportedKeyType => "unsupported key type",
        Error::FailedBodyHashMatch => "body hash did not verify",
        Error::FailedAuidMatch => "i= is not within d=",
        Error::RevokedPublicKey => "key revoked",
        Error::IncompatibleAlgorithms => "key does not fit the algorithm",
        Error::SignatureExpired => "signature expired",
        Error::SignatureLength => "l= tag not accepted",
        Error::DnsError(_) => "DNS error",
        Error::DnsRecordNotFound(_) => "no key for signature",
        Error::ArcChainTooLong => "chain too long",
        Error::ArcInvalidInstance(_) => "invalid instance",
        Error::ArcInvalidCV => "invalid cv",
        Error::ArcHasHeaderTag => "ARC-Seal has an h= tag",
        Error::ArcBrokenChain => "broken chain",
        Error::NotAligned => "not aligned",
        Error::InvalidRecordType => "not a key record",
    }
}

/// The MAIL FROM address as a property value, or its domain when the
/// address is not a plain `local@domain` (a quoted local part, say).
fn mailfrom(address: &str, domain: &str) -> String {
    if is_plain(address) {
        address.to_string()
    } else {
        pvalue(domain)
    }
}

/// Made only of characters a property value may hold unquoted: atext,
/// dots and `@` (an address), ASCII only.
fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.@".contains(&b))
}

/// A property value (RFC 8601 `pvalue`): plain, or a quoted string.
pub fn pvalue(s: &str) -> String {
    if is_plain(s) {
        s.to_string()
    } else {
        quoted(s)
    }
}

/// A Received-SPF key-value value: a dot-atom, or a quoted string.
fn kv_value(s: &str) -> String {
    let dot_atom = !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b));
    if dot_atom { s.to_string() } else { quoted(s) }
}

/// A quoted string holding `s`, control characters left out.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Text safe inside a comment: no parentheses, backslashes or controls.
fn comment_text(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !matches!(c, '(' | ')' | '\\'))
        .collect()
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_field_one_result_per_line() {
        let h = authentication_results(
            "mx.example.org",
            &[
                "spf=pass smtp.mailfrom=a@b.example".into(),
                "dkim=none".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            h.render(),
            "Authentication-Results: mx.example.org;\r\n\tspf=pass smtp.mailfrom=a@b.example;\r\n\tdkim=none\r\n"
        );
        assert_eq!(
            authentication_results("mx.example.org", &[])
                .unwrap()
                .render(),
            "Authentication-Results: mx.example.org; none\r\n"
        );
    }

    #[test]
    fn values_from_the_client_cannot_break_out() {
        assert_eq!(pvalue("a@b.example"), "a@b.example");
        assert_eq!(pvalue("x; dkim=pass"), "\"x; dkim=pass\"");
        assert_eq!(pvalue("a\"b\\c\r\nd"), "\"a\\\"b\\\\cd\"");
        assert_eq!(
            mailfrom("\"odd local\"@b.example", "b.example"),
            "b.example"
        );
        assert_eq!(kv_value("client.example"), "client.example");
        assert_eq!(kv_value("[192.0.2.1]"), "\"[192.0.2.1]\"");
        assert_eq!(comment_text("a(b)c\\d"), "abcd");
    }

    #[test]
    fn base64_as_rfc_4648() {
        assert_eq!(base64(b"123456"), "MTIzNDU2");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn forged_results_are_those_claiming_our_id() {
        let header = b"Authentication-Results: mx.example.org; spf=pass\r\n\
From: a@b.example\r\n\
authentication-results: (comment) \"MX.example.org\";\r\n\tdkim=pass\r\n\
Authentication-Results: other.example; dkim=pass\r\n\
Authentication-Results:mx.example.org.evil; dkim=pass\r\n\
Authentication-Results:\r\n mx.example.org; dmarc=pass\r\n";
        let del = |index| Edit::DeleteHeader {
            name: AUTHENTICATION_RESULTS.into(),
            index,
        };
        assert_eq!(forged(header, "mx.example.org"), [del(5), del(2), del(1)]);
        assert!(forged(b"Subject: x\r\n", "mx.example.org").is_empty());
    }

    #[test]
    fn authserv_ids_are_read_past_comments() {
        assert_eq!(
            authserv_id_of(b" mx.example.org; none").as_deref(),
            Some("mx.example.org")
        );
        assert_eq!(
            authserv_id_of(b" (a (nested) comment)\r\n mx.example.org 1; none").as_deref(),
            Some("mx.example.org")
        );
        assert_eq!(
            authserv_id_of(b" \"q\\\"d\"; none").as_deref(),
            Some("q\"d")
        );
        assert_eq!(authserv_id_of(b"  "), None);
    }
}
