//! What every long-running binary of the project does the same way: logging set-up and waiting
//! for the signal to stop.

/// Structured logs to stderr: `plain` (human-readable; colours only on a terminal) or `json` (one
/// object per line, span fields included). `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Raises this process's soft limit on open files to its hard limit (as Go's runtime does), so a
/// server sized for `wanted` connections is not stopped short by a login shell's 1,024. Returns
/// the soft limit now in force, or why it could not be read or raised; never lowers it.
pub fn raise_open_files_limit(wanted: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
    }
    if limit.rlim_cur >= wanted || limit.rlim_cur >= limit.rlim_max {
        return Ok(limit.rlim_cur as u64);
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max.min(wanted.max(limit.rlim_cur as u64) as libc::rlim_t),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit through a valid pointer to a local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(format!("setrlimit(RLIMIT_NOFILE, {}): {}", raised.rlim_cur, std::io::Error::last_os_error()));
    }
    Ok(raised.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_towards_what_is_wanted_and_never_lowered() {
        let before = super::raise_open_files_limit(0).expect("the limit reads");
        let after = super::raise_open_files_limit(before + 1).expect("raised or left");
        assert!(after >= before, "{after} < {before}");
        assert_eq!(super::raise_open_files_limit(1).expect("reads"), after, "never lowered");
    }
}
