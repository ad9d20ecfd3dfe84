//! The Sender Rewriting Scheme for forwarded mail, compatible with postsrsd
//! (and libsrs2, whose code postsrsd carries as `srs2.c`): a message an
//! alias forwards to another server leaves with an envelope sender in our
//! SRS domain, so the destination's SPF check looks at our addresses, not
//! the original sender's; a bounce to that address is checked and sent back
//! to the original sender.
//!
//! # The format (postsrsd 2.x, `srs2.c`)
//! - `SRS0=HHHH=TT=orig-domain=orig-local@srs-domain` for a sender
//!   `orig-local@orig-domain`. `TT` is the day number (Unix time / 86400)
//!   modulo 1024 as two base32 characters of `A–Z2–7`, high five bits
//!   first. `HHHH` is the first 4 characters of the base64url (`A–Za–z0–9-_`)
//!   encoding of HMAC-SHA1(secret, lowercase(TT ‖ orig-domain ‖
//!   orig-local)): the parts concatenated with no separator.
//! - A sender that already is `SRS0=rest@first-domain` (mail forwarded
//!   twice) becomes `SRS1=HHHH=first-domain==rest@srs-domain`, the hash over
//!   lowercase(first-domain ‖ `=rest`): the `=` after `SRS0` stays part of
//!   what is hashed and written, hence the `==`. An `SRS1=old=first=rest@…`
//!   sender keeps `first` and `rest` under a new hash of ours.
//! - A sender in the SRS domain itself is not rewritten.
//! - Reversing checks the hash case-insensitively with `+` ≡ `-` and `/` ≡
//!   `_` (postsrsd's `base64_equivalent`, so libsrs2's older `+/` hashes
//!   still verify), the time stamp case-insensitively and its age in days
//!   ≤ `max_age`, wrapping at 1024 days. An SRS0 address reverses to
//!   `orig-local@orig-domain`; an SRS1 address to `SRS0rest@first-domain`,
//!   the address the first forwarder gave, which it reverses in turn.
//!
//! The unit tests' vectors were computed by postsrsd's own `srs2.c` and
//! `sha1.c` (commit ad76f54), built with a three-line `main`.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;

/// One day, the precision of the time stamp.
const DAY: u64 = 86_400;
/// Base32 alphabet of the time stamp.
const TIME_CHARS: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Two base32 characters: the stamp wraps after 1024 days.
const TIME_SLOTS: u64 = 1024;
/// Base64url alphabet of the hash (postsrsd ≥ 2.0).
const HASH_CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Characters of the hash written and checked.
const HASH_LEN: usize = 4;

/// Why an address in the SRS domain was not reversed. Each is refused at
/// RCPT with `550 5.1.1` (`crate::reply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrsError {
    /// Not shaped as `SRS0=…` or `SRS1=…` with all of its parts.
    #[error("malformed SRS address")]
    Malformed,
    /// The hash does not match: forged, or signed with another secret.
    #[error("SRS hash invalid")]
    BadHash,
    /// The time stamp is older than `srs.max_age` (or not base32).
    #[error("SRS time stamp out of date")]
    Expired,
}

/// The SRS signer and checker of a running server.
#[derive(Clone)]
pub struct Srs {
    key: hmac::Key,
    /// The domain our SRS addresses are in, lowercase.
    domain: String,
    /// Days an SRS0 address stays valid.
    max_age_days: u64,
}

impl std::fmt::Debug for Srs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Srs")
            .field("domain", &self.domain)
            .field("max_age_days", &self.max_age_days)
            .finish_non_exhaustive()
    }
}

/// Whether a local part is shaped as an SRS address (`SRS0` or `SRS1`
/// followed by a separator, in any case), as postsrsd's
/// `SRS_IS_SRS_ADDRESS` tests it.
pub fn is_srs(local: &str) -> bool {
    let b = local.as_bytes();
    b.len() > 4
        && b[..3].eq_ignore_ascii_case(b"SRS")
        && matches!(b[3], b'0' | b'1')
        && matches!(b[4], b'=' | b'-' | b'+')
}

impl Srs {
    /// `secret`: the HMAC key as postsrsd takes it (the line's bytes);
    /// `max_age`: how long an address stays valid, in whole days.
    pub fn new(secret: &[u8], domain: &str, max_age: std::time::Duration) -> Srs {
        Srs {
            key: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret),
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            max_age_days: max_age.as_secs() / DAY,
        }
    }

    /// The domain of our SRS addresses.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The envelope sender for a copy of mail from `sender` that we
    /// forward, at Unix time `now`. The null sender and a sender already in
    /// our SRS domain are returned as they are; so is anything without `@`.
    pub fn forward(&self, sender: &str, now: u64) -> String {
        let Some((local, domain)) = sender.rsplit_once('@') else {
            return sender.to_string();
        };
        if local.is_empty() || domain.eq_ignore_ascii_case(&self.domain) {
            return sender.to_string();
        }
        if is_srs(local) && local.as_bytes()[3] == b'1' {
            // SRS1=hash=first=rest: keep first and rest, hash them anew.
            let mut parts = local[5..].splitn(3, '=');
            if let (Some(_), Some(first), Some(rest)) = (parts.next(), parts.next(), parts.next())
                && !first.is_empty()
                && !rest.is_empty()
            {
                let hash = self.hash(&[first, rest]);
                return format!("SRS1={hash}={first}={rest}@{}", self.domain);
            }
        } else if is_srs(local) {
            // SRS0=rest@first: the separator after SRS0 is part of rest.
            let rest = &local[4..];
            let hash = self.hash(&[domain, rest]);
            return format!("SRS1={hash}={domain}={rest}@{}", self.domain);
        }
        let stamp = stamp(now);
        let hash = self.hash(&[&stamp, domain, local]);
        format!("SRS0={hash}={stamp}={domain}={local}@{}", self.domain)
    }

    /// The address an SRS address (`local`: its local part; the domain is
    /// the caller's to check) stands for, checked at Unix time `now`.
    pub fn reverse(&self, local: &str, now: u64) -> Result<String, SrsError> {
        if !is_srs(local) {
            return Err(SrsError::Malformed);
        }
        let nonempty = |s: &&str| !s.is_empty();
        if local.as_bytes()[3] == b'1' {
            let mut parts = local[5..].splitn(3, '=');
            let hash = parts.next().filter(nonempty).ok_or(SrsError::Malformed)?;
            let first = parts.next().filter(nonempty).ok_or(SrsError::Malformed)?;
            let rest = parts.next().filter(nonempty).ok_or(SrsError::Malformed)?;
            self.check_hash(hash, &[first, rest])?;
            return Ok(format!("SRS0{rest}@{first}"));
        }
        let mut parts = local[5..].splitn(4, '=');
        let hash = parts.next().filter(nonempty).ok_or(SrsError::Malformed)?;
        let stamp = parts.next().filter(nonempty).ok_or(SrsError::Malformed)?;
        let domain = parts.next().filter(nonempty).ok_or(SrsError::Malformed)?;
        let user = parts.next().filter(nonempty).ok_or(SrsError::Malformed)?;
        // postsrsd checks the stamp first: an old address is out of date
        // whatever its hash.
        self.check_stamp(stamp, now)?;
        self.check_hash(hash, &[stamp, domain, user])?;
        Ok(format!("{user}@{domain}"))
    }

    /// The first [`HASH_LEN`] base64url characters of the HMAC of the
    /// lowercased parts, concatenated.
    fn hash(&self, parts: &[&str]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(p.to_ascii_lowercase().as_bytes());
        }
        let tag = ctx.sign();
        let d = tag.as_ref();
        // 4 characters are 24 bits: the first three bytes.
        let n = (u32::from(d[0]) << 16) | (u32::from(d[1]) << 8) | u32::from(d[2]);
        (0..HASH_LEN)
            .map(|i| HASH_CHARS[((n >> (18 - 6 * i)) & 0x3f) as usize] as char)
            .collect()
    }

    /// postsrsd's `srs_hash_check`: at least [`HASH_LEN`] characters, the
    /// first [`HASH_LEN`] compared as [`b64_class`] sees them.
    fn check_hash(&self, given: &str, parts: &[&str]) -> Result<(), SrsError> {
        if given.len() < HASH_LEN {
            return Err(SrsError::BadHash);
        }
        let ours = self.hash(parts);
        let same = given.bytes().zip(ours.bytes()).fold(true, |ok, (a, b)| {
            ok & matches!((b64_class(a), b64_class(b)), (Some(x), Some(y)) if x == y)
        });
        if same { Ok(()) } else { Err(SrsError::BadHash) }
    }

    fn check_stamp(&self, stamp: &str, now: u64) -> Result<(), SrsError> {
        if stamp.len() != 2 {
            return Err(SrsError::Expired);
        }
        let mut then = 0u64;
        for c in stamp.bytes() {
            let i = TIME_CHARS
                .iter()
                .position(|&t| t == c.to_ascii_uppercase())
                .ok_or(SrsError::Expired)?;
            then = (then << 5) | i as u64;
        }
        let mut today = (now / DAY) % TIME_SLOTS;
        while today < then {
            today += TIME_SLOTS;
        }
        if today <= then + self.max_age_days {
            Ok(())
        } else {
            Err(SrsError::Expired)
        }
    }
}

/// The time stamp of Unix time `now`: the day number modulo 1024 in two
/// base32 characters.
fn stamp(now: u64) -> String {
    let day = now / DAY;
    [(day >> 5) & 31, day & 31]
        .iter()
        .map(|&i| TIME_CHARS[i as usize] as char)
        .collect()
}

/// A hash character as postsrsd's `base64_equivalent` compares it: case
/// folded, `+` as `-`, `/` as `_`; None for anything else.
fn b64_class(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c.to_ascii_lowercase()),
        b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => Some(c),
        b'+' => Some(b'-'),
        b'/' => Some(b'_'),
        _ => None,
    }
}

/// Unix time now, in seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The SRS domain `srs.domain` defaults to: `hostname` without its first
/// label (`mx.example.org` → `example.org`), or `hostname` itself when it
/// has a single label.
pub fn default_domain(hostname: &str) -> String {
    match hostname.split_once('.') {
        Some((_, rest)) if !rest.is_empty() => rest.to_string(),
        _ => hostname.to_string(),
    }
}

/// Reads the secret: the file's first line, trimmed. An error names the
/// file when it is unreadable or the line empty.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("srs.secret_file {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(format!(
            "srs.secret_file {}: the first line (the secret) is empty",
            path.display()
        ));
    }
    Ok(line.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14T22:13:20Z, day 19675: stamp `G3`.
    const T: u64 = 1_700_000_000;

    fn srs() -> Srs {
        Srs::new(
            b"tops3cr3t",
            "srs.example.org",
            std::time::Duration::from_secs(21 * DAY),
        )
    }

    // Every expected address below is what postsrsd's srs_forward printed
    // for the same secret, time and input.

    #[test]
    fn srs0_matches_postsrsd() {
        let s = srs();
        assert_eq!(
            s.forward("sender@elsewhere.test", T),
            "SRS0=XcQ5=G3=elsewhere.test=sender@srs.example.org"
        );
        // The hash is over the lowercased parts; the address keeps its case.
        assert_eq!(
            s.forward("Sender@Elsewhere.Test", T),
            "SRS0=XcQ5=G3=Elsewhere.Test=Sender@srs.example.org"
        );
        let other = |secret: &str, sender: &str, t: u64, domain: &str| {
            Srs::new(secret.as_bytes(), domain, std::time::Duration::from_secs(0))
                .forward(sender, t)
        };
        assert_eq!(
            other(
                "another secret",
                "first.last+tag@mail.example.com",
                1_234_567_890,
                "fwd.example.net"
            ),
            "SRS0=8z9u=6Q=mail.example.com=first.last+tag@fwd.example.net"
        );
        // base64url: `_` appears where libsrs2 wrote `/`.
        assert_eq!(
            other("k9", "u9@d.test", T, "s.test"),
            "SRS0=qF2_=G3=d.test=u9@s.test"
        );
        assert_eq!(
            other("k7", "u7@d.test", T, "s.test"),
            "SRS0=30zg=G3=d.test=u7@s.test"
        );
    }

    #[test]
    fn srs1_matches_postsrsd() {
        let s = srs();
        let want = "SRS1=vD1v=first.test==abcd=XY=orig.test=alice@srs.example.org";
        assert_eq!(
            s.forward("SRS0=abcd=XY=orig.test=alice@first.test", T),
            want
        );
        // An SRS1 sender keeps its first forwarder and rest, with our hash.
        assert_eq!(
            s.forward(
                "SRS1=wxyz=first.test==abcd=XY=orig.test=alice@second.test",
                T
            ),
            want
        );
        let local = want.rsplit_once('@').unwrap().0;
        assert_eq!(
            s.reverse(local, T).unwrap(),
            "SRS0=abcd=XY=orig.test=alice@first.test"
        );
        assert_eq!(
            s.reverse(&local.to_lowercase(), T).unwrap(),
            "SRS0=abcd=xy=orig.test=alice@first.test"
        );
    }

    #[test]
    fn our_own_domain_and_the_null_sender_are_kept() {
        let s = srs();
        assert_eq!(s.forward("user@SRS.example.org", T), "user@SRS.example.org");
        assert_eq!(s.forward("", T), "");
    }

    #[test]
    fn reverse_checks_hash_case_insensitively_and_age() {
        let s = srs();
        let local = "SRS0=XcQ5=G3=elsewhere.test=sender";
        assert_eq!(s.reverse(local, T).unwrap(), "sender@elsewhere.test");
        // Lowercased by a relay on the way back: still valid (postsrsd too).
        assert_eq!(
            s.reverse("srs0=xcq5=g3=elsewhere.test=sender", T).unwrap(),
            "sender@elsewhere.test"
        );
        // 21 days later still valid, 22 days later out of date, as postsrsd.
        assert!(s.reverse(local, T + 21 * DAY).is_ok());
        assert_eq!(s.reverse(local, T + 22 * DAY), Err(SrsError::Expired));
        assert_eq!(
            s.reverse("SRS0=XcQ6=G3=elsewhere.test=sender", T),
            Err(SrsError::BadHash)
        );
        // Another secret's address is forged.
        let other = Srs::new(
            b"other",
            "srs.example.org",
            std::time::Duration::from_secs(0),
        );
        assert_eq!(other.reverse(local, T), Err(SrsError::BadHash));
        assert_eq!(
            s.reverse("SRS0=XcQ5=G3=elsewhere.test", T),
            Err(SrsError::Malformed)
        );
        assert_eq!(
            s.reverse("SRS0=XcQ=G3=elsewhere.test=sender", T),
            Err(SrsError::BadHash)
        );
        assert_eq!(s.reverse("postmaster", T), Err(SrsError::Malformed));
    }

    #[test]
    fn libsrs2_plus_slash_hashes_verify() {
        let s = Srs::new(b"k9", "s.test", std::time::Duration::from_secs(21 * DAY));
        assert!(s.reverse("SRS0=qF2_=G3=d.test=u9", T).is_ok());
        assert!(s.reverse("SRS0=qF2/=G3=d.test=u9", T).is_ok());
        assert_eq!(
            s.reverse("SRS0=qF2+=G3=d.test=u9", T),
            Err(SrsError::BadHash)
        );
    }

    #[test]
    fn stamps_wrap_at_1024_days() {
        assert_eq!(stamp(T), "G3");
        let s = srs();
        // An address made on day 1023 of a cycle is 1 day old on day 0.
        let day = 1023 * DAY;
        let a = s.forward("a@b.test", day);
        let local = a.rsplit_once('@').unwrap().0;
        assert!(s.reverse(local, day + DAY).is_ok());
    }

    #[test]
    fn the_secret_is_the_first_line_trimmed_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "  s3cret \nsecond\n").unwrap();
        assert_eq!(read_secret(&path).unwrap(), b"s3cret");
        std::fs::write(&path, "\n").unwrap();
        let e = read_secret(&path).unwrap_err();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("empty"),
            "{e}"
        );
        let missing = dir.path().join("missing");
        let e = read_secret(&missing).unwrap_err();
        assert!(
            e.starts_with(&format!("srs.secret_file {}: ", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn shapes_and_defaults() {
        assert!(is_srs("SRS0=x") && is_srs("srs1+x") && is_srs("SRS0-x"));
        assert!(!is_srs("SRS2=x") && !is_srs("SRS0") && !is_srs("srsx=x"));
        assert_eq!(default_domain("mx.example.org"), "example.org");
        assert_eq!(default_domain("localhost"), "localhost");
    }
}
