//! Bearer tokens. The configuration holds only their SHA-256 digests (hex), so a leaked config file
//! does not leak a credential; a presented token is hashed and looked up.

use aws_lc_rs::digest;

/// The hex SHA-256 digest of `token`, as written in the configuration.
pub fn sha256_hex(token: &str) -> String {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token: 32 bytes, hex.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` is a hex SHA-256 digest (what the configuration must hold).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_the_known_sha256() {
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let t = generate();
        assert_eq!(t.len(), 64);
        assert_ne!(t, generate());
        assert!(is_sha256_hex(&sha256_hex(&t)));
        assert!(!is_sha256_hex("ABC"));
    }
}
