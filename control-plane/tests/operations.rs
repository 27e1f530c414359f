//! Operations on a running cluster, against real replica processes: moving leadership away (what a
//! rolling upgrade does before restarting the leader), a leader stopped with SIGTERM handing over
//! by itself, and a backup restored into a fresh cluster.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{group, sleeping_service, stop_load, wait_until, Cluster};
use titus_client::proto as pb;
use titus_client::{Client, Error, ReadConsistency};

const ELECTION: Duration = Duration::from_secs(30);

/// Writes (capacity groups) and linearizable reads in a loop until `stop`; returns the names
/// acknowledged and every error the SDK gave up with.
async fn load(client: Client, prefix: &'static str, stop: Arc<AtomicBool>) -> (Vec<String>, Vec<String>) {
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("{prefix}-{i}");
        match client.create_capacity_group(group(&name)).await {
            Ok(_) => acked.push(name),
            Err(e) => failed.push(format!("create {name}: {e}")),
        }
        if let Err(e) = client.list_capacity_groups(ReadConsistency::Linearizable).await {
            failed.push(format!("list: {e}"));
        }
        i += 1;
    }
    (acked, failed)
}

async fn group_names(client: &Client) -> Vec<String> {
    client.list_capacity_groups(ReadConsistency::Linearizable).await.unwrap().into_iter().map(|g| g.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_step_down_and_sigterm_hand_leadership_over_with_no_failed_request() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = ["a", "b"].into_iter().map(|p| tokio::spawn(load(c.client(), p, stop.clone()))).collect();
    wait_until(ELECTION, "load under way", || async { (group_names(&c.client()).await.len() >= 10).then_some(()) })
        .await;

    // A step-down its caller abandons (the call dropped mid-way) leaves a working leader behind:
    // heartbeats and elections back on, its writes served.
    let url = format!("http://{}", c.replica(leader).api_addr);
    let mut raw = pb::cluster_service_client::ClusterServiceClient::connect(url).await.unwrap();
    let abandoned = tokio::time::timeout(Duration::from_millis(300), raw.step_down(pb::StepDownRequest {})).await;
    assert!(abandoned.is_err(), "the step-down answered within 300 ms: {abandoned:?}");
    drop(raw);
    c.client_of(leader).create_capacity_group(group("after-abandoned-step-down")).await.expect("write via the leader");
    assert_eq!(c.wait_for_leader(ELECTION).await, leader, "an abandoned step-down moved leadership");

    // Asked: leadership moves to another replica, which every replica then reports.
    let started = Instant::now();
    let status = c.client().step_down(Duration::from_secs(10)).await.expect("step down");
    let handed_over = started.elapsed();
    assert_ne!(status.leader_id, leader, "the leader that stepped down still leads: {status:?}");
    assert_ne!(status.leader_id, 0, "{status:?}");
    eprintln!("step-down: replica {leader} -> {} in {handed_over:?}", status.leader_id);
    let second = status.leader_id;
    // The one that stepped down stands for election again later: it is a normal follower.
    let follower = wait_until(ELECTION, "old leader follows the new one", || async {
        c.status_of(leader).await.filter(|s| s.leader_id == second)
    })
    .await;
    assert_eq!(follower.node_id, leader);

    // Stopped with SIGTERM, a leader hands over by itself before exiting.
    let leader_now = c.wait_for_leader(ELECTION).await;
    let started = Instant::now();
    let exit = c.terminate(leader_now);
    assert!(exit.success(), "replica {leader_now} exited with {exit}");
    let third = c.wait_for_leader(ELECTION).await;
    assert_ne!(third, leader_now);
    eprintln!("SIGTERM: replica {leader_now} stopped, replica {third} leads, {:?} after the signal", started.elapsed());
    assert!(c.log_of(leader_now).contains("stepped down"), "no hand-over in the log of replica {leader_now}");
    c.start_replica(leader_now);
    // The load goes on through the new leader, and the stopped replica catches up.
    let before = group_names(&c.client()).await.len();
    wait_until(ELECTION, "writes after the hand-overs", || async {
        (group_names(&c.client()).await.len() >= before + 10).then_some(())
    })
    .await;
    let target = c.status_of(third).await.unwrap().last_applied_index;
    c.wait_applied(leader_now, target, ELECTION).await;

    let acked = stop_load(&stop, writers).await;
    let names = group_names(&c.client()).await;
    for name in &acked {
        assert!(names.contains(name), "acknowledged write {name} lost");
    }
    let total = acked.len();
    eprintln!("{total} writes acknowledged under load, none failed");
}

/// Jobs, tasks and capacity groups as one cluster reports them, for comparing two.
type Picture = (BTreeMap<String, pb::Job>, BTreeMap<String, pb::Task>, Vec<String>);

async fn picture(client: &Client) -> Picture {
    let jobs = client.find_jobs(&[], 1000, "").await.unwrap().items;
    let tasks = client.find_tasks(&[], 1000, "").await.unwrap().items;
    (
        jobs.into_iter().map(|j| (j.id.clone(), j)).collect(),
        tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
        group_names(client).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_a_backup_restores_every_job_and_task_into_a_fresh_cluster() {
    let a = Cluster::start(3, &[]);
    a.wait_for_leader(ELECTION).await;
    let client = a.client();
    for i in 0..5 {
        client.create_capacity_group(group(&format!("group-{i}"))).await.unwrap();
    }
    let mut job_ids = Vec::new();
    for i in 0..12 {
        job_ids.push(client.create_job(sleeping_service(&format!("app-{i}"), 0.5, 64, 1 + i % 3)).await.unwrap());
    }
    client.kill_job(&job_ids[0]).await.unwrap();
    // Settled first (its never-placed tasks finish at once, then the job), so that neither
    // cluster's lifecycle changes the picture between the backup and the comparison.
    wait_until(ELECTION, "killed job finished", || async {
        let job = client.find_job(&job_ids[0]).await.ok()?;
        (job.status.map(|s| s.state) == Some(pb::JobState::JobFinished as i32)).then_some(())
    })
    .await;
    let expected_tasks: usize = (1..12).map(|i| 1 + i % 3).sum::<u32>() as usize;
    wait_until(ELECTION, "every task created", || async {
        let n = client.find_tasks(&[], 1000, "").await.ok()?.items.len();
        (n >= expected_tasks).then_some(())
    })
    .await;
    let before = picture(&client).await;
    let backup = client.backup(Duration::from_secs(30)).await.expect("backup");
    assert!(!backup.cluster_id.is_empty() && backup.applied_index > 0, "{backup:?}");
    eprintln!("backup: {} bytes at index {}", backup.data.len(), backup.applied_index);

    let b = Cluster::start(3, &[]);
    b.wait_for_leader(ELECTION).await;
    let fresh = b.client();
    // Something in it already, as a fresh cluster may have: the restore replaces it.
    fresh.create_capacity_group(group("scratch")).await.unwrap();
    let refused = fresh.restore(backup.data.clone(), false, Duration::from_secs(60)).await;
    match &refused {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("force") && m.contains("not empty"), "{m}"),
        other => panic!("a restore over state must need force: {other:?}"),
    }
    let garbage = fresh.restore(b"not a backup".to_vec(), true, Duration::from_secs(10)).await;
    match &garbage {
        Err(Error::InvalidArgument { message, .. }) => assert!(message.contains("backup"), "{message}"),
        other => panic!("garbage must be refused naming the backup: {other:?}"),
    }
    assert_eq!(group_names(&fresh).await, vec!["scratch".to_string()], "a refused restore changed nothing");

    let result = fresh.restore(backup.data.clone(), true, Duration::from_secs(60)).await.expect("restore");
    assert_eq!(result.tasks as usize, before.1.len(), "{result:?}");
    assert_eq!(result.capacity_groups, 5, "{result:?}");
    let after = picture(&fresh).await;
    assert_eq!(after.0, before.0, "jobs differ after the restore");
    assert_eq!(after.1, before.1, "tasks differ after the restore");
    assert_eq!(after.2, before.2, "capacity groups differ after the restore");
    // Every replica of the new cluster holds it (the restore went through its log).
    let target = b.status_of(b.wait_for_leader(ELECTION).await).await.unwrap().last_applied_index;
    for id in 1..=3 {
        b.wait_applied(id, target, ELECTION).await;
        let stale = b.client_of(id).list_capacity_groups(ReadConsistency::Stale).await.unwrap();
        assert_eq!(stale.len(), 5, "replica {id}");
    }
    // The restored cluster carries on: the lifecycle acts on the restored jobs.
    fresh.kill_job(&job_ids[1]).await.unwrap();
    wait_until(ELECTION, "restored job killed", || async {
        let job = fresh.find_job(&job_ids[1]).await.ok()?;
        (job.status.map(|s| s.state) != Some(pb::JobState::JobAccepted as i32)).then_some(())
    })
    .await;
}

/// `titus -o json ARGS` against `api`, parsed.
fn titus_json(api: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(common::bin("titus"))
        .args(["--server", api, "-o", "json"])
        .args(args)
        .output()
        .expect("run titus");
    assert!(out.status.success(), "titus {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("titus -o json prints JSON")
}

/// What the fixture's test reads: every job, every job's tasks, the capacity groups and the
/// killed (archived) job, as `titus -o json` shows them.
fn fixture_view(api: &str, killed: &str) -> serde_json::Value {
    let jobs = titus_json(api, &["job", "list"]);
    let tasks: Vec<serde_json::Value> = jobs
        .as_array()
        .expect("a list of jobs")
        .iter()
        .flat_map(|j| {
            titus_json(api, &["task", "list", j["id"].as_str().expect("a job id")]).as_array().cloned().unwrap()
        })
        .collect();
    // The fields the fixture was written with (the CLI has since added ages, counts and reasons).
    let keep = |v: &serde_json::Value, keys: &[&str]| {
        serde_json::Value::Object(keys.iter().filter_map(|k| Some((k.to_string(), v.get(*k)?.clone()))).collect())
    };
    let job_keys = ["id", "applicationName", "owner", "capacityGroup", "state", "reasonCode"];
    let task_keys = ["id", "jobId", "index", "state", "reasonCode", "reasonMessage", "context"];
    // `job get -o json` prints the whole spec now: the killed job's row is made from it.
    let spec = titus_json(api, &["job", "get", killed]);
    let killed_row = serde_json::json!([{
        "id": spec["id"], "applicationName": spec["applicationName"], "owner": spec["owner"]["teamEmail"],
        "capacityGroup": spec["capacityGroup"], "state": spec["status"]["state"], "reasonCode": spec["status"]["reasonCode"],
    }]);
    serde_json::json!({
        "jobs": jobs.as_array().unwrap().iter().map(|j| keep(j, &job_keys)).collect::<Vec<_>>(),
        "tasks": tasks.iter().map(|t| keep(t, &task_keys)).collect::<Vec<_>>(),
        "capacity_groups": titus_json(api, &["capacity-group", "list"]),
        "killed_job": killed_row,
    })
}

async fn codec_version_of(c: &Cluster, id: u64) -> Option<u32> {
    c.status_of(id).await.map(|s| s.codec_version)
}

/// A data dir written by the previous release (version-1 JSON records, log entries and a
/// snapshot; see tests/fixtures/make-v1-data-dir.sh) is read by this one as it was written; the
/// cluster then moves to the binary codec on its own, and a replica that joins later is caught up
/// from that old snapshot and the entries after it, both encodings mixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_a_data_dir_of_the_previous_release_is_read_then_upgraded() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("v1-expected.json")).expect("expected")).expect("JSON");
    let killed = expected["killed_job"][0]["id"].as_str().expect("the killed job's id").to_string();
    // The fixture's killed job finished on the day it was made: kept findable for good here.
    let keep = ["--archive-retention-hours", "1000000"];
    let tarball = fixtures.join("v1-data-dir.tar.gz");
    let mut c = Cluster::start_from_data(&tarball, "127.0.0.1:17401", "127.0.0.1:17402", &keep);
    c.wait_for_leader(ELECTION).await;
    let api = c.replica(1).api_addr.clone();
    assert_eq!(fixture_view(&api, &killed), expected, "read as the previous release wrote it");

    // Every member (this one) reads version 2: the leader moves the cluster to it.
    wait_until(ELECTION, "codec version 2", || async { (codec_version_of(&c, 1).await == Some(2)).then_some(()) })
        .await;
    let client = c.client();
    let job = client.create_job(sleeping_service("after-upgrade", 0.5, 64, 1)).await.expect("a job written in v2");

    // Two replicas join: caught up by the previous release's snapshot (the log behind it is
    // gone) and the entries since, some written in each version.
    for id in [2, 3] {
        let (peer, api) = c.spawn_joiner(id);
        client.add_member(id, &peer, &api).await.expect("add member");
    }
    let leader_applied = client.cluster_status().await.expect("status").last_applied_index;
    for id in [2, 3] {
        c.wait_applied(id, leader_applied, ELECTION).await;
        assert_eq!(codec_version_of(&c, id).await, Some(2), "replica {id} writes version 2 too");
    }
    // Replica 1 gone: the two that joined elect a leader and serve what it served.
    c.kill(1);
    let leader = c.wait_for_leader(ELECTION).await;
    assert_ne!(leader, 1);
    let api = c.replica(leader).api_addr.clone();
    let mut view = fixture_view(&api, &killed);
    let jobs = view["jobs"].as_array_mut().expect("jobs");
    let at = jobs.iter().position(|j| j["id"] == job.as_str()).expect("the job written after the upgrade");
    assert_eq!(jobs.remove(at)["applicationName"], "after-upgrade");
    view["tasks"].as_array_mut().expect("tasks").retain(|t| t["jobId"] != job.as_str());
    assert_eq!(view, expected, "the joiners read the previous release's records from its snapshot");

    // Replica 1 restarted: its own data dir now holds both encodings, and it catches up.
    c.start_replica(1);
    let applied = c.client().cluster_status().await.expect("status").last_applied_index;
    c.wait_applied(1, applied, ELECTION).await;
    assert!(client.find_job(&job).await.is_ok());
}
