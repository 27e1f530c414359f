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

/// The standard `process_*` series (CPU seconds, resident and virtual memory, open and most file
/// descriptors, start time, threads) read from /proc at scrape time, and `titus_build_info` naming
/// the binary and its version. Series that cannot be read (not Linux) are left out.
pub fn process_metrics(binary: &str, version: &str) -> String {
    let mut out = String::new();
    let mut series = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    };
    // SAFETY: sysconf reads a configuration value; no memory is touched.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // The command name (field 2) is in parentheses and may hold spaces: fields after the last ')'.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        if let (Some(utime), Some(stime), true) = (field(14), field(15), ticks > 0) {
            series(
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                (utime + stime) / ticks as f64,
            );
        }
        if let Some(threads) = field(20) {
            series("process_threads", "gauge", "Number of OS threads in the process.", threads);
        }
        if let Some(vsize) = field(23) {
            series("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vsize);
        }
        if let (Some(rss), true) = (field(24), page > 0) {
            series("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss * page as f64);
        }
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok()));
        if let (Some(start), Some(boot), true) = (field(22), boot, ticks > 0) {
            series(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot + start / ticks as f64,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        series("process_open_fds", "gauge", "Number of open file descriptors.", fds.count() as f64);
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        series("process_max_fds", "gauge", "Maximum number of open file descriptors.", limit.rlim_cur as f64);
    }
    let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    out.push_str(&format!(
        "# HELP titus_build_info The binary and its version (always 1).\n# TYPE titus_build_info gauge\ntitus_build_info{{binary=\"{}\",version=\"{}\"}} 1\n",
        escape(binary),
        escape(version)
    ));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_series_are_read_from_proc() {
        let text = super::process_metrics("titus-test", "1.2.3");
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6, "a running test holds more than a megabyte");
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_start_time_seconds") > 1.7e9);
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(text.contains("titus_build_info{binary=\"titus-test\",version=\"1.2.3\"} 1"), "{text}");
    }

    #[test]
    fn the_open_files_limit_is_raised_towards_what_is_wanted_and_never_lowered() {
        let before = super::raise_open_files_limit(0).expect("the limit reads");
        let after = super::raise_open_files_limit(before + 1).expect("raised or left");
        assert!(after >= before, "{after} < {before}");
        assert_eq!(super::raise_open_files_limit(1).expect("reads"), after, "never lowered");
    }
}
