//! A policy server's answer: `name=value` lines ended by an empty line, of
//! which only `action` counts. Its value is parsed the way Postfix's
//! access(5) tables are: a case-insensitive word, then optional text.

use super::PolicyError;

/// A refusal: the SMTP reply the server chose, with Postfix's defaults
/// filled in where it gave only a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyReply {
    /// 4xx or 5xx.
    pub code: u16,
    /// The RFC 3463 status, its class matching the code's.
    pub enhanced: String,
    /// The text to show the client.
    pub text: String,
}

/// What the policy server decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `OK` (or `RELAY`, an all-digit value, or a 2xx reply): accept,
    /// skipping the remaining checks of this stage.
    Ok,
    /// `DUNNO`: no opinion; go on with the next check.
    Dunno,
    /// `REJECT [text]` (554 5.7.1 by default) or a `5xx [x.y.z] text` reply.
    /// A 521 also asks to disconnect.
    Reject(PolicyReply),
    /// `DEFER [text]` (450 4.7.1 by default) or a `4xx [x.y.z] text` reply.
    /// A 421 also asks to disconnect.
    Defer(PolicyReply),
    /// `DEFER_IF_PERMIT [text]`: refuse temporarily (450 4.7.1) unless a
    /// later check rejects; postgrey's greylisting answer.
    DeferIfPermit(PolicyReply),
    /// `DEFER_IF_REJECT [text]`: turn a later rejection into a temporary
    /// one (450 4.7.1); no effect otherwise.
    DeferIfReject(PolicyReply),
    /// `PREPEND header: value`: add this header field to the message;
    /// postgrey's `X-Greylist` after a delay.
    Prepend(String),
    /// `HOLD [text]`: accept, but keep the message aside for review.
    Hold(Option<String>),
    /// `DISCARD [text]`: accept and silently drop the message.
    Discard(Option<String>),
    /// Any other word (`FILTER`, `REDIRECT`, `BCC`, `WARN`, `INFO`,
    /// restriction names, …): letterbox has no equivalent, so the caller
    /// decides (usually: log it, treat as DUNNO).
    Other {
        /// The first word as sent.
        command: String,
        /// The rest, trimmed.
        text: String,
    },
}

impl Action {
    /// Parses an `action` value.
    pub fn parse(value: &str) -> Action {
        let value = value.trim();
        let (word, text) = match value.find([' ', '\t']) {
            Some(i) => (&value[..i], value[i..].trim_start()),
            None => (value, ""),
        };
        let opt = || (!text.is_empty()).then(|| text.to_string());
        let reply = |code: u16, default: &str| make_reply(code, text, default);
        match word.to_ascii_uppercase().as_str() {
            "OK" | "RELAY" => return Action::Ok,
            "DUNNO" => return Action::Dunno,
            "REJECT" => return Action::Reject(reply(554, "Access denied")),
            "DEFER" => return Action::Defer(reply(450, "Access denied")),
            "DEFER_IF_PERMIT" => return Action::DeferIfPermit(reply(450, "Service unavailable")),
            "DEFER_IF_REJECT" => return Action::DeferIfReject(reply(450, "Service unavailable")),
            "HOLD" => return Action::Hold(opt()),
            "DISCARD" => return Action::Discard(opt()),
            "PREPEND" if is_header(text) => return Action::Prepend(text.to_string()),
            _ => {}
        }
        if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            // Postfix: "an all-numerical result is treated as OK".
            return Action::Ok;
        }
        let b = word.as_bytes();
        if b.len() == 3 && b.iter().all(u8::is_ascii_digit) && !text.is_empty() {
            let code =
                (b[0] - b'0') as u16 * 100 + (b[1] - b'0') as u16 * 10 + (b[2] - b'0') as u16;
            match b[0] {
                b'2' => return Action::Ok,
                b'4' => return Action::Defer(make_reply(code, text, "Access denied")),
                b'5' => return Action::Reject(make_reply(code, text, "Access denied")),
                _ => {}
            }
        }
        Action::Other {
            command: word.to_string(),
            text: text.to_string(),
        }
    }
}

/// A reply with `code`, the enhanced status at the front of `text` (class
/// fixed to the code's) or `X.7.1`, and the rest of the text or `default`.
fn make_reply(code: u16, text: &str, default: &str) -> PolicyReply {
    let class = char::from(b'0' + (code / 100) as u8);
    let (enhanced, rest) = match split_enhanced(text) {
        Some((status, rest)) => (format!("{class}{}", &status[1..]), rest),
        None => (format!("{class}.7.1"), text),
    };
    PolicyReply {
        code,
        enhanced,
        text: if rest.is_empty() { default } else { rest }.to_string(),
    }
}

/// `x.y.z rest` → (`x.y.z`, `rest`) when the text starts with an RFC 3463
/// status: a class digit, then two groups of 1–3 digits.
fn split_enhanced(text: &str) -> Option<(&str, &str)> {
    let end = text.find(' ').unwrap_or(text.len());
    let status = &text[..end];
    let digits =
        |s: &str, max: usize| (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = status.split('.');
    let ok = matches!(parts.next(), Some(c) if digits(c, 1))
        && matches!(parts.next(), Some(s) if digits(s, 3))
        && matches!(parts.next(), Some(d) if digits(d, 3))
        && parts.next().is_none();
    ok.then(|| (status, text[end..].trim_start_matches(' ')))
}

/// `Name: value`, as PREPEND requires (Postfix refuses anything else).
fn is_header(text: &str) -> bool {
    match text.split_once(':') {
        Some((name, _)) => !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()),
        None => false,
    }
}

/// Parses a whole answer (its lines, up to the empty one) into its action.
/// Other attributes are ignored, as Postfix ignores them.
pub fn parse_response(text: &[u8]) -> Result<Action, PolicyError> {
    let text = std::str::from_utf8(text)
        .map_err(|_| PolicyError::Protocol("answer is not UTF-8".into()))?;
    let mut action = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| PolicyError::Protocol(format!("line without '=': {line:?}")))?;
        if name == "action" && action.is_none() {
            action = Some(value);
        }
    }
    match action {
        Some(v) if !v.trim().is_empty() => Ok(Action::parse(v)),
        Some(_) => Err(PolicyError::Protocol("empty action".into())),
        None => Err(PolicyError::Protocol("no action in the answer".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, enhanced: &str, text: &str) -> PolicyReply {
        PolicyReply {
            code,
            enhanced: enhanced.into(),
            text: text.into(),
        }
    }

    #[test]
    fn accepting_words() {
        assert_eq!(Action::parse("OK"), Action::Ok);
        assert_eq!(Action::parse("ok whatever"), Action::Ok);
        assert_eq!(Action::parse("RELAY"), Action::Ok);
        assert_eq!(Action::parse("1700000000"), Action::Ok);
        assert_eq!(Action::parse("550"), Action::Ok, "all digits, as Postfix");
        assert_eq!(Action::parse("250 2.0.0 fine"), Action::Ok);
        assert_eq!(Action::parse("DUNNO"), Action::Dunno);
        assert_eq!(Action::parse("dunno ignored text"), Action::Dunno);
    }

    #[test]
    fn rejecting_words_with_and_without_text() {
        assert_eq!(
            Action::parse("REJECT"),
            Action::Reject(reply(554, "5.7.1", "Access denied"))
        );
        assert_eq!(
            Action::parse("reject 5.7.26 bad SPF"),
            Action::Reject(reply(554, "5.7.26", "bad SPF"))
        );
        assert_eq!(
            Action::parse("REJECT 4.1.1 class fixed"),
            Action::Reject(reply(554, "5.1.1", "class fixed"))
        );
        assert_eq!(
            Action::parse("DEFER"),
            Action::Defer(reply(450, "4.7.1", "Access denied"))
        );
        assert_eq!(
            Action::parse("DEFER try later"),
            Action::Defer(reply(450, "4.7.1", "try later"))
        );
        assert_eq!(
            Action::parse(
                "DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/help/example.org.html"
            ),
            Action::DeferIfPermit(reply(
                450,
                "4.7.1",
                "Greylisted, see http://postgrey.schweikert.ch/help/example.org.html"
            ))
        );
        assert_eq!(
            Action::parse("defer_if_permit"),
            Action::DeferIfPermit(reply(450, "4.7.1", "Service unavailable"))
        );
        assert_eq!(
            Action::parse("DEFER_IF_REJECT 4.7.0 maybe"),
            Action::DeferIfReject(reply(450, "4.7.0", "maybe"))
        );
    }

    #[test]
    fn numeric_replies() {
        assert_eq!(
            Action::parse("450 4.2.0 Greylisted"),
            Action::Defer(reply(450, "4.2.0", "Greylisted"))
        );
        assert_eq!(
            Action::parse("421 closing"),
            Action::Defer(reply(421, "4.7.1", "closing"))
        );
        assert_eq!(
            Action::parse("550 5.1.1 no such user"),
            Action::Reject(reply(550, "5.1.1", "no such user"))
        );
        assert_eq!(
            Action::parse("521 go away"),
            Action::Reject(reply(521, "5.7.1", "go away"))
        );
        assert_eq!(
            Action::parse("599 5.0.0"),
            Action::Reject(reply(599, "5.0.0", "Access denied"))
        );
        assert_eq!(
            Action::parse("300 odd"),
            Action::Other {
                command: "300".into(),
                text: "odd".into()
            }
        );
    }

    #[test]
    fn other_words() {
        assert_eq!(
            Action::parse("PREPEND X-Greylist: delayed 2 seconds by postgrey-1.37"),
            Action::Prepend("X-Greylist: delayed 2 seconds by postgrey-1.37".into())
        );
        assert_eq!(
            Action::parse("PREPEND not a header"),
            Action::Other {
                command: "PREPEND".into(),
                text: "not a header".into()
            }
        );
        assert_eq!(Action::parse("HOLD"), Action::Hold(None));
        assert_eq!(
            Action::parse("hold look at it"),
            Action::Hold(Some("look at it".into()))
        );
        assert_eq!(Action::parse("DISCARD"), Action::Discard(None));
        assert_eq!(
            Action::parse("DISCARD\tbye"),
            Action::Discard(Some("bye".into()))
        );
        for (value, command, text) in [
            (
                "FILTER smtp:[127.0.0.1]:10025",
                "FILTER",
                "smtp:[127.0.0.1]:10025",
            ),
            ("REDIRECT a@example.org", "REDIRECT", "a@example.org"),
            ("BCC archive@example.org", "BCC", "archive@example.org"),
            ("WARN suspicious", "WARN", "suspicious"),
            ("INFO note", "INFO", "note"),
            ("HANGUP", "HANGUP", ""),
            (
                "reject_unknown_client_hostname",
                "reject_unknown_client_hostname",
                "",
            ),
        ] {
            assert_eq!(
                Action::parse(value),
                Action::Other {
                    command: command.into(),
                    text: text.into()
                },
                "{value}"
            );
        }
    }

    #[test]
    fn answers_need_exactly_an_action() {
        assert_eq!(parse_response(b"action=DUNNO\n\n").unwrap(), Action::Dunno);
        assert_eq!(
            parse_response(b"foo=bar\r\naction=OK\r\naction=REJECT\r\n\r\n").unwrap(),
            Action::Ok,
            "the first action counts; CRLF tolerated"
        );
        assert!(matches!(
            parse_response(b"foo=bar\n\n"),
            Err(PolicyError::Protocol(_))
        ));
        assert!(matches!(
            parse_response(b"action=\n\n"),
            Err(PolicyError::Protocol(_))
        ));
        assert!(matches!(
            parse_response(b"garbage\n\n"),
            Err(PolicyError::Protocol(_))
        ));
        assert!(matches!(
            parse_response(b"action=\xff\n\n"),
            Err(PolicyError::Protocol(_))
        ));
    }
}
