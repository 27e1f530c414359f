//! Transport security for every Titus connection: mutual TLS with rustls, caller identities carried
//! in certificates, certificates and keys reloaded from disk without a restart, the helper that
//! makes a cluster's private CA and certificates, bearer-token hashing and per-caller rate limits.
//!
//! Nothing here knows the API: the control plane decides what an identity may do.
//!
//! - [`identity`]: who a certificate names (`spiffe://<trust-domain>/<kind>/<name>`).
//! - [`tls`]: loading and reloading PEM files into rustls configurations, the server's accepted
//!   connections (with the caller's identity attached) and the client's connector.
//! - [`certs`]: a private CA and certificates for replicas, agents and clients.
//! - [`token`]: bearer tokens, stored as SHA-256 digests.
//! - [`ratelimit`]: token buckets per caller.

pub mod admission;
pub mod certs;
pub mod identity;
pub mod ratelimit;
pub mod tls;
pub mod token;

pub use admission::{Gate, ListenerLimits, ListenerStats};
pub use identity::{Identity, Kind};
pub use tls::{Connector, PeerInfo, Tls, TlsError, TlsFiles};
