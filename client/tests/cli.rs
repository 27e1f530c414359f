//! The `titus` CLI against a real 3-replica cluster: submit from files, list in each output
//! format, resize, enable/disable, kill, and the errors and exit codes scripts rely on.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{wait_until, Cluster};

const ELECTION: Duration = Duration::from_secs(30);

/// No configuration file: this machine's contexts stay out of the tests.
const NO_CONFIG: &str = "/nonexistent/titus-config.toml";

struct Cli {
    servers: String,
}

impl Cli {
    /// `titus ARGS` against this cluster, with no configuration file or context of this machine's.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_titus"));
        command
            .args(args)
            .env("TITUS_SERVERS", &self.servers)
            .env("TITUS_CLI_CONFIG", NO_CONFIG)
            .env_remove("TITUS_CONTEXT");
        command
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command(args).output().expect("run titus");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "titus {args:?} failed: {err}");
        out
    }
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples").join(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t310_cli_submits_lists_resizes_and_kills() {
    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    // Seeds from the environment variable, one of them a follower.
    let cli = Cli { servers: c.servers() };

    let service = cli.ok(&["job", "submit", "-f", &example("service.json")]).trim().to_string();
    let batch = cli.ok(&["job", "submit", "-f", &example("batch.yaml")]).trim().to_string();
    assert_eq!(service.len(), 36, "a job id: {service}");

    let table = cli.ok(&["job", "list"]);
    assert!(table.contains("hello-service") && table.contains("hello-batch") && table.starts_with("JOB"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "job", "list", "--filter", "appName=hello-service"])).unwrap();
    assert_eq!(json[0]["id"], service.as_str());
    let yaml = cli.ok(&["-o", "yaml", "job", "get", &batch]);
    assert!(yaml.contains(&format!("id: {batch}")) && yaml.contains("applicationName: hello-batch"), "{yaml}");

    // Tasks appear (Accepted: there is no agent in this test), the service resizes.
    wait_until(ELECTION, "two service tasks", || async {
        let out = cli.ok(&["-o", "json", "task", "list", &service]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v.as_array()?.len() == 2).then_some(())
    })
    .await;
    cli.ok(&["job", "resize", &service, "--desired", "3"]);
    let job: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "job", "get", &service])).unwrap();
    assert_eq!(job["id"], service.as_str());
    assert_eq!(job["service"]["capacity"]["desired"], 3, "the whole spec: {job}");
    assert!(cli.ok(&["job", "list"]).contains("1/3/4"), "service capacity shows min/desired/max");
    cli.ok(&["job", "disable", &service]);
    cli.ok(&["job", "enable", &service]);

    // Errors: invalid values name the field (exit 2), unknown ids exit 3, typos in files are caught.
    let (code, _, err) = cli.run(&["job", "resize", &service, "--min", "9"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("capacity"), "{err}");
    let (code, _, err) = cli.run(&["job", "get", "no-such-job"]);
    assert_eq!(code, 3, "{err}");
    let dir = tempfile::TempDir::new().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, std::fs::read_to_string(example("batch.yaml")).unwrap().replace("memoryMB", "memoryMb"))
        .unwrap();
    let (code, _, err) = cli.run(&["job", "submit", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("memoryMb") && err.lines().count() == 1, "one line naming the field: {err}");
    let zero_cpu = dir.path().join("zero.yaml");
    std::fs::write(&zero_cpu, std::fs::read_to_string(example("batch.yaml")).unwrap().replace("cpu: 0.5", "cpu: 0"))
        .unwrap();
    let (code, _, err) = cli.run(&["job", "submit", "-f", zero_cpu.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("container.resources.cpu: must be > 0"), "{err}");

    // Every command speaks JSON when asked, changes included.
    let killed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "job", "kill", &service[..8]])).unwrap();
    assert_eq!((killed["job"].as_str(), killed["kill"].as_str()), (Some(service.as_str()), Some("requested")));
    let submitted: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "job", "submit", "-f", &example("batch.yaml")])).unwrap();
    assert_eq!(submitted["id"].as_str().map(str::len), Some(36), "{submitted}");
    wait_until(ELECTION, "the killed job finished", || async {
        cli.ok(&["-o", "json", "job", "get", &service]).contains("\"Finished\"").then_some(())
    })
    .await;
    assert!(cli.ok(&["completions", "bash"]).contains("_titus"));

    // Instance groups and members.
    cli.ok(&["instance-group", "create", "ig-a", "--tier", "critical"]);
    cli.ok(&["instance-group", "lifecycle", "ig-a", "phased-out"]);
    let groups = cli.ok(&["instance-group", "list"]);
    assert!(groups.contains("ig-a") && groups.contains("critical") && groups.contains("IG_PHASED_OUT"), "{groups}");
    let members: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "cluster", "members"])).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 3);
    assert_eq!(members.as_array().unwrap().iter().filter(|m| m["role"] == "leader").count(), 1);
}

/// `titus completions bash | head -1` once panicked ("failed printing to stdout: Broken pipe",
/// exit 101): a closed pipe now ends the CLI quietly, by SIGPIPE, as it ends `ls`.
#[test]
fn t320_a_closed_pipe_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    let mut child = Command::new(env!("CARGO_BIN_EXE_titus"))
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run titus");
    // The reader goes away before the CLI writes anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for titus");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    const SIGPIPE: i32 = 13;
    assert_eq!(out.status.signal(), Some(SIGPIPE), "ended by SIGPIPE: {:?} {stderr}", out.status);
}

/// Honest exit codes: `job submit --wait` of a batch job whose task fails exits JOB_FAILED (6) with
/// the task's reason, one that succeeds exits 0, and `task list` of an unknown job is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t330_wait_exits_non_zero_when_a_batch_task_fails() {
    common::ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    c.start_agent("a330", 2.0, 1024);
    let cli = Cli { servers: c.servers() };
    let submit = |script: &'static str| {
        let args =
            ["job", "submit", "--app", "exit", "--image", "titus/busybox:latest", "--cpu", "0.1", "--memory-mb", "32"];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["--batch-size", "1", "--wait", "--timeout", "120", "--", "sh", "-c", script]);
        cli.run(&args)
    };
    let (code, out, err) = submit("exit 3");
    assert_eq!(code, 6, "a failed batch job exits 6: {out} {err}");
    assert!(err.contains("exited with code 3") && err.contains("failed"), "the task's reason is said: {err}");
    let (code, out, err) = submit("true");
    assert_eq!(code, 0, "a batch job that succeeds exits 0: {out} {err}");
    let (code, _, err) = cli.run(&["task", "list", "00000000-0000-0000-0000-000000000000"]);
    assert_eq!(code, 3, "task list of an unknown job is not found: {err}");
}

/// The task id of the only task of `job`, once it is in `state`.
async fn only_task(cli: &Cli, job: &str, state: &str) -> String {
    wait_until(Duration::from_secs(120), &format!("the task of {job} {state}"), || async {
        let v: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "task", "list", job])).ok()?;
        let t = v.as_array()?.iter().find(|t| t["state"] == state)?;
        Some(t["id"].as_str()?.to_string())
    })
    .await
}

/// Output and commands through the leader to the agent: a finished batch task's output (its
/// container already removed: served from what the agent kept), stdout/stderr apart, --tail,
/// --timestamps, `job logs` with prefixes; `logs -f` of a service while it prints; `exec` with
/// output and exit code, stdin, and the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t340_task_logs_and_exec() {
    common::ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    c.start_agent("a340", 2.0, 1024);
    let cli = Cli { servers: c.servers() };
    let base = ["job", "submit", "--app", "io", "--image", "titus/busybox:latest", "--cpu", "0.1", "--memory-mb", "32"];

    // A batch task that prints on both streams and ends.
    let mut args = base.to_vec();
    args.extend(["--batch-size", "1", "--", "sh", "-c", "echo out-1; echo err-1 >&2; echo out-2"]);
    let batch = cli.ok(&args).trim().to_string();
    let task = only_task(&cli, &batch, "Finished").await;
    // The agent removes a finished task's container once the control plane forgets it; its
    // output is read the same before and after.
    let (code, out, err) = wait_until(Duration::from_secs(60), "the batch task's output", || async {
        let r = cli.run(&["task", "logs", &task]);
        (r.0 == 0 && r.1.contains("out-2")).then_some(r)
    })
    .await;
    assert_eq!(code, 0);
    assert_eq!(out, "out-1\nout-2\n", "stdout to stdout, in order");
    assert!(err.contains("err-1"), "stderr to stderr: {err}");
    assert_eq!(cli.ok(&["task", "logs", &task, "--stdout", "--tail", "1"]), "out-2\n");
    let (_, out, err) = cli.run(&["task", "logs", &task, "--stderr"]);
    assert!(out.is_empty() && err.contains("err-1"), "only stderr: {out:?} {err:?}");
    let stamped = cli.ok(&["task", "logs", &task, "--timestamps", "--stdout"]);
    assert!(stamped.lines().all(|l| l.starts_with("20") && l.contains("Z out-")), "{stamped}");
    assert!(cli.ok(&["task", "logs", &task, "--since", "1h"]).contains("out-1"));
    let merged = cli.ok(&["job", "logs", &batch, "--stdout"]);
    assert!(merged.contains(&format!("[0 {task}] out-1\n")), "lines prefixed by task: {merged}");
    wait_until(Duration::from_secs(60), "the finished container removed", || async {
        let ps = std::process::Command::new("docker")
            .args(["ps", "-a", "-q", "--filter", &format!("name=titus-{task}")])
            .output()
            .ok()?;
        ps.stdout.is_empty().then_some(())
    })
    .await;
    assert_eq!(
        cli.ok(&["task", "logs", &task, "--stdout"]),
        "out-1\nout-2\n",
        "kept by the agent after its container went"
    );

    // A service that prints as it runs: `logs -f` shows new lines as they come.
    let mut args = base.to_vec();
    args.extend(["--desired", "1", "--", "sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done"]);
    let service = cli.ok(&args).trim().to_string();
    let running = only_task(&cli, &service, "Started").await;
    let mut follow =
        cli.command(&["task", "logs", "-f", &running]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut reader = std::io::BufReader::new(follow.stdout.take().unwrap());
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        let mut line = String::new();
        // Bounded: 25 lines is 5 s of ticks.
        while lines.len() < 25 && reader.read_line(&mut line).unwrap_or(0) > 0 {
            lines.push(std::mem::take(&mut line));
        }
        lines
    });
    let seen = tokio::time::timeout(Duration::from_secs(60), seen).await.expect("25 lines within 60 s").unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(seen.len(), 25, "follow keeps printing: {seen:?}");
    let ticks: Vec<u64> =
        seen.iter().filter_map(|l| l.trim().strip_prefix("tick-").and_then(|n| n.parse().ok())).collect();
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "in order, none lost: {ticks:?}");

    // Exec: output and exit code; stdin.
    let (code, out, _) = cli.run(&["task", "exec", &running, "--", "sh", "-c", "echo in-container; exit 7"]);
    assert_eq!((code, out.as_str()), (7, "in-container\n"), "the command's exit code is the CLI's");
    let mut piped = cli
        .command(&["task", "exec", "-i", &running, "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = piped.stdin.take().unwrap();
        stdin.write_all(b"through stdin\n").unwrap();
    } // closed: cat sees the end of its input and exits
    let piped = tokio::task::spawn_blocking(move || piped.wait_with_output()).await.unwrap().unwrap();
    let said = String::from_utf8_lossy(&piped.stderr);
    assert_eq!(piped.status.code(), Some(0), "{said}");
    assert_eq!(String::from_utf8_lossy(&piped.stdout), "through stdin\n", "{said}");

    // Refusals: an unknown task is not found; a finished one has no running container; a task
    // never placed has no container at all.
    let (code, _, err) = cli.run(&["task", "exec", "no-such-task", "--", "true"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = cli.run(&["task", "exec", &task, "--", "true"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("Finished"), "{err}");
    let unplaced = cli
        .ok(&["job", "submit", "--app", "io", "--image", "titus/busybox:latest", "--cpu", "16", "--memory-mb", "32"]
            .into_iter()
            .chain(["--batch-size", "1", "--", "true"])
            .collect::<Vec<_>>())
        .trim()
        .to_string();
    let pending = only_task(&cli, &unplaced, "Accepted").await;
    let (code, _, err) = cli.run(&["task", "logs", &pending]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("never placed"), "{err}");
}

/// Contexts: servers and credentials under a name in the configuration file, one current; a
/// flag or variable overrides them. A cluster nobody can reach, or one whose TLS does not match,
/// is said within seconds, not after the 30 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t350_contexts_and_quick_failures() {
    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("titus").join("config.toml");
    let servers = c.servers();
    let titus = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_titus"))
            .args(args)
            .env("TITUS_CLI_CONFIG", &config)
            .env_remove("TITUS_SERVERS")
            .env_remove("TITUS_CONTEXT")
            .env_remove("TITUS_CA")
            .output()
            .expect("run titus");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = titus(&["config", "set-context", "test", "--servers", &servers]);
    assert_eq!(code, 0, "{err}");
    // Nothing listens on port 1; the first context written became the current one.
    assert_eq!(titus(&["config", "set-context", "nowhere", "--servers", "127.0.0.1:1"]).0, 0);
    assert_eq!(titus(&["config", "current-context"]).1.trim(), "test");
    let (code, out, err) = titus(&["cluster", "status"]);
    assert_eq!(code, 0, "the current context's servers are used: {err}");
    assert!(out.contains("leader"), "{out}");
    let listed = titus(&["config", "get-contexts"]).1;
    assert!(listed.lines().any(|l| l.starts_with('*') && l.contains("test")), "{listed}");

    // Unreachable: said within seconds (exit 69), naming what failed.
    let t0 = std::time::Instant::now();
    let (code, _, err) = titus(&["--context", "nowhere", "job", "list"]);
    assert_eq!(code, 69, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(15), "gave up after {:?}, not within seconds", t0.elapsed());
    assert!(err.to_lowercase().contains("connect"), "{err}");
    // A flag overrides the context.
    assert_eq!(titus(&["--context", "nowhere", "--server", &servers, "cluster", "status"]).0, 0);

    // TLS toward a plaintext cluster: the handshake fails at once, and that is said.
    let certs = dir.path().join("certs");
    assert_eq!(titus(&["certs", "init", certs.to_str().unwrap(), "--clients", "me"]).0, 0);
    let ca = certs.join("ca.pem");
    assert_eq!(titus(&["config", "set-context", "tls", "--servers", &servers, "--ca-file", ca.to_str().unwrap()]).0, 0);
    assert_eq!(titus(&["config", "use-context", "tls"]).0, 0);
    let t0 = std::time::Instant::now();
    let (code, _, err) = titus(&["job", "list"]);
    assert_eq!(code, 69, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(15), "gave up after {:?}", t0.elapsed());
    assert_eq!(titus(&["config", "use-context", "absent"]).0, 3, "an unknown context is not found");
    assert_eq!(titus(&["config", "delete-context", "tls"]).0, 0);
    assert_eq!(titus(&["config", "use-context", "test"]).0, 0);
    // The global --timeout bounds a call.
    let (code, _, err) = titus(&["--timeout", "2s", "--context", "nowhere", "job", "list"]);
    assert_eq!(code, 69, "{err}");
}

/// `job get -o yaml > f; edit f; job apply -f f`: what can change in place changes, the rest is
/// refused naming each field; a spec without id finds its job by application and jobGroupInfo;
/// flags beside `-f` are refused, never ignored; `-f -` reads stdin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t360_get_edit_apply_round_trip() {
    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let cli = Cli { servers: c.servers() };
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("job.yaml");
    let file = file.to_str().unwrap();

    let id = cli.ok(&["job", "submit", "-f", &example("service.json")]).trim().to_string();
    let yaml = cli.ok(&["-o", "yaml", "job", "get", &id[..8]]);
    assert!(yaml.contains(&format!("id: {id}")) && yaml.contains("desired: 2"), "{yaml}");
    std::fs::write(file, &yaml).unwrap();
    assert_eq!(cli.ok(&["job", "apply", "-f", file]).trim(), format!("job {id} unchanged"), "read back as it was");

    // Size, enabled flag and attributes change in place.
    let edited = yaml
        .replace("desired: 2", "desired: 3")
        .replace("applicationName: hello-service", "applicationName: hello-service\nattributes:\n  team: edge");
    std::fs::write(file, &edited).unwrap();
    let out = cli.ok(&["job", "apply", "-f", file]);
    assert!(out.contains("resized 1/2/4 -> 1/3/4") && out.contains("attributes set: team"), "{out}");
    let job: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "job", "get", &id])).unwrap();
    assert_eq!(job["service"]["capacity"]["desired"], 3);
    assert_eq!(job["attributes"]["team"], "edge");

    // So does the disruption budget (UpdateJobDisruptionBudget).
    assert!(edited.contains("disruptionBudget:\n"), "the default budget is shown: {edited}");
    let budgeted = edited.replace("disruptionBudget:\n", "disruptionBudget:\n  availabilityPercentageLimit: 50\n");
    std::fs::write(file, &budgeted).unwrap();
    let out = cli.ok(&["job", "apply", "-f", file]);
    assert!(out.contains("disruption budget changed"), "{out}");
    let job: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "job", "get", &id])).unwrap();
    assert_eq!(job["disruptionBudget"]["availabilityPercentageLimit"], 50.0, "{job}");
    std::fs::write(file, budgeted.replace("availabilityPercentageLimit: 50", "availabilityPercentageLimit: 101"))
        .unwrap();
    let (code, _, err) = cli.run(&["job", "apply", "-f", file]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("disruption_budget.availability_percentage_limit"), "{err}");

    // What would need a new job is refused, each field named, and nothing changes.
    std::fs::write(
        file,
        edited
            .replace("desired: 3", "desired: 4")
            .replace("teamEmail: edge@example.com", "teamEmail: other@example.com")
            .replace("tag: latest", "tag: v2"),
    )
    .unwrap();
    let (code, _, err) = cli.run(&["job", "apply", "-f", file]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("owner.teamEmail") && !err.contains("container.image.tag"), "{err}");
    let job: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "job", "get", &id])).unwrap();
    assert_eq!(job["service"]["capacity"]["desired"], 3, "nothing was changed");
    assert_eq!(job["container"]["image"]["tag"], "latest", "nothing was changed");

    // A new image (and resources) is a rolling update: status shows it, a rollback undoes it.
    std::fs::write(file, edited.replace("tag: latest", "tag: v2").replace("cpu: 0.5", "cpu: 0.75")).unwrap();
    let out = cli.ok(&["job", "apply", "-f", file, "--max-surge", "2"]);
    assert!(out.contains("deployment 1 started (") && out.contains("container.image.tag"), "{out}");
    assert!(out.contains("container.resources.cpu"), "{out}");
    let status = cli.ok(&["job", "deploy", "status", &id[..8]]);
    assert!(status.contains("deployment 1: Progressing version 0 -> 1"), "{status}");
    assert!(status.contains("new tasks available 0/3") && status.contains("old tasks left"), "{status}");
    let shown: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "job", "deploy", "status", &id])).unwrap();
    assert_eq!(shown["deployments"][0]["strategy"]["maxSurge"], 2);
    assert!(cli.ok(&["job", "list"]).contains("deployment 1 progressing to version 1"));
    cli.ok(&["job", "deploy", "rollback", &id]);
    let shown: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "job", "deploy", "status", &id])).unwrap();
    assert_eq!(shown["specVersion"], 0, "{shown}");
    assert_eq!(shown["deployments"][0]["rollbackOf"], 1, "{shown}");
    assert_eq!(shown["deployments"][1]["state"], "RolledBack", "{shown}");
    let job: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "job", "get", &id])).unwrap();
    assert_eq!(job["container"]["image"]["tag"], "latest", "back on the old image");
    let (code, _, err) = cli.run(&["job", "deploy", "rollback", &id]);
    assert_eq!(code, 5, "a rollback is not rolled back: {err}");
    assert!(err.contains("is itself a rollback"), "{err}");

    // A dry run commits nothing: of the update (no agent here: every task would wait, and why),
    // and of the file as a new job.
    std::fs::write(file, edited.replace("tag: latest", "tag: v3")).unwrap();
    let plan = cli.ok(&["job", "plan", "-f", file]);
    assert!(
        plan.contains(&format!("job {id}: a rolling update (image) in 2 steps; its first step starts 1 tasks")),
        "{plan}"
    );
    assert!(plan.contains("0 would be placed now") && plan.contains("would wait: no eligible agent"), "{plan}");
    let plan: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "job", "plan", "-f", file, "--max-surge", "3", "--canary", "1"]))
            .unwrap();
    assert_eq!((plan["tasks"].as_u64(), plan["steps"].as_u64()), (Some(1), Some(2)), "{plan}");
    let fresh: String = edited.lines().filter(|l| !l.starts_with("id:")).map(|l| format!("{l}\n")).collect();
    std::fs::write(file, fresh.replace("hello-service", "hello-planned")).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "job", "plan", "-f", file])).unwrap();
    assert_eq!(
        (plan["job"].is_null(), plan["tasks"].as_u64(), plan["placed"].as_u64()),
        (true, Some(3), Some(0)),
        "{plan}"
    );
    let job: serde_json::Value = serde_json::from_str(&cli.ok(&["-o", "json", "job", "get", &id])).unwrap();
    assert_eq!(job["container"]["image"]["tag"], "latest", "a plan changes nothing");
    let listed = cli.ok(&["job", "list"]);
    assert!(!listed.contains("hello-planned"), "a plan creates nothing: {listed}");

    // Without an id the job is found by application and jobGroupInfo; from stdin.
    let without_id: String = edited.lines().filter(|l| !l.starts_with("id:")).map(|l| format!("{l}\n")).collect();
    let mut apply = cli
        .command(&["-o", "json", "job", "apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        apply.stdin.take().unwrap().write_all(without_id.replace("desired: 3", "desired: 1").as_bytes()).unwrap();
    }
    let out = apply.wait_with_output().unwrap();
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((said["id"].as_str(), said["created"].as_bool()), (Some(id.as_str()), Some(false)), "{said}");

    // `job watch` says what changed, and ends when the job does.
    let mut watch = cli.command(&["job", "watch", &id]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.contains("now following changes")) {
        seen.push(lines.recv_timeout(Duration::from_secs(60)).expect("a line of job watch within 60 s"));
    }
    cli.ok(&["job", "resize", &id, "--desired", "2"]);
    cli.ok(&["job", "disable", &id]);
    cli.ok(&["job", "kill", &id]);
    // Until the watch ends (its output closes), at most 60 s.
    loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("job watch still running 60 s after the kill: {e}; {seen:?}"),
        }
    }
    let status = tokio::task::spawn_blocking(move || watch.wait()).await.unwrap().unwrap();
    assert!(status.success(), "watch ends with the job: {seen:?}");
    let all = seen.join("\n");
    assert!(all.contains("resized 1/1/4 -> 1/2/4 (min/desired/max)") && all.contains("disabled"), "{all}");
    assert!(all.contains("Accepted -> KillInitiated") && all.contains("KillInitiated -> Finished"), "{all}");

    // A spec with an id is not a new job; flags describing a job are refused beside -f.
    std::fs::write(file, &yaml).unwrap();
    let (code, _, err) = cli.run(&["job", "submit", "-f", file]);
    assert_eq!(code, 2);
    assert!(err.contains("id:") && err.contains("apply"), "{err}");
    let (code, _, err) = cli.run(&["job", "submit", "-f", &example("service.json"), "--cpu", "2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cpu"), "{err}");
}
