//! The one way replicated state changes: a [`Command`] carried in a Raft log entry.
//!
//! Applying a command is deterministic: timestamps, ids and random choices are decided by the leader
//! before proposing and travel inside the command. A command that is invalid against the state it is
//! applied to (a duplicate name, say) is applied as a no-op and answered with a [`Rejection`].

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::agent::{Agent, InstanceGroup, LaunchIntent, Lifecycle};
use crate::deployment::{DeploymentStep, RolloutStrategy};
use crate::job::{DisruptionBudget, Job, ServiceJobProcesses};
use crate::load_balancer::{AssociationState, LbTarget};
use crate::task::{Task, TaskStatus};
use crate::CapacityGroup;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Names the cluster. Proposed once by the first leader; later proposals are no-ops.
    SetClusterId {
        cluster_id: String,
    },
    /// From this entry on, every replica writes `version` of the codec (see `codec`): proposed by
    /// the leader once every member reads it. Never lowers the version; an unknown one is refused.
    SetCodecVersion {
        version: u8,
    },
    CreateCapacityGroup {
        group: CapacityGroup,
        /// A retry with the same token returns the group created by the first call.
        idempotency_token: Option<String>,
    },
    /// Replaces tier, resources and instance count; keeps the create time.
    UpdateCapacityGroup {
        group: CapacityGroup,
    },
    DeleteCapacityGroup {
        name: String,
    },

    /// A user's command applied at most once per call: the SDK retries a call whose outcome it does
    /// not know (a timed-out attempt may still commit) with the same `x-request-id`, and applying it
    /// a second time, after other writes, would silently undo them. Found by the Jepsen register
    /// workload. `key` is the request id with a fingerprint of the request; a retry inside
    /// `expires_ms` answers the first application's response.
    Once {
        key: String,
        expires_ms: i64,
        command: Box<Command>,
    },

    // ----- jobs (users) -----
    /// A new job in Accepted state; its tasks are created by the lifecycle. Rejected whole when the
    /// capacity group's quota does not allow it.
    CreateJob {
        job: Job,
        idempotency_token: Option<String>,
        /// When the token may be forgotten.
        token_expires_ms: i64,
    },
    /// Each bound is optional; the result must keep min <= desired <= max and the job's processes.
    UpdateJobCapacity {
        job_id: String,
        min: Option<u32>,
        desired: Option<u32>,
        max: Option<u32>,
    },
    UpdateJobStatus {
        job_id: String,
        enabled: bool,
    },
    UpdateJobProcesses {
        job_id: String,
        processes: ServiceJobProcesses,
    },
    UpdateJobAttributes {
        job_id: String,
        attributes: BTreeMap<String, String>,
    },
    /// Replaces the job's disruption budget (checked as a job's is); the next voluntary disruption
    /// is judged on it.
    UpdateJobDisruptionBudget {
        job_id: String,
        budget: DisruptionBudget,
    },
    DeleteJobAttributes {
        job_id: String,
        keys: Vec<String>,
    },
    /// Moves a live task of a service job to another service job that runs the same container
    /// (Titus's MoveTask): the source's desired goes down by one, the target's up by one.
    MoveTask {
        task_id: String,
        source_job_id: String,
        target_job_id: String,
    },
    /// Sets a live task's attributes (checked as a job's; at most `MAX_ATTRIBUTES` in all).
    UpdateTaskAttributes {
        task_id: String,
        attributes: BTreeMap<String, String>,
    },
    DeleteTaskAttributes {
        task_id: String,
        keys: Vec<String>,
    },
    KillJob {
        job_id: String,
        timestamp_ms: i64,
    },
    /// Starts a rolling update of a service job to `container` (see `deployment`): the job's spec
    /// takes the next version and the lifecycle replaces its tasks in steps. An active deployment
    /// is superseded. Rejected for a batch job and for a change of resources; a container equal to
    /// the current one starts nothing. Answers the deployment's id.
    UpdateJobSpec {
        job_id: String,
        container: crate::job::Container,
        strategy: RolloutStrategy,
        timestamp_ms: i64,
    },
    /// Moves a job's active deployment on. Rejected when deployment `deployment_id` is not the
    /// job's active one (it ended, or a newer one superseded it), so a stale plan does nothing.
    AdvanceDeployment {
        job_id: String,
        deployment_id: u32,
        change: DeploymentChange,
        timestamp_ms: i64,
    },
    /// Kills one task; `shrink` (service jobs) also lowers desired so it is not replaced.
    KillTask {
        task_id: String,
        shrink: bool,
        prevent_min_size_update: bool,
        timestamp_ms: i64,
    },

    /// Evicts a task (Titus's EvictionService): a voluntary disruption, killed as `evicted` and
    /// replaced, only when the job's disruption budget allows it as of this entry; otherwise
    /// rejected with what holds it back.
    EvictTask {
        task_id: String,
        reason: String,
        timestamp_ms: i64,
    },

    // ----- tasks (lifecycle on the leader, and agents) -----
    /// New tasks; `archive` lists finished tasks they replace, moved to the archive in the same entry.
    CreateTasks {
        tasks: Vec<Task>,
        archive: Vec<String>,
    },
    /// A task's next state, from its agent or from the lifecycle (timeouts, kills). An illegal
    /// transition is rejected and changes nothing.
    UpdateTaskStatus {
        task_id: String,
        status: TaskStatus,
        context: BTreeMap<String, String>,
        /// The state the proposer saw and decided from (a lifecycle timeout, a reconcile): the
        /// update is rejected when the task has moved on since — a stale "stuck in Launched" plan
        /// once killed a task that had just Started. None: from any state the transition allows.
        #[serde(default)]
        expected_state: Option<crate::task::TaskState>,
    },
    /// Task states reported by agents, batched: each applies like `UpdateTaskStatus` when the task
    /// is still placed on the reporting agent and the transition is legal; the others are skipped.
    UpdateTaskStatuses {
        reports: Vec<StatusReport>,
    },
    /// Moves a job whose tasks are all Finished, and those tasks, to the archive.
    FinishJob {
        job_id: String,
        reason_code: String,
        reason_message: String,
        timestamp_ms: i64,
    },
    /// Forgets archived jobs past retention and expired idempotency tokens (by key).
    PurgeArchive {
        job_ids: Vec<String>,
        tokens: Vec<String>,
    },

    // ----- agents -----
    UpsertInstanceGroup {
        group: InstanceGroup,
    },
    SetInstanceGroupLifecycle {
        id: String,
        lifecycle: Lifecycle,
        /// When it was asked (0 in entries of releases that did not say).
        #[serde(default)]
        timestamp_ms: i64,
    },
    /// The capacity manager's new target size; rejected outside [min, max].
    SetInstanceGroupDesired {
        id: String,
        desired: u32,
    },
    /// Writes a launch ahead of its RunInstances call (Some), or clears it once done (None).
    SetLaunchIntent {
        id: String,
        intent: Option<LaunchIntent>,
    },
    /// Writes the instances about to be terminated ahead of the TerminateInstances call, or clears
    /// them (empty) once it is done.
    SetTerminationIntent {
        id: String,
        instances: Vec<String>,
    },
    /// An agent (re)registered with its resources and attributes; it is Online again.
    RegisterAgent {
        agent: Agent,
    },
    SetAgentHealth {
        agent_id: String,
        healthy: bool,
        reason: String,
    },
    /// Its instance is about to be terminated (capacity scale-down): no new tasks from now on.
    MarkAgentTerminating {
        agent_id: String,
        /// False undoes it: the instance was kept after all (its agent got a task meanwhile, or
        /// the termination failed). Entries written before this field existed meant true.
        #[serde(default = "yes")]
        terminating: bool,
    },
    /// An operator drains the agent (or, `draining` false, puts it back in service).
    SetAgentDraining {
        agent_id: String,
        draining: bool,
        /// When it was asked (0 in entries of releases that did not say).
        #[serde(default)]
        timestamp_ms: i64,
    },
    /// The agent missed its heartbeats past the TTL: it is Lost and its live tasks Finished(lost).
    AgentLost {
        agent_id: String,
        timestamp_ms: i64,
    },
    /// Placements: each task moves Accepted → Launched on its agent, re-checked against the agent's
    /// free resources when applied, so a stale view never over-commits an agent.
    AssignTasks {
        assignments: Vec<Assignment>,
        timestamp_ms: i64,
    },

    // ----- load balancers -----
    /// Associates a service job with a target group (checked to exist and be of type `ip` before
    /// proposing). Re-adding an association is a no-op, or revives it when it was orphaned.
    AddLoadBalancer {
        job_id: String,
        target_group: String,
        timestamp_ms: i64,
    },
    RemoveLoadBalancer {
        job_id: String,
        target_group: String,
    },
    SetLoadBalancerState {
        job_id: String,
        target_group: String,
        state: AssociationState,
        message: String,
        timestamp_ms: i64,
    },
    /// Writes target records (ahead of, or after, an AWS call). Each moves only forward
    /// (Registering → Registered → Deregistering → Deregistered); one that would move back is
    /// skipped. Answers the keys written.
    PutLbTargets {
        targets: Vec<LbTarget>,
    },
    /// Forgets target records (drained, or of a deleted target group).
    ForgetLbTargets {
        targets: Vec<LbTarget>,
    },

    // ----- restore of a backup (operators) -----
    /// Starts a restore into an empty staging area. Rejected when the state holds jobs, tasks or
    /// capacity groups, unless `force`.
    RestoreBegin {
        restore_id: String,
        force: bool,
    },
    /// Raw records of one replicated column family, from a backup, staged verbatim (a restore is
    /// committed in many bounded entries, not one huge one).
    RestoreRecords {
        restore_id: String,
        family: String,
        /// Keys and values as hex strings in the entry: half the size of JSON's arrays of numbers,
        /// and far quicker to decode on a busy follower.
        #[serde(with = "hex_records")]
        records: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Ends a restore: the staged records replace the state in one batch (the agents registered
    /// with this cluster stay), and observers and the leader's caches start over.
    RestoreEnd {
        restore_id: String,
    },

    // ----- audit -----
    /// Records of calls answered (who, what, when, result), numbered in apply order; beyond
    /// `keep` records the oldest are dropped.
    AppendAudit {
        records: Vec<AuditRecord>,
        keep: u64,
        /// Names the batch: one proposed again after an unknown outcome (a timeout) is appended
        /// once. Empty (entries from before it existed): not deduplicated.
        #[serde(default)]
        batch_id: String,
    },
}

/// What happens to an active deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeploymentChange {
    /// The lifecycle replaced tasks (recorded for `deploy status`).
    Step(DeploymentStep),
    /// Every canary is available: the deployment pauses until promoted.
    CanariesReady,
    /// Go on past the canaries (a user, or the canary pause ran out).
    Promote,
    /// Every task runs the new version.
    Succeed,
    /// Back to the previous spec (new tasks failed past the threshold, or a user asked).
    RollBack { reason: String },
}

fn yes() -> bool {
    true
}

/// One mutating call, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the replica answered, ms since the epoch.
    pub time_ms: i64,
    /// The caller: `client/alice`, `token/ci`, `agent/a1`, `anonymous` (insecure mode) or
    /// `unauthenticated`.
    pub caller: String,
    /// The gRPC method, e.g. `/titus.JobManagementService/KillJob`.
    pub method: String,
    /// What it was about (a job or task id, a group name), when known.
    pub target: String,
    /// The gRPC status code name (`Ok`, `PermissionDenied`, ...).
    pub code: String,
    /// The error message, empty on success.
    pub message: String,
    /// The replica that answered.
    pub replica: u64,
    /// The caller's request id (`x-request-id`), when it sent one.
    pub request_id: String,
}

/// One task state an agent reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub task_id: String,
    pub agent_id: String,
    pub status: TaskStatus,
    pub context: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: String,
    pub agent_id: String,
}

impl Command {
    /// Restamps the times that must be the leader's: a command built on the replica that took the
    /// call carries that replica's clock, and a CreateJob retried through another replica had its
    /// token's expiry judged by a third clock. The leader calls this right before proposing.
    pub fn restamp(&mut self, now_ms: i64) {
        match self {
            Command::CreateJob { job, token_expires_ms, .. } => {
                let ttl = token_expires_ms.saturating_sub(job.status.timestamp_ms);
                job.status.timestamp_ms = now_ms;
                *token_expires_ms = now_ms.saturating_add(ttl);
            }
            Command::Once { command, .. } => command.restamp(now_ms),
            _ => {}
        }
    }

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::SetClusterId { .. } => "set_cluster_id",
            Command::SetCodecVersion { .. } => "set_codec_version",
            Command::Once { command, .. } => command.kind(),
            Command::CreateCapacityGroup { .. } => "create_capacity_group",
            Command::UpdateCapacityGroup { .. } => "update_capacity_group",
            Command::DeleteCapacityGroup { .. } => "delete_capacity_group",
            Command::CreateJob { .. } => "create_job",
            Command::UpdateJobCapacity { .. } => "update_job_capacity",
            Command::UpdateJobStatus { .. } => "update_job_status",
            Command::UpdateJobProcesses { .. } => "update_job_processes",
            Command::UpdateJobAttributes { .. } => "update_job_attributes",
            Command::UpdateJobDisruptionBudget { .. } => "update_job_disruption_budget",
            Command::DeleteJobAttributes { .. } => "delete_job_attributes",
            Command::UpdateTaskAttributes { .. } => "update_task_attributes",
            Command::MoveTask { .. } => "move_task",
            Command::DeleteTaskAttributes { .. } => "delete_task_attributes",
            Command::KillJob { .. } => "kill_job",
            Command::UpdateJobSpec { .. } => "update_job_spec",
            Command::AdvanceDeployment { .. } => "advance_deployment",
            Command::KillTask { .. } => "kill_task",
            Command::EvictTask { .. } => "evict_task",
            Command::CreateTasks { .. } => "create_tasks",
            Command::UpdateTaskStatus { .. } => "update_task_status",
            Command::UpdateTaskStatuses { .. } => "update_task_statuses",
            Command::FinishJob { .. } => "finish_job",
            Command::PurgeArchive { .. } => "purge_archive",
            Command::UpsertInstanceGroup { .. } => "upsert_instance_group",
            Command::SetInstanceGroupLifecycle { .. } => "set_instance_group_lifecycle",
            Command::SetInstanceGroupDesired { .. } => "set_instance_group_desired",
            Command::SetLaunchIntent { .. } => "set_launch_intent",
            Command::SetTerminationIntent { .. } => "set_termination_intent",
            Command::RegisterAgent { .. } => "register_agent",
            Command::SetAgentHealth { .. } => "set_agent_health",
            Command::AgentLost { .. } => "agent_lost",
            Command::SetAgentDraining { .. } => "set_agent_draining",
            Command::MarkAgentTerminating { .. } => "mark_agent_terminating",
            Command::AssignTasks { .. } => "assign_tasks",
            Command::AddLoadBalancer { .. } => "add_load_balancer",
            Command::RemoveLoadBalancer { .. } => "remove_load_balancer",
            Command::SetLoadBalancerState { .. } => "set_load_balancer_state",
            Command::PutLbTargets { .. } => "put_lb_targets",
            Command::ForgetLbTargets { .. } => "forget_lb_targets",
            Command::RestoreBegin { .. } => "restore_begin",
            Command::RestoreRecords { .. } => "restore_records",
            Command::RestoreEnd { .. } => "restore_end",
            Command::AppendAudit { .. } => "append_audit",
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Applied; nothing to return (also the answer to blank and membership entries).
    Done,
    CapacityGroup(CapacityGroup),
    /// The id of the job created (or, for a retried token, created earlier).
    JobId(String),
    /// Of the placements proposed, the task ids that were applied.
    Assigned(Vec<String>),
    InstanceGroup(InstanceGroup),
    /// The id of the deployment started (0: the spec was unchanged, nothing started).
    Deployment(u32),
    /// Keys of the records written.
    Keys(Vec<String>),
    /// Not applied: the state did not allow it.
    Rejected(Rejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectionKind {
    /// The request contradicts the state it met (e.g. min > desired after a partial update).
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub kind: RejectionKind,
    /// The request field the rejection is about, e.g. `group.name`.
    pub field: String,
    pub message: String,
}

impl Rejection {
    pub fn new(kind: RejectionKind, field: &str, message: impl Into<String>) -> Self {
        Rejection { kind, field: field.to_string(), message: message.into() }
    }
}

#[cfg(test)]
mod restamp_tests {
    use super::*;
    use crate::job::fixtures::batch_descriptor;
    use crate::job::{JobState, JobStatus};

    #[test]
    fn the_leader_s_clock_decides_a_job_s_times() {
        let status = JobStatus {
            state: JobState::Accepted,
            reason_code: String::new(),
            reason_message: String::new(),
            timestamp_ms: 1_000,
        };
        let job = Job {
            id: "j".into(),
            descriptor: batch_descriptor(1),
            status,
            status_history: Vec::new(),
            rollout: Default::default(),
            evictions_ms: Vec::new(),
        };
        let create = Command::CreateJob { job, idempotency_token: Some("t".into()), token_expires_ms: 1_000 + 60_000 };
        let mut once = Command::Once { key: "k".into(), expires_ms: 9, command: Box::new(create) };
        once.restamp(5_000);
        let Command::Once { command, expires_ms, .. } = once else { unreachable!() };
        assert_eq!(expires_ms, 9, "the request key's own expiry is untouched");
        let Command::CreateJob { job, token_expires_ms, .. } = *command else { unreachable!() };
        assert_eq!((job.status.timestamp_ms, token_expires_ms), (5_000, 65_000), "same TTL, from the leader's now");
    }
}

/// `Vec<(bytes, bytes)>` as `[[hex, hex], ...]` (see `Command::RestoreRecords`).
mod hex_records {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    fn encode(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn decode(text: &str) -> Result<Vec<u8>, String> {
        if text.len() % 2 != 0 {
            return Err(format!("odd-length hex string of {} characters", text.len()));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or("not hex")?, 16).map_err(|e| e.to_string()))
            .collect()
    }

    pub fn serialize<S: Serializer>(records: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(records.iter().map(|(k, v)| (encode(k), encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(Vec<u8>, Vec<u8>)>, D::Error> {
        let pairs: Vec<(String, String)> = Vec::deserialize(d)?;
        pairs
            .iter()
            .map(|(k, v)| Ok((decode(k).map_err(D::Error::custom)?, decode(v).map_err(D::Error::custom)?)))
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use crate::command::Command;

        #[test]
        fn records_round_trip_as_hex() {
            let c = Command::RestoreRecords {
                restore_id: "r".into(),
                family: "jobs".into(),
                records: vec![(b"k\x00\xff".to_vec(), vec![]), (vec![], (0..=255).collect())],
            };
            let bytes = crate::codec::encode(&c).unwrap();
            assert!(String::from_utf8_lossy(&bytes).contains(r#"["6b00ff",""]"#));
            assert_eq!(crate::codec::decode::<Command>(&bytes).unwrap(), c);
            let bad = String::from_utf8_lossy(&bytes).replace("6b00ff", "6b00f");
            assert!(crate::codec::decode::<Command>(bad.as_bytes()).is_err(), "odd-length hex is refused");
        }
    }
}
