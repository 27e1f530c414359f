//! The SDK's one error type. Server-side field violations are kept, field by field.

/// One invalid field, as the server named it (`group.resources_per_instance.cpu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {message}")]
    InvalidArgument { message: String, violations: Vec<FieldViolation> },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("no replica could serve {operation} within {elapsed_ms} ms ({attempts} attempts); last error from {last_replica}: {last_error}")]
    Unavailable { operation: String, attempts: u32, elapsed_ms: u64, last_replica: String, last_error: String },
    #[error("{replica}: {}: {}", code_name(status.code()), status.message())]
    Server { replica: String, status: tonic::Status },
    #[error("seed address {0:?} is not host:port")]
    BadSeed(String),
    #[error("no seed addresses given")]
    NoSeeds,
}

pub type Result<T> = std::result::Result<T, Error>;

/// `PERMISSION_DENIED`-style names, as gRPC documents them.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Splits the server's `field: description; field: description` message.
fn parse_violations(message: &str) -> Vec<FieldViolation> {
    message
        .split("; ")
        .filter_map(|part| part.split_once(": "))
        .map(|(f, d)| FieldViolation { field: f.to_string(), description: d.to_string() })
        .collect()
}

impl Error {
    /// The error a replica's `status` means (for the messages of a stream the SDK hands out).
    pub fn from_status(replica: &str, status: tonic::Status) -> Error {
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::InvalidArgument => Error::InvalidArgument { violations: parse_violations(&message), message },
            tonic::Code::NotFound => Error::NotFound(message),
            tonic::Code::AlreadyExists => Error::AlreadyExists(message),
            tonic::Code::FailedPrecondition => Error::FailedPrecondition(message),
            _ => Error::Server { replica: replica.to_string(), status },
        }
    }

    /// The field violations of an INVALID_ARGUMENT error; empty otherwise.
    pub fn violations(&self) -> &[FieldViolation] {
        match self {
            Error::InvalidArgument { violations, .. } => violations,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_violations_survive_the_wire() {
        let e = Error::from_status(
            "r1",
            tonic::Status::invalid_argument("group.name: must not be empty; group.instance_count: must be > 0"),
        );
        let fields: Vec<&str> = e.violations().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["group.name", "group.instance_count"]);
        assert!(matches!(Error::from_status("r1", tonic::Status::not_found("x")), Error::NotFound(_)));
    }
}
