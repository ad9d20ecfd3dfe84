//! The DATA and BDAT decoder (`letterbox::smtp::dot::Decoder`), checked
//! against a reference model written the plain way (find the terminator,
//! unstuff, normalize) rather than as a state machine.
//!
//! The first two bytes choose a split point; the rest is what the client
//! sent after `354` (or as BDAT content). For every input:
//!
//! - fed whole, fed in two pieces split anywhere, and fed one byte at a
//!   time, the decoder gives the same content, the same end position and
//!   the same bare-LF flag as the model;
//! - the message ends only at the first `<CRLF>.<CRLF>` (the data's start
//!   counting as after a CRLF), so there is at most one end per DATA, and
//!   `Done(n)` is within the bytes fed;
//! - dot-unstuffing is exact: a dot is removed only right after a CRLF (or
//!   at the start);
//! - the output never holds a bare LF (every LF follows a CR), and a bare
//!   LF in the input is reported;
//! - BDAT content never ends early, is never unstuffed, and only gains
//!   the CR of each bare LF.

#![no_main]

use letterbox::smtp::dot::{Decoder, Progress};
use libfuzzer_sys::fuzz_target;

/// Content, end position (bytes into the input), bare LF seen.
type Decoded = (Vec<u8>, Option<usize>, bool);

fn feed_pieces(mut d: Decoder, pieces: &[&[u8]]) -> Decoded {
    let mut out = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        match d.feed(piece, &mut out) {
            Progress::More => offset += piece.len(),
            Progress::Done(n) => {
                assert!(
                    n >= 1 && n <= piece.len(),
                    "Done({n}) outside a piece of {}",
                    piece.len()
                );
                return (out, Some(offset + n), d.saw_bare_lf);
            }
        }
    }
    (out, None, d.saw_bare_lf)
}

/// DATA the plain way.
fn model_data(input: &[u8]) -> Decoded {
    let framed = [b"\r\n", input].concat();
    // framed[p..p + 5] == CRLF.CRLF  <=>  the input ends its message at p + 3.
    let end = framed
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|p| p + 3);
    let content = match end {
        Some(e) => &input[..e - 3],
        None => input,
    };
    let mut unstuffed = Vec::new();
    for (i, &b) in content.iter().enumerate() {
        let line_start = i == 0 || content[..i].ends_with(b"\r\n");
        if !(b == b'.' && line_start) {
            unstuffed.push(b);
        }
    }
    let (mut out, bare) = normalize(&unstuffed);
    // Without an end, a final CR waits to see whether an LF follows.
    if end.is_none() && out.last() == Some(&b'\r') {
        out.pop();
    }
    (out, end, bare)
}

/// Bare LF becomes CRLF; says whether there was one.
fn normalize(input: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(input.len());
    let mut bare = false;
    for (i, &b) in input.iter().enumerate() {
        if b == b'\n' && (i == 0 || input[i - 1] != b'\r') {
            bare = true;
            out.push(b'\r');
        }
        out.push(b);
    }
    (out, bare)
}

fn no_bare_lf(out: &[u8]) -> bool {
    out.iter()
        .enumerate()
        .all(|(i, &b)| b != b'\n' || (i > 0 && out[i - 1] == b'\r'))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let input = &data[2..];
    let split = u16::from_le_bytes([data[0], data[1]]) as usize % (input.len() + 1);
    let (a, b) = input.split_at(split);
    let bytes: Vec<&[u8]> = input.chunks(1).collect();

    // DATA
    let want = model_data(input);
    let whole = feed_pieces(Decoder::data(), &[input]);
    assert_eq!(whole, want, "whole input differs from the model");
    assert_eq!(
        feed_pieces(Decoder::data(), &[a, b]),
        want,
        "split at {split}"
    );
    assert_eq!(feed_pieces(Decoder::data(), &bytes), want, "byte at a time");
    let (out, end, _) = &whole;
    if let Some(e) = *end {
        let ends_at_crlf_dot_crlf =
            input[..e].ends_with(b"\r\n.\r\n") || (e == 3 && input.starts_with(b".\r\n"));
        assert!(ends_at_crlf_dot_crlf, "ended at {e} without CRLF.CRLF");
        assert!(out.len() <= 2 * e);
    }
    assert!(no_bare_lf(out), "bare LF in the output");

    // BDAT
    let (want, bare) = normalize(input);
    let mut results = Vec::new();
    for pieces in [vec![input], vec![a, b], bytes] {
        let mut d = Decoder::bdat();
        let mut out = Vec::new();
        for piece in pieces {
            assert_eq!(d.feed(piece, &mut out), Progress::More, "BDAT ended early");
        }
        d.finish(&mut out);
        results.push((out, d.saw_bare_lf));
    }
    // Every chunking agrees with the model.
    for r in &results {
        assert_eq!(r, &(want.clone(), bare), "BDAT differs from the model");
        assert!(no_bare_lf(&r.0));
    }
});
