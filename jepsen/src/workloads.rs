//! The client workloads. Each records what it invokes and how it ended into the shared history.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use titus_client::{Client, JobBuilder};
use tokio::time::Instant;

use crate::history::{classify, Recorder, Type};

pub const OWNER: &str = "jepsen@titus.local";
pub const REGISTER_APP: &str = "jepsen-register";
pub const SET_APP: &str = "jepsen-set";
pub const TASKS_APP: &str = "jepsen-tasks";
pub const KILL_APP: &str = "jepsen-kill";

/// Ends one operation: ok with `value`, or fail/info by the error.
fn complete<T>(
    rec: &Recorder,
    process: &mut i64,
    workers: i64,
    f: &str,
    value_on_error: Value,
    r: titus_client::Result<T>,
    ok: impl FnOnce(T) -> Value,
) {
    match r {
        Ok(v) => rec.record(*process, Type::Ok, f, ok(v), None),
        Err(e) => {
            let kind = classify(&e);
            rec.record(*process, kind, f, value_on_error, Some(e.to_string()));
            if kind == Type::Info {
                // Its outcome is unknown: this process may still be running it; go on as another.
                *process += workers;
            }
        }
    }
}

/// A service job's desired size (the register's value).
fn desired_of(job: &titus_client::proto::Job) -> Option<u32> {
    match job.job_descriptor.as_ref()?.job_type.as_ref()? {
        titus_client::proto::job_descriptor::JobType::Service(s) => s.capacity.as_ref().map(|c| c.desired),
        _ => None,
    }
}

/// The process that records the register keys' creation.
pub const SETUP_PROCESS: i64 = 40_000;

/// Creates the register workload's keys: service jobs whose desired size is the register (0 at
/// first). Placement never finds room for their tasks (64 cpus each), so only the control plane is
/// exercised.
///
/// With `rec`, each creation goes into the history as an acknowledged `write [key 0]`, so that the
/// history says what the register held first and is checked from `nil` like any Jepsen register.
/// It is recorded once the job exists (its id is the key) and before any worker starts, so no other
/// operation on the key is concurrent with it and the narrower interval changes nothing.
pub async fn register_setup(client: &Client, keys: usize, rec: Option<&Recorder>) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for k in 0..keys {
        let desc = JobBuilder::service(REGISTER_APP, "titus/busybox:latest", 0, 0, 10)
            .owner(OWNER)
            .cpu(64.0)
            .memory_mb(16)
            .attribute("jepsen.key", &k.to_string())
            .build();
        let id = client.create_job(desc).await.map_err(|e| anyhow::anyhow!("creating register key {k}: {e}"))?;
        if let Some(rec) = rec {
            rec.record(SETUP_PROCESS, Type::Invoke, "write", json!([id, 0]), None);
            rec.record(SETUP_PROCESS, Type::Ok, "write", json!([id, 0]), None);
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Random writes (UpdateJobCapacity desired = v) and reads (FindJob) of random keys.
pub async fn register_worker(
    client: Client,
    rec: Recorder,
    keys: Vec<String>,
    worker: i64,
    workers: i64,
    until: Instant,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut process = worker;
    while Instant::now() < until {
        let key = keys[rng.gen_range(0..keys.len())].clone();
        if rng.gen_bool(0.5) {
            let v: u32 = rng.gen_range(1..=5);
            rec.record(process, Type::Invoke, "write", json!([key, v]), None);
            let r = client.update_job_capacity(&key, None, Some(v), None).await;
            complete(&rec, &mut process, workers, "write", json!([key, v]), r, |_| json!([key, v]));
        } else {
            rec.record(process, Type::Invoke, "read", json!([key, null]), None);
            let r = client.find_job(&key).await;
            complete(&rec, &mut process, workers, "read", json!([key, null]), r, |job| {
                let desired = desired_of(&job);
                json!([key, desired])
            });
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
    }
}

/// CreateJob with a fresh idempotency token per add; the token is also a job attribute, so the
/// final read can map tokens to jobs.
pub async fn set_worker(client: Client, rec: Recorder, worker: i64, workers: i64, until: Instant, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut process = worker;
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let token = format!("jepsen-{worker}-{n}");
        rec.record(process, Type::Invoke, "add", json!(token), None);
        let desc = JobBuilder::batch(SET_APP, "titus/busybox:latest", 1)
            .owner(OWNER)
            .cpu(64.0)
            .memory_mb(16)
            .attribute("jepsen.token", &token)
            .build();
        let r = client.create_job_with_token(desc, &token).await;
        complete(&rec, &mut process, workers, "add", json!(token), r, |id| json!([token, id]));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..60))).await;
    }
}

/// The final read of the set: every job of the workload with its token.
pub async fn set_read_all(client: &Client, rec: &Recorder, process: i64) {
    rec.record(process, Type::Invoke, "read-all", Value::Null, None);
    let mut pairs = Vec::new();
    let mut cursor = String::new();
    loop {
        match client.find_jobs(&[("appName", SET_APP)], 500, &cursor).await {
            Ok(page) => {
                for job in page.items {
                    let token = job
                        .job_descriptor
                        .as_ref()
                        .and_then(|d| d.attributes.get("jepsen.token").cloned())
                        .unwrap_or_default();
                    pairs.push(json!([token, job.id]));
                }
                match page.pagination {
                    Some(p) if p.has_more => cursor = p.cursor,
                    _ => break,
                }
            }
            Err(e) => {
                rec.record(process, classify(&e), "read-all", Value::Null, Some(e.to_string()));
                return;
            }
        }
    }
    rec.record(process, Type::Ok, "read-all", Value::Array(pairs), None);
}

/// An ObserveJobs client on the register's jobs, recording every notification.
pub async fn observer(client: Client, rec: Recorder, observer: u64, until: Instant) {
    let mut obs = client.observe_jobs(&[("appName", REGISTER_APP)]);
    let process = 10_000 + observer as i64;
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, obs.next()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(observer, error = %e, "observer");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => break,
        };
        use titus_client::proto::job_change_notification::Notification as N;
        let value = match n.notification {
            Some(N::JobUpdate(u)) => {
                let job = u.job.unwrap_or_default();
                let state = job.status.as_ref().map(|s| s.state).unwrap_or_default();
                let desired = desired_of(&job);
                json!({"observer": observer, "revision": n.revision, "kind": "job", "id": job.id, "state": format!("{state}/{}", desired.unwrap_or(0))})
            }
            Some(N::TaskUpdate(u)) => {
                let task = u.task.unwrap_or_default();
                let state = task.status.map(|s| s.state).unwrap_or_default();
                json!({"observer": observer, "revision": n.revision, "kind": "task", "id": task.id, "state": state.to_string()})
            }
            Some(N::SnapshotEnd(e)) => {
                json!({"observer": observer, "revision": n.revision, "kind": "snapshot-end", "resumed": e.resumed})
            }
            None => continue,
        };
        rec.record(process, Type::Ok, "observe", value, None);
    }
}

/// Submits small batch jobs that agents run (a 2-second sleep).
pub async fn task_submitter(client: Client, rec: Recorder, worker: i64, workers: i64, until: Instant) {
    let mut process = 20_000 + worker;
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let token = format!("jepsen-task-{worker}-{n}");
        rec.record(process, Type::Invoke, "submit", Value::Null, None);
        let desc = JobBuilder::batch(TASKS_APP, "titus/busybox:latest", 1)
            .owner(OWNER)
            .cpu(0.1)
            .memory_mb(16)
            .command(["sleep", "2"])
            .build();
        let r = client.create_job_with_token(desc, &token).await;
        complete(&rec, &mut process, workers, "submit", Value::Null, r, Value::String);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// The kill-during-launch workload: submits a batch job whose task would run for ten minutes and
/// kills the job a random 0 to 4 s later — while its task is being placed, its container created,
/// or just started — recorded as `launch` (ok: the job id) and `kill` (value: the job id).
pub async fn kill_during_launch(client: Client, rec: Recorder, worker: i64, workers: i64, until: Instant, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut process = 50_000 + worker;
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let token = format!("jepsen-kill-{worker}-{n}");
        rec.record(process, Type::Invoke, "launch", Value::Null, None);
        // The shell exits at once on SIGTERM (a bare `sleep` as PID 1 ignores it until the kill's
        // grace period ends), so a stopped container is gone within a second.
        let desc = JobBuilder::batch(KILL_APP, "titus/busybox:latest", 1)
            .owner(OWNER)
            .cpu(0.1)
            .memory_mb(16)
            .command(["sh", "-c", "trap 'exit 143' TERM; sleep 600 & wait"])
            .build();
        let r = client.create_job_with_token(desc, &token).await;
        let job = r.as_ref().ok().cloned();
        complete(&rec, &mut process, workers, "launch", Value::Null, r, Value::String);
        if let Some(job) = job {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..4000))).await;
            rec.record(process, Type::Invoke, "kill", json!(job), None);
            let r = client.kill_job(&job).await;
            complete(&rec, &mut process, workers, "kill", json!(job), r, |_| json!(job));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
    }
}

/// The final reads of the kill-during-launch workload: every launched job is killed (again, where
/// its kill's outcome was unknown or it was never sent); once all their tasks are Finished (or
/// `within` passed) their states are read (`killed-tasks`: `[task job state]` rows), and the agents'
/// containers are sampled for `watch` more (`containers-final`): none of those tasks may run.
pub async fn kills_final(client: &Client, rec: &Recorder, agents: &[String], within: Duration, watch: Duration) {
    let ops = rec.ops();
    let launched: Vec<String> = ops
        .iter()
        .filter(|o| o.f == "launch" && o.kind == Type::Ok)
        .filter_map(|o| o.value.as_str().map(str::to_string))
        .collect();
    let killed: std::collections::BTreeSet<&str> =
        ops.iter().filter(|o| o.f == "kill" && o.kind == Type::Ok).filter_map(|o| o.value.as_str()).collect();
    for job in launched.iter().filter(|j| !killed.contains(j.as_str())) {
        // A job that already finished refuses the kill: fine, it is what the sweep wants.
        let _ = client.kill_job(job).await;
    }
    let deadline = Instant::now() + within;
    loop {
        let (rows, settled) = task_rows(client, &launched, |state| state == "Finished").await;
        if settled || Instant::now() > deadline {
            rec.record(30_002, Type::Invoke, "killed-tasks", Value::Null, None);
            rec.record(30_002, Type::Ok, "killed-tasks", Value::Array(rows), None);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let until = Instant::now() + watch;
    while Instant::now() < until {
        sample(rec, 30_003, "containers-final", agents).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `[task job state]` rows of the jobs' tasks (states as the checkers name them), and whether every
/// task's state passes `settled` (false when a read failed).
async fn task_rows(client: &Client, jobs: &[String], settled: impl Fn(&str) -> bool) -> (Vec<Value>, bool) {
    let mut rows = Vec::new();
    let mut all = true;
    for chunk in jobs.chunks(50) {
        let ids = chunk.join(",");
        match client.find_tasks(&[("jobIds", &ids)], 1000, "").await {
            Ok(page) => {
                for t in page.items {
                    let state = t.status.as_ref().map(|s| s.state).unwrap_or_default();
                    let name = titus_client::proto::TaskState::try_from(state)
                        .map(|s| s.as_str_name().trim_start_matches("TASK_").to_string())
                        .unwrap_or_default();
                    let name = match name.as_str() {
                        "STARTED" => "Started".to_string(),
                        "FINISHED" => "Finished".to_string(),
                        other => other.to_string(),
                    };
                    all &= settled(&name);
                    rows.push(json!([t.id, t.job_id, name]));
                }
            }
            Err(_) => all = false,
        }
    }
    (rows, all)
}

/// `[task container agent]` rows of the running task containers of the given agents, or why
/// `docker ps` could not tell.
async fn running_containers(agents: &[String]) -> Result<Vec<Value>, String> {
    let mut rows = Vec::new();
    for agent in agents {
        let out = tokio::process::Command::new("docker")
            .args([
                "ps",
                "--filter",
                &format!("label=titus.agent.id={agent}"),
                "--filter",
                "status=running",
                "--format",
                "{{.Label \"titus.task.id\"}} {{.ID}}",
            ])
            .output()
            .await
            .map_err(|e| format!("docker ps: {e}"))?;
        if !out.status.success() {
            return Err(format!("docker ps: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((task, container)) = line.split_once(' ') {
                rows.push(json!([task, container, agent]));
            }
        }
    }
    Ok(rows)
}

/// One sample of the running containers as an op of `f`: ok with the rows, or fail with why there
/// are none (a checker must not read a failed `docker ps` as "nothing runs").
async fn sample(rec: &Recorder, process: i64, f: &str, agents: &[String]) {
    match running_containers(agents).await {
        Ok(rows) => rec.record(process, Type::Ok, f, Value::Array(rows), None),
        Err(e) => rec.record(process, Type::Fail, f, Value::Null, Some(e)),
    }
}

/// Samples the running task containers of the given agents, every 300 ms.
pub async fn container_sampler(rec: Recorder, agents: Vec<String>, until: Instant) {
    while Instant::now() < until {
        sample(&rec, 30_000, "containers", &agents).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The final read of the tasks workload, once every task of an acknowledged job is running or
/// terminal (or `within` passed).
pub async fn tasks_final(client: &Client, rec: &Recorder, within: Duration) {
    let jobs: Vec<String> = rec
        .ops()
        .iter()
        .filter(|o| o.f == "submit" && o.kind == Type::Ok)
        .filter_map(|o| o.value.as_str().map(str::to_string))
        .collect();
    let deadline = Instant::now() + within;
    loop {
        let (rows, settled) = task_rows(client, &jobs, |state| state == "Started" || state == "Finished").await;
        if settled || Instant::now() > deadline {
            rec.record(30_001, Type::Invoke, "tasks", Value::Null, None);
            rec.record(30_001, Type::Ok, "tasks", Value::Array(rows), None);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
