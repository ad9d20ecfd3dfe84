//! `N/DURATION`: at most N events per window (`"5/10m"`).
//!
//! Reconciliation note: the rate limits (`[limits]` messages_per_ip…)
//! bring their own `Rate` with this same spelling and API (`new`, `count`,
//! `window`, `FromStr`, `Display`, serde as a string). When both are in one
//! tree, this file becomes `pub use crate::ratelimit::Rate;`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::units;

/// At most `count` events per `window`; both at least 1 (second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    window: units::Duration,
}

/// Why a string is not a [`Rate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate {input:?}: {why}")]
pub struct RateError {
    input: String,
    why: String,
}

impl Rate {
    /// `count` per `window`; None for a zero count or a window under 1s.
    pub fn new(count: u32, window: StdDuration) -> Option<Rate> {
        (count > 0 && window.as_secs() > 0).then(|| Rate {
            count,
            window: units::Duration::from_secs(window.as_secs()),
        })
    }

    /// Events allowed per window.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The window.
    pub fn window(&self) -> StdDuration {
        self.window.0
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let err = |why: String| RateError {
            input: s.to_string(),
            why,
        };
        let (n, window) = s
            .split_once('/')
            .ok_or_else(|| err("expected COUNT/DURATION, such as \"5/10m\"".into()))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| err(format!("{:?} is not a whole number of events", n.trim())))?;
        if count == 0 {
            return Err(err("the count must be at least 1".into()));
        }
        let window: units::Duration = window.trim().parse().map_err(|e| err(format!("{e}")))?;
        if window.as_secs() == 0 {
            return Err(err("the window must be at least 1s".into()));
        }
        Ok(Rate { count, window })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.window)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let r: Rate = "5/10m".parse().unwrap();
        assert_eq!((r.count(), r.window().as_secs()), (5, 600));
        assert_eq!(r.to_string(), "5/10m");
        assert_eq!(" 3 / 2s ".parse::<Rate>().unwrap().to_string(), "3/2s");
        for bad in ["5", "0/1m", "x/1m", "5/0s", "5/1y", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!(
            "5".parse::<Rate>().unwrap_err().to_string(),
            "invalid rate \"5\": expected COUNT/DURATION, such as \"5/10m\""
        );
    }
}
