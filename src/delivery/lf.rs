//! CRLF → LF as a message is copied into a maildir: the spool holds SMTP's
//! canonical CRLF lines, a maildir file holds Unix lines. Only the pair CR LF
//! becomes LF; a lone CR or LF is kept as received. A pair split across two
//! reads is still one pair.

/// The conversion's state between chunks.
#[derive(Debug, Default)]
pub(crate) struct LfConverter {
    /// The previous chunk ended in CR, not yet written.
    pending_cr: bool,
}

impl LfConverter {
    /// Appends `input`, converted, to `out`.
    pub(crate) fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if self.pending_cr && !input.is_empty() {
            self.pending_cr = false;
            if input[0] != b'\n' {
                out.push(b'\r');
            }
        }
        while let Some(i) = input.iter().position(|&b| b == b'\r') {
            out.extend_from_slice(&input[..i]);
            match input.get(i + 1) {
                // The LF of the pair is copied with the next stretch.
                Some(b'\n') => {}
                Some(_) => out.push(b'\r'),
                None => self.pending_cr = true,
            }
            input = &input[i + 1..];
        }
        out.extend_from_slice(input);
    }

    /// Ends the input: a CR left at the very end is a lone CR.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            out.push(b'\r');
        }
    }
}

/// Converts a whole buffer.
pub(crate) fn to_lf(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut c = LfConverter::default();
    c.push(input, &mut out);
    c.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_crlf_pairs_become_lf() {
        assert_eq!(to_lf(b"a\r\nb\r\n"), b"a\nb\n");
        assert_eq!(to_lf(b"lone\rcr\r\n"), b"lone\rcr\n");
        assert_eq!(to_lf(b"bare\nlf"), b"bare\nlf");
        assert_eq!(to_lf(b"\r\r\n\r"), b"\r\n\r");
        assert_eq!(to_lf(b"\n\r"), b"\n\r");
        assert_eq!(to_lf(b""), b"");
        assert_eq!(to_lf(b"\xff\x00\r\n"), b"\xff\x00\n");
    }

    #[test]
    fn a_pair_split_across_chunks_is_one_pair() {
        let input = b"ab\r\ncd\r\r\nef\rg\r\n\r";
        let whole = to_lf(input);
        assert_eq!(whole, b"ab\ncd\r\nef\rg\n\r");
        // Every way of cutting the input into two and three chunks agrees.
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let mut out = Vec::new();
                let mut c = LfConverter::default();
                c.push(&input[..i], &mut out);
                c.push(&input[i..j], &mut out);
                c.push(&input[j..], &mut out);
                c.finish(&mut out);
                assert_eq!(out, whole, "cut at {i} and {j}");
            }
        }
    }

    #[test]
    fn a_cr_before_an_empty_chunk_stays_pending() {
        let mut out = Vec::new();
        let mut c = LfConverter::default();
        c.push(b"x\r", &mut out);
        c.push(b"", &mut out);
        c.push(b"\ny", &mut out);
        c.finish(&mut out);
        assert_eq!(out, b"x\ny");
    }
}
