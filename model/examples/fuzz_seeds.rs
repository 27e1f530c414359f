//! Writes the fuzz targets' seed inputs (valid examples the fuzzer mutates from) into
//! `fuzz/corpus/<target>/seed-*`: `cargo run -p titus-model --example fuzz_seeds`.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use titus_model::codec;
use titus_model::command::{AuditRecord, Command};
use titus_model::convert::job_descriptor_from_proto;
use titus_model::job::{Job, JobState, JobStatus};
use titus_model::raft_types::{Entry, LogId};
use titus_proto as pb;

fn descriptor(service: bool) -> pb::JobDescriptor {
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: "team@example.com".into() }),
        application_name: "web".into(),
        capacity_group: "web-critical".into(),
        attributes: [("team".to_string(), "a".to_string())].into_iter().collect(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources { cpu: 1.5, memory_mb: 512, disk_mb: 1024, ..Default::default() }),
            image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["sleep".into(), "10".into()],
            env: [("A".to_string(), "1".to_string())].into_iter().collect(),
            ..Default::default()
        }),
        job_type: Some(if service {
            pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
                capacity: Some(pb::Capacity { min: 1, desired: 2, max: 4 }),
                enabled: true,
                ..Default::default()
            })
        } else {
            pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size: 3, ..Default::default() })
        }),
        ..Default::default()
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut jobs = Vec::new();
    for (i, service) in [false, true].into_iter().enumerate() {
        let d = descriptor(service);
        let request = pb::CreateJobRequest { job_descriptor: Some(d.clone()), idempotency_token: "t-1".into() };
        write(&root.join("job_descriptor"), &format!("seed-{i}"), &request.encode_to_vec());
        jobs.push(job_descriptor_from_proto(Some(d)).expect("the seed descriptors are valid"));
    }
    let status = JobStatus {
        state: JobState::Accepted,
        reason_code: "normal".into(),
        reason_message: String::new(),
        timestamp_ms: 1,
    };
    let commands = vec![
        Command::CreateJob {
            job: Job {
                id: "j-1".into(),
                descriptor: jobs[1].clone(),
                status,
                status_history: Vec::new(),
                rollout: Default::default(),
                evictions_ms: Vec::new(),
            },
            idempotency_token: Some("t-1".into()),
            token_expires_ms: 100,
        },
        Command::UpdateJobCapacity { job_id: "j-1".into(), min: Some(1), desired: None, max: Some(9) },
        Command::UpdateJobAttributes { job_id: "j-1".into(), attributes: BTreeMap::from([("k".into(), "v".into())]) },
        Command::KillTask { task_id: "t-1".into(), shrink: true, prevent_min_size_update: false, timestamp_ms: 5 },
        Command::RestoreRecords {
            restore_id: "r".into(),
            family: "jobs".into(),
            records: vec![(b"k".to_vec(), b"v".to_vec())],
        },
        Command::AppendAudit {
            records: vec![AuditRecord {
                time_ms: 1,
                caller: "client/alice".into(),
                method: "/titus.JobManagementService/KillJob".into(),
                target: "job j-1".into(),
                code: "PermissionDenied".into(),
                message: "rule job-owner".into(),
                replica: 1,
                request_id: "r-1".into(),
            }],
            keep: 10,
            batch_id: "b-1".into(),
        },
    ];
    for (i, command) in commands.into_iter().enumerate() {
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), 10 + i as u64),
            payload: openraft::EntryPayload::Normal(command),
        };
        write(&root.join("raft_entry"), &format!("seed-{i}"), &codec::encode_as(codec::JSON, &entry).unwrap());
        write(&root.join("raft_entry"), &format!("seed-{i}-v2"), &codec::encode_as(codec::MSGPACK, &entry).unwrap());
    }
    let blank =
        Entry { log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 1), payload: openraft::EntryPayload::Blank };
    write(&root.join("raft_entry"), "seed-blank", &codec::encode_as(codec::JSON, &blank).unwrap());
    write(&root.join("raft_entry"), "seed-blank-v2", &codec::encode_as(codec::MSGPACK, &blank).unwrap());
    let agent_messages = [
        pb::agent_message::Message::Register(pb::AgentRegister {
            agent_id: "agent-1".into(),
            instance_group: "default".into(),
            resources: Some(pb::AgentResources {
                cpu: 4.0,
                memory_mb: 8192,
                disk_mb: 10_000,
                network_mbps: 1000,
                gpu: 0,
            }),
            attributes: [("zone".to_string(), "us-east-1a".to_string())].into_iter().collect(),
            ..Default::default()
        }),
        pb::agent_message::Message::Status(pb::AgentTask {
            task_id: "t-1".into(),
            state: pb::TaskState::TaskFinished as i32,
            reason_code: "failed".into(),
            reason_message: "exited with code 1".into(),
            task_context: [
                ("containerIp".to_string(), "172.17.0.2".to_string()),
                ("exitCode".to_string(), "1".to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }),
        pb::agent_message::Message::Heartbeat(pb::AgentHeartbeat { healthy: false, unhealthy_reason: "docker".into() }),
    ];
    for (i, m) in agent_messages.into_iter().enumerate() {
        let bytes = pb::AgentMessage { message: Some(m) }.encode_to_vec();
        write(&root.join("agent_message"), &format!("seed-{i}"), &bytes);
    }
    println!("seeds written under {}", root.display());
}
