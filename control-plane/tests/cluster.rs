//! Cluster tests: real replica processes, real RocksDB, real gRPC on loopback.
//! Numbered by area: t10 bootstrap and restart, t20 replication and failover, t30 snapshots and
//! membership, t40 quorum loss, t50 bad input.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{group, wait_until, Cluster};
use titus_client::proto::capacity_group_service_client::CapacityGroupServiceClient;
use titus_client::proto::CreateCapacityGroupRequest;
use titus_client::{ClientOptions, Error, MemberRole, ReadConsistency};

const ELECTION: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_three_replicas_bootstrap_once_and_survive_a_full_restart() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let status = c.status_of(leader).await.expect("leader status");
    let cluster_id = status.cluster_id.clone();
    assert_eq!(status.members.len(), 3);
    for id in 1..=3 {
        assert_eq!(c.status_of(id).await.unwrap().cluster_id, cluster_id, "replica {id} has another cluster id");
    }

    let client = c.client();
    for i in 0..20 {
        client.create_capacity_group(group(&format!("g{i}"))).await.expect("create");
    }

    // Every replica stopped gracefully at once, then started again.
    for id in 1..=3 {
        assert!(c.terminate(id).success(), "replica {id} did not exit cleanly on SIGTERM");
    }
    for id in 1..=3 {
        c.start_replica(id);
    }
    let leader = c.wait_for_leader(ELECTION).await;
    let status = c.status_of(leader).await.unwrap();
    assert_eq!(status.cluster_id, cluster_id, "a restart must never re-initialize the cluster");
    let names: BTreeSet<String> = c
        .client()
        .list_capacity_groups(ReadConsistency::Linearizable)
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, (0..20).map(|i| format!("g{i}")).collect::<BTreeSet<_>>());

    // And after a kill -9 of all of them: nothing acknowledged is lost.
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.start_replica(id);
    }
    c.wait_for_leader(ELECTION).await;
    let after = c.client().list_capacity_groups(ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(after.len(), 20);
    assert_eq!(c.status_of(1).await.unwrap().cluster_id, cluster_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_write_via_follower_is_read_everywhere_and_survives_leader_kill() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();

    // A client that knows only a follower: the write is forwarded to the leader.
    let created =
        c.client_of(follower).create_capacity_group(group("via-follower")).await.expect("write through a follower");
    assert!(created.create_time_ms > 0);
    for id in 1..=3 {
        let g = c
            .client_of(id)
            .get_capacity_group("via-follower", ReadConsistency::Linearizable)
            .await
            .unwrap_or_else(|e| panic!("replica {id}: {e}"));
        assert_eq!(g, created, "replica {id} returned a different record");
    }

    let client = c.client();
    let mut acked = vec!["via-follower".to_string()];
    for i in 0..30 {
        let name = format!("before-kill-{i}");
        client.create_capacity_group(group(&name)).await.expect("create");
        acked.push(name);
    }

    c.kill(leader);
    let start = Instant::now();
    let new_leader = c.wait_for_leader(ELECTION).await;
    assert_ne!(new_leader, leader);
    eprintln!("new leader {new_leader} after {:?}", start.elapsed());
    for i in 0..10 {
        let name = format!("after-kill-{i}");
        client.create_capacity_group(group(&name)).await.expect("write after failover");
        acked.push(name);
    }
    let names: BTreeSet<String> =
        client.list_capacity_groups(ReadConsistency::Linearizable).await.unwrap().into_iter().map(|g| g.name).collect();
    for name in &acked {
        assert!(names.contains(name), "acknowledged write {name} lost after leader kill");
    }

    // The killed replica comes back and catches up.
    c.start_replica(leader);
    let target = c.status_of(new_leader).await.unwrap().last_applied_index;
    c.wait_applied(leader, target, ELECTION).await;
    let on_restarted = c.client_of(leader).list_capacity_groups(ReadConsistency::Stale).await.unwrap();
    assert_eq!(on_restarted.len(), acked.len(), "restarted replica did not catch up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_replaced_replica_catches_up_from_a_snapshot() {
    let mut c = Cluster::start(
        3,
        &["--snapshot-after-entries", "50", "--keep-entries-after-snapshot", "0", "--keep-log-seconds", "0"],
    );
    let leader = c.wait_for_leader(ELECTION).await;
    let victim = (1..=3).rev().find(|id| *id != leader).unwrap();
    let client = c.client();
    for i in 0..150 {
        client.create_capacity_group(group(&format!("g{i}"))).await.expect("create");
    }
    // The log behind a snapshot is purged: a fresh replica cannot catch up from the log alone.
    let status = wait_until(ELECTION, "a snapshot on the leader", || async {
        c.status_of(leader).await.filter(|s| s.snapshot_index >= 100)
    })
    .await;
    assert!(status.snapshot_index >= 100, "{status:?}");

    // The replica dies and its disk is lost; replace it with a new replica.
    c.kill(victim);
    c.wipe(victim);
    let removed = client.remove_member(victim).await.expect("remove dead replica");
    assert!(removed.members.iter().all(|m| m.node_id != victim));
    let (peer, api) = c.spawn_joiner(9);
    let added = client.add_member(9, &peer, &api).await.expect("add replacement");
    assert_eq!(common::role_of(&added, 9), Some(MemberRole::Follower), "{added:?}");

    let target = c.status_of(leader).await.unwrap().last_applied_index;
    let joined = c.wait_applied(9, target, ELECTION).await;
    assert!(joined.snapshot_index > 0, "the new replica should have installed a snapshot: {joined:?}");
    assert!(c.log_of(9).contains("installed snapshot"), "the new replica caught up from the log, not a snapshot");
    let groups = c.client_of(9).list_capacity_groups(ReadConsistency::Stale).await.unwrap();
    assert_eq!(groups.len(), 150);
    assert_eq!(joined.cluster_id, c.status_of(leader).await.unwrap().cluster_id);

    // The new member counts toward the quorum: with the old leader gone, writes still commit.
    c.kill(leader);
    c.wait_for_leader(ELECTION).await;
    c.client()
        .create_capacity_group(group("after-replacement"))
        .await
        .expect("write with the replacement in the quorum");
}

/// The log behind a snapshot is kept for `raft.keep-log-seconds` (30 s by default) whatever the
/// entries: a follower away for a few seconds while the leader wrote past several snapshots catches
/// up from the log, not by a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_a_follower_away_for_seconds_catches_up_from_the_log_past_several_snapshots() {
    // A snapshot every 50 entries and no entries kept by count: only the time window keeps the log
    // (5 minutes: far longer than the test takes on a loaded machine).
    let mut c = Cluster::start(
        3,
        &["--snapshot-after-entries", "50", "--keep-entries-after-snapshot", "0", "--keep-log-seconds", "300"],
    );
    let leader = c.wait_for_leader(ELECTION).await;
    let away = (1..=3).rev().find(|id| *id != leader).unwrap();
    let client = c.client();
    c.kill(away);
    for i in 0..200 {
        client.create_capacity_group(group(&format!("g{i}"))).await.expect("create");
    }
    wait_until(ELECTION, "snapshots on the leader", || async {
        c.status_of(leader).await.filter(|s| s.snapshot_index >= 150)
    })
    .await;
    c.start_replica(away);
    let target = c.status_of(leader).await.unwrap().last_applied_index;
    c.wait_applied(away, target, ELECTION).await;
    assert!(!c.log_of(away).contains("installed snapshot"), "the follower took a snapshot, not the log");
    let groups = c.client_of(away).list_capacity_groups(ReadConsistency::Stale).await.unwrap();
    assert_eq!(groups.len(), 200);
}

/// A follower whose disk was lost comes back under its own id with an empty data dir. The leader
/// had it matched far along; its log now answers that nothing matches. The leader starts that
/// follower over (openraft's `loosen-follower-log-revert`) instead of panicking its Raft core —
/// which stalled the placement benchmark for good after its follower wipe — and keeps leading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t33_a_follower_back_with_an_empty_disk_is_caught_up_and_the_leader_keeps_leading() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let victim = (1..=3).rev().find(|id| *id != leader).unwrap();
    let client = c.client();
    for i in 0..50 {
        client.create_capacity_group(group(&format!("g{i}"))).await.expect("create");
    }
    let target = c.status_of(leader).await.unwrap().last_applied_index;
    c.wait_applied(victim, target, ELECTION).await;
    let term = c.status_of(leader).await.unwrap().term;

    c.kill(victim);
    c.wipe(victim);
    c.start_replica(victim);
    for i in 50..100 {
        client.create_capacity_group(group(&format!("g{i}"))).await.expect("create with a follower starting over");
    }
    let target = c.status_of(leader).await.unwrap().last_applied_index;
    c.wait_applied(victim, target, ELECTION).await;
    let groups = c.client_of(victim).list_capacity_groups(ReadConsistency::Stale).await.unwrap();
    assert_eq!(groups.len(), 100, "the follower holds every record again");
    let now = c.status_of(leader).await.unwrap();
    assert_eq!((now.leader_id, now.term), (leader, term), "the leader led throughout");
    assert!(!c.log_of(leader).contains("panicked"), "the leader's log shows a panic");
}

/// A large state reaches a replacement replica as a streamed snapshot: the leader writes it to a
/// file from a RocksDB snapshot, openraft sends it in 4 MiB chunks, the joiner writes the chunks
/// to a file and installs it in bounded batches. The joiner's peak memory stays well under the
/// snapshot's size (the previous release held it whole, decoded it whole and wrote it in one
/// batch: about three times its size), and the cluster keeps its leader throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_a_large_snapshot_streams_to_a_new_replica_in_bounded_memory() {
    const JOBS: usize = 1_300;
    const WRITERS: usize = 6;
    // Nothing kept behind a snapshot: the joiner cannot catch up from the log.
    let mut c = Cluster::start(
        3,
        &["--snapshot-after-entries", "1000", "--keep-entries-after-snapshot", "0", "--keep-log-seconds", "0"],
    );
    let leader = c.wait_for_leader(ELECTION).await;
    let client = c.client();
    // Jobs of ~200 KiB each (50 environment values of 4,000 bytes that do not compress).
    let big_job = |n: usize| {
        let mut d = common::sleeping_service(&format!("big{n}"), 0.1, 16, 0);
        let env = d.container.as_mut().map(|c| &mut c.env).expect("container");
        for k in 0..50 {
            let value: String =
                (0..4_000).map(|i| char::from(b'a' + ((n * 7919 + k * 104_729 + i * 31) % 26) as u8)).collect();
            env.insert(format!("V{k}"), value);
        }
        d
    };
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let client = client.clone();
        let jobs: Vec<_> = (w..JOBS).step_by(WRITERS).map(big_job).collect();
        writers.spawn(async move {
            let mut ids = Vec::new();
            for job in jobs {
                ids.push(client.create_job(job).await.expect("create a large job"));
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = writers.join_next().await {
        ids.extend(done.expect("writer"));
    }
    // Small writes until a snapshot covers every large entry: the joiner then gets all of them
    // from the snapshot, and the log after it is small (so what is measured is the install).
    let large_until = c.status_of(leader).await.unwrap().last_applied_index;
    let mut small = 0;
    let status = wait_until(Duration::from_secs(120), "a snapshot of every large job on the leader", || {
        small += 1;
        let (client, name) = (client.clone(), format!("small{small}"));
        let status = c.status_of(leader);
        async move {
            for i in 0..20 {
                client.create_capacity_group(group(&format!("{name}-{i}"))).await.expect("a small write");
            }
            status.await.filter(|s| s.snapshot_index >= large_until)
        }
    })
    .await;
    let snapshot_bytes: u64 = std::fs::read_dir(c.replica(leader).data_dir.join("snapshots"))
        .expect("the leader's snapshot directory")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    assert!(snapshot_bytes > 200 << 20, "the snapshot is {snapshot_bytes} bytes; the test needs a large one");

    let victim = (1..=3).find(|id| *id != leader).unwrap();
    c.kill(victim);
    c.wipe(victim);
    client.remove_member(victim).await.expect("remove dead replica");
    let (peer, api) = c.spawn_joiner(9);
    client.add_member(9, &peer, &api).await.expect("add replacement");
    client.create_capacity_group(group("after-install")).await.expect("a write with the joiner in the quorum");
    let target = c.status_of(leader).await.unwrap().last_applied_index;
    let joined = c.wait_applied(9, target, Duration::from_secs(120)).await;
    assert!(joined.snapshot_index >= status.snapshot_index, "{joined:?}");
    assert!(c.log_of(9).contains("installed snapshot"), "the joiner caught up without installing a snapshot");
    let peak = common::peak_rss_bytes(c.pid(9));
    assert!(
        peak < snapshot_bytes / 2,
        "the joiner peaked at {} MiB installing a {} MiB snapshot",
        peak >> 20,
        snapshot_bytes >> 20
    );
    assert_eq!(c.wait_for_leader(ELECTION).await, leader, "the leader changed while the snapshot streamed");
    // Point reads (a FindJobs here would decode every 200 KiB job: seconds of a debug build's CPU).
    let joiner = c.client_of(9);
    for id in [ids.first(), ids.last()].into_iter().flatten() {
        let job = joiner.find_job(id).await.expect("find on the joiner");
        assert_eq!(job.id, *id, "the joiner serves the snapshot's jobs");
    }
    eprintln!("t31: snapshot {} MiB, joiner peak RSS {} MiB", snapshot_bytes >> 20, peak >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_five_replicas_tolerate_two_losses_and_fail_fast_without_quorum() {
    let mut c = Cluster::start(5, &["--request-timeout-ms", "2000"]);
    let leader = c.wait_for_leader(ELECTION).await;
    let client = c.client();
    client.create_capacity_group(group("five")).await.expect("create");

    // Two down, one of them the leader: the other three keep accepting writes.
    let followers: Vec<u64> = (1..=5).filter(|id| *id != leader).collect();
    c.kill(leader);
    c.kill(followers[0]);
    c.wait_for_leader(ELECTION).await;
    for i in 0..5 {
        client.create_capacity_group(group(&format!("two-down-{i}"))).await.expect("write with two replicas down");
    }

    // Three down: no majority. A write fails with UNAVAILABLE within its deadline, never hangs.
    c.kill(followers[1]);
    let deadline = Duration::from_secs(6);
    let short =
        c.client_with(ClientOptions { deadline, attempt_timeout: Duration::from_secs(3), ..ClientOptions::default() });
    let start = Instant::now();
    let err = short.create_capacity_group(group("no-quorum")).await.expect_err("a write without quorum must fail");
    let took = start.elapsed();
    assert!(matches!(err, Error::Unavailable { .. }), "expected UNAVAILABLE, got {err}");
    assert!(took < deadline + Duration::from_secs(2), "took {took:?}, beyond its {deadline:?} deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_bad_input_names_the_field_and_duplicates_are_refused() {
    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let client = c.client();

    let mut bad = group("");
    bad.0.instance_count = 0;
    bad.0.resources_per_instance.as_mut().unwrap().cpu = -1.0;
    bad.0.resources_per_instance.as_mut().unwrap().memory_mb = 0;
    let err = client.create_capacity_group(bad).await.expect_err("invalid group accepted");
    let fields: Vec<&str> = err.violations().iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "group.name",
            "group.resources_per_instance.cpu",
            "group.resources_per_instance.memory_mb",
            "group.instance_count"
        ],
        "{err}"
    );

    let err = client.create_capacity_group(group("bad name!")).await.expect_err("bad name accepted");
    assert_eq!(err.violations()[0].field, "group.name");

    client.create_capacity_group(group("dup")).await.expect("first create");
    let err = client.create_capacity_group(group("dup")).await.expect_err("duplicate accepted");
    assert!(matches!(&err, Error::AlreadyExists(m) if m.contains("group.name")), "{err}");

    let err =
        client.get_capacity_group("missing", ReadConsistency::Linearizable).await.expect_err("missing group found");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let err = client.update_capacity_group(group("missing")).await.expect_err("update of a missing group");
    assert!(matches!(err, Error::NotFound(_)), "{err}");

    // A retried create with the same idempotency token returns the first result, not ALREADY_EXISTS.
    let mut raw = CapacityGroupServiceClient::connect(format!("http://{}", c.replica(2).api_addr)).await.unwrap();
    let req = CreateCapacityGroupRequest { group: Some(group("idem").0), idempotency_token: "token-1".into() };
    let first = raw.create_capacity_group(req.clone()).await.expect("first create").into_inner();
    let retried = raw.create_capacity_group(req).await.expect("retried create").into_inner();
    assert_eq!(first, retried);
    let other_token = CreateCapacityGroupRequest { group: Some(group("idem").0), idempotency_token: "token-2".into() };
    assert_eq!(raw.create_capacity_group(other_token).await.unwrap_err().code(), tonic::Code::AlreadyExists);

    // Update keeps the create time; delete removes; a second delete is NOT_FOUND.
    let before = client.get_capacity_group("dup", ReadConsistency::Linearizable).await.unwrap();
    let mut bigger = group("dup");
    bigger.0.instance_count = 42;
    let after = client.update_capacity_group(bigger).await.unwrap();
    assert_eq!((after.instance_count, after.create_time_ms), (42, before.create_time_ms));
    client.delete_capacity_group("dup").await.unwrap();
    assert!(matches!(client.delete_capacity_group("dup").await, Err(Error::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_health_and_reflection_answer_on_the_api_port() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let url = format!("http://{}", c.replica(2).api_addr);

    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "titus.CapacityGroupService", "titus.ClusterService"] {
        let s = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(s.status, ServingStatus::Serving as i32, "health of {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().expect("a reflection reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["titus.CapacityGroupService", "titus.ClusterService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[test]
fn t60_startup_errors_are_one_clear_line() {
    use common::run_to_exit;
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("data");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let free = |_: ()| format!("127.0.0.1:{}", common::free_port());
    let args = |node: u64, peer: &str, api: &str| -> Vec<String> {
        vec![
            "--node-id".into(),
            node.to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--peer-listen".into(),
            peer.into(),
            "--api-listen".into(),
            api.into(),
            "--insecure".into(),
        ]
    };
    let within = Duration::from_secs(20);

    let (status, err) = run_to_exit(&args(0, &free(()), &free(())), within);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("node-id: must be > 0"), "{err}");

    let (status, err) = run_to_exit(&args(1, &free(()), &busy_addr), within);
    assert!(!status.success());
    assert!(err.contains(&format!("api-listen {busy_addr}: address already in use")), "{err}");

    // The data dir now belongs to replica 1: wait until it serves (its node id is recorded by then).
    let (peer, api) = (free(()), free(()));
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_titus-control-plane"))
        .args(args(1, &peer, &api))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = runtime.enter();
    let client = titus_client::Client::connect([api.as_str()]).unwrap();
    runtime.block_on(wait_until(within, "replica 1 serving", || async { client.cluster_status_of(&api).await.ok() }));
    let (status, err) = run_to_exit(&args(2, &free(()), &free(())), within);
    assert!(!status.success());
    assert!(err.contains("is in use by another process"), "{err}");
    first.kill().unwrap();
    first.wait().unwrap();
    let (status, err) = run_to_exit(&args(2, &free(()), &free(())), within);
    assert!(!status.success());
    assert!(err.contains("belongs to replica 1, not to node-id 2"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_a_replica_of_another_cluster_is_refused_and_cannot_disrupt() {
    let mut a = Cluster::start(3, &[]);
    let mut b = Cluster::start(3, &[]);
    a.wait_for_leader(ELECTION).await;
    let b_leader = b.wait_for_leader(ELECTION).await;
    let a_id = a.status_of(1).await.unwrap().cluster_id;
    let b_id = b.status_of(b_leader).await.unwrap().cluster_id;
    assert_ne!(a_id, b_id);
    a.client().create_capacity_group(group("only-in-a")).await.unwrap();

    // B's replica 3 is started on a copy of A's replica 3 data dir (same node id, wrong cluster).
    let intruder = 3;
    a.kill(intruder);
    b.kill(intruder);
    b.transplant_data_from(&a, intruder, intruder);
    b.start_replica(intruder);

    let client = b.client_with(ClientOptions { deadline: Duration::from_secs(20), ..ClientOptions::default() });
    for i in 0..10 {
        client.create_capacity_group(group(&format!("b-{i}"))).await.expect("B keeps working with two good replicas");
    }
    wait_until(ELECTION, "the intruder to refuse B's messages", || async {
        b.log_of(intruder).contains("another cluster").then_some(())
    })
    .await;
    let s = b.status_of(intruder).await.expect("intruder answers");
    assert_eq!(s.cluster_id, a_id, "the intruder must keep its own cluster id");
    for id in [1, 2] {
        let s = b.status_of(id).await.unwrap();
        assert_eq!(s.cluster_id, b_id);
        assert!(s.leader_id != 0 && s.leader_id != intruder, "replica {id} follows {}", s.leader_id);
    }
    let groups = b.client_of(intruder).list_capacity_groups(ReadConsistency::Stale).await.unwrap();
    assert!(groups.iter().all(|g| !g.name.starts_with("b-")), "B's data leaked into a replica of A");
}
