//! Who a certificate names. Every certificate the helper issues carries one URI subject alternative
//! name, `spiffe://<trust-domain>/<kind>/<name>`: the kind says what the holder may act as (a
//! replica, an agent, a client), the name which one. The CA is the trust boundary: a certificate
//! counts only when it chains to the configured CA, and the trust domain is informational.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What a certificate's holder may act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A control-plane replica: serves the api and peer ports, calls other replicas' peer ports.
    Replica,
    /// A host agent: attaches to the control plane and reports its tasks.
    Agent,
    /// A user, an operator's tool or an automation using the API.
    Client,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Replica => "replica",
            Kind::Agent => "agent",
            Kind::Client => "client",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "replica" => Some(Kind::Replica),
            "agent" => Some(Kind::Agent),
            "client" => Some(Kind::Client),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A certificate holder: `replica/2`, `agent/i-0abc`, `client/alice`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kind: Kind,
    pub name: String,
}

pub const MAX_NAME_LEN: usize = 128;

/// Names are identifiers that end up in logs, metrics and the audit log: a safe alphabet only.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')) {
        return Err("may contain only letters, digits, '-', '_', '.' and '@'".into());
    }
    Ok(())
}

impl Identity {
    pub fn new(kind: Kind, name: impl Into<String>) -> Result<Identity, String> {
        let name = name.into();
        validate_name(&name).map_err(|why| format!("identity name: {why}"))?;
        Ok(Identity { kind, name })
    }

    /// The URI subject alternative name that carries this identity.
    pub fn uri(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/{}/{}", self.kind, self.name)
    }

    /// Parses `spiffe://<trust-domain>/<kind>/<name>`.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (_domain, path) = rest.split_once('/')?;
        let (kind, name) = path.split_once('/')?;
        Identity::new(Kind::parse(kind)?, name).ok()
    }

    /// The identity a DER certificate carries, if it carries exactly one.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("unreadable subject alternative names: {e}"))?
            .ok_or("the certificate has no subject alternative names (no titus identity)")?;
        let mut found = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        });
        let uri = found.next().ok_or("the certificate carries no spiffe:// identity")?;
        if found.next().is_some() {
            return Err("the certificate carries more than one spiffe:// identity".into());
        }
        Identity::from_uri(uri).ok_or_else(|| "the certificate's spiffe:// identity is not <kind>/<name>".into())
    }
}

/// A DER certificate's serial number as lower-case hex, without leading zeros (see
/// [`normalize_serial`]).
pub fn serial_hex(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let hex: String = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    normalize_serial(&hex).ok_or_else(|| "the certificate has an empty serial number".into())
}

/// A serial number as written by people and tools (`4A:3F…`, `serial=4a3f…`, `0x4A3F`), as
/// [`serial_hex`] gives it; None when it is not hex.
pub fn normalize_serial(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t.strip_prefix("serial=").unwrap_or(t);
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if digits.is_empty() || digits.len() > 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    Some(if trimmed.is_empty() { "0".to_string() } else { trimmed.to_string() })
}

/// A DER certificate's validity, ms since the epoch: (not before, not after).
pub fn validity_ms(der: &[u8]) -> Result<(i64, i64), String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp() * 1000, v.not_after.timestamp() * 1000))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_bad_ones_are_refused() {
        let id = Identity::new(Kind::Agent, "i-0abc").unwrap();
        assert_eq!(Identity::from_uri(&id.uri("prod")), Some(id.clone()));
        assert_eq!(id.to_string(), "agent/i-0abc");
        for bad in [
            "https://prod/agent/x",
            "spiffe://prod/root/x",
            "spiffe://prod/agent/",
            "spiffe://prod/agent",
            "spiffe://prod/client/a b",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
        assert!(Identity::new(Kind::Client, "x".repeat(129)).is_err());
    }
}
