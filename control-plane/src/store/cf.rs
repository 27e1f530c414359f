//! Column family names: the one place that says where each kind of record lives in RocksDB.

/// Raft log entries, keyed by big-endian log index so iteration is in log order.
pub const RAFT_LOG: &str = "raft_log";
/// Raft's own durable metadata: vote, last purged log id, committed log id, this replica's node id.
pub const RAFT_META: &str = "raft_meta";
/// State machine metadata: last applied log id, last membership, cluster id.
pub const SM_META: &str = "sm_meta";
/// The newest snapshot (its metadata and the name of its file, see `store::snapshots`), so it
/// survives a restart and can be sent to a follower.
pub const SNAPSHOT: &str = "snapshot";
/// Capacity groups, keyed by name.
pub const CAPACITY_GROUPS: &str = "capacity_groups";
/// Idempotency tokens of mutating calls, keyed by kind/token, valued by the result to return on a
/// retry and an expiry.
pub const IDEMPOTENCY_TOKENS: &str = "idempotency_tokens";
/// Active (not finished) jobs, keyed by job id.
pub const JOBS: &str = "jobs";
/// Active tasks, keyed by task id; finished ones stay until their job finishes or they are replaced.
pub const TASKS: &str = "tasks";
/// Index `job_id/task_id` → empty, for a job's tasks.
pub const TASKS_BY_JOB: &str = "tasks_by_job";
/// Index `agent_id/task_id` → the task's resources, for live tasks placed on an agent: what an
/// agent holds without reading every task.
pub const TASKS_BY_AGENT: &str = "tasks_by_agent";
/// Finished jobs and tasks, still findable until retention purges them.
pub const ARCHIVED_JOBS: &str = "archived_jobs";
pub const ARCHIVED_TASKS: &str = "archived_tasks";
pub const ARCHIVED_TASKS_BY_JOB: &str = "archived_tasks_by_job";
/// Index `finish time (big-endian ms) ++ job_id` → empty, oldest first, for retention.
pub const ARCHIVE_ORDER: &str = "archive_order";
/// Agents, keyed by agent id.
pub const AGENTS: &str = "agents";
/// Instance groups, keyed by id.
pub const INSTANCE_GROUPS: &str = "instance_groups";

/// Job ↔ ALB target group associations, keyed by `job_id/target_group_arn`.
pub const LOAD_BALANCERS: &str = "load_balancers";
/// IP targets registered (or being registered/deregistered) by this system, keyed by
/// `task_id/target_group_arn`.
pub const LB_TARGETS: &str = "lb_targets";

/// A restore in progress: the backup's records, keyed `family NUL key`, until `RestoreEnd` swaps
/// them in whole (replicated, and carried by snapshots, like the rest of the state).
pub const RESTORE_STAGING: &str = "restore_staging";

/// The audit log: records of mutating calls keyed by their big-endian sequence number (from 1,
/// in apply order), bounded by dropping the oldest. Not carried by backups, and a restore keeps
/// the cluster's own: it is this cluster's history, not the backed-up state's.
pub const AUDIT: &str = "audit";

/// Column families that hold replicated state. A snapshot carries exactly these, and installing one
/// replaces them whole; adding an entity means adding its column family here.
pub const STATE: &[&str] = &[
    CAPACITY_GROUPS,
    IDEMPOTENCY_TOKENS,
    JOBS,
    TASKS,
    TASKS_BY_JOB,
    TASKS_BY_AGENT,
    ARCHIVED_JOBS,
    ARCHIVED_TASKS,
    ARCHIVED_TASKS_BY_JOB,
    ARCHIVE_ORDER,
    AGENTS,
    INSTANCE_GROUPS,
    LOAD_BALANCERS,
    LB_TARGETS,
    RESTORE_STAGING,
    AUDIT,
];

/// Whether a backup carries `family`: the replicated state, less a restore's staging area and
/// the audit log (this cluster's own history).
pub fn in_backups(family: &str) -> bool {
    STATE.contains(&family) && family != RESTORE_STAGING && family != AUDIT
}

/// Every column family the store opens.
pub fn all() -> impl Iterator<Item = &'static str> {
    [RAFT_LOG, RAFT_META, SM_META, SNAPSHOT].into_iter().chain(STATE.iter().copied())
}

/// Keys inside [`RAFT_META`].
pub mod raft_meta {
    pub const VOTE: &[u8] = b"vote";
    pub const LAST_PURGED: &[u8] = b"last_purged";
    pub const COMMITTED: &[u8] = b"committed";
    pub const NODE_ID: &[u8] = b"node_id";
}

/// Keys inside [`SM_META`].
pub mod sm_meta {
    pub const LAST_APPLIED: &[u8] = b"last_applied";
    pub const MEMBERSHIP: &[u8] = b"membership";
    pub const CLUSTER_ID: &[u8] = b"cluster_id";
    /// The codec version this cluster writes (see `Command::SetCodecVersion`); absent: 1.
    pub const CODEC_VERSION: &[u8] = b"codec_version";
    /// Present once `tasks_by_agent` is maintained for this state (see `rebuild_agent_index`).
    pub const AGENT_INDEX: &[u8] = b"agent_index";
    /// The id of a restore begun and not yet ended (see `Command::RestoreBegin`).
    pub const RESTORE: &[u8] = b"restore";
    /// The id of the last restore ended, so a retried `RestoreEnd` answers as the first did.
    pub const RESTORE_DONE: &[u8] = b"restore_done";
}

/// Keys inside [`SNAPSHOT`].
pub mod snapshot {
    pub const META: &[u8] = b"meta";
    /// The snapshot's file, in the data dir's `snapshots/`.
    pub const FILE: &[u8] = b"file";
    /// Present while a received snapshot replaces the state: a replica that restarts with it
    /// installs that snapshot again before reading anything.
    pub const INSTALLING: &[u8] = b"installing";
    /// The previous release kept the snapshot's data itself here; moved into a file at start.
    pub const DATA: &[u8] = b"data";
}
