//! The one place where addresses become canonical: domains lowercased and
//! IDNA-encoded, local parts lowercased and checked so that a directory
//! value can never steer a maildir path outside the root.
//!
//! Limits are RFC 5321 §4.5.3.1: local part 64 octets, domain 255 octets,
//! path 256 octets (so an address of at most 254).

use std::fmt;

/// RFC 5321 §4.5.3.1.1.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 §4.5.3.1.2.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 §4.5.3.1.3: a path of 256 octets includes the angle brackets.
pub const MAX_ADDRESS: usize = 254;

/// Why an address or a part of one was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0:?} is not an address of the form local@domain")]
    NotAnAddress(String),
    #[error("domain {0:?} is not a valid domain name")]
    BadDomain(String),
    #[error("domain {0:?} is longer than {MAX_DOMAIN} octets")]
    DomainTooLong(String),
    #[error("local part {0:?} is empty")]
    EmptyLocal(String),
    #[error("local part {0:?} is longer than {MAX_LOCAL_PART} octets")]
    LocalTooLong(String),
    #[error("local part {0:?} may not start or end with a dot or contain \"..\"")]
    LocalDots(String),
    #[error("local part {0:?} contains {1:?}, which is not allowed")]
    LocalChar(String, char),
    #[error("address {0:?} is longer than {MAX_ADDRESS} octets")]
    AddressTooLong(String),
    /// A leading `|` marks a pipe command among alias destinations, so no
    /// mailbox or alias may be named with one.
    #[error("local part {0:?} may not start with \"|\", which marks a pipe command")]
    LocalPipe(String),
}

/// A canonical address: lowercase local part and lowercase ASCII (IDNA)
/// domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    pub local: String,
    pub domain: String,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

impl Address {
    /// Parses and normalizes an address for the directory: the local part
    /// must be safe as a maildir directory name (see [`local_part`]).
    pub fn parse(input: &str, delimiter: Option<char>) -> Result<Address, AddressError> {
        let (local, domain) = split(input)?;
        let addr = Address {
            local: local_part(local, delimiter)?,
            domain: domain_name(domain)?,
        };
        check_length(input, &addr)?;
        Ok(addr)
    }

    /// Normalizes an address as a client gave it over SMTP (after the
    /// command parser removed brackets and quoting). Unlike [`Address::parse`]
    /// it lets any local part through, lowercased: whether it names a
    /// mailbox is the directory's question, and a local part that is
    /// unsafe as a path simply names none.
    pub fn from_smtp(input: &str) -> Result<Address, AddressError> {
        let (local, domain) = split(input)?;
        if local.is_empty() {
            return Err(AddressError::EmptyLocal(input.into()));
        }
        if local.len() > MAX_LOCAL_PART {
            return Err(AddressError::LocalTooLong(local.into()));
        }
        if let Some(c) = local.chars().find(|c| c.is_control()) {
            return Err(AddressError::LocalChar(local.into(), c));
        }
        let addr = Address {
            local: local.to_lowercase(),
            domain: domain_name(domain)?,
        };
        check_length(input, &addr)?;
        Ok(addr)
    }

    /// Splits off a subaddress: `user+tag` → (`user`, Some(`tag`)).
    pub fn without_subaddress(&self, delimiter: Option<char>) -> (Address, Option<&str>) {
        match delimiter.and_then(|d| self.local.split_once(d)) {
            Some((user, tag)) if !user.is_empty() => (
                Address {
                    local: user.to_string(),
                    domain: self.domain.clone(),
                },
                Some(tag),
            ),
            _ => (self.clone(), None),
        }
    }
}

fn check_length(input: &str, addr: &Address) -> Result<(), AddressError> {
    if addr.local.len() + 1 + addr.domain.len() > MAX_ADDRESS {
        return Err(AddressError::AddressTooLong(input.into()));
    }
    Ok(())
}

/// Splits at the last `@`: a quoted local part may itself contain one.
fn split(input: &str) -> Result<(&str, &str), AddressError> {
    match input.rsplit_once('@') {
        Some((local, domain)) if !domain.is_empty() => Ok((local, domain)),
        _ => Err(AddressError::NotAnAddress(input.into())),
    }
}

/// Normalizes a domain name: IDNA (UTS #46) to ASCII, lowercase, each label
/// letters, digits and inner hyphens. IP literals are not domain names.
pub fn domain_name(input: &str) -> Result<String, AddressError> {
    let bad = || AddressError::BadDomain(input.into());
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    if trimmed.is_empty() {
        return Err(bad());
    }
    if trimmed.len() > MAX_DOMAIN && (trimmed.is_ascii() || trimmed.len() > MAX_DOMAIN * 4) {
        return Err(AddressError::DomainTooLong(input.into()));
    }
    let ascii = idna::domain_to_ascii_strict(trimmed).map_err(|_| bad())?;
    if ascii.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong(input.into()));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !ascii.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(ascii)
}

/// Normalizes a local part that will name a maildir directory: lowercase,
/// a dot-atom (RFC 5322 §3.2.3, with UTF-8 as RFC 6531 allows) without `/`,
/// `@` or the subaddress delimiter.
pub fn local_part(input: &str, delimiter: Option<char>) -> Result<String, AddressError> {
    if input.is_empty() {
        return Err(AddressError::EmptyLocal(input.into()));
    }
    let local = input.to_lowercase();
    if local.len() > MAX_LOCAL_PART {
        return Err(AddressError::LocalTooLong(input.into()));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(AddressError::LocalDots(input.into()));
    }
    if local.starts_with('|') {
        return Err(AddressError::LocalPipe(input.into()));
    }
    let atext = |c: char| {
        c.is_ascii_alphanumeric()
            || "!#$%&'*+-=?^_`{|}~.".contains(c)
            || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
    };
    if let Some(c) = local.chars().find(|&c| !atext(c) || Some(c) == delimiter) {
        return Err(AddressError::LocalChar(input.into(), c));
    }
    Ok(local)
}

/// A recipient pattern for a sink rule: `*.tmp.example.org` (every name
/// below, at any depth) or an exact domain. Returns it normalized.
pub fn sink_pattern(input: &str) -> Result<String, AddressError> {
    match input.strip_prefix("*.") {
        Some(base) => Ok(format!("*.{}", domain_name(base)?)),
        None => domain_name(input),
    }
}

/// Whether `domain` (normalized) is covered by a normalized sink pattern.
pub fn sink_pattern_matches(pattern: &str, domain: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(base) => {
            domain.len() > base.len() + 1
                && domain.ends_with(base)
                && domain.as_bytes()[domain.len() - base.len() - 1] == b'.'
        }
        None => pattern == domain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_lowercased_and_idna_encoded() {
        assert_eq!(domain_name("Example.ORG").unwrap(), "example.org");
        assert_eq!(
            domain_name("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(domain_name("example.org.").unwrap(), "example.org");
        for bad in [
            "",
            ".",
            "a..b",
            "-a.org",
            "a-.org",
            "[127.0.0.1]",
            "a b.org",
            "a_b.org",
            "a/b.org",
            "x\0.org",
        ] {
            assert!(domain_name(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            domain_name(&format!("{}.org", "a.".repeat(130))),
            Err(AddressError::DomainTooLong(_))
        ));
    }

    #[test]
    fn local_parts_cannot_escape_the_root() {
        let d = Some('+');
        assert_eq!(local_part("Alice", d).unwrap(), "alice");
        assert_eq!(local_part("first.last", d).unwrap(), "first.last");
        assert_eq!(local_part("jörg", d).unwrap(), "jörg");
        for bad in [
            "", "../x", "a/b", "..", ".hidden", "a..b", "trail.", "a\0b", "a\nb", "a b", "a@b",
            "a+b", "a\\b", "\"q\"",
        ] {
            assert!(local_part(bad, d).is_err(), "{bad:?}");
        }
        assert!(local_part("a+b", None).is_ok());
        // `|` inside is atext; leading, it would read as a pipe command.
        assert_eq!(local_part("a|b", d).unwrap(), "a|b");
        assert!(matches!(
            local_part("|cmd", d),
            Err(AddressError::LocalPipe(_))
        ));
        assert!(matches!(
            local_part(&"a".repeat(65), d),
            Err(AddressError::LocalTooLong(_))
        ));
    }

    #[test]
    fn addresses() {
        let a = Address::parse("Alice@Example.ORG", Some('+')).unwrap();
        assert_eq!(a.to_string(), "alice@example.org");
        assert!(Address::parse("noat", None).is_err());
        assert!(Address::parse("a@", None).is_err());
        let long = format!(
            "{}@{}.org",
            "a".repeat(64),
            "b".repeat(60) + &".c".repeat(90)
        );
        assert!(matches!(
            Address::parse(&long, None),
            Err(AddressError::AddressTooLong(_))
        ));
    }

    #[test]
    fn smtp_addresses_split_at_the_last_at() {
        let a = Address::from_smtp("a@b@Example.org").unwrap();
        assert_eq!(
            (a.local.as_str(), a.domain.as_str()),
            ("a@b", "example.org")
        );
        assert!(Address::from_smtp("x@[127.0.0.1]").is_err());
        assert!(Address::from_smtp("@example.org").is_err());
    }

    #[test]
    fn subaddresses() {
        let a = Address::from_smtp("user+tag+more@example.org").unwrap();
        let (base, tag) = a.without_subaddress(Some('+'));
        assert_eq!((base.local.as_str(), tag), ("user", Some("tag+more")));
        let (base, tag) = a.without_subaddress(None);
        assert_eq!((base.local.as_str(), tag), ("user+tag+more", None));
        let b = Address::from_smtp("+tag@example.org").unwrap();
        assert_eq!(b.without_subaddress(Some('+')).0.local, "+tag");
    }

    #[test]
    fn sink_patterns() {
        assert_eq!(
            sink_pattern("*.TMP.example.org").unwrap(),
            "*.tmp.example.org"
        );
        assert!(sink_pattern("*.").is_err());
        assert!(sink_pattern("a.*.org").is_err());
        let p = "*.tmp.example.org";
        assert!(sink_pattern_matches(p, "x.tmp.example.org"));
        assert!(sink_pattern_matches(p, "a.b.tmp.example.org"));
        assert!(!sink_pattern_matches(p, "tmp.example.org"));
        assert!(!sink_pattern_matches(p, "xtmp.example.org"));
        assert!(sink_pattern_matches("tmp.example.org", "tmp.example.org"));
        assert!(!sink_pattern_matches(
            "tmp.example.org",
            "x.tmp.example.org"
        ));
    }
}
