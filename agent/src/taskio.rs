//! A task's output and commands run in its container, served to the leader over a session stream
//! (`AgentService.Session`) that the agent opens when the leader asks (`OpenSession`).
//!
//! Output comes from the Docker daemon while the container exists. When the control plane forgets
//! a task, its output is saved first (the last [`FinishedLogs::max_bytes_per_task`] of it) into a
//! file of its own, so a finished batch task's output can still be read after its container is
//! gone; those files go after [`FinishedLogs::max_age`], oldest first past
//! [`FinishedLogs::max_total_bytes`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bollard::container::{LogOutput, LogsOptions};
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Code, Streaming};

use titus_proto as pb;

use crate::docker::{container_name, DockerRuntime};

/// Where a forgotten task's output is kept, and how much of it.
#[derive(Debug, Clone)]
pub struct FinishedLogs {
    pub dir: PathBuf,
    pub max_bytes_per_task: u64,
    pub max_total_bytes: u64,
    pub max_age: Duration,
    /// When the folder was last pruned: a prune lists it whole, so it runs at most every
    /// [`PRUNE_EVERY`], not at every save (the total may exceed its bound by that long's saves).
    pub last_prune: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// The least time between two prunes of the saved output.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Largest output chunk sent up in one message.
const MAX_CHUNK: usize = 64 << 10;

/// What a session ended with, said to the leader (and by it to the client) as a gRPC status.
#[derive(Debug)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

type Up = mpsc::Sender<pb::SessionUp>;

fn output(stream: pb::OutputStream, data: &[u8]) -> pb::SessionUp {
    pb::SessionUp {
        message: Some(pb::session_up::Message::Output(pb::TaskOutput {
            output: Some(pb::task_output::Output::Chunk(pb::OutputChunk {
                stream: stream as i32,
                data: data.to_vec(),
            })),
        })),
    }
}

/// Sends `data` up in chunks; false when the leader's end is gone.
async fn send_output(up: &Up, stream: pb::OutputStream, data: &[u8]) -> bool {
    for piece in data.chunks(MAX_CHUNK) {
        if up.send(output(stream, piece)).await.is_err() {
            return false;
        }
    }
    true
}

fn docker_error(e: bollard::errors::Error) -> Refusal {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, message } => {
            Refusal::new(Code::NotFound, message)
        }
        bollard::errors::Error::DockerResponseServerError { status_code: 409, message } => {
            Refusal::new(Code::FailedPrecondition, message)
        }
        e => Refusal::new(Code::Unavailable, format!("docker daemon: {e}")),
    }
}

/// The task's file of saved output.
fn saved_path(dir: &Path, task_id: &str) -> Option<PathBuf> {
    let safe = !task_id.is_empty()
        && task_id.len() <= 200
        && !task_id.starts_with('.')
        && task_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    safe.then(|| dir.join(format!("{task_id}.log")))
}

/// Docker's timestamp prefix (`2026-12-07T18:00:00.123456789Z `) as ms since the epoch.
fn parse_timestamp(line: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(line.get(..20)?).ok()?;
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if s.as_bytes()[4] != b'-' || s.as_bytes()[10] != b'T' || !(1..=12).contains(&month) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let millis = line.get(20..23).and_then(|m| std::str::from_utf8(m).ok()?.parse::<i64>().ok()).unwrap_or(0);
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + millis)
}

/// One saved line: which stream, then the line as Docker gave it with its timestamp.
fn encode_record(stream: pb::OutputStream, line: &[u8], out: &mut Vec<u8>) {
    out.push(stream as u8);
    out.extend_from_slice(&(line.len() as u32).to_le_bytes());
    out.extend_from_slice(line);
}

fn decode_records(mut data: &[u8]) -> Vec<(pb::OutputStream, &[u8])> {
    let mut records = Vec::new();
    while data.len() >= 5 {
        let stream =
            if data[0] == pb::OutputStream::Stderr as u8 { pb::OutputStream::Stderr } else { pb::OutputStream::Stdout };
        let len = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let Some(line) = data.get(5..5 + len) else { break };
        records.push((stream, line));
        data = &data[5 + len..];
    }
    records
}

/// Strips Docker's timestamp and the space after it.
fn without_timestamp(line: &[u8]) -> &[u8] {
    match line.iter().position(|b| *b == b' ') {
        Some(i) if i <= 40 => &line[i + 1..],
        _ => line,
    }
}

fn wanted(request: &pb::TaskLogsRequest, stream: pb::OutputStream) -> bool {
    let both = !request.stdout && !request.stderr;
    both || match stream {
        pb::OutputStream::Stdout => request.stdout,
        pb::OutputStream::Stderr => request.stderr,
    }
}

impl FinishedLogs {
    /// Saves the last `max_bytes_per_task` of the container's output before it is removed, then
    /// drops saved output past its age or past the total. Failures are the caller's to log: the
    /// container goes either way.
    pub async fn save(&self, docker: &DockerRuntime, task_id: &str) -> Result<(), String> {
        let Some(path) = saved_path(&self.dir, task_id) else {
            return Err(format!("task id {task_id:?} cannot name a file"));
        };
        let client = docker.client().await.map_err(|e| e.to_string())?;
        let options = LogsOptions::<String> {
            stdout: true,
            stderr: true,
            timestamps: true,
            tail: "all".into(),
            ..Default::default()
        };
        let mut logs = client.logs(&container_name(task_id), Some(options));
        let (mut kept, mut bytes) = (VecDeque::new(), 0u64);
        while let Some(item) = logs.next().await {
            let (stream, line) = match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                    (pb::OutputStream::Stdout, message)
                }
                Ok(LogOutput::StdErr { message }) => (pb::OutputStream::Stderr, message),
                Ok(LogOutput::StdIn { .. }) => continue,
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(()),
                Err(e) => return Err(format!("reading the container's output: {e}")),
            };
            bytes += 5 + line.len() as u64;
            kept.push_back((stream, line));
            while bytes > self.max_bytes_per_task {
                let Some((_, old)) = kept.pop_front() else { break };
                bytes -= 5 + old.len() as u64;
            }
        }
        if kept.is_empty() {
            return Ok(());
        }
        let mut data = Vec::with_capacity(bytes as usize);
        for (stream, line) in &kept {
            encode_record(*stream, line, &mut data);
        }
        tokio::fs::create_dir_all(&self.dir).await.map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let aside = path.with_extension("log.new");
        tokio::fs::write(&aside, &data).await.map_err(|e| format!("{}: {e}", aside.display()))?;
        tokio::fs::rename(&aside, &path).await.map_err(|e| format!("{}: {e}", path.display()))?;
        let due = {
            let mut last = self.last_prune.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            self.prune().await;
        }
        Ok(())
    }

    /// Drops saved output older than `max_age`, then the oldest until the rest fit `max_total_bytes`.
    pub async fn prune(&self) {
        let Ok(mut dir) = tokio::fs::read_dir(&self.dir).await else { return };
        let mut files = Vec::new();
        while let Ok(Some(entry)) = dir.next_entry().await {
            let Ok(meta) = entry.metadata().await else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            files.push((modified, meta.len(), entry.path()));
        }
        files.sort();
        let now = SystemTime::now();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        for (modified, len, path) in files {
            let old = now.duration_since(modified).unwrap_or_default() > self.max_age;
            if (old || total > self.max_total_bytes) && tokio::fs::remove_file(&path).await.is_ok() {
                total -= len;
            }
        }
    }

    /// Serves saved output as `request` asks; NOT_FOUND when none is kept.
    async fn serve(&self, request: &pb::TaskLogsRequest, up: &Up) -> Result<(), Refusal> {
        let missing = || {
            Refusal::new(
                Code::NotFound,
                format!(
                    "task {}: its container is gone and no output of it is kept on this agent (kept {} hours)",
                    request.task_id,
                    self.max_age.as_secs() / 3600
                ),
            )
        };
        let path = saved_path(&self.dir, &request.task_id).ok_or_else(missing)?;
        let mut data = Vec::new();
        match tokio::fs::File::open(&path).await {
            Ok(mut f) => f.read_to_end(&mut data).await.map_err(|e| Refusal::new(Code::Internal, e.to_string()))?,
            Err(_) => return Err(missing()),
        };
        let mut records: Vec<_> = decode_records(&data)
            .into_iter()
            .filter(|(stream, _)| wanted(request, *stream))
            .filter(|(_, line)| request.since_ms <= 0 || parse_timestamp(line).is_none_or(|t| t >= request.since_ms))
            .collect();
        if request.tail > 0 {
            let skip = records.len().saturating_sub(request.tail as usize);
            records.drain(..skip);
        }
        for (stream, line) in records {
            let line = if request.timestamps { line } else { without_timestamp(line) };
            if !send_output(up, stream, line).await {
                break;
            }
        }
        Ok(())
    }
}

/// Serves the task's output: the daemon's while its container exists, else what was saved.
pub async fn logs(
    docker: &DockerRuntime,
    saved: &FinishedLogs,
    request: &pb::TaskLogsRequest,
    up: &Up,
) -> Result<(), Refusal> {
    let client = docker.client().await.map_err(|e| Refusal::new(Code::Unavailable, e.to_string()))?;
    let name = container_name(&request.task_id);
    match client.inspect_container(&name, None).await {
        Ok(_) => {}
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
            return saved.serve(request, up).await
        }
        Err(e) => return Err(docker_error(e)),
    }
    let both = !request.stdout && !request.stderr;
    let options = LogsOptions::<String> {
        follow: request.follow,
        stdout: both || request.stdout,
        stderr: both || request.stderr,
        since: request.since_ms.max(0) / 1000,
        timestamps: request.timestamps,
        tail: if request.tail == 0 { "all".into() } else { request.tail.to_string() },
        ..Default::default()
    };
    let mut stream = client.logs(&name, Some(options));
    loop {
        // A follower of a quiet container notices the client leaving only when it next prints.
        let item = tokio::select! {
            item = stream.next() => item,
            _ = up.closed() => return Ok(()),
        };
        let (which, data) = match item {
            None => return Ok(()),
            Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                (pb::OutputStream::Stdout, message)
            }
            Some(Ok(LogOutput::StdErr { message })) => (pb::OutputStream::Stderr, message),
            Some(Ok(LogOutput::StdIn { .. })) => continue,
            Some(Err(e)) => return Err(docker_error(e)),
        };
        if !send_output(up, which, &data).await {
            return Ok(());
        }
    }
}

/// Most arguments of an exec'd command, and their total size.
pub const MAX_EXEC_ARGS: usize = 256;
pub const MAX_EXEC_BYTES: usize = 64 << 10;

/// Runs `start`'s command in the task's running container: what comes down `input` is its stdin
/// (and terminal size); its output goes up, then its exit code.
pub async fn exec(
    docker: &DockerRuntime,
    start: pb::ExecStart,
    input: &mut Streaming<pb::ExecInput>,
    up: &Up,
) -> Result<(), Refusal> {
    if start.command.is_empty() || start.command.len() > MAX_EXEC_ARGS {
        return Err(Refusal::new(Code::InvalidArgument, format!("command: 1 to {MAX_EXEC_ARGS} arguments")));
    }
    let client = docker.client().await.map_err(|e| Refusal::new(Code::Unavailable, e.to_string()))?;
    let name = container_name(&start.task_id);
    let running = client.inspect_container(&name, None).await.map_err(docker_error)?;
    if !running.state.and_then(|s| s.running).unwrap_or(false) {
        return Err(Refusal::new(
            Code::FailedPrecondition,
            format!("task {}: its container is not running", start.task_id),
        ));
    }
    let created = client
        .create_exec(
            &name,
            CreateExecOptions::<String> {
                attach_stdin: Some(start.stdin),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(start.tty),
                cmd: Some(start.command.clone()),
                ..Default::default()
            },
        )
        .await
        .map_err(docker_error)?;
    let started = client
        .start_exec(&created.id, Some(StartExecOptions { detach: false, tty: start.tty, output_capacity: None }))
        .await
        .map_err(docker_error)?;
    let StartExecResults::Attached { mut output, input: mut stdin } = started else {
        return Err(Refusal::new(Code::Internal, "the daemon started the command detached"));
    };
    let resize = |size: pb::TerminalSize| {
        let (client, id) = (client.clone(), created.id.clone());
        async move {
            let width = u16::try_from(size.width).unwrap_or(u16::MAX);
            let height = u16::try_from(size.height).unwrap_or(u16::MAX);
            if width > 0 && height > 0 {
                let _ = client.resize_exec(&id, ResizeExecOptions { width, height }).await;
            }
        }
    };
    if let (true, Some(size)) = (start.tty, start.size) {
        resize(size).await;
    }
    // Input and output at once; input ends on its own (end of stdin, or the client gone).
    let mut input_open = true;
    loop {
        tokio::select! {
            item = output.next() => match item {
                None => break,
                Some(Ok(LogOutput::StdErr { message })) => {
                    if !send_output(up, pb::OutputStream::Stderr, &message).await { return Ok(()) }
                }
                Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                    if !send_output(up, pb::OutputStream::Stdout, &message).await { return Ok(()) }
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => return Err(docker_error(e)),
            },
            message = input.message(), if input_open => match message {
                Ok(Some(pb::ExecInput { input: Some(pb::exec_input::Input::Stdin(data)) })) => {
                    if start.stdin && stdin.write_all(&data).await.is_err() {
                        input_open = false;
                    }
                }
                Ok(Some(pb::ExecInput { input: Some(pb::exec_input::Input::CloseStdin(_)) })) => {
                    let _ = stdin.shutdown().await;
                }
                Ok(Some(pb::ExecInput { input: Some(pb::exec_input::Input::Resize(size)) })) => resize(size).await,
                Ok(Some(_)) => {}
                // No more input: the command's stdin ends with it.
                Ok(None) => {
                    input_open = false;
                    if start.stdin {
                        let _ = stdin.shutdown().await;
                    }
                }
                // The leader's end broke: nobody reads the output any more.
                Err(_) => return Ok(()),
            },
            _ = up.closed() => return Ok(()),
        }
    }
    let code = client.inspect_exec(&created.id).await.map_err(docker_error)?.exit_code.unwrap_or(-1);
    let exit = pb::SessionUp {
        message: Some(pb::session_up::Message::Output(pb::TaskOutput {
            output: Some(pb::task_output::Output::Exit(pb::ExecExit { code: i32::try_from(code).unwrap_or(i32::MAX) })),
        })),
    };
    let _ = up.send(exit).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_are_read_as_epoch_ms() {
        assert_eq!(parse_timestamp(b"1970-01-01T00:00:00.000000000Z x"), Some(0));
        assert_eq!(parse_timestamp(b"2026-12-07T15:20:00.250000000Z hello\n"), Some(1_796_656_800_250));
        assert_eq!(parse_timestamp(b"2000-02-29T00:00:01Z y"), Some(951_782_401_000));
        assert_eq!(parse_timestamp(b"garbage"), None);
        assert_eq!(parse_timestamp(b"2026-13-07T15:20:00.0Z "), None);
    }

    #[test]
    fn saved_records_read_back_and_a_cut_record_is_dropped() {
        let mut data = Vec::new();
        encode_record(pb::OutputStream::Stdout, b"2026-12-07T15:20:00.000000000Z one\n", &mut data);
        encode_record(pb::OutputStream::Stderr, b"2026-12-07T15:20:01.000000000Z two\n", &mut data);
        let whole = decode_records(&data);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[1].0, pb::OutputStream::Stderr);
        assert_eq!(without_timestamp(whole[1].1), b"two\n");
        assert_eq!(decode_records(&data[..data.len() - 1]).len(), 1, "a record cut short is left out");
    }

    #[test]
    fn only_safe_task_ids_name_files() {
        let dir = Path::new("/d");
        assert_eq!(saved_path(dir, "a-1_b.c"), Some(PathBuf::from("/d/a-1_b.c.log")));
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert_eq!(saved_path(dir, bad), None, "{bad:?}");
        }
    }
}
