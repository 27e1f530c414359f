//! A cluster's private CA and the certificates it issues, for `titus certs` and the tests.
//!
//! Keys are ECDSA P-256. A certificate names one identity in a URI subject alternative name (see
//! [`crate::identity`]) and, for replicas, the host names and addresses they are reached at (so
//! generic gRPC tools can verify them too). Replicas get both server and client authentication
//! (they call each other); agents and clients get client authentication only.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

use crate::identity::{Identity, Kind};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator failed");
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days as i64);
}

/// A new self-signed CA named `name`, valid for `days`.
pub fn new_ca(name: &str, days: u32) -> Result<Pem, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Titus");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(serial());
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// The parameters of a certificate for `identity`: its URI SAN, `hosts` as DNS / IP SANs, and the
/// extended key usages of its kind.
fn leaf_params(
    identity: &Identity,
    trust_domain: &str,
    hosts: &[String],
    days: u32,
) -> Result<CertificateParams, CertError> {
    if trust_domain.is_empty() || !trust_domain.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')) {
        return Err(CertError::Invalid(format!(
            "trust domain {trust_domain:?}: use letters, digits, '-' and '.' only"
        )));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.to_string());
    dn.push(DnType::OrganizationName, "Titus");
    params.distinguished_name = dn;
    params.subject_alt_names.push(SanType::URI(identity.uri(trust_domain).try_into()?));
    for host in hosts {
        match host.parse::<IpAddr>() {
            Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
            Err(_) => params.subject_alt_names.push(SanType::DnsName(
                host.clone().try_into().map_err(|_| CertError::Invalid(format!("host {host:?} is not a DNS name")))?,
            )),
        }
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity.kind {
        Kind::Replica => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Kind::Agent | Kind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial());
    validity(&mut params, days);
    Ok(params)
}

/// The CA as rcgen needs it to sign.
fn ca_of(ca: &Pem) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca.cert)?.self_signed(&ca_key)?;
    Ok((ca_cert, ca_key))
}

/// A certificate for `identity`, signed by `ca`, valid for `days`. `hosts` (names or addresses)
/// are added as DNS / IP subject alternative names.
pub fn issue(ca: &Pem, identity: &Identity, trust_domain: &str, hosts: &[String], days: u32) -> Result<Pem, CertError> {
    let params = leaf_params(identity, trust_domain, hosts, days)?;
    let (ca_cert, ca_key) = ca_of(ca)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// A new private key and a certificate signing request for it, PEM: what an enrolling agent
/// sends (the key never leaves it).
pub fn new_csr(identity: &Identity) -> Result<Pem, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, identity.to_string());
    let csr = params.serialize_request(&key)?;
    Ok(Pem { cert: csr.pem()?, key: key.serialize_pem() })
}

/// Signs the public key of `csr_pem` (its signature checked: the requester holds the key) into a
/// certificate for `identity`. What the request asks to be named is ignored: the signer decides.
pub fn sign_csr(
    ca: &Pem,
    identity: &Identity,
    trust_domain: &str,
    csr_pem: &str,
    days: u32,
) -> Result<String, CertError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CertError::Invalid(format!("csr: not a valid, self-signed certificate request ({e})")))?;
    let params = leaf_params(identity, trust_domain, &[], days)?;
    let (ca_cert, ca_key) = ca_of(ca)?;
    Ok(params.signed_by(&csr.public_key, &ca_cert, &ca_key)?.pem())
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let err = |e: std::io::Error| CertError::File { path: path.to_path_buf(), message: e.to_string() };
    // Written aside, then renamed: a reloading process never sees half a file.
    let tmp = path.with_extension("tmp");
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(if private { 0o600 } else { 0o644 });
        }
        let mut f = options.open(&tmp).map_err(err)?;
        f.write_all(contents.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)
}

/// Writes `pem` to `cert` and `key` (the key readable by its owner only), each written aside and
/// renamed.
pub fn write_files(cert: &Path, key: &Path, pem: &Pem) -> Result<(), CertError> {
    for dir in [cert.parent(), key.parent()].into_iter().flatten().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| CertError::File { path: dir.to_path_buf(), message: e.to_string() })?;
    }
    write(key, &pem.key, true)?;
    write(cert, &pem.cert, false)
}

/// Writes `pem` as `<dir>/<stem>.pem` and `<dir>/<stem>.key` (the key readable by its owner only).
pub fn write_pair(dir: &Path, stem: &str, pem: &Pem) -> Result<(PathBuf, PathBuf), CertError> {
    fs::create_dir_all(dir).map_err(|e| CertError::File { path: dir.to_path_buf(), message: e.to_string() })?;
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    write(&key, &pem.key, true)?;
    write(&cert, &pem.cert, false)?;
    Ok((cert, key))
}

/// Reads `<dir>/<stem>.pem` and `.key`.
pub fn read_pair(dir: &Path, stem: &str) -> Result<Pem, CertError> {
    let read = |p: PathBuf| fs::read_to_string(&p).map_err(|e| CertError::File { path: p, message: e.to_string() });
    Ok(Pem { cert: read(dir.join(format!("{stem}.pem")))?, key: read(dir.join(format!("{stem}.key")))? })
}

/// The file stem `titus certs` uses for an identity: `replica-1`, `agent-a1`, `client-alice`.
pub fn stem(identity: &Identity) -> String {
    format!("{}-{}", identity.kind, identity.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = new_ca("test CA", 1).unwrap();
        let id = Identity::new(Kind::Replica, "2").unwrap();
        let pem = issue(&ca, &id, "prod", &["127.0.0.1".into(), "replica-2".into()], 1).unwrap();
        let der = rustls_pemfile::certs(&mut pem.cert.as_bytes()).next().unwrap().unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        assert!(issue(&ca, &id, "bad domain", &[], 1).is_err());
        let ca_der = rustls_pemfile::certs(&mut ca.cert.as_bytes()).next().unwrap().unwrap();
        assert!(Identity::from_cert_der(&ca_der).is_err(), "the CA names nobody");
    }

    #[test]
    fn a_signed_request_names_whom_the_signer_decides() {
        let ca = new_ca("test CA", 1).unwrap();
        let asked = Identity::new(Kind::Replica, "1").unwrap();
        let request = new_csr(&asked).unwrap();
        let agent = Identity::new(Kind::Agent, "i-0abc").unwrap();
        let cert = sign_csr(&ca, &agent, "prod", &request.cert, 30).unwrap();
        let der = rustls_pemfile::certs(&mut cert.as_bytes()).next().unwrap().unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), agent);
        assert!(sign_csr(&ca, &agent, "prod", "garbage", 30).unwrap_err().to_string().contains("csr"));
    }
}
