//! The `titus` CLI against a real 3-replica cluster: submit from files, list in each output
//! format, resize, enable/disable, kill, and the errors and exit codes scripts rely on.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{wait_until, Cluster};

const ELECTION: Duration = Duration::from_secs(30);

struct Cli {
    servers: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_titus"))
            .args(args)
            .env("TITUS_SERVERS", &self.servers)
            .output()
            .expect("run titus");
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
    let cli = Cli { servers: c.replicas.iter().map(|r| r.api_addr.clone()).collect::<Vec<_>>().join(",") };

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
    assert_eq!(job[0]["id"], service.as_str());
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

    cli.ok(&["job", "kill", &service]);
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
    let cli = Cli { servers: c.replicas.iter().map(|r| r.api_addr.clone()).collect::<Vec<_>>().join(",") };
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
