//! Password hashes in the form Dovecot verifies: `{ARGON2ID}$argon2id$v=19$…`.
//!
//! Dovecot's ARGON2ID scheme goes through libsodium, which only supports one
//! lane, so the parameters keep p=1.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Dovecot's scheme prefix.
pub const SCHEME: &str = "{ARGON2ID}";

/// Errors from hashing or checking a password.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password is empty")]
    Empty,
    #[error("password is longer than 1024 bytes")]
    TooLong,
    #[error("password contains a NUL, CR or LF character")]
    BadChar,
    #[error("hashing failed: {0}")]
    Hash(String),
}

fn hasher() -> Argon2<'static> {
    // OWASP's argon2id recommendation (19 MiB, 2 passes, 1 lane).
    let params = Params::new(19 * 1024, 2, 1, None).expect("static argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes `password` into a `{ARGON2ID}`-prefixed PHC string.
pub fn hash(password: &str) -> Result<String, PasswordError> {
    if password.is_empty() {
        return Err(PasswordError::Empty);
    }
    if password.len() > 1024 {
        return Err(PasswordError::TooLong);
    }
    // Dovecot's protocols cannot carry these, so such a password could
    // never be used to log in.
    if password.contains(['\0', '\r', '\n']) {
        return Err(PasswordError::BadChar);
    }
    let salt = SaltString::generate(&mut OsRng);
    let phc = hasher()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| PasswordError::Hash(e.to_string()))?;
    Ok(format!("{SCHEME}{phc}"))
}

/// Checks `password` against a stored hash made by [`hash`].
pub fn verify(stored: &str, password: &str) -> bool {
    let Some(phc) = stored.strip_prefix(SCHEME) else {
        return false;
    };
    let ok = PasswordHash::new(phc)
        .is_ok_and(|h| hasher().verify_password(password.as_bytes(), &h).is_ok());
    release_memory();
    ok
}

/// Gives the 19 MiB an argon2 check used back to the system. glibc keeps
/// a freed block that large in the arena of the thread that freed it (its
/// mmap threshold rises after the first such free), and a login can run
/// on any blocking-pool thread: 20 logins left about 300 MiB resident.
fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = hash("correct horse").unwrap();
        assert!(
            h.starts_with("{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$"),
            "{h}"
        );
        assert!(verify(&h, "correct horse"));
        assert!(!verify(&h, "wrong"));
        assert!(matches!(hash(""), Err(PasswordError::Empty)));
        assert!(matches!(hash("a\nb"), Err(PasswordError::BadChar)));
    }
}
