//! openraft's storage conformance suite against the RocksDB store, plus durability checks of our own.

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::{LogStore, StateMachine};
use crate::raft_types::{StorageError, TypeConfig};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm, _) = super::open(dir.path(), 1).expect("open store");
        Ok((dir, log, sm))
    }
}

/// Applies `command` as the entry at log index `index` of term 1, answering its response.
pub(crate) fn apply_at(
    sm: &mut StateMachine,
    index: u64,
    command: crate::command::Command,
) -> crate::command::CommandResponse {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    let entry = crate::raft_types::Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(command),
    };
    let mut responses = futures::executor::block_on(sm.apply([entry])).expect("apply");
    assert_eq!(responses.len(), 1);
    responses.remove(0)
}

/// A one-instance Flex capacity group named `name`.
pub(super) fn capacity_group(name: &str) -> crate::model::CapacityGroup {
    use crate::model::{CapacityGroup, ResourceDimension, Tier};
    CapacityGroup {
        name: name.into(),
        tier: Tier::Flex,
        resources_per_instance: ResourceDimension {
            cpu: 1.0,
            memory_mb: 1024,
            disk_mb: 1024,
            network_mbps: 10,
            gpu: 0,
        },
        instance_count: 1,
        create_time_ms: 1,
        update_time_ms: 1,
        allowed_capabilities: Vec::new(),
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)?;
    Ok(())
}

#[test]
fn data_dir_of_another_replica_is_refused() {
    let dir = TempDir::new().unwrap();
    drop(super::open(dir.path(), 1).unwrap());
    let err = super::open(dir.path(), 2).err().expect("must refuse");
    assert!(err.to_string().contains("belongs to replica 1"), "{err}");
    assert!(super::open(dir.path(), 1).is_ok());
}

/// The by-agent index (what apply and the agent API read) against a scan of every task, and the
/// scheduler's change-fed cache against a fresh load, through placements, reports, a lost agent
/// and a rebuild of the index from scratch.
#[test]
fn the_agent_index_and_the_scheduler_cache_follow_every_change() {
    use std::collections::BTreeMap;

    use crate::command::{Assignment, Command};
    use crate::model::task::{TaskState, TaskStatus};
    use crate::scheduling::Cache;
    use crate::state::{agent_of, Allocation, StateRead};

    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    let (_, mut changes) = reader.changes.subscribe(None);
    let mut index = 0;
    let mut apply = |sm: &mut StateMachine, command: Command| {
        index += 1;
        apply_at(sm, index, command)
    };
    let status = |state: TaskState| TaskStatus {
        state,
        reason_code: String::new(),
        reason_message: String::new(),
        timestamp_ms: 1,
    };
    let expected = |read: &dyn StateRead| {
        let mut out: BTreeMap<String, Allocation> = BTreeMap::new();
        for t in read.all_tasks().unwrap() {
            let Some(agent) = agent_of(&t).filter(|_| t.state().is_live()) else { continue };
            let job = read.job(&t.job_id).unwrap().unwrap();
            let a = out.entry(agent.to_string()).or_default();
            a.resources.add(&job.descriptor.container.resources.as_dimension());
            a.live_tasks += 1;
        }
        out
    };

    let (job, tasks) = batch_job("job-1", "t", 12);
    apply(&mut sm, Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
    apply(&mut sm, Command::CreateTasks { tasks, archive: vec![] });
    for a in ["a1", "a2", "a3"] {
        apply(&mut sm, Command::RegisterAgent { agent: agent(a) });
    }
    // 12 tasks of 0.5 cpu offered to each of 3 agents of 1.5 cpus, one entry per agent: 3 fit on
    // each; the rest are refused when applied, whatever the plan said.
    for a in ["a1", "a2", "a3"] {
        let assignments = (0..12).map(|i| Assignment { task_id: format!("t{i:02}"), agent_id: a.into() }).collect();
        apply(&mut sm, Command::AssignTasks { assignments, timestamp_ms: 2 });
    }
    let got = reader.allocations().unwrap();
    assert_eq!(got, expected(&reader));
    assert_eq!(got.values().map(|a| a.live_tasks).collect::<Vec<_>>(), vec![3, 3, 3]);
    assert_eq!(reader.allocation_of("a2").unwrap(), got["a2"]);

    for (i, state) in [(0, TaskState::StartInitiated), (1, TaskState::Finished), (5, TaskState::Finished)] {
        apply(
            &mut sm,
            Command::UpdateTaskStatus {
                task_id: format!("t{i:02}"),
                status: status(state),
                context: Default::default(),
                expected_state: None,
            },
        );
    }
    apply(&mut sm, Command::AgentLost { agent_id: "a3".into(), timestamp_ms: 3 });
    let got = reader.allocations().unwrap();
    assert_eq!(got, expected(&reader));
    assert!(!got.contains_key("a3"), "a lost agent holds nothing: {got:?}");

    // The scheduler's cache, fed only by the change stream, equals one loaded from scratch.
    let mut fed = Cache::default();
    while let Ok(batch) = changes.try_recv() {
        for c in &batch.changes {
            fed.apply(c, &reader).unwrap();
        }
    }
    let loaded = Cache::load(&reader, vec![]).unwrap();
    assert_eq!(fed.summary(), loaded.summary());
    assert_eq!(loaded.pending(), 3);

    // A store (or snapshot) from before the index: rebuilt from the tasks.
    let family = super::cf_handle(&reader.db, super::cf::TASKS_BY_AGENT).unwrap();
    let keys: Vec<Box<[u8]>> =
        reader.db.iterator_cf(family, rocksdb::IteratorMode::Start).map(|kv| kv.unwrap().0).collect();
    for k in keys {
        reader.db.delete_cf(family, k).unwrap();
    }
    let meta = super::cf_handle(&reader.db, super::cf::SM_META).unwrap();
    assert_eq!(super::rebuild_agent_index(&reader.db).unwrap(), 0, "marked as built: not scanned again");
    reader.db.delete_cf(meta, super::cf::sm_meta::AGENT_INDEX).unwrap();
    assert!(reader.allocations().unwrap().is_empty());
    assert_eq!(super::rebuild_agent_index(&reader.db).unwrap(), 4);
    assert_eq!(reader.allocations().unwrap(), expected(&reader));

    // The counts kept on apply are what a scan counts.
    let counts = reader.counts();
    assert_eq!(counts, super::StateCounts::scan(&reader.db).unwrap());
    assert_eq!((counts.pending_tasks, counts.agents_online, counts.agents_lost), (3, 2, 1), "{counts:?}");
    assert_eq!(counts.tasks_in(TaskState::Launched), 3, "{counts:?}");
}

/// A rolling update that changes resources: each task holds what it was placed with — the old
/// tasks their 0.5 CPU, the new ones 1 CPU — in the by-agent index, the placement check at apply,
/// the scheduler's cache (fed and loaded) and a rebuilt index; an old-version task placed during
/// the deployment takes the old resources; new resources beyond the group's reservation are refused.
#[test]
fn a_rolling_update_places_new_resources_beside_the_old() {
    use crate::command::{Assignment, Command, CommandResponse};
    use crate::model::deployment::RolloutStrategy;
    use crate::model::job::fixtures::service_descriptor;
    use crate::model::task::context;
    use crate::scheduling::Cache;
    use crate::state::{agent_of, StateRead};

    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    let (_, mut changes) = reader.changes.subscribe(None);
    let mut index = 0;
    let mut apply = |sm: &mut StateMachine, command: Command| {
        index += 1;
        apply_at(sm, index, command)
    };
    let mut group = capacity_group("web");
    group.resources_per_instance =
        crate::model::ResourceDimension { cpu: 2.0, memory_mb: 4096, disk_mb: 1_000_000, network_mbps: 10_000, gpu: 0 };
    apply(&mut sm, Command::CreateCapacityGroup { group, idempotency_token: None });
    let (mut job, tasks) = batch_job("svc", "s", 2);
    job.descriptor.job_type = service_descriptor(0, 2, 4).job_type;
    job.descriptor.capacity_group = "web".into();
    let created = apply(&mut sm, Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
    assert!(matches!(created, CommandResponse::JobId(_)), "{created:?}");
    apply(&mut sm, Command::CreateTasks { tasks, archive: vec![] });
    for a in ["a1", "a2"] {
        apply(&mut sm, Command::RegisterAgent { agent: agent(a) });
    }
    let place = |sm: &mut StateMachine,
                 apply: &mut dyn FnMut(&mut StateMachine, Command) -> CommandResponse,
                 task: &str,
                 agent: &str| {
        let assignments = vec![Assignment { task_id: task.into(), agent_id: agent.into() }];
        match apply(sm, Command::AssignTasks { assignments, timestamp_ms: 2 }) {
            CommandResponse::Assigned(ids) => !ids.is_empty(),
            other => panic!("AssignTasks answered {other:?}"),
        }
    };
    assert!(place(&mut sm, &mut apply, "s00", "a1") && place(&mut sm, &mut apply, "s01", "a1"));

    let update = |cpu: f64| {
        let mut container = reader.job("svc").unwrap().unwrap().descriptor.container;
        container.resources.cpu = cpu;
        Command::UpdateJobSpec {
            job_id: "svc".into(),
            container,
            strategy: RolloutStrategy::default(),
            timestamp_ms: 3,
        }
    };
    // 2 tasks × 1.5 CPU would need 3 of the group's 2.
    match apply(&mut sm, update(1.5)) {
        CommandResponse::Rejected(r) => assert_eq!(r.field, "capacity_group", "{r:?}"),
        other => panic!("an update beyond the reservation was not refused: {other:?}"),
    }
    assert!(matches!(apply(&mut sm, update(1.0)), CommandResponse::Deployment(1)));
    assert_eq!(reader.allocation_of("a1").unwrap().resources.cpu, 1.0, "the old tasks keep their 0.5 CPU");

    // A new-version task (1 CPU) does not fit beside them on a1's 1.5; it does on a2. An
    // old-version task placed now takes the old 0.5 and fits on a1.
    let (_, mut more) = batch_job("svc", "n", 2);
    more[0].context.insert(context::JOB_VERSION.into(), "1".into());
    more[1].id = "old".into();
    (more[0].index, more[1].index) = (2, 3);
    let created = apply(&mut sm, Command::CreateTasks { tasks: more, archive: vec![] });
    assert!(!matches!(created, CommandResponse::Rejected(_)), "{created:?}");
    let view = Cache::load(&reader, vec![]).unwrap().view(&Default::default(), &[], 10);
    let needs: std::collections::BTreeMap<&str, f64> = view.tasks.iter().map(|t| (t.id.as_str(), t.need.cpu)).collect();
    assert_eq!(needs, [("n00", 1.0), ("old", 0.5)].into(), "the scheduler asks what each version needs");
    assert!(!place(&mut sm, &mut apply, "n00", "a1"), "1 CPU placed beside 1 CPU on a 1.5-CPU agent");
    assert!(place(&mut sm, &mut apply, "n00", "a2"));
    assert!(place(&mut sm, &mut apply, "old", "a1"));

    let held = |id: &str| reader.task(id).unwrap().unwrap().resources.expect("a placed task records what it holds");
    assert_eq!([held("s00").cpu, held("old").cpu, held("n00").cpu], [0.5, 0.5, 1.0]);
    let got = reader.allocations().unwrap();
    assert_eq!((got["a1"].resources.cpu, got["a1"].live_tasks), (1.5, 3));
    assert_eq!((got["a2"].resources.cpu, got["a2"].live_tasks), (1.0, 1));
    assert_eq!(reader.allocation_of("a2").unwrap(), got["a2"]);
    let by_scan: f64 = reader
        .all_tasks()
        .unwrap()
        .iter()
        .filter(|t| agent_of(t).is_some() && t.state().is_live())
        .map(|t| t.resources.as_ref().unwrap().cpu)
        .sum();
    assert_eq!(by_scan, 2.5);

    let mut fed = Cache::default();
    while let Ok(batch) = changes.try_recv() {
        for c in &batch.changes {
            fed.apply(c, &reader).unwrap();
        }
    }
    let loaded = Cache::load(&reader, vec![]).unwrap();
    assert_eq!(fed.summary(), loaded.summary());
    let (_, loads, groups) = loaded.summary();
    assert_eq!(loads["a1"].0, "1.500 cpu 300 MB");
    assert_eq!(loads["a2"].0, "1.000 cpu 100 MB");
    assert_eq!(groups["web"], "2.500 cpu 400 MB");

    // Rebuilt from the tasks, the index says the same.
    let meta = super::cf_handle(&reader.db, super::cf::SM_META).unwrap();
    reader.db.delete_cf(meta, super::cf::sm_meta::AGENT_INDEX).unwrap();
    assert_eq!(super::rebuild_agent_index(&reader.db).unwrap(), 4);
    assert_eq!(reader.allocations().unwrap(), got);
}

/// A batch job `id` of `n` tasks `{prefix}00`… of 0.5 CPU and 100 MB, all Accepted.
pub(crate) fn batch_job(id: &str, prefix: &str, n: u32) -> (crate::model::job::Job, Vec<crate::model::task::Task>) {
    use crate::model::job::fixtures::batch_descriptor;
    use crate::model::job::{Job, JobState, JobStatus};
    use crate::model::task::{Task, TaskState, TaskStatus};
    let mut descriptor = batch_descriptor(n);
    descriptor.container.resources.cpu = 0.5;
    descriptor.container.resources.memory_mb = 100;
    let job = Job {
        id: id.into(),
        descriptor,
        status: JobStatus {
            state: JobState::Accepted,
            reason_code: String::new(),
            reason_message: String::new(),
            timestamp_ms: 1,
        },
        status_history: vec![],
        rollout: Default::default(),
        evictions_ms: Vec::new(),
    };
    let tasks = (0..n)
        .map(|i| Task {
            id: format!("{prefix}{i:02}"),
            job_id: id.into(),
            index: i,
            status: TaskStatus {
                state: TaskState::Accepted,
                reason_code: String::new(),
                reason_message: String::new(),
                timestamp_ms: 1,
            },
            status_history: vec![],
            context: Default::default(),
            original_id: format!("{prefix}{i:02}"),
            resubmit_of: None,
            resubmit_number: 0,
            system_resubmit_number: 0,
            resources: None,
            attributes: Default::default(),
        })
        .collect();
    (job, tasks)
}

/// An online agent `id` of 1.5 CPUs and 1,000 MB.
pub(crate) fn agent(id: &str) -> crate::model::agent::Agent {
    use crate::model::agent::{Agent, AgentState};
    use crate::model::ResourceDimension;
    Agent {
        id: id.into(),
        instance_group: "default".into(),
        resources: ResourceDimension { cpu: 1.5, memory_mb: 1000, disk_mb: 100_000, network_mbps: 1000, gpu: 0 },
        attributes: Default::default(),
        state: AgentState::Online,
        healthy: true,
        unhealthy_reason: String::new(),
        registered_ms: 1,
        terminating: false,
        lost_ms: None,
        draining: false,
        draining_since_ms: None,
    }
}

#[test]
fn a_restore_swaps_the_state_only_at_its_end() {
    use crate::command::{Command, CommandResponse};

    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    let mut index = 0;
    let mut apply = |sm: &mut StateMachine, command: Command| {
        index += 1;
        apply_at(sm, index, command)
    };
    let group = capacity_group;
    let names = || reader.capacity_groups().unwrap().into_iter().map(|g| g.name).collect::<Vec<_>>();
    let rejected = |r: &CommandResponse, field: &str| matches!(r, CommandResponse::Rejected(x) if x.field == field);

    apply(&mut sm, Command::CreateCapacityGroup { group: group("old"), idempotency_token: None });
    let backup = super::decode_backup(&reader.backup().unwrap().data).unwrap();
    apply(&mut sm, Command::CreateCapacityGroup { group: group("new"), idempotency_token: None });

    let r = apply(&mut sm, Command::RestoreBegin { restore_id: "r1".into(), force: false });
    assert!(rejected(&r, "force"), "a restore over capacity groups needs force: {r:?}");
    apply(&mut sm, Command::RestoreBegin { restore_id: "r1".into(), force: true });
    for (family, records) in backup {
        apply(&mut sm, Command::RestoreRecords { restore_id: "r1".into(), family, records });
        // A begin applied late (proposed again) keeps what was staged.
        apply(&mut sm, Command::RestoreBegin { restore_id: "r1".into(), force: true });
    }
    // Cut short here, nothing has changed.
    assert_eq!(names(), ["new", "old"]);
    let r = apply(&mut sm, Command::RestoreEnd { restore_id: "r0".into() });
    assert!(rejected(&r, "restore_id"), "another restore's end: {r:?}");
    let r = apply(
        &mut sm,
        Command::RestoreRecords { restore_id: "r1".into(), family: super::cf::RESTORE_STAGING.into(), records: vec![] },
    );
    assert!(rejected(&r, "family"), "{r:?}");

    let (_, mut changes) = reader.changes.subscribe(None);
    assert!(matches!(apply(&mut sm, Command::RestoreEnd { restore_id: "r1".into() }), CommandResponse::Done));
    assert_eq!(names(), ["old"], "the backup's state, whole");
    let reset = changes.try_recv().expect("a change batch after the restore");
    assert!(reset.reset, "observers start over after a restore");
    let restored = reader.backup().unwrap();
    assert!(
        super::decode_backup(&restored.data).unwrap().iter().all(|(f, _)| f != super::cf::RESTORE_STAGING),
        "the staging area is not backed up"
    );
    let r = apply(&mut sm, Command::RestoreRecords { restore_id: "r1".into(), family: "jobs".into(), records: vec![] });
    assert!(rejected(&r, "restore_id"), "a finished restore takes no more records: {r:?}");
    // An end proposed again (its first outcome unknown to the caller) answers as the first did.
    assert!(matches!(apply(&mut sm, Command::RestoreEnd { restore_id: "r1".into() }), CommandResponse::Done));
    assert_eq!(names(), ["old"]);
    let r = apply(&mut sm, Command::RestoreBegin { restore_id: "r1".into(), force: true });
    assert!(rejected(&r, "restore_id"), "an ended restore cannot begin again: {r:?}");
}

#[test]
fn the_audit_log_numbers_in_apply_order_keeps_the_newest_and_stays_out_of_backups() {
    use crate::command::{AuditRecord, Command};

    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    let record = |n: u64| AuditRecord {
        time_ms: n as i64,
        caller: if n % 2 == 0 { "client/alice".into() } else { "client/bob".into() },
        method: "/titus.JobManagementService/KillJob".into(),
        target: format!("job {n}"),
        code: "Ok".into(),
        message: String::new(),
        replica: 1,
        request_id: String::new(),
    };
    for (i, batch) in [vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]].into_iter().enumerate() {
        let command = Command::AppendAudit {
            records: batch.into_iter().map(record).collect(),
            keep: 5,
            batch_id: format!("b{i}"),
        };
        apply_at(&mut sm, 2 * i as u64 + 1, command.clone());
        // Proposed again after an unknown outcome: appended once.
        apply_at(&mut sm, 2 * i as u64 + 2, command);
    }
    let (all, last) = reader.audit_records(0, 100, 100, |_| true).unwrap();
    assert_eq!(all.iter().map(|(s, r)| (*s, r.time_ms)).collect::<Vec<_>>(), [(5, 5), (6, 6), (7, 7), (8, 8), (9, 9)]);
    assert_eq!(last, 9);
    let (bobs, _) = reader.audit_records(5, 1, 100, |r| r.caller == "client/bob").unwrap();
    assert_eq!(bobs.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [7], "after 5, bob's first only");
    let (none, last) = reader.audit_records(0, 10, 2, |r| r.caller == "nobody").unwrap();
    assert!(none.is_empty());
    assert_eq!(last, 6, "a filtered page that found nothing says how far it looked");
    let backup = super::decode_backup(&reader.backup().unwrap().data).unwrap();
    assert!(backup.iter().all(|(f, _)| f != super::cf::AUDIT), "the audit log is not backed up");
}

/// The purge looks at a bounded slice of the token table at a time and goes on where it stopped:
/// every expired token is found in one pass, and no call scans the whole table.
#[test]
fn expired_tokens_are_found_a_bounded_slice_at_a_time() {
    use crate::command::Command;

    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    // 25 recorded calls (rejected: the job does not exist), every third one expired at 100.
    for i in 0..25u64 {
        let command = Command::Once {
            key: format!("k{i:02}"),
            expires_ms: if i % 3 == 0 { 50 } else { 1_000 },
            command: Box::new(Command::UpdateJobStatus { job_id: "none".into(), enabled: true }),
        };
        apply_at(&mut sm, i + 1, command);
    }
    let mut found = Vec::new();
    let mut cursor: Option<String> = None;
    let mut calls = 0;
    loop {
        let (tokens, next) = reader.expired_tokens(100, cursor.as_deref(), 2, 4).unwrap();
        assert!(tokens.len() <= 2);
        found.extend(tokens);
        calls += 1;
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
        assert!(calls < 50, "the cursor moves on");
    }
    let want: Vec<String> = (0..25).filter(|i| i % 3 == 0).map(|i| format!("request/k{i:02}")).collect();
    assert_eq!(found, want, "each expired token once, in key order");
    assert!(calls >= 7, "25 records, 4 a call: {calls} calls");
}

/// A query reads one snapshot: a job that finishes (moves to the archive with its tasks) while a
/// view is open is seen by that view exactly as before — active, with its task, not archived —
/// while new reads see it archived. FindJobs once listed such a job twice.
#[test]
fn a_view_reads_one_snapshot_while_entries_apply() {
    use crate::command::Command;
    use crate::model::task::TaskState;
    use crate::state::StateRead;

    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    let mut index = 0;
    let mut apply = |sm: &mut StateMachine, command: Command| {
        index += 1;
        apply_at(sm, index, command)
    };
    let (job, mut tasks) = batch_job("job-1", "t", 1);
    apply(&mut sm, Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
    tasks[0].status.state = TaskState::Finished;
    apply(&mut sm, Command::CreateTasks { tasks, archive: vec![] });

    let view = reader.snapshot();
    let finish = Command::FinishJob {
        job_id: "job-1".into(),
        reason_code: "normal".into(),
        reason_message: String::new(),
        timestamp_ms: 2,
    };
    assert_eq!(apply(&mut sm, finish), crate::command::CommandResponse::Done);
    // The view: as it was.
    assert!(view.job("job-1").unwrap().is_some());
    assert!(view.archived_job("job-1").unwrap().is_none());
    assert!(view.archived_jobs().unwrap().is_empty());
    assert_eq!(view.task_ids_of_job("job-1").unwrap(), vec!["t00".to_string()]);
    assert!(view.archived_task("t00").unwrap().is_none());
    // Live reads and a new view: archived.
    for now in [&reader as &dyn StateRead, &reader.snapshot()] {
        assert!(now.job("job-1").unwrap().is_none());
        assert!(now.archived_job("job-1").unwrap().is_some());
        assert!(now.task_ids_of_job("job-1").unwrap().is_empty());
        assert!(now.archived_task("t00").unwrap().is_some());
    }
}
