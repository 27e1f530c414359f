//! Job and task API on a real 3-replica cluster (processes, RocksDB, gRPC), including leader kills.
//! t100 the RPCs, t110 idempotent CreateJob across a leader kill, t120 observe resuming across a
//! leader kill.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::{wait_until, Cluster};
use titus_client::proto::{self as pb, job_change_notification::Notification};
use titus_client::{CapacityGroupSpec, Client, ClientOptions, Error, Tier};

const ELECTION: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(20);

fn descriptor(app: &str, job_type: pb::job_descriptor::JobType) -> pb::JobDescriptor {
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: "team@example.com".into() }),
        application_name: app.into(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources { cpu: 1.0, memory_mb: 512, ..Default::default() }),
            image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["sleep".into(), "1".into()],
            ..Default::default()
        }),
        job_type: Some(job_type),
        ..Default::default()
    }
}

fn batch(app: &str, size: u32) -> pb::JobDescriptor {
    descriptor(app, pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size, ..Default::default() }))
}

fn service(app: &str, min: u32, desired: u32, max: u32) -> pb::JobDescriptor {
    descriptor(
        app,
        pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
            capacity: Some(pb::Capacity { min, desired, max }),
            enabled: true,
            ..Default::default()
        }),
    )
}

async fn live_tasks(client: &Client, job_id: &str) -> Vec<pb::Task> {
    let r = client
        .find_tasks(&[("jobIds", job_id), ("taskStates", "Accepted,Launched,StartInitiated,Started")], 1000, "")
        .await
        .expect("find tasks");
    r.items
}

async fn wait_live(client: &Client, job_id: &str, n: usize) -> Vec<pb::Task> {
    wait_until(SETTLE, &format!("{n} live tasks of {job_id}"), || async {
        let t = live_tasks(client, job_id).await;
        (t.len() == n).then_some(t)
    })
    .await
}

fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.status.as_ref().unwrap().state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t100_every_job_rpc_on_a_three_replica_cluster() {
    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let client = c.client();

    // Bad input names the field; nothing is created.
    let mut bad = batch("bad", 1);
    bad.container.as_mut().unwrap().resources.as_mut().unwrap().cpu = 0.0;
    bad.attributes.insert("titus.secret".into(), "x".into());
    let err = client.create_job(bad).await.expect_err("invalid job accepted");
    let fields: Vec<&str> = err.violations().iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["attributes.titus.secret", "container.resources.cpu"], "{err}");
    let err = client
        .create_job(descriptor("none", pb::job_descriptor::JobType::Batch(Default::default())))
        .await
        .expect_err("size 0");
    assert_eq!(err.violations()[0].field, "batch.size");

    // Quota: a capacity group reserving 2 cpus refuses a job needing 3, whole.
    client.create_capacity_group(CapacityGroupSpec::new("small", Tier::Flex, 1.0, 1024, 20_000, 256, 2)).await.unwrap();
    let mut greedy = batch("greedy", 3);
    greedy.capacity_group = "small".into();
    let err = client.create_job(greedy.clone()).await.expect_err("over quota");
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("capacity_group") && m.contains("quota")),
        "{err}"
    );
    assert_eq!(client.find_jobs(&[("appName", "greedy")], 10, "").await.unwrap().items.len(), 0);
    if let Some(pb::job_descriptor::JobType::Batch(b)) = greedy.job_type.as_mut() {
        b.size = 2;
    }
    client.create_job(greedy).await.expect("within quota");

    // A batch job runs to completion through its tasks' reported states.
    let b = client.create_job(batch("crunch", 2)).await.unwrap();
    let tasks = wait_live(&client, &b, 2).await;
    let indexes: BTreeSet<u32> = tasks.iter().map(|t| t.index).collect();
    assert_eq!(indexes, BTreeSet::from([0, 1]));
    for t in &tasks {
        client
            .report_task_status(&t.id, pb::TaskState::TaskLaunched, "", &[("agent", "agent-1"), ("zone", "us-east-1a")])
            .await
            .unwrap();
        client.report_task_status(&t.id, pb::TaskState::TaskStarted, "", &[("containerIp", "10.0.0.7")]).await.unwrap();
    }
    let started = client.find_task(&tasks[0].id).await.unwrap();
    assert_eq!(started.task_context.get("zone").map(String::as_str), Some("us-east-1a"));
    assert_eq!(started.status_history.len(), 2);
    // An illegal transition is refused.
    let err =
        client.report_task_status(&tasks[0].id, pb::TaskState::TaskLaunched, "", &[]).await.expect_err("backwards");
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    for t in &tasks {
        client.report_task_status(&t.id, pb::TaskState::TaskFinished, "normal", &[]).await.unwrap();
    }
    let finished = wait_until(SETTLE, "batch job finished", || async {
        client.find_job(&b).await.ok().filter(|j| state(j) == pb::JobState::JobFinished)
    })
    .await;
    assert_eq!(finished.status.unwrap().reason_code, "normal");
    let archived = client.find_task(&tasks[1].id).await.expect("archived task is still findable");
    assert!(archived.archived);
    assert_eq!(
        client.find_jobs(&[("jobState", "Finished"), ("appName", "crunch")], 10, "").await.unwrap().items.len(),
        1
    );

    // A service job follows desired; processes, status, attributes, shrink.
    let s = client.create_job(service("web", 1, 3, 5)).await.unwrap();
    wait_live(&client, &s, 3).await;
    // ObserveJob: the job and its tasks, the marker, then its changes as they commit.
    let mut one = client.observe_job(&s);
    let (mut jobs_seen, mut tasks_seen) = (0, 0);
    loop {
        match one.next().await.unwrap().notification.unwrap() {
            Notification::JobUpdate(u) => {
                assert_eq!(u.job.unwrap().id, s);
                jobs_seen += 1;
            }
            Notification::TaskUpdate(u) => {
                assert_eq!(u.task.unwrap().job_id, s);
                tasks_seen += 1;
            }
            Notification::SnapshotEnd(e) => {
                assert!(!e.resumed);
                break;
            }
        }
    }
    assert_eq!((jobs_seen, tasks_seen), (1, 3));
    client.update_job_capacity(&s, None, Some(5), None).await.unwrap();
    let desired = loop {
        if let Some(Notification::JobUpdate(u)) = one.next().await.unwrap().notification {
            let Some(pb::job_descriptor::JobType::Service(spec)) = u.job.unwrap().job_descriptor.unwrap().job_type
            else {
                unreachable!()
            };
            break spec.capacity.unwrap().desired;
        }
    };
    assert_eq!(desired, 5);
    wait_live(&client, &s, 5).await;
    client.update_job_capacity(&s, None, Some(2), None).await.unwrap();
    let two = wait_live(&client, &s, 2).await;
    let err = client.update_job_capacity(&s, Some(4), None, None).await.expect_err("min above desired");
    assert_eq!(err.violations()[0].field, "capacity", "{err}");
    client.update_job_processes(&s, true, false).await.unwrap();
    let err = client.update_job_capacity(&s, None, Some(3), None).await.expect_err("increase disabled");
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    client.update_job_processes(&s, false, false).await.unwrap();
    client.kill_task(&two[0].id, true, false).await.unwrap();
    let job = client.find_job(&s).await.unwrap();
    let Some(pb::job_descriptor::JobType::Service(spec)) = job.job_descriptor.unwrap().job_type else {
        panic!("not a service job")
    };
    assert_eq!((spec.capacity.unwrap().desired, spec.capacity.unwrap().min), (1, 1));
    wait_live(&client, &s, 1).await;
    client.update_job_status(&s, false).await.unwrap();
    client.update_job_capacity(&s, None, Some(3), None).await.unwrap();
    assert_eq!(live_tasks(&client, &s).await.len(), 1, "a disabled job must not grow");
    client.update_job_attributes(&s, &[("team", "edge"), ("tier", "1")]).await.unwrap();
    assert_eq!(client.find_jobs(&[("attributes", "team:edge")], 10, "").await.unwrap().items.len(), 1);
    client.delete_job_attributes(&s, &["tier"]).await.unwrap();
    let attrs = client.find_job(&s).await.unwrap().job_descriptor.unwrap().attributes;
    assert_eq!(attrs.keys().collect::<Vec<_>>(), ["team"]);
    let err = client.update_job_attributes(&s, &[("titus.agent", "x")]).await.expect_err("reserved");
    assert_eq!(err.violations()[0].field, "attributes.titus.agent");

    // Filters and pages.
    assert_eq!(client.find_jobs(&[("jobType", "SERVICE")], 10, "").await.unwrap().items.len(), 1);
    let err = client.find_jobs(&[("colour", "blue")], 10, "").await.expect_err("unknown filter");
    assert_eq!(err.violations()[0].field, "filtering_criteria.colour");
    for i in 0..5 {
        client.create_job(batch(&format!("paged-{i}"), 1)).await.unwrap();
    }
    let mut ids = HashSet::new();
    let mut cursor = String::new();
    loop {
        let page = client.find_jobs(&[("jobState", "Accepted")], 2, &cursor).await.unwrap();
        assert!(page.items.len() <= 2);
        ids.extend(page.items.into_iter().map(|j| j.id));
        let p = page.pagination.unwrap();
        if !p.has_more {
            break;
        }
        cursor = p.cursor;
    }
    assert_eq!(ids.len(), 7, "greedy + web + 5 paged jobs are Accepted");

    // Killing a job kills its tasks and finishes it.
    client.kill_job(&s).await.unwrap();
    wait_until(SETTLE, "killed job finished", || async {
        client.find_job(&s).await.ok().filter(|j| state(j) == pb::JobState::JobFinished)
    })
    .await;
    let err = client.find_job("no-such-job").await.expect_err("missing job");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t110_create_job_retried_with_the_same_token_across_a_leader_kill_makes_one_job() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let client = c.client();
    let token = "deploy-42";
    // The first call races the leader's death: its outcome may be unknown to the client.
    let racing = {
        let client = client.clone();
        tokio::spawn(async move { client.create_job_with_token(batch("once", 1), token).await })
    };
    c.kill(leader);
    let first = racing.await.unwrap();
    c.wait_for_leader(ELECTION).await;
    let retried = client.create_job_with_token(batch("once", 1), token).await.expect("retry after failover");
    if let Ok(id) = first {
        assert_eq!(id, retried, "the same token must return the same job");
    }
    let again = client.create_job_with_token(batch("once", 1), token).await.unwrap();
    assert_eq!(again, retried);
    let jobs = client.find_jobs(&[("appName", "once")], 10, "").await.unwrap();
    assert_eq!(jobs.items.len(), 1, "exactly one job per token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t120_observe_resumes_across_a_leader_kill_without_gaps_or_duplicates() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let writer = c.client();
    let before = writer.create_job(service("before", 0, 2, 4)).await.unwrap();
    wait_live(&writer, &before, 2).await;

    // The observer starts on the leader, which is about to die.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let seeds = [c.replica(leader).api_addr.clone(), c.replica(follower).api_addr.clone()];
    let observer_client =
        Client::with_options(seeds.iter(), ClientOptions { shuffle_seeds: false, ..ClientOptions::default() }).unwrap();
    let mut observer = observer_client.observe_jobs(&[]);

    let mut seen_tasks: HashSet<String> = HashSet::new();
    let mut seen = HashSet::new();
    let mut snapshot_ends = Vec::new();
    let mut last_revision = 0;
    let mut record = |n: pb::JobChangeNotification, seen_tasks: &mut HashSet<String>, snapshot_ends: &mut Vec<bool>| {
        let key = match n.notification.clone().unwrap() {
            Notification::JobUpdate(u) => format!("job:{}:{}", u.job.unwrap().id, n.revision),
            Notification::TaskUpdate(u) => {
                let t = u.task.unwrap();
                seen_tasks.insert(t.id.clone());
                format!("task:{}:{}:{}", t.id, t.status.unwrap().state, n.revision)
            }
            Notification::SnapshotEnd(e) => {
                snapshot_ends.push(e.resumed);
                format!("end:{}:{}", n.revision, snapshot_ends.len())
            }
        };
        assert!(seen.insert(key.clone()), "duplicate notification {key}");
        assert!(n.revision >= last_revision, "revision went backwards: {} after {last_revision}", n.revision);
        last_revision = n.revision;
    };
    loop {
        let n = observer.next().await.expect("snapshot");
        let end = matches!(n.notification, Some(Notification::SnapshotEnd(_)));
        record(n, &mut seen_tasks, &mut snapshot_ends);
        if end {
            break;
        }
    }
    assert_eq!(snapshot_ends, [false]);
    assert_eq!(seen_tasks.len(), 2, "the snapshot carries the existing tasks");

    c.kill(leader);
    c.wait_for_leader(ELECTION).await;
    let after = writer.create_job(service("after", 0, 3, 4)).await.unwrap();
    let after_tasks: HashSet<String> = wait_live(&writer, &after, 3).await.into_iter().map(|t| t.id).collect();

    // The observer reconnects to a live replica by itself and resumes from its last revision.
    let deadline = std::time::Instant::now() + SETTLE;
    while !after_tasks.is_subset(&seen_tasks) {
        assert!(std::time::Instant::now() < deadline, "observer never saw the new job's tasks");
        let n =
            tokio::time::timeout(SETTLE, observer.next()).await.expect("observer stalled").expect("observer failed");
        record(n, &mut seen_tasks, &mut snapshot_ends);
    }
    assert_eq!(snapshot_ends, [false, true], "the stream must resume (not restart) on another replica");
}
