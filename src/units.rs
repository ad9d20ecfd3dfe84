//! Human-written quantities shared by the CLI and the config file: durations
//! (`30s`, `10m`, `1h`, `2d`) and byte sizes (`500M`, `2G`, plain bytes).
//!
//! Both parse strictly: a typo is an error that quotes the input, never a
//! silent zero.

use std::fmt;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An error from parsing a duration or a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {why}")]
pub struct UnitError {
    what: &'static str,
    input: String,
    why: &'static str,
}

/// A span of time written as a number and a unit: `30s`, `10m`, `1h`, `2d`.
/// A bare number is seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(StdDuration::from_secs(secs))
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl From<Duration> for StdDuration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| UnitError {
            what: "duration",
            input: s.to_string(),
            why,
        };
        let (digits, unit) = split_number(s.trim())
            .ok_or_else(|| err("expected a number followed by s, m, h or d"))?;
        let n: u64 = digits.parse().map_err(|_| err("number out of range"))?;
        let scale = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(err("unit must be s, m, h or d")),
        };
        let secs = n
            .checked_mul(scale)
            .ok_or_else(|| err("number out of range"))?;
        Ok(Duration::from_secs(secs))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        match s {
            0 => write!(f, "0s"),
            _ if s.is_multiple_of(86400) => write!(f, "{}d", s / 86400),
            _ if s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            _ if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

/// A number of bytes written as `500M`, `2G`, `64K` (binary multiples) or
/// plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| UnitError {
            what: "size",
            input: s.to_string(),
            why,
        };
        let (digits, unit) = split_number(s.trim())
            .ok_or_else(|| err("expected a number optionally followed by K, M, G or T"))?;
        let n: u64 = digits.parse().map_err(|_| err("number out of range"))?;
        let scale: u64 = match unit {
            "" | "B" | "b" => 1,
            "K" | "k" | "KiB" => 1 << 10,
            "M" | "m" | "MiB" => 1 << 20,
            "G" | "g" | "GiB" => 1 << 30,
            "T" | "t" | "TiB" => 1 << 40,
            _ => return Err(err("unit must be K, M, G or T")),
        };
        n.checked_mul(scale)
            .map(ByteSize)
            .ok_or_else(|| err("number out of range"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            if b != 0 && b.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

/// Splits `"10m"` into `("10", "m")`; `None` when there are no leading digits.
fn split_number(s: &str) -> Option<(&str, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (end > 0).then(|| (&s[..end], &s[end..]))
}

/// Config files may write either `"1h"` or a plain integer (seconds or
/// bytes); both deserialize through this.
#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrInt {
    Str(String),
    Int(u64),
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrInt::deserialize(d)? {
            StrOrInt::Str(s) => s.parse().map_err(serde::de::Error::custom),
            StrOrInt::Int(n) => Ok(Duration::from_secs(n)),
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrInt::deserialize(d)? {
            StrOrInt::Str(s) => s.parse().map_err(serde::de::Error::custom),
            StrOrInt::Int(n) => Ok(ByteSize(n)),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (input, secs) in [
            ("30s", 30),
            ("10m", 600),
            ("1h", 3600),
            ("2d", 172800),
            ("45", 45),
            ("0s", 0),
        ] {
            assert_eq!(
                input.parse::<Duration>().unwrap().as_secs(),
                secs,
                "{input}"
            );
        }
        for bad in [
            "",
            "h",
            "1w",
            "1.5h",
            "-1s",
            "1 h h",
            "99999999999999999999s",
        ] {
            assert!(bad.parse::<Duration>().is_err(), "{bad}");
        }
        assert_eq!(Duration::from_secs(7200).to_string(), "2h");
        assert_eq!(Duration::from_secs(90).to_string(), "90s");
    }

    #[test]
    fn sizes() {
        for (input, bytes) in [
            ("500M", 500 << 20),
            ("2G", 2 << 30),
            ("1024", 1024),
            ("0", 0),
            ("64K", 65536),
        ] {
            assert_eq!(input.parse::<ByteSize>().unwrap().0, bytes, "{input}");
        }
        for bad in ["", "M", "1X", "1.5G", "-5"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize(500 << 20).to_string(), "500M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
