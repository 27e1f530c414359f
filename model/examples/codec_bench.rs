//! Encodes and decodes the records the control plane writes most — a Started task with its
//! history and context, a service job, a batch of agent status reports — in each codec version,
//! and prints bytes and time per record:
//!
//!     cargo run --release -p titus-model --example codec_bench [ITERATIONS]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use titus_model::codec::{self, JSON, MSGPACK};
use titus_model::command::{Command, StatusReport};
use titus_model::convert::job_descriptor_from_proto;
use titus_model::job::{Job, JobState, JobStatus};
use titus_model::task::{Task, TaskState, TaskStatus};
use titus_proto as pb;

fn status(state: TaskState, at: i64) -> TaskStatus {
    TaskStatus { state, reason_code: "normal".into(), reason_message: String::new(), timestamp_ms: at }
}

fn task() -> Task {
    let t0 = 1_796_000_000_000;
    Task {
        id: "3f1c2a9e-5b7d-4c1e-9a0b-6d2e8f4a1c3b".into(),
        job_id: "9d8e7f6a-1b2c-4d3e-8f9a-0b1c2d3e4f5a".into(),
        index: 17,
        status: status(TaskState::Started, t0 + 900),
        status_history: [TaskState::Accepted, TaskState::Launched, TaskState::StartInitiated]
            .into_iter()
            .enumerate()
            .map(|(i, s)| status(s, t0 + 300 * i as i64))
            .collect(),
        context: BTreeMap::from([
            ("agent".to_string(), "agent-0042".to_string()),
            ("host".to_string(), "ip-10-0-12-34.ec2.internal".to_string()),
            ("zone".to_string(), "us-east-1a".to_string()),
            ("instanceId".to_string(), "i-0abc123def4567890".to_string()),
            ("containerIp".to_string(), "10.0.12.201".to_string()),
            ("taskIndex".to_string(), "17".to_string()),
        ]),
        original_id: "3f1c2a9e-5b7d-4c1e-9a0b-6d2e8f4a1c3b".into(),
        resubmit_of: None,
        resubmit_number: 0,
        system_resubmit_number: 0,
        resources: None,
        attributes: Default::default(),
    }
}

fn job() -> Job {
    let descriptor = pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: "team@example.com".into() }),
        application_name: "web".into(),
        capacity_group: "web-critical".into(),
        attributes: [("team".to_string(), "payments".to_string())].into_iter().collect(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources { cpu: 1.5, memory_mb: 512, disk_mb: 1024, ..Default::default() }),
            image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["sleep".into(), "3600".into()],
            env: (0..8).map(|i| (format!("VAR_{i}"), format!("value-{i}"))).collect(),
            ..Default::default()
        }),
        job_type: Some(pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
            capacity: Some(pb::Capacity { min: 1, desired: 20, max: 40 }),
            enabled: true,
            ..Default::default()
        })),
        ..Default::default()
    };
    let status = JobStatus {
        state: JobState::Accepted,
        reason_code: "normal".into(),
        reason_message: String::new(),
        timestamp_ms: 1,
    };
    Job {
        id: "9d8e7f6a-1b2c-4d3e-8f9a-0b1c2d3e4f5a".into(),
        descriptor: job_descriptor_from_proto(Some(descriptor)).expect("a valid descriptor"),
        status,
        status_history: Vec::new(),
        rollout: Default::default(),
        evictions_ms: Vec::new(),
    }
}

fn reports() -> Command {
    let t = task();
    Command::UpdateTaskStatuses {
        reports: (0..100)
            .map(|i| StatusReport {
                task_id: format!("{}-{i}", t.id),
                agent_id: "agent-0042".into(),
                status: status(TaskState::Started, 1_796_000_000_000 + i),
                context: BTreeMap::from([("containerIp".to_string(), format!("10.0.12.{i}"))]),
            })
            .collect(),
    }
}

/// Bytes, ns to encode, ns to decode.
fn measure<T>(version: u8, value: &T, iterations: u32) -> (usize, f64, f64)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = codec::encode_as(version, value).expect("encodes");
    let t = Instant::now();
    for _ in 0..iterations {
        black_box(codec::encode_as(version, black_box(value)).expect("encodes"));
    }
    let encode = t.elapsed().as_nanos() as f64 / f64::from(iterations);
    let t = Instant::now();
    for _ in 0..iterations {
        black_box(codec::decode::<T>(black_box(&bytes)).expect("decodes"));
    }
    let decode = t.elapsed().as_nanos() as f64 / f64::from(iterations);
    (bytes.len(), encode, decode)
}

fn row<T>(name: &str, value: &T, iterations: u32)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let (jb, je, jd) = measure(JSON, value, iterations);
    let (mb, me, md) = measure(MSGPACK, value, iterations);
    println!(
        "{name:<24} v1 {jb:>6} B {je:>9.0} ns enc {jd:>9.0} ns dec | v2 {mb:>6} B {me:>9.0} ns enc {md:>9.0} ns dec | v2/v1 bytes {:.2} enc {:.2} dec {:.2}",
        mb as f64 / jb as f64,
        me / je,
        md / jd
    );
}

fn main() {
    let iterations: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    println!("codec_bench: {iterations} iterations per figure");
    row("task (Started)", &task(), iterations);
    row("job (service)", &job(), iterations);
    row("100 status reports", &reports(), iterations / 50);
}
