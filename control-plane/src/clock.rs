//! The wall clock, in milliseconds since the epoch: the one place every layer reads it from (the
//! bottom of the crate; it depends on nothing of ours).

/// Now, in ms since the epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
