//! `titus task logs`, `titus job logs` and `titus task exec`: a task's container output and
//! commands run in it, through the leader to the task's agent.

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use titus_client::proto as pb;
use titus_client::{Client, Error};

/// What `logs` asks for.
pub struct LogsArgs {
    pub follow: bool,
    pub tail: Option<u32>,
    pub since: Option<Duration>,
    pub timestamps: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl LogsArgs {
    fn request(&self, task_id: &str) -> pb::TaskLogsRequest {
        let since_ms = self
            .since
            .map_or(0, |d| crate::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).max(1));
        pb::TaskLogsRequest {
            task_id: task_id.to_string(),
            follow: self.follow,
            tail: self.tail.unwrap_or(0),
            since_ms,
            timestamps: self.timestamps,
            stdout: self.stdout,
            stderr: self.stderr,
        }
    }
}

fn write_chunk(chunk: &pb::OutputChunk) {
    if chunk.stream == pb::OutputStream::Stderr as i32 {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(&chunk.data);
        let _ = e.flush();
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(&chunk.data);
        let _ = o.flush();
    }
}

/// Prints one task's output as it comes.
pub async fn task_logs(client: &Client, task_id: &str, args: &LogsArgs) -> Result<(), Error> {
    let mut stream = client.task_logs(args.request(task_id)).await?;
    while let Some(message) = stream.next().await {
        let message = message.map_err(|s| Error::from_status("leader", s))?;
        if let Some(pb::task_output::Output::Chunk(chunk)) = message.output {
            write_chunk(&chunk);
        }
    }
    Ok(())
}

/// Most tasks `job logs -f` follows at once (an agent serves 32 sessions).
const MAX_FOLLOWED: usize = 32;

/// Prints the output of every task of a job that has one, each line prefixed by the task's index
/// and id: task after task, or with `follow` side by side (the first [`MAX_FOLLOWED`] live ones)
/// until every one stops.
pub async fn job_logs(client: &Client, job_id: &str, args: &LogsArgs) -> Result<(), Error> {
    let mut tasks = client.find_tasks(&[("jobIds", job_id)], 1000, "").await?.items;
    if tasks.is_empty() {
        client.find_job(job_id).await?; // an unknown job is "not found"
        eprintln!("titus: job {job_id} has no tasks");
        return Ok(());
    }
    tasks.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
    if args.follow {
        let finished = pb::TaskState::TaskFinished as i32;
        tasks.retain(|t| t.status.as_ref().is_some_and(|s| s.state != finished));
        if tasks.len() > MAX_FOLLOWED {
            eprintln!("titus: following the first {MAX_FOLLOWED} of {} live tasks", tasks.len());
            tasks.truncate(MAX_FOLLOWED);
        }
    }
    let mut streams = futures::stream::SelectAll::new();
    let mut lines = Lines::default();
    for t in &tasks {
        let prefix = format!("[{} {}] ", t.index, t.id);
        let stream = match client.task_logs(args.request(&t.id)).await {
            Ok(s) => s,
            // Never placed, or its output is no longer kept: said, and the others go on.
            Err(e @ (Error::FailedPrecondition(_) | Error::NotFound(_))) => {
                eprintln!("titus: {prefix}{e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        if args.follow {
            streams.push(stream.map(move |m| (prefix.clone(), m)).boxed());
        } else {
            // One task at a time: bounded sessions, and each task's lines together.
            let mut one = stream.map(move |m| (prefix.clone(), m)).boxed();
            while let Some((prefix, message)) = one.next().await {
                lines.take(&prefix, message);
            }
            lines.flush();
        }
    }
    while let Some((prefix, message)) = streams.next().await {
        lines.take(&prefix, message);
    }
    lines.flush();
    Ok(())
}

/// Output of several tasks, a whole line at a time with its task's prefix, so that lines of
/// tasks printed side by side never interleave mid-line.
#[derive(Default)]
struct Lines {
    /// Per prefix and stream, what came after the last newline.
    partial: std::collections::BTreeMap<(String, i32), Vec<u8>>,
}

impl Lines {
    fn take(&mut self, prefix: &str, message: Result<pb::TaskOutput, tonic::Status>) {
        let chunk = match message {
            Ok(pb::TaskOutput { output: Some(pb::task_output::Output::Chunk(c)) }) => c,
            Ok(_) => return,
            Err(s) => {
                eprintln!("titus: {prefix}{}", Error::from_status("leader", s));
                return;
            }
        };
        let pending = self.partial.entry((prefix.to_string(), chunk.stream)).or_default();
        pending.extend_from_slice(&chunk.data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let mut data = prefix.as_bytes().to_vec();
            data.extend(pending.drain(..=end));
            write_chunk(&pb::OutputChunk { stream: chunk.stream, data });
        }
    }

    /// Ends each unfinished line.
    fn flush(&mut self) {
        for ((prefix, stream), rest) in std::mem::take(&mut self.partial) {
            if !rest.is_empty() {
                let mut data = prefix.into_bytes();
                data.extend_from_slice(&rest);
                data.push(b'\n');
                write_chunk(&pb::OutputChunk { stream, data });
            }
        }
    }
}

/// The terminal's size, when stdin is one.
#[cfg(unix)]
fn terminal_size() -> Option<pb::TerminalSize> {
    // SAFETY: TIOCGWINSZ fills the winsize struct it is given; nothing else is touched.
    unsafe {
        let mut size: libc::winsize = std::mem::zeroed();
        (libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) == 0 && size.ws_col > 0)
            .then(|| pb::TerminalSize { width: size.ws_col.into(), height: size.ws_row.into() })
    }
}

/// Puts this terminal in raw mode while it lives (keys go to the remote command as typed), and
/// back as it was when dropped.
#[cfg(unix)]
struct RawMode(Option<libc::termios>);

#[cfg(unix)]
impl RawMode {
    fn enter() -> RawMode {
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios struct of our own.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                return RawMode(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return RawMode(None);
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw);
            RawMode(Some(saved))
        }
    }
}

#[cfg(unix)]
impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the attributes read in `enter`.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
    }
}

/// Runs `command` in task `task_id`'s container; returns its exit code.
pub async fn exec(client: &Client, task_id: &str, command: Vec<String>, stdin: bool, tty: bool) -> Result<i32, Error> {
    use tokio::io::AsyncReadExt;
    let start = pb::ExecStart {
        task_id: task_id.to_string(),
        command,
        tty,
        stdin,
        #[cfg(unix)]
        size: if tty { terminal_size() } else { None },
        #[cfg(not(unix))]
        size: None,
    };
    let (input, mut input_rx) = tokio::sync::mpsc::channel(16);
    // Without stdin the call's input stays open (an ended input would end the call) until the
    // output ends.
    let mut hold = None;
    if stdin {
        tokio::spawn(async move {
            let mut reader = tokio::io::stdin();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let close = pb::exec_input::Input::CloseStdin(pb::Empty {});
                        let _ = input.send(pb::ExecInput { input: Some(close) }).await;
                        return;
                    }
                    Ok(n) => {
                        let data = pb::exec_input::Input::Stdin(buf[..n].to_vec());
                        if input.send(pb::ExecInput { input: Some(data) }).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        hold = Some(input);
    }
    #[cfg(unix)]
    let _raw = if tty && stdin { Some(RawMode::enter()) } else { None };
    let mut output = client.exec_task(start, futures::stream::poll_fn(move |cx| input_rx.poll_recv(cx))).await?;
    let mut code = None;
    while let Some(message) = output.next().await {
        match message.map_err(|s| Error::from_status("leader", s))?.output {
            Some(pb::task_output::Output::Chunk(chunk)) => write_chunk(&chunk),
            Some(pb::task_output::Output::Exit(exit)) => code = Some(exit.code),
            None => {}
        }
    }
    drop(hold);
    code.ok_or_else(|| Error::Server {
        replica: "leader".into(),
        status: tonic::Status::unavailable(
            "the command's output ended without its exit code (its agent or the leader went away)",
        ),
    })
}
