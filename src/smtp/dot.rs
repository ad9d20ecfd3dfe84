//! The DATA decoder (RFC 5321 §4.1.1.4, §4.5.2): a push parser that turns
//! the bytes after `354` into message content and finds the end.
//!
//! Only `<CRLF>.<CRLF>` ends a message (the data's very start counts as
//! after a CRLF). `<LF>.<LF>`, `<CR>.<CR>`, `<LF>.<CRLF>`, `<CRLF>.<LF>`
//! and every other look-alike are content, so one DATA yields at most one
//! message and nothing can be smuggled behind a terminator that another
//! MTA would see differently. A leading dot is removed only at the start of
//! a CRLF-ended line. Bare LF is rewritten to CRLF (and reported, for
//! servers configured to refuse such mail); other bytes pass unchanged.
//! The same machine without dot handling normalizes BDAT chunks.

/// Where the decoder is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line that followed a CRLF (or the data's start).
    LineStart,
    /// Saw `.` at a line start.
    Dot,
    /// Saw `.` `CR` at a line start.
    DotCr,
    /// Inside a line.
    Text,
    /// Saw CR inside a line.
    Cr,
}

/// Decoding progress after a call to [`Decoder::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All input was consumed; the message goes on.
    More,
    /// The terminator ended at this many bytes into the input; the rest
    /// belongs to the next command.
    Done(usize),
}

#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// Dot-unstuffing and the terminator apply (DATA); off for BDAT.
    dots: bool,
    /// A bare LF was seen (and rewritten).
    pub saw_bare_lf: bool,
}

impl Decoder {
    /// A decoder for DATA.
    pub fn data() -> Decoder {
        Decoder {
            state: State::LineStart,
            dots: true,
            saw_bare_lf: false,
        }
    }

    /// A decoder for BDAT content: line endings only, across chunks.
    pub fn bdat() -> Decoder {
        Decoder {
            state: State::LineStart,
            dots: false,
            saw_bare_lf: false,
        }
    }

    /// Decodes `input`, appending content to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let mut i = 0;
        while i < input.len() {
            // Fast path: copy a run of ordinary bytes in one go.
            if self.state == State::Text {
                let run = input[i..]
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(input.len() - i);
                out.extend_from_slice(&input[i..i + run]);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (State::LineStart, b'.') if self.dots => State::Dot,
                (State::Dot, b'\r') => State::DotCr,
                (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Progress::Done(i);
                }
                // `.` then something other than CRLF: the dot was stuffing.
                (State::Dot, _) => self.byte(b, out),
                // `.` CR then not LF: the dot was stuffing, the CR is content.
                (State::DotCr, _) => {
                    self.state = State::Cr;
                    self.byte(b, out)
                }
                (State::Cr, _) => self.byte(b, out),
                (_, _) => self.byte(b, out),
            };
        }
        Progress::More
    }

    /// Handles one byte outside the dot states; returns the next state.
    fn byte(&mut self, b: u8, out: &mut Vec<u8>) -> State {
        let after_cr = self.state == State::Cr;
        match b {
            b'\n' if after_cr => {
                out.extend_from_slice(b"\r\n");
                State::LineStart
            }
            b'\n' => {
                // Bare LF: a line ending, but not one after which a dot is
                // special, so `<LF>.<LF>` can never end the message.
                self.saw_bare_lf = true;
                out.extend_from_slice(b"\r\n");
                State::Text
            }
            b'\r' => {
                if after_cr {
                    out.push(b'\r');
                }
                State::Cr
            }
            _ => {
                if after_cr {
                    out.push(b'\r');
                }
                out.push(b);
                State::Text
            }
        }
    }

    /// Flushes a CR still pending at the end of BDAT content.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if matches!(self.state, State::Cr | State::DotCr) {
            out.push(b'\r');
        }
        self.state = State::LineStart;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in every split into two pieces and checks each gives
    /// the same result.
    fn decode(input: &[u8]) -> (Vec<u8>, Option<usize>, bool) {
        let mut first = None;
        for split in 0..=input.len() {
            let mut d = Decoder::data();
            let mut out = Vec::new();
            let mut done = match d.feed(&input[..split], &mut out) {
                Progress::Done(n) => Some(n),
                Progress::More => None,
            };
            if done.is_none()
                && let Progress::Done(n) = d.feed(&input[split..], &mut out)
            {
                done = Some(split + n);
            }
            let got = (out, done, d.saw_bare_lf);
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(f, &got, "split at {split} of {input:?}"),
            }
        }
        first.unwrap()
    }

    #[test]
    fn terminator_and_unstuffing() {
        assert_eq!(
            decode(b"hello\r\n.\r\n"),
            (b"hello\r\n".to_vec(), Some(10), false)
        );
        assert_eq!(decode(b".\r\n"), (b"".to_vec(), Some(3), false));
        assert_eq!(
            decode(b"..dot\r\n.\r\nMAIL"),
            (b".dot\r\n".to_vec(), Some(10), false)
        );
        assert_eq!(
            decode(b"a\r\n...\r\n.\r\n"),
            (b"a\r\n..\r\n".to_vec(), Some(11), false)
        );
        assert_eq!(
            decode(b"a.\r\n.b\r\n.\r\n"),
            (b"a.\r\nb\r\n".to_vec(), Some(11), false)
        );
    }

    #[test]
    fn smuggling_variants_never_end_the_message() {
        // Each variant is followed by a would-be second message; all of it
        // must be content, and only the final CRLF.CRLF ends the data.
        let variants: &[&[u8]] = &[
            b"\n.\n",
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\n",
            b"\n.\r",
            b"\0.\r\n",
            b"\r\n.\0\r\n",
            b"\r\n .\r\n",
        ];
        for v in variants {
            let mut input = b"x".to_vec();
            input.extend_from_slice(v);
            input.extend_from_slice(
                b"MAIL FROM:<e@evil>\r\nRCPT TO:<v@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            let (_, done, _) = decode(&input);
            assert_eq!(
                done,
                Some(input.len()),
                "variant {v:?} ended the message early"
            );
        }
    }

    #[test]
    fn bare_lf_is_normalized_and_reported() {
        assert_eq!(
            decode(b"a\nb\r\n.\r\n"),
            (b"a\r\nb\r\n".to_vec(), Some(8), true)
        );
        // A dot after a bare LF is content, not stuffing.
        assert_eq!(
            decode(b"a\n.b\r\n.\r\n"),
            (b"a\r\n.b\r\n".to_vec(), Some(9), true)
        );
        // `<CRLF>.<LF>`: the dot was stuffing, the LF a bare line end.
        assert_eq!(
            decode(b"a\r\n.\nb\r\n.\r\n"),
            (b"a\r\n\r\nb\r\n".to_vec(), Some(11), true)
        );
    }

    #[test]
    fn bare_cr_passes_through() {
        assert_eq!(
            decode(b"a\rb\r\r\n.\r\n"),
            (b"a\rb\r\r\n".to_vec(), Some(9), false)
        );
        assert_eq!(
            decode(b"\r\n.\rx\r\n.\r\n"),
            (b"\r\n\rx\r\n".to_vec(), Some(10), false)
        );
    }

    #[test]
    fn bdat_has_no_dots() {
        let mut d = Decoder::bdat();
        let mut out = Vec::new();
        assert_eq!(d.feed(b"a\r\n.\r\nb\n", &mut out), Progress::More);
        assert_eq!(d.feed(b"c\r", &mut out), Progress::More);
        d.finish(&mut out);
        assert_eq!(out, b"a\r\n.\r\nb\r\nc\r");
        assert!(d.saw_bare_lf);
    }
}
