//! Where every command meets its rule: one exhaustive `match` over [`Command`], with no catch-all
//! arm, so a new variant does not compile until it is given a rule. Each arm calls into the module
//! that owns the rule (jobs and tasks, agents, capacity groups, instance groups, load balancers);
//! rules read the replicated state and write through an [`Overlay`], which the state machine then
//! writes in the entry's one batch.
//!
//! A few commands are about the store itself rather than any rule (naming the cluster, restoring
//! a backup, appending audit records: sequence numbers and column families); they are handed back
//! as a [`StoreCommand`], which the state machine matches exhaustively in turn.
//!
//! Deterministic: the outcome depends on the command and the replicated state only (times come in
//! the command, from the proposing leader), so every replica applies an entry alike.

use crate::command::{AuditRecord, Command, CommandResponse, Rejection, RejectionKind};
use crate::error::Result;
use crate::jobs::{apply as jobs, capacity_groups};
use crate::state::{Overlay, StateRead, TokenRecord};
use crate::{capacity, loadbalancer};

/// A command the store applies itself.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreCommand {
    SetClusterId { cluster_id: String },
    SetCodecVersion { version: u8 },
    RestoreBegin { restore_id: String, force: bool },
    RestoreRecords { restore_id: String, family: String, records: Vec<(Vec<u8>, Vec<u8>)> },
    RestoreEnd { restore_id: String },
    AppendAudit { records: Vec<AuditRecord>, keep: u64, batch_id: String },
}

impl StoreCommand {
    pub fn name(&self) -> &'static str {
        match self {
            StoreCommand::SetClusterId { .. } => "SetClusterId",
            StoreCommand::SetCodecVersion { .. } => "SetCodecVersion",
            StoreCommand::RestoreBegin { .. } => "RestoreBegin",
            StoreCommand::RestoreRecords { .. } => "RestoreRecords",
            StoreCommand::RestoreEnd { .. } => "RestoreEnd",
            StoreCommand::AppendAudit { .. } => "AppendAudit",
        }
    }
}

/// What applying a command came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// A rule answered; its writes (none, for a rejection) are in the overlay.
    Rule(CommandResponse),
    /// The store applies it (the overlay is untouched).
    Store(StoreCommand),
}

impl Applied {
    /// A rule's response; `None` for a store command.
    pub fn rule(self) -> Option<CommandResponse> {
        match self {
            Applied::Rule(r) => Some(r),
            Applied::Store(_) => None,
        }
    }
}

/// Applies `command` to `o`.
pub fn apply(o: &mut Overlay, command: Command) -> Result<Applied> {
    let store = |c: StoreCommand| Ok(Applied::Store(c));
    let response = match command {
        Command::SetClusterId { cluster_id } => return store(StoreCommand::SetClusterId { cluster_id }),
        Command::SetCodecVersion { version } => return store(StoreCommand::SetCodecVersion { version }),
        Command::RestoreBegin { restore_id, force } => return store(StoreCommand::RestoreBegin { restore_id, force }),
        Command::RestoreRecords { restore_id, family, records } => {
            return store(StoreCommand::RestoreRecords { restore_id, family, records })
        }
        Command::RestoreEnd { restore_id } => return store(StoreCommand::RestoreEnd { restore_id }),
        Command::AppendAudit { records, keep, batch_id } => {
            return store(StoreCommand::AppendAudit { records, keep, batch_id })
        }
        Command::Once { key, expires_ms, command } => once(o, key, expires_ms, *command)?,

        Command::CreateCapacityGroup { group, idempotency_token } => {
            capacity_groups::create(o, group, idempotency_token)?
        }
        Command::UpdateCapacityGroup { group } => capacity_groups::update(o, group)?,
        Command::DeleteCapacityGroup { name } => capacity_groups::delete(o, &name)?,

        Command::CreateJob { job, idempotency_token, token_expires_ms } => {
            jobs::create_job(o, job, idempotency_token, token_expires_ms)?
        }
        Command::UpdateJobCapacity { job_id, min, desired, max } => {
            jobs::update_capacity(o, &job_id, min, desired, max)?
        }
        Command::UpdateJobStatus { job_id, enabled } => jobs::update_job_status(o, &job_id, enabled)?,
        Command::UpdateJobProcesses { job_id, processes } => jobs::update_job_processes(o, &job_id, processes)?,
        Command::UpdateJobAttributes { job_id, attributes } => jobs::update_job_attributes(o, &job_id, attributes)?,
        Command::UpdateJobDisruptionBudget { job_id, budget } => {
            jobs::update_job_disruption_budget(o, &job_id, budget)?
        }
        Command::DeleteJobAttributes { job_id, keys } => jobs::delete_job_attributes(o, &job_id, keys)?,
        Command::UpdateTaskAttributes { task_id, attributes } => jobs::update_task_attributes(o, &task_id, attributes)?,
        Command::MoveTask { task_id, source_job_id, target_job_id } => {
            jobs::move_task(o, &task_id, &source_job_id, &target_job_id)?
        }
        Command::DeleteTaskAttributes { task_id, keys } => jobs::delete_task_attributes(o, &task_id, keys)?,
        Command::KillJob { job_id, timestamp_ms } => jobs::kill_job(o, &job_id, timestamp_ms)?,
        Command::EvictTask { task_id, reason, timestamp_ms } => jobs::evict_task(o, &task_id, reason, timestamp_ms)?,
        Command::UpdateJobSpec { job_id, container, strategy, timestamp_ms } => {
            jobs::update_job_spec(o, &job_id, container, strategy, timestamp_ms)?
        }
        Command::AdvanceDeployment { job_id, deployment_id, change, timestamp_ms } => {
            jobs::advance_deployment(o, &job_id, deployment_id, change, timestamp_ms)?
        }
        Command::KillTask { task_id, shrink, prevent_min_size_update, timestamp_ms } => {
            jobs::kill_task(o, &task_id, shrink, prevent_min_size_update, timestamp_ms)?
        }
        Command::CreateTasks { tasks, archive } => jobs::create_tasks(o, tasks, archive)?,
        Command::UpdateTaskStatus { task_id, status, context, expected_state } => {
            jobs::update_task_status(o, &task_id, status, context, expected_state)?
        }
        Command::UpdateTaskStatuses { reports } => jobs::update_task_statuses(o, reports)?,
        Command::FinishJob { job_id, reason_code, reason_message, timestamp_ms } => {
            jobs::finish_job(o, &job_id, reason_code, reason_message, timestamp_ms)?
        }
        Command::PurgeArchive { job_ids, tokens } => jobs::purge_archive(o, job_ids, tokens)?,

        Command::RegisterAgent { agent } => jobs::register_agent(o, agent)?,
        Command::SetAgentHealth { agent_id, healthy, reason } => jobs::set_agent_health(o, &agent_id, healthy, reason)?,
        Command::MarkAgentTerminating { agent_id, terminating } => {
            jobs::mark_agent_terminating(o, &agent_id, terminating)?
        }
        Command::SetAgentDraining { agent_id, draining, timestamp_ms } => {
            jobs::set_agent_draining(o, &agent_id, draining, timestamp_ms)?
        }
        Command::AgentLost { agent_id, timestamp_ms } => jobs::agent_lost(o, &agent_id, timestamp_ms)?,
        Command::AssignTasks { assignments, timestamp_ms } => jobs::assign_tasks(o, assignments, timestamp_ms)?,

        Command::UpsertInstanceGroup { group } => capacity::apply::upsert(o, group)?,
        Command::SetInstanceGroupLifecycle { id, lifecycle, timestamp_ms } => {
            capacity::apply::set_lifecycle(o, &id, lifecycle, timestamp_ms)?
        }
        Command::SetInstanceGroupDesired { id, desired } => capacity::apply::set_desired(o, &id, desired)?,
        Command::SetLaunchIntent { id, intent } => capacity::apply::set_launch_intent(o, &id, intent)?,
        Command::SetTerminationIntent { id, instances } => capacity::apply::set_termination_intent(o, &id, instances)?,

        Command::AddLoadBalancer { job_id, target_group, timestamp_ms } => {
            loadbalancer::apply::add(o, job_id, target_group, timestamp_ms)?
        }
        Command::RemoveLoadBalancer { job_id, target_group } => loadbalancer::apply::remove(o, &job_id, &target_group)?,
        Command::SetLoadBalancerState { job_id, target_group, state, message, timestamp_ms } => {
            loadbalancer::apply::set_state(o, &job_id, &target_group, state, message, timestamp_ms)?
        }
        Command::PutLbTargets { targets } => loadbalancer::apply::put_targets(o, targets)?,
        Command::ForgetLbTargets { targets } => loadbalancer::apply::forget_targets(o, targets)?,
    };
    Ok(Applied::Rule(response))
}

/// A user's command applied at most once per request id: a retry inside `expires_ms` answers the
/// first application's response. Every outcome is recorded, rejections too: a client told
/// "rejected" must not see a delayed duplicate of the same call succeed later, after other writes.
fn once(o: &mut Overlay, key: String, expires_ms: i64, command: Command) -> Result<CommandResponse> {
    let key = format!("request/{key}");
    if let Some(record) = o.token(&key)? {
        if let Ok(response) = serde_json::from_str::<CommandResponse>(&record.result) {
            return Ok(response);
        }
    }
    let response = match apply(o, command)? {
        Applied::Rule(response) => response,
        // The API wraps users' job commands only; a store command inside is refused rather than
        // applied without its record.
        Applied::Store(inner) => CommandResponse::Rejected(Rejection::new(
            RejectionKind::InvalidArgument,
            "command",
            format!("a request id cannot wrap {}, a store command", inner.name()),
        )),
    };
    let result = serde_json::to_string(&response).unwrap_or_default();
    o.put_token(key, TokenRecord { result, expires_ms });
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CapacityGroup;
    use crate::state::MemoryStore;

    fn run(store: &mut MemoryStore, command: Command) -> Applied {
        let mut o = Overlay::new(store);
        let applied = apply(&mut o, command).unwrap();
        let changes = o.into_changes();
        store.commit(changes);
        applied
    }

    fn group(name: &str, instances: u32, at: i64) -> CapacityGroup {
        CapacityGroup {
            name: name.into(),
            tier: crate::model::Tier::Flex,
            resources_per_instance: crate::model::ResourceDimension::default(),
            instance_count: instances,
            create_time_ms: at,
            update_time_ms: at,
            allowed_capabilities: Vec::new(),
        }
    }

    #[test]
    fn capacity_groups_are_rules_like_any_other() {
        let mut store = MemoryStore::default();
        let create = |g| Command::CreateCapacityGroup { group: g, idempotency_token: Some("t1".into()) };
        assert_eq!(
            run(&mut store, create(group("g", 2, 100))),
            Applied::Rule(CommandResponse::CapacityGroup(group("g", 2, 100)))
        );
        // A retry with the token answers the first group, even with another body.
        assert_eq!(
            run(&mut store, create(group("g", 9, 200))),
            Applied::Rule(CommandResponse::CapacityGroup(group("g", 2, 100)))
        );
        let again =
            run(&mut store, Command::CreateCapacityGroup { group: group("g", 3, 300), idempotency_token: None });
        assert!(matches!(again, Applied::Rule(CommandResponse::Rejected(r)) if r.kind == RejectionKind::AlreadyExists));
        // An update keeps the create time.
        let updated = run(&mut store, Command::UpdateCapacityGroup { group: group("g", 5, 400) });
        let mut want = group("g", 5, 400);
        want.create_time_ms = 100;
        assert_eq!(updated, Applied::Rule(CommandResponse::CapacityGroup(want.clone())));
        assert_eq!(store.capacity_groups.get("g"), Some(&want));
        assert_eq!(
            run(&mut store, Command::DeleteCapacityGroup { name: "g".into() }),
            Applied::Rule(CommandResponse::Done)
        );
        assert!(store.capacity_groups.is_empty());
        let gone = run(&mut store, Command::DeleteCapacityGroup { name: "g".into() });
        assert!(matches!(gone, Applied::Rule(CommandResponse::Rejected(r)) if r.kind == RejectionKind::NotFound));
        // The token outlives the group it made: a retry is told so.
        let retried = run(&mut store, create(group("g", 2, 100)));
        assert!(matches!(retried, Applied::Rule(CommandResponse::Rejected(r)) if r.field == "idempotency_token"));
    }

    #[test]
    fn store_commands_go_back_to_the_store_and_cannot_hide_in_a_request_id() {
        let mut store = MemoryStore::default();
        let set = Command::SetClusterId { cluster_id: "c".into() };
        assert_eq!(run(&mut store, set.clone()), Applied::Store(StoreCommand::SetClusterId { cluster_id: "c".into() }));
        let wrapped = Command::Once { key: "k".into(), expires_ms: 10, command: Box::new(set) };
        let refused = run(&mut store, wrapped);
        assert!(
            matches!(&refused, Applied::Rule(CommandResponse::Rejected(r)) if r.message.contains("SetClusterId")),
            "{refused:?}"
        );
        // Refused and recorded like any outcome: a retry gets the same answer.
        assert!(store.tokens.contains_key("request/k"));
    }
}
