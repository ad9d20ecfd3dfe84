//! IP networks: as the config writes them (`192.0.2.0/24`, `2001:db8::/32`,
//! or a bare address for one host), and as the groups clients are counted
//! under: one address or an IPv6 /64 for rate limits, a /24 or a /64 for
//! greylisting. An IPv6 /64 is usually one customer's allocation, so
//! counting single IPv6 addresses would let one host rotate through 2^64.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IP network: an address with its host bits cleared and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Network {
    addr: IpAddr,
    bits: u8,
}

/// Why a string is not a [`Network`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network {input:?}: {why}")]
pub struct NetworkError {
    input: String,
    why: String,
}

impl Network {
    /// The network of `bits` leading bits around `addr`, or None when
    /// `bits` is longer than the address.
    pub fn new(addr: IpAddr, bits: u8) -> Option<Network> {
        let addr = addr.to_canonical();
        match addr {
            IpAddr::V4(a) if bits <= 32 => Some(Network {
                addr: IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & mask32(bits))),
                bits,
            }),
            IpAddr::V6(a) if bits <= 128 => Some(Network {
                addr: IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & mask128(bits))),
                bits,
            }),
            _ => None,
        }
    }

    /// The group `ip` belongs to: its first `v4_bits` if it is IPv4 (an
    /// IPv4-mapped IPv6 address counts as IPv4), else its first `v6_bits`.
    pub fn of(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> Network {
        let ip = ip.to_canonical();
        let bits = if ip.is_ipv4() {
            v4_bits.min(32)
        } else {
            v6_bits.min(128)
        };
        Network::new(ip, bits).expect("prefix length clamped to the address")
    }

    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address
    /// as the IPv4 address it carries).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => a.to_bits() & mask32(self.bits) == n.to_bits(),
            (IpAddr::V6(n), IpAddr::V6(a)) => a.to_bits() & mask128(self.bits) == n.to_bits(),
            _ => false,
        }
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Loopback, IPv4 and IPv6: the default allow and exempt lists.
    pub fn loopback() -> Vec<Network> {
        vec![
            Network::new(IpAddr::from([127, 0, 0, 0]), 8).expect("valid"),
            Network::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128).expect("valid"),
        ]
    }
}

fn mask32(bits: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0)
}

fn mask128(bits: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0)
}

impl FromStr for Network {
    type Err = NetworkError;

    /// `ADDRESS/BITS`, or a bare address for one host. Host bits must be
    /// clear: `192.0.2.1/24` is refused (with the network it probably
    /// meant), since either the address or the length is a typo.
    fn from_str(s: &str) -> Result<Network, NetworkError> {
        let err = |why: String| NetworkError {
            input: s.to_string(),
            why,
        };
        let (addr, bits) = match s.trim().split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            err("expected an IP address, optionally followed by /prefix-length".into())
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|&b| b <= max)
                .ok_or_else(|| err(format!("prefix length must be 0 to {max}")))?,
        };
        let net = Network::new(addr, bits).expect("length checked above");
        if net.addr != addr {
            return Err(err(format!("host bits are set; did you mean {net}?")));
        }
        Ok(net)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_networks_and_hosts_and_prints_them_back() {
        for (input, shown) in [
            ("192.0.2.0/24", "192.0.2.0/24"),
            ("192.0.2.7", "192.0.2.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
        ] {
            assert_eq!(input.parse::<Network>().unwrap().to_string(), shown);
        }
        let err = |s: &str| s.parse::<Network>().unwrap_err().to_string();
        assert_eq!(
            err("192.0.2.1/24"),
            "invalid network \"192.0.2.1/24\": host bits are set; did you mean 192.0.2.0/24?"
        );
        assert_eq!(
            err("192.0.2.0/33"),
            "invalid network \"192.0.2.0/33\": prefix length must be 0 to 32"
        );
        assert_eq!(
            err("example.org"),
            "invalid network \"example.org\": expected an IP address, optionally followed by /prefix-length"
        );
    }

    #[test]
    fn contains_and_groups() {
        let net: Network = "192.0.2.0/24".parse().unwrap();
        assert!(net.contains(ip("192.0.2.255")));
        assert!(net.contains(ip("::ffff:192.0.2.1")));
        assert!(!net.contains(ip("192.0.3.0")));
        assert!(!net.contains(ip("2001:db8::1")));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert_eq!(
            Network::of(ip("2001:db8:1:2:aaaa::1"), 32, 64).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            Network::of(ip("::ffff:198.51.100.7"), 24, 64).to_string(),
            "198.51.100.0/24"
        );
        let lo = Network::loopback();
        assert!(lo.iter().any(|n| n.contains(ip("127.3.4.5"))));
        assert!(lo.iter().any(|n| n.contains(ip("::1"))));
        assert!(!lo.iter().any(|n| n.contains(ip("::2"))));
    }
}
