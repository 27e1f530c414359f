//! The SDK against a real 3-replica cluster: a follower-only seed works; a stream of CreateJob
//! calls survives a leader kill with exactly one job per call.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::Cluster;
use titus_client::proto as pb;

const ELECTION: Duration = Duration::from_secs(30);

fn job(app: &str) -> pb::JobDescriptor {
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: "team@example.com".into() }),
        application_name: app.into(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources { cpu: 0.1, memory_mb: 16, ..Default::default() }),
            image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["true".into()],
            ..Default::default()
        }),
        job_type: Some(pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
            capacity: Some(pb::Capacity { min: 0, desired: 0, max: 1 }),
            enabled: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t300_a_follower_seed_works_and_200_creates_survive_a_leader_kill() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let via_follower = c.client_of(follower);
    let id = via_follower.create_job(job("follower-seed")).await.expect("create through a follower-only client");
    assert_eq!(via_follower.find_job(&id).await.unwrap().id, id);

    let client = c.client();
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..200 {
                ids.push(client.create_job(job("stream")).await.expect("CreateJob across the leader kill"));
            }
            ids
        })
    };
    // Kill the leader once the stream is under way.
    common::wait_until(ELECTION, "the first creates", || async {
        let n = client.find_jobs(&[("appName", "stream")], 1, "").await.ok()?.pagination?.total_items;
        (n >= 30).then_some(())
    })
    .await;
    c.kill(leader);
    let ids = writer.await.unwrap();
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 200, "every call returned its own job");
    let total = client.find_jobs(&[("appName", "stream")], 1, "").await.unwrap().pagination.unwrap().total_items;
    assert_eq!(total, 200, "exactly 200 jobs: no retry created a second one");
}
