//! The compose stack of deploy/compose: the images deploy/build-images.sh made from this build, 3
//! replicas, 2 agents on the real Docker daemon, moto. Brought up healthy; every replica restarted
//! one by one by deploy/compose/rolling-upgrade.sh (leader last, after stepping down) under client
//! load, with no request failing beyond the SDK's retries and no task container restarted; then
//! `down` and `up` again, keeping every job.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{containers_of, ensure_test_image, sleeping_service, stop_load, wait_until};
use titus_client::{Client, ClientOptions};

const UP: Duration = Duration::from_secs(180);
/// The agent ids get this prefix, so the test's containers are told apart from anyone else's.
const AGENT_PREFIX: &str = "compose-test-";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

struct Stack {
    project: String,
    file: PathBuf,
    /// Layered on `file` (the 5-replica variant).
    overlay: Option<PathBuf>,
    services: usize,
}

impl Stack {
    fn new() -> Stack {
        Stack {
            project: format!("titus-test-{}", std::process::id()),
            file: repo().join("deploy/compose/docker-compose.yml"),
            overlay: None,
            services: 6,
        }
    }

    fn five_replicas() -> Stack {
        Stack {
            project: format!("titus-test5-{}", std::process::id()),
            overlay: Some(repo().join("deploy/compose/docker-compose.5.yml")),
            file: repo().join("deploy/compose/docker-compose.yml"),
            services: 8,
        }
    }

    fn files(&self) -> Vec<String> {
        let mut f = vec!["-f".to_string(), self.file.display().to_string()];
        if let Some(o) = &self.overlay {
            f.extend(["-f".to_string(), o.display().to_string()]);
        }
        f
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker-compose")
            .arg("-p")
            .arg(&self.project)
            .args(self.files())
            .args(args)
            .env("TITUS_AGENT_PREFIX", AGENT_PREFIX)
            .output()
            .expect("docker-compose")
    }

    fn compose(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "docker-compose {args:?} failed:\n{text}");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Each service's container and its health (`healthy`, `starting`, ...).
    fn health(&self) -> Vec<(String, String)> {
        let ids = self.compose(&["ps", "-q"]);
        ids.lines()
            .filter(|l| !l.is_empty())
            .map(|id| {
                let out = Command::new("docker")
                    .args([
                        "inspect",
                        "-f",
                        "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
                        id,
                    ])
                    .output()
                    .expect("docker inspect");
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let (name, health) = text.split_once(' ').unwrap_or((&text, "unknown"));
                (name.to_string(), health.to_string())
            })
            .collect()
    }

    /// `up -d`, then every service healthy.
    async fn up(&self) {
        make_certs();
        self.compose(&["up", "-d"]);
        self.wait_healthy().await;
    }

    async fn wait_healthy(&self) {
        let started = Instant::now();
        wait_until(UP, "every service of the stack healthy", || async {
            let h = self.health();
            (h.len() == self.services && h.iter().all(|(_, s)| s == "healthy")).then_some(())
        })
        .await;
        eprintln!("stack healthy in {:?}", started.elapsed());
    }

    fn logs(&self) -> String {
        self.compose(&["logs", "--tail", "40"])
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
        // Their containers and job networks (the agents that would remove them are gone).
        for agent in ["agent-1", "agent-2"] {
            common::remove_agent_leftovers(&format!("{AGENT_PREFIX}{agent}"));
        }
    }
}

/// Builds the images from the debug binaries when a run of deploy/test.sh has not already.
fn ensure_images() {
    ensure_test_image();
    let missing = ["titus/control-plane", "titus/agent", "titus/moto"].iter().any(|i| {
        !Command::new("docker")
            .args(["image", "inspect", &format!("{i}:latest")])
            .output()
            .expect("docker image inspect")
            .status
            .success()
    });
    if missing {
        let status = Command::new("bash")
            .arg(repo().join("deploy/build-images.sh"))
            .args(["--profile", "debug", "--no-build"])
            .status()
            .expect("deploy/build-images.sh");
        assert!(status.success(), "deploy/build-images.sh failed");
    }
}

/// The stack's CA and certificates (deploy/compose/make-certs.sh, with the CLI of this build).
fn make_certs() {
    let status = Command::new("bash")
        .arg(repo().join("deploy/compose/make-certs.sh"))
        .env("TITUS", common::bin("titus"))
        .env("TITUS_AGENT_PREFIX", AGENT_PREFIX)
        .status()
        .expect("deploy/compose/make-certs.sh");
    assert!(status.success(), "deploy/compose/make-certs.sh failed");
}

/// A client of the stack presenting the admin client certificate.
fn client_of(servers: &str) -> Client {
    let tls = repo().join("deploy/compose/tls");
    let options = ClientOptions::default()
        .with_tls(tls.join("ca.pem"), Some((tls.join("client-admin.pem"), tls.join("client-admin.key"))))
        .unwrap();
    Client::with_options([servers], options).unwrap()
}

fn client() -> Client {
    client_of("127.0.0.1:18001,127.0.0.1:18002,127.0.0.1:18003")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t510_five_replica_compose_stack_keeps_writing_with_two_replicas_down() {
    ensure_images();
    let stack = Stack::five_replicas();
    stack.up().await;
    let client = client_of("127.0.0.1:18001,127.0.0.1:18002,127.0.0.1:18003,127.0.0.1:18004,127.0.0.1:18005");
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.members.len(), 5, "{status:?}");
    let first = client.create_job(sleeping_service("five-a", 0.1, 16, 0)).await.expect("write with 5 up");
    // Two down, the leader among them when it is 1 or 2: three of five still commit.
    stack.compose(&["stop", "-t", "5", "replica-1", "replica-2"]);
    let second = client.create_job(sleeping_service("five-b", 0.1, 16, 0)).await.expect("write with 2 of 5 down");
    let ids = job_ids(&client).await;
    assert!(ids.contains(&first) && ids.contains(&second), "{ids:?}");
}

/// Jobs (with no tasks) created in a loop until `stop`: those acknowledged, and every failure.
async fn submit_jobs(client: Client, prefix: &'static str, stop: Arc<AtomicBool>) -> (Vec<String>, Vec<String>) {
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        match client.create_job(sleeping_service(&format!("{prefix}-{i}"), 0.1, 16, 0)).await {
            Ok(id) => acked.push(id),
            Err(e) => failed.push(format!("create {prefix}-{i}: {e}")),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (acked, failed)
}

async fn job_ids(client: &Client) -> BTreeSet<String> {
    try_job_ids(client).await.expect("find jobs")
}

async fn try_job_ids(client: &Client) -> Result<BTreeSet<String>, titus_client::Error> {
    let mut ids = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let page = client.find_jobs(&[], 500, &cursor).await?;
        ids.extend(page.items.into_iter().map(|j| j.id));
        match page.pagination {
            Some(p) if p.has_more => cursor = p.cursor,
            _ => return Ok(ids),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t500_compose_stack_survives_a_rolling_upgrade_under_load_and_down_up() {
    ensure_images();
    let stack = Stack::new();
    stack.up().await;
    let client = client();

    // A service with a task on each agent: its containers must not restart.
    let service = client.create_job(sleeping_service("compose-service", 0.5, 64, 2)).await.expect("submit");
    let running = || {
        let mut c: Vec<_> = ["agent-1", "agent-2"]
            .iter()
            .flat_map(|a| containers_of(&format!("{AGENT_PREFIX}{a}")))
            .filter(|(_, _, running, _)| *running)
            .map(|(id, task, _, started)| (id, task, started))
            .collect();
        c.sort();
        c
    };
    let before = wait_until(UP, "the service's two containers running", || async {
        let c = running();
        (c.len() == 2).then_some(c)
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> =
        ["load-a", "load-b"].into_iter().map(|p| tokio::spawn(submit_jobs(client.clone(), p, stop.clone()))).collect();
    let started = Instant::now();
    let file = stack.file.clone();
    let project = stack.project.clone();
    let upgrade = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(repo().join("deploy/compose/rolling-upgrade.sh"))
            .arg("-p")
            .arg(project)
            .arg("-f")
            .arg(file)
            .env("TITUS_AGENT_PREFIX", AGENT_PREFIX)
            .output()
            .expect("rolling-upgrade.sh")
    })
    .await
    .unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&upgrade.stdout), String::from_utf8_lossy(&upgrade.stderr));
    assert!(upgrade.status.success(), "rolling upgrade failed:\n{output}");
    eprintln!("rolling upgrade of 3 replicas in {:?}:\n{output}", started.elapsed());
    let acked = stop_load(&stop, writers).await;
    assert!(acked.len() > 20, "the load barely ran: {} jobs", acked.len());
    let present = job_ids(&client).await;
    let lost: Vec<_> = acked.iter().filter(|id| !present.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged jobs lost: {lost:?}");
    eprintln!("{} jobs acknowledged during the upgrade, none failed or lost", acked.len());
    assert_eq!(running(), before, "a task container was restarted or replaced by the upgrade");

    // down (volumes kept) and up: every job is still there, the service's tasks too.
    stack.compose(&["down", "-t", "20"]);
    stack.up().await;
    let client = self::client();
    // Healthy containers are not yet a settled cluster: on a loaded machine the restarted replicas
    // have been seen to churn through elections for over 30 s (see the closing note of issue 10).
    let t0 = Instant::now();
    let after = wait_until(UP, "jobs readable after down and up", || async { try_job_ids(&client).await.ok() }).await;
    eprintln!("jobs readable {:?} after the stack was healthy again", t0.elapsed());
    assert!(after.contains(&service), "the service job is gone after down/up");
    let lost: Vec<_> = acked.iter().filter(|id| !after.contains(*id)).collect();
    assert!(lost.is_empty(), "jobs lost by down/up: {lost:?}");
    assert_eq!(after.len(), present.len(), "down/up changed the set of jobs");

    // The CLI in the image: a backup to a file on a replica's volume, restored over the running
    // stack (--force, since it holds jobs): the same jobs, and the service's containers untouched.
    let servers = "replica-1:8001,replica-2:8001,replica-3:8001";
    let titus = |args: &[&str]| {
        let mut all = vec!["exec", "-T", "replica-1", "titus", "--server", servers];
        all.extend_from_slice(args);
        stack.compose(&all)
    };
    let out = titus(&["cluster", "backup", "/var/lib/titus/backup.tbk"]);
    assert!(out.contains("bytes written to /var/lib/titus/backup.tbk"), "{out}");
    let refused = stack.run(&[
        "exec",
        "-T",
        "replica-1",
        "titus",
        "--server",
        servers,
        "cluster",
        "restore",
        "/var/lib/titus/backup.tbk",
    ]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && text.contains("force"), "a restore over jobs needs --force: {text}");
    let out = titus(&["cluster", "restore", "--force", "/var/lib/titus/backup.tbk"]);
    assert!(out.contains(&format!("{} jobs", present.len())), "{out}");
    assert_eq!(job_ids(&client).await, after, "the restored stack has other jobs");
    let running_now = wait_until(UP, "the service's two containers running", || async {
        let c = running();
        (c.len() == 2).then_some(c)
    })
    .await;
    assert_eq!(running_now, before, "the restore restarted a task container");
}
