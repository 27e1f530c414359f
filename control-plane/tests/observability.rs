//! Observability against a real 3-replica cluster: every replica's `/metrics` is valid Prometheus
//! text exposition and moves when the cluster does; `/healthz` and `/readyz` mean something; the
//! request id a caller sends is echoed; the read-only web view, loaded by a real headless browser
//! (Debian's chromium), shows a submitted job and its tasks from the leader and from a follower,
//! and a screenshot is kept as a test artifact.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{http_get, parse_exposition, scrape, value, wait_until, Cluster, Sample};
use titus_client::proto as pb;

const ELECTION: Duration = Duration::from_secs(30);

fn service_job(app: &str, desired: u32) -> pb::JobDescriptor {
    common::sleeping_service(app, 1.0, 512, desired)
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    assert!(parse_exposition("# TYPE a counter\na_total 1\n").is_err(), "a sample of an undeclared family");
    assert!(parse_exposition("# TYPE a gauge\na{x=\"1} 1\n").is_err());
    assert!(parse_exposition("# TYPE a gauge\na one\n").is_err());
    assert!(parse_exposition("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n").is_err());
    let ok = parse_exposition("# HELP a A.\n# TYPE a gauge\na{x=\"q\\\"\\\\\"} 1.5\n").unwrap();
    assert_eq!(ok[0].1["x"], "q\"\\");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t500_metrics_are_valid_and_move_health_means_something_and_request_ids_echo() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_for_leader(ELECTION).await;
    for r in &cluster.replicas {
        assert_eq!(http_get(&r.admin_addr, "/healthz").await.0, 200);
        wait_until(ELECTION, "every replica ready", || async {
            (http_get(&r.admin_addr, "/readyz").await.0 == 200).then_some(())
        })
        .await;
        let s = scrape(&r.admin_addr).await;
        assert!(value(&s, "titus_raft_term", &[]) >= 1.0);
        assert_eq!(value(&s, "titus_raft_is_leader", &[]), if r.id == leader { 1.0 } else { 0.0 });
    }
    let leader_admin = cluster.replica(leader).admin_addr.clone();
    let before = scrape(&leader_admin).await;
    let creates = |s: &[Sample]| {
        value(s, "titus_grpc_requests_total", &[("method", "/titus.JobManagementService/CreateJob"), ("code", "Ok")])
    };

    // Submit through the leader: calls are counted, tasks appear by state on every replica (the
    // same replicated facts on followers), the log grows.
    let client = cluster.client_of(leader);
    for i in 0..3 {
        client.create_job(service_job(&format!("metrics-{i}"), 2)).await.unwrap();
    }
    let after = scrape(&leader_admin).await;
    assert_eq!(creates(&after) - creates(&before), 3.0, "three CreateJob calls counted");
    assert!(
        value(&after, "titus_grpc_request_seconds_count", &[("method", "/titus.JobManagementService/CreateJob")])
            >= 3.0
    );
    assert!(value(&after, "titus_raft_last_log_index", &[]) > value(&before, "titus_raft_last_log_index", &[]));
    assert!(value(&after, "titus_raft_committed_index", &[]) > value(&before, "titus_raft_committed_index", &[]));
    assert!(
        value(&after, "titus_raft_append_seconds_count", &[]) > value(&before, "titus_raft_append_seconds_count", &[])
    );
    for r in &cluster.replicas {
        wait_until(ELECTION, "six pending tasks seen by every replica", || async {
            let s = scrape(&r.admin_addr).await;
            (value(&s, "titus_tasks", &[("state", "Accepted")]) == 6.0
                && value(&s, "titus_scheduler_pending_tasks", &[]) == 6.0)
                .then_some(())
        })
        .await;
        let s = scrape(&r.admin_addr).await;
        assert!(value(&s, "titus_rocksdb_sst_bytes", &[]) >= 0.0);
        if r.id == leader {
            assert!(value(&s, "titus_raft_follower_lag_entries", &[]) >= 0.0);
            assert_eq!(s.iter().filter(|x| x.0 == "titus_raft_follower_lag_entries").count(), 2, "one per follower");
        }
    }
    // With no agent, the placement round says why.
    let s = scrape(&leader_admin).await;
    assert_eq!(value(&s, "titus_scheduler_unplaced_tasks", &[("reason", "no eligible agent")]), 6.0);

    // A caller's request id comes back; one without gets one made for it.
    let mut raw = pb::job_management_service_client::JobManagementServiceClient::connect(format!(
        "http://{}",
        cluster.replica(leader).api_addr
    ))
    .await
    .unwrap();
    let mut request = tonic::Request::new(pb::JobQuery::default());
    request.metadata_mut().insert("x-request-id", "t500-request".parse().unwrap());
    let response = raw.find_jobs(request).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "t500-request");
    let response = raw.find_jobs(pb::JobQuery::default()).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap().len(), 36, "a uuid made by the server");
    // Errors echo it too, and are counted by their code.
    let mut bad = tonic::Request::new(pb::JobId { id: "no-such-job".into() });
    bad.metadata_mut().insert("x-request-id", "t500-bad".parse().unwrap());
    let status = raw.find_job(bad).await.unwrap_err();
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "t500-bad");
    let s = scrape(&leader_admin).await;
    assert_eq!(
        value(
            &s,
            "titus_grpc_requests_total",
            &[("method", "/titus.JobManagementService/FindJob"), ("code", "NotFound")]
        ),
        1.0
    );

    // A replica that lost its quorum is live but not ready.
    let follower = cluster.replicas.iter().map(|r| r.id).find(|id| *id != leader).unwrap();
    let mut cluster = cluster;
    let others: Vec<u64> = cluster.replicas.iter().map(|r| r.id).filter(|id| *id != follower).collect();
    for id in others {
        cluster.kill(id);
    }
    let addr = cluster.replica(follower).admin_addr.clone();
    let why = wait_until(ELECTION, "the lone replica is not ready", || async {
        let (status, body) = http_get(&addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(why.contains("no leader"), "{why}");
    assert_eq!(http_get(&addr, "/healthz").await.0, 200, "still live");
}

/// Debian's chromium, headless: the DOM of `url` after it loaded.
fn chromium(args: &[&str]) -> std::process::Output {
    let bin = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("chromium is not installed: apt-get install chromium (deploy/test.sh does)");
    let profile = tempfile::TempDir::new().unwrap();
    Command::new(bin)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t510_the_web_view_shows_jobs_and_tasks_from_any_replica_in_a_real_browser() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_for_leader(ELECTION).await;
    let client = cluster.client();
    let job_id = client.create_job(service_job("web-view-<b>demo</b>", 2)).await.unwrap_err().to_string();
    assert!(job_id.contains("application_name"), "names with markup are refused: {job_id}");
    let job_id = client.create_job(service_job("web-view-demo", 2)).await.unwrap();
    let follower = cluster.replicas.iter().find(|r| r.id != leader).unwrap();
    // The follower applies the tasks too; then its page shows them.
    wait_until(ELECTION, "the follower holds the job's tasks", || async {
        let (_, body) = http_get(&follower.admin_addr, &format!("/ui/jobs/{job_id}")).await;
        (body.matches("Accepted").count() >= 2).then_some(())
    })
    .await;

    for r in [cluster.replica(leader), follower] {
        let out = chromium(&["--dump-dom", &format!("http://{}/ui", r.admin_addr)]);
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(dom.contains("web-view-demo") && dom.contains(&job_id), "replica {}: {dom}", r.id);
        // The leader shows its scheduler's reason; a follower works one out from replicated state.
        let why = if r.id == leader { "no agent is registered" } else { "no healthy agent online" };
        assert!(dom.contains("Pending tasks") && dom.contains(why), "why it waits: {dom}");
        assert!(dom.contains("Members") && dom.contains("leader"), "{dom}");
        let out = chromium(&["--dump-dom", &format!("http://{}/ui/jobs/{job_id}", r.admin_addr)]);
        let dom = String::from_utf8_lossy(&out.stdout);
        let tasks = client.find_tasks(&[("jobIds", job_id.as_str())], 100, "").await.unwrap().items;
        assert_eq!(tasks.len(), 2);
        for t in &tasks {
            assert!(dom.contains(&t.id), "task {} on replica {}'s job page: {dom}", t.id, r.id);
        }
    }

    // A batch task that fails five times (four retries): its job page shows the failures as one
    // row with their count, the task page its timeline, and the finished job is linked.
    let mut flaky = service_job("web-view-flaky", 1);
    flaky.job_type = Some(pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
        size: 1,
        retry_policy: Some(pb::RetryPolicy {
            policy: Some(pb::retry_policy::Policy::Immediate(pb::retry_policy::Immediate { retries: 4 })),
        }),
        ..Default::default()
    }));
    let flaky = client.create_job(flaky).await.unwrap();
    let mut last = String::new();
    for try_no in 0..5 {
        let t = wait_until(ELECTION, &format!("try {try_no} of the flaky task"), || async {
            let live =
                client.find_tasks(&[("jobIds", flaky.as_str()), ("taskStates", "Accepted")], 10, "").await.ok()?;
            live.items.into_iter().find(|t| t.id != last)
        })
        .await;
        client.report_task_status(&t.id, pb::TaskState::TaskLaunched, "", &[("agent", "agent-x")]).await.unwrap();
        client.report_task_status(&t.id, pb::TaskState::TaskFinished, "failed", &[]).await.unwrap();
        last = t.id;
    }
    let leader_admin = cluster.replica(leader).admin_addr.clone();
    wait_until(ELECTION, "the flaky job among the finished", || async {
        let (_, body) = http_get(&leader_admin, "/ui").await;
        let finished = body.split("<h2>Finished jobs</h2>").nth(1)?;
        finished.contains(&flaky).then_some(())
    })
    .await;
    let out = chromium(&["--dump-dom", &format!("http://{leader_admin}/ui/jobs/{flaky}")]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("(5 tasks; the last shown)"), "five failures, one row: {dom}");
    assert!(dom.contains("<h2>Spec</h2>") && dom.contains("retry policy") && dom.contains("Immediate"), "{dom}");
    assert!(dom.contains("http-equiv=\"refresh\""), "the page reloads itself: {dom}");
    let out = chromium(&["--dump-dom", &format!("http://{leader_admin}/ui/tasks/{last}")]);
    let dom = String::from_utf8_lossy(&out.stdout);
    let timeline = dom.split("Timeline").nth(1).unwrap_or_default();
    let (a, l, f) = (timeline.find("Accepted"), timeline.find("Launched"), timeline.find("Finished"));
    assert!(a.is_some() && a < l && l < f && timeline.contains("failed"), "the states in order: {dom}");

    // A screenshot of the cluster page, kept as a test artifact.
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let artifacts = dir.join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("web-view.png");
    let _ = std::fs::remove_file(&png);
    let out = chromium(&[
        &format!("--screenshot={}", png.display()),
        "--window-size=1280,900",
        &format!("http://{}/ui", cluster.replica(leader).admin_addr),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&png).expect("the screenshot was written");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "a real PNG: {} bytes", bytes.len());
    eprintln!("web view screenshot: {}", png.display());
    let job_png = artifacts.join("web-view-job.png");
    let out = chromium(&[
        &format!("--screenshot={}", job_png.display()),
        "--window-size=1280,1100",
        &format!("http://{leader_admin}/ui/jobs/{flaky}"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("job page screenshot: {}", job_png.display());
}
