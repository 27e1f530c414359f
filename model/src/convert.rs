//! Conversions between the wire types (titus-proto) and the replicated model.

use titus_proto as pb;

use crate::Invalid;

type Result<T> = std::result::Result<T, Invalid>;
use crate::deployment::{Deployment, RolloutStrategy};
use crate::{CapacityGroup, ResourceDimension, Tier};

pub fn tier_from_proto(field: &str, t: i32) -> Result<Tier> {
    match pb::Tier::try_from(t) {
        Ok(pb::Tier::Critical) => Ok(Tier::Critical),
        // Titus's default tier.
        Ok(pb::Tier::Flex) | Ok(pb::Tier::Unspecified) => Ok(Tier::Flex),
        Err(_) => Err(Invalid::field(field, format!("{t} is not a tier (CRITICAL or FLEX)"))),
    }
}

pub fn tier_to_proto(t: Tier) -> pb::Tier {
    match t {
        Tier::Critical => pb::Tier::Critical,
        Tier::Flex => pb::Tier::Flex,
    }
}

/// The group in a request; `field` is where it sits in the request. Times are left at 0: the
/// leader's clock decides them.
pub fn capacity_group_from_proto(field: &str, g: Option<pb::CapacityGroup>) -> Result<CapacityGroup> {
    let g = g.ok_or_else(|| Invalid::field(field, "is required"))?;
    let r = g.resources_per_instance.unwrap_or_default();
    let group = CapacityGroup {
        name: g.name,
        tier: tier_from_proto(&format!("{field}.tier"), g.tier)?,
        resources_per_instance: ResourceDimension {
            cpu: r.cpu,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb,
            network_mbps: r.network_mbps,
            gpu: r.gpu,
        },
        instance_count: g.instance_count,
        create_time_ms: 0,
        update_time_ms: 0,
        allowed_capabilities: g.allowed_capabilities,
    };
    group.validate(field).map_err(Invalid)?;
    Ok(group)
}

pub fn capacity_group_to_proto(g: CapacityGroup) -> pb::CapacityGroup {
    let r = g.resources_per_instance;
    pb::CapacityGroup {
        name: g.name,
        tier: tier_to_proto(g.tier) as i32,
        resources_per_instance: Some(pb::ResourceDimension {
            cpu: r.cpu,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb,
            network_mbps: r.network_mbps,
            gpu: r.gpu,
        }),
        instance_count: g.instance_count,
        create_time_ms: g.create_time_ms,
        update_time_ms: g.update_time_ms,
        allowed_capabilities: g.allowed_capabilities,
    }
}

// ----- jobs and tasks -----

use std::collections::BTreeMap;

use crate::job::{
    Capacity, Container, ContainerResources, DisruptionBudget, HealthCheck, Image, Job, JobDescriptor, JobGroupInfo,
    JobState, JobType, RetryPolicy, SecurityProfile, ServiceJobProcesses,
};
use crate::task::{Task, TaskState, TaskStatus};
use crate::FieldViolation;

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

fn retry_policy_from_proto(p: Option<pb::RetryPolicy>) -> RetryPolicy {
    use pb::retry_policy::Policy;
    match p.and_then(|p| p.policy) {
        None => RetryPolicy::default(),
        Some(Policy::Immediate(i)) => RetryPolicy::Immediate { retries: i.retries },
        Some(Policy::Delayed(d)) => {
            RetryPolicy::Delayed { initial_delay_ms: d.initial_delay_ms, delay_ms: d.delay_ms, retries: d.retries }
        }
        Some(Policy::ExponentialBackOff(e)) => RetryPolicy::ExponentialBackOff {
            initial_delay_ms: e.initial_delay_ms,
            max_delay_interval_ms: e.max_delay_interval_ms,
            retries: e.retries,
        },
    }
}

fn retry_policy_to_proto(p: &RetryPolicy) -> pb::RetryPolicy {
    use pb::retry_policy::{Delayed, ExponentialBackOff, Immediate, Policy};
    let policy = match *p {
        RetryPolicy::Immediate { retries } => Policy::Immediate(Immediate { retries }),
        RetryPolicy::Delayed { initial_delay_ms, delay_ms, retries } => {
            Policy::Delayed(Delayed { initial_delay_ms, delay_ms, retries })
        }
        RetryPolicy::ExponentialBackOff { initial_delay_ms, max_delay_interval_ms, retries } => {
            Policy::ExponentialBackOff(ExponentialBackOff { initial_delay_ms, max_delay_interval_ms, retries })
        }
    };
    pb::RetryPolicy { policy: Some(policy) }
}

/// The descriptor of a CreateJob request, with Titus's defaults filled in, validated.
pub fn job_descriptor_from_proto(d: Option<pb::JobDescriptor>) -> Result<JobDescriptor> {
    let d = d.ok_or_else(|| Invalid::field("job_descriptor", "is required"))?;
    let c = d.container.unwrap_or_default();
    let r = c.resources.unwrap_or_default();
    let image = c.image.unwrap_or_default();
    let job_type = match d.job_type {
        Some(pb::job_descriptor::JobType::Batch(b)) => JobType::Batch {
            size: b.size,
            runtime_limit_sec: b.runtime_limit_sec,
            retry_policy: retry_policy_from_proto(b.retry_policy),
            retry_on_runtime_limit: b.retry_on_runtime_limit,
        },
        Some(pb::job_descriptor::JobType::Service(s)) => {
            let cap = s.capacity.unwrap_or_default();
            let p = s.service_job_processes.unwrap_or_default();
            JobType::Service {
                capacity: Capacity { min: cap.min, desired: cap.desired, max: cap.max },
                enabled: s.enabled,
                retry_policy: retry_policy_from_proto(s.retry_policy),
                processes: ServiceJobProcesses {
                    disable_increase_desired: p.disable_increase_desired,
                    disable_decrease_desired: p.disable_decrease_desired,
                },
            }
        }
        None => return Err(Invalid::field("job_type", "exactly one of batch and service must be set")),
    };
    let budget = budget_from_proto(d.disruption_budget);
    let group = d.job_group_info.unwrap_or_default();
    let mut descriptor = JobDescriptor {
        owner_email: d.owner.map(|o| o.team_email).unwrap_or_default(),
        application_name: d.application_name,
        capacity_group: d.capacity_group,
        job_group_info: JobGroupInfo { stack: group.stack, detail: group.detail, sequence: group.sequence },
        attributes: d.attributes.into_iter().collect(),
        container: Container {
            resources: ContainerResources {
                cpu: r.cpu,
                gpu: r.gpu,
                memory_mb: r.memory_mb,
                disk_mb: r.disk_mb,
                network_mbps: r.network_mbps,
                shm_size_mb: r.shm_size_mb,
            },
            image: Image { name: image.name, tag: non_empty(image.tag), digest: non_empty(image.digest) },
            entry_point: c.entry_point,
            command: c.command,
            env: c.env.into_iter().collect(),
            soft_constraints: c.soft_constraints.map(|c| c.constraints.into_iter().collect()).unwrap_or_default(),
            hard_constraints: c.hard_constraints.map(|c| c.constraints.into_iter().collect()).unwrap_or_default(),
            capabilities: c.capabilities,
            security_profile: c
                .security_profile
                .map(|p| SecurityProfile {
                    security_groups: p.security_groups,
                    iam_role: p.iam_role,
                    attributes: p.attributes.into_iter().collect(),
                    allow_imds_v1: p.allow_imds_v1,
                })
                .unwrap_or_default(),
            health_check: c.health_check.map(|h| {
                HealthCheck {
                    command: h.command,
                    http_path: h.http_path,
                    http_port: h.http_port,
                    interval_sec: h.interval_sec,
                    timeout_sec: h.timeout_sec,
                    retries: h.retries,
                    start_period_sec: h.start_period_sec,
                    replace_after_sec: h.replace_after_sec,
                }
                .with_defaults()
            }),
        },
        job_type,
        disruption_budget: budget,
    };
    descriptor.apply_defaults();
    descriptor.validate().map_err(Invalid)?;
    Ok(descriptor)
}

pub fn job_descriptor_to_proto(d: &JobDescriptor) -> pb::JobDescriptor {
    let r = &d.container.resources;
    let job_type = match &d.job_type {
        JobType::Batch { size, runtime_limit_sec, retry_policy, retry_on_runtime_limit } => {
            pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
                size: *size,
                runtime_limit_sec: *runtime_limit_sec,
                retry_policy: Some(retry_policy_to_proto(retry_policy)),
                retry_on_runtime_limit: *retry_on_runtime_limit,
            })
        }
        JobType::Service { capacity, enabled, retry_policy, processes } => {
            pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
                capacity: Some(pb::Capacity { min: capacity.min, desired: capacity.desired, max: capacity.max }),
                enabled: *enabled,
                retry_policy: Some(retry_policy_to_proto(retry_policy)),
                service_job_processes: Some(pb::ServiceJobProcesses {
                    disable_increase_desired: processes.disable_increase_desired,
                    disable_decrease_desired: processes.disable_decrease_desired,
                }),
            })
        }
    };
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: d.owner_email.clone() }),
        application_name: d.application_name.clone(),
        capacity_group: d.capacity_group.clone(),
        job_group_info: Some(pb::JobGroupInfo {
            stack: d.job_group_info.stack.clone(),
            detail: d.job_group_info.detail.clone(),
            sequence: d.job_group_info.sequence.clone(),
        }),
        attributes: d.attributes.clone().into_iter().collect(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources {
                cpu: r.cpu,
                gpu: r.gpu,
                memory_mb: r.memory_mb,
                disk_mb: r.disk_mb,
                network_mbps: r.network_mbps,
                shm_size_mb: r.shm_size_mb,
            }),
            image: Some(pb::Image {
                name: d.container.image.name.clone(),
                tag: d.container.image.tag.clone().unwrap_or_default(),
                digest: d.container.image.digest.clone().unwrap_or_default(),
            }),
            entry_point: d.container.entry_point.clone(),
            command: d.container.command.clone(),
            env: d.container.env.clone().into_iter().collect(),
            soft_constraints: Some(pb::Constraints {
                constraints: d.container.soft_constraints.clone().into_iter().collect(),
            }),
            hard_constraints: Some(pb::Constraints {
                constraints: d.container.hard_constraints.clone().into_iter().collect(),
            }),
            capabilities: d.container.capabilities.clone(),
            security_profile: {
                let p = &d.container.security_profile;
                (!p.is_empty()).then(|| pb::SecurityProfile {
                    security_groups: p.security_groups.clone(),
                    iam_role: p.iam_role.clone(),
                    attributes: p.attributes.clone().into_iter().collect(),
                    allow_imds_v1: p.allow_imds_v1,
                })
            },
            health_check: d.container.health_check.as_ref().map(|h| pb::HealthCheck {
                command: h.command.clone(),
                http_path: h.http_path.clone(),
                http_port: h.http_port,
                interval_sec: h.interval_sec,
                timeout_sec: h.timeout_sec,
                retries: h.retries,
                start_period_sec: h.start_period_sec,
                replace_after_sec: h.replace_after_sec,
            }),
        }),
        job_type: Some(job_type),
        disruption_budget: Some(pb::DisruptionBudget {
            self_managed_relocation_time_ms: d.disruption_budget.self_managed_relocation_time_ms,
            availability_percentage_limit: d.disruption_budget.availability_percentage_limit,
            unhealthy_tasks_limit: d.disruption_budget.unhealthy_tasks_limit,
            rate_limit: d.disruption_budget.rate_limit,
            rate_interval_ms: d.disruption_budget.rate_interval_ms,
            rate_percentage_per_hour: d.disruption_budget.rate_percentage_per_hour,
            time_windows: d
                .disruption_budget
                .time_windows
                .iter()
                .map(|w| pb::TimeWindow {
                    days: w.days.iter().map(|d| u32::from(*d)).collect(),
                    start_hour: w.start_hour,
                    end_hour: w.end_hour,
                })
                .collect(),
        }),
    }
}

fn job_state_to_proto(s: JobState) -> pb::JobState {
    match s {
        JobState::Accepted => pb::JobState::JobAccepted,
        JobState::KillInitiated => pb::JobState::JobKillInitiated,
        JobState::Finished => pb::JobState::JobFinished,
    }
}

pub fn job_to_proto(j: &Job) -> pb::Job {
    let status = |s: &crate::job::JobStatus| pb::JobStatus {
        state: job_state_to_proto(s.state) as i32,
        reason_code: s.reason_code.clone(),
        reason_message: s.reason_message.clone(),
        timestamp_ms: s.timestamp_ms,
    };
    pb::Job {
        id: j.id.clone(),
        job_descriptor: Some(job_descriptor_to_proto(&j.descriptor)),
        status: Some(status(&j.status)),
        status_history: j.status_history.iter().map(status).collect(),
        spec_version: j.rollout.version,
        deployment: j
            .rollout
            .deployments
            .last()
            .map(|d| pb::Deployment { steps: Vec::new(), ..deployment_to_proto(d) }),
    }
}

/// A strategy from the wire; absent: the defaults. Validated, fields named from `strategy`.
pub fn strategy_from_proto(s: Option<pb::RolloutStrategy>) -> Result<RolloutStrategy> {
    let Some(s) = s else { return Ok(RolloutStrategy::default()) };
    let strategy = RolloutStrategy {
        max_unavailable: s.max_unavailable,
        max_surge: s.max_surge,
        canary: s.canary,
        canary_pause_sec: s.canary_pause_sec,
        rollback_after_failures: s.rollback_after_failures,
    };
    strategy.validate().map_err(Invalid)?;
    Ok(strategy)
}

pub fn strategy_to_proto(s: &RolloutStrategy) -> pb::RolloutStrategy {
    pb::RolloutStrategy {
        max_unavailable: s.max_unavailable,
        max_surge: s.max_surge,
        canary: s.canary,
        canary_pause_sec: s.canary_pause_sec,
        rollback_after_failures: s.rollback_after_failures,
    }
}

/// A deployment as recorded (the live counts are the caller's to fill).
pub fn deployment_to_proto(d: &Deployment) -> pb::Deployment {
    pb::Deployment {
        id: d.id,
        from_version: d.from_version,
        to_version: d.to_version,
        from_image: d.from_image.clone(),
        to_image: d.to_image.clone(),
        strategy: Some(strategy_to_proto(&d.strategy)),
        state: d.state.name().to_string(),
        rollback_of: d.rollback_of.unwrap_or(0),
        failures: d.failures,
        started_ms: d.started_ms,
        ended_ms: d.ended_ms.unwrap_or(0),
        canary_ready_ms: d.canary_ready_ms.unwrap_or(0),
        promoted: d.promoted,
        message: d.message.clone(),
        steps: d
            .steps
            .iter()
            .map(|s| pb::DeploymentStep {
                at_ms: s.at_ms,
                created: s.created,
                killed: s.killed,
                new_available: s.new_available,
                old_live: s.old_live,
            })
            .collect(),
        ..Default::default()
    }
}

pub fn task_state_to_proto(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Accepted => pb::TaskState::TaskAccepted,
        TaskState::Launched => pb::TaskState::TaskLaunched,
        TaskState::StartInitiated => pb::TaskState::TaskStartInitiated,
        TaskState::Started => pb::TaskState::TaskStarted,
        TaskState::KillInitiated => pb::TaskState::TaskKillInitiated,
        TaskState::Finished => pb::TaskState::TaskFinished,
    }
}

pub fn task_state_from_proto(field: &str, s: i32) -> Result<TaskState> {
    Ok(match pb::TaskState::try_from(s).map_err(|_| Invalid::field(field, format!("{s} is not a task state")))? {
        pb::TaskState::TaskAccepted => TaskState::Accepted,
        pb::TaskState::TaskLaunched => TaskState::Launched,
        pb::TaskState::TaskStartInitiated => TaskState::StartInitiated,
        pb::TaskState::TaskStarted => TaskState::Started,
        pb::TaskState::TaskKillInitiated => TaskState::KillInitiated,
        pb::TaskState::TaskFinished => TaskState::Finished,
    })
}

pub fn task_to_proto(t: &Task, archived: bool) -> pb::Task {
    let status = |s: &TaskStatus| pb::TaskStatus {
        state: task_state_to_proto(s.state) as i32,
        reason_code: s.reason_code.clone(),
        reason_message: s.reason_message.clone(),
        timestamp_ms: s.timestamp_ms,
    };
    pb::Task {
        id: t.id.clone(),
        job_id: t.job_id.clone(),
        status: Some(status(&t.status)),
        status_history: t.status_history.iter().map(status).collect(),
        task_context: t.context.clone().into_iter().collect(),
        original_id: t.original_id.clone(),
        resubmit_of: t.resubmit_of.clone().unwrap_or_default(),
        resubmit_number: t.resubmit_number,
        system_resubmit_number: t.system_resubmit_number,
        index: t.index,
        archived,
        resources: t.resources.as_ref().map(resources_to_proto),
        attributes: t.attributes.clone().into_iter().collect(),
    }
}

/// Checks an id field of a request (job or task id).
pub fn id_field(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Invalid::field(field, "must not be empty"));
    }
    if id.len() > 128 {
        return Err(Invalid::field(field, "must be at most 128 characters"));
    }
    Ok(())
}

pub fn attributes_from_proto(attributes: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let attributes: BTreeMap<String, String> = attributes.into_iter().collect();
    let mut violations = Vec::new();
    crate::job::validate_attributes(&attributes, &mut |f: &str, why: String| {
        violations.push(FieldViolation::new(f, why))
    });
    if violations.is_empty() {
        Ok(attributes)
    } else {
        Err(Invalid(violations))
    }
}

/// A disruption budget as the wire says it; none (or all zero): the default. Not checked here
/// (`DisruptionBudget::validate` names what is wrong); out-of-range values stay out of range.
pub fn budget_from_proto(b: Option<pb::DisruptionBudget>) -> DisruptionBudget {
    match b {
        Some(b) if b != pb::DisruptionBudget::default() => DisruptionBudget {
            self_managed_relocation_time_ms: b.self_managed_relocation_time_ms,
            availability_percentage_limit: b.availability_percentage_limit,
            unhealthy_tasks_limit: b.unhealthy_tasks_limit,
            rate_limit: b.rate_limit,
            rate_interval_ms: b.rate_interval_ms,
            rate_percentage_per_hour: b.rate_percentage_per_hour,
            time_windows: b
                .time_windows
                .into_iter()
                .take(crate::budget::MAX_TIME_WINDOWS + 1)
                .map(|w| crate::budget::TimeWindow {
                    // Out of range stays out of range (8+), for validation to name.
                    days: w.days.iter().take(8).map(|d| u8::try_from(*d).unwrap_or(u8::MAX)).collect(),
                    start_hour: w.start_hour,
                    end_hour: w.end_hour,
                })
                .collect(),
        },
        _ => DisruptionBudget::default(),
    }
}

/// Resources as the wire carries them (what an agent offers or holds, what a task holds).
pub fn resources_to_proto(r: &ResourceDimension) -> pb::AgentResources {
    pb::AgentResources {
        cpu: r.cpu,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
        network_mbps: r.network_mbps,
        gpu: r.gpu,
    }
}

/// What a machine offers, as the wire says it (checked by `ResourceDimension::validate_offered`).
pub fn resources_from_proto(r: &pb::AgentResources) -> ResourceDimension {
    ResourceDimension {
        cpu: r.cpu,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
        network_mbps: r.network_mbps,
        gpu: r.gpu,
    }
}

/// Longest reason message kept from an agent's report or heartbeat.
pub const MAX_AGENT_REASON_LEN: usize = 2048;

/// An agent's registration as the replicated record it becomes (Online, registered at `now_ms`),
/// every field checked: a NaN or infinite CPU count once reached the log this way and made every
/// replica fail to read it back.
pub fn agent_from_register(reg: &pb::AgentRegister, now_ms: i64) -> Result<crate::agent::Agent> {
    use crate::agent::{Agent, AgentState, DEFAULT_INSTANCE_GROUP};
    let agent = Agent {
        id: reg.agent_id.clone(),
        instance_group: if reg.instance_group.is_empty() {
            DEFAULT_INSTANCE_GROUP.into()
        } else {
            reg.instance_group.clone()
        },
        resources: resources_from_proto(&reg.resources.clone().unwrap_or_default()),
        attributes: reg.attributes.clone().into_iter().collect(),
        state: AgentState::Online,
        healthy: !reg.inventory_incomplete,
        unhealthy_reason: if reg.inventory_incomplete { "docker daemon unreachable".into() } else { String::new() },
        registered_ms: now_ms,
        terminating: false,
        lost_ms: None,
        draining: false,
        draining_since_ms: None,
    };
    agent.validate().map_err(Invalid)?;
    Ok(agent)
}

/// The networks an agent declared its containers take addresses from: well formed, at most
/// [`MAX_CONTAINER_NETWORKS`](crate::agent::MAX_CONTAINER_NETWORKS), and each inside one of
/// `allowed` when the operator set any (the control plane's `agents.container-networks`).
pub fn container_networks(declared: &[String], allowed: &[crate::agent::Cidr]) -> Result<Vec<crate::agent::Cidr>> {
    use crate::agent::{Cidr, MAX_CONTAINER_NETWORKS};
    if declared.len() > MAX_CONTAINER_NETWORKS {
        return Err(Invalid(vec![FieldViolation::new(
            "container_networks",
            format!("must have at most {MAX_CONTAINER_NETWORKS} entries, not {}", declared.len()),
        )]));
    }
    let mut out = Vec::with_capacity(declared.len());
    let mut violations = Vec::new();
    for (i, text) in declared.iter().enumerate() {
        let field = format!("container_networks[{i}]");
        match Cidr::parse(text) {
            Err(m) => violations.push(FieldViolation::new(field, m)),
            Ok(n) if !allowed.is_empty() && !allowed.iter().any(|a| n.within(a)) => {
                violations.push(FieldViolation::new(
                    field,
                    format!(
                        "{n} is outside the networks this cluster allows containers ({})",
                        allowed.iter().map(Cidr::to_string).collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
            Ok(n) => out.push(n),
        }
    }
    if violations.is_empty() {
        Ok(out)
    } else {
        Err(Invalid(violations))
    }
}

/// A task state agent `agent_id` reported, as it may enter the log: a valid task id and state; a
/// reason an agent may give (any other is kept as `failed`, the claimed code quoted in the
/// message: an agent must not declare its failures `lost`, which do not count against retries);
/// only the context keys an agent may set, each well formed (`containerIp` an IP address in one of
/// the `networks` the agent declared when it registered — else it could have a load balancer send
/// traffic anywhere —, `exitCode` a number; others are dropped: an agent that rewrote `agent` or `instanceId` could
/// hold resources forever or mislead capacity); bounded text.
pub fn agent_report(
    agent_id: &str,
    rt: pb::AgentTask,
    now_ms: i64,
    networks: &[crate::agent::Cidr],
) -> Result<crate::command::StatusReport> {
    use crate::task::{context, reason};
    crate::validate_name("task_id", &rt.task_id).map_err(|v| Invalid(vec![v]))?;
    let state = task_state_from_proto("state", rt.state)?;
    let mut reason_message = rt.reason_message;
    let reason_code = if state == TaskState::Finished && rt.reason_code.is_empty() {
        reason::NORMAL.to_string()
    } else if rt.reason_code.is_empty() || reason::AGENT_MAY_REPORT.contains(&rt.reason_code.as_str()) {
        rt.reason_code
    } else {
        reason_message = format!("{reason_message} (the agent reported {:?})", crate::truncated(&rt.reason_code));
        reason::FAILED.to_string()
    };
    let context: BTreeMap<String, String> = rt
        .task_context
        .into_iter()
        .filter(|(k, v)| match k.as_str() {
            context::CONTAINER_IP => {
                v.parse::<std::net::IpAddr>().is_ok_and(|ip| networks.iter().any(|n| n.contains(ip)))
            }
            context::EXIT_CODE => v.parse::<i64>().is_ok(),
            context::HEALTH => context::HEALTH_STATES.contains(&v.as_str()),
            _ => false,
        })
        .collect();
    let status = TaskStatus {
        state,
        reason_code,
        reason_message: crate::bounded(reason_message, MAX_AGENT_REASON_LEN),
        timestamp_ms: now_ms,
    };
    Ok(crate::command::StatusReport { task_id: rt.task_id, agent_id: agent_id.to_string(), status, context })
}

#[cfg(test)]
mod agent_port_tests {
    use super::*;
    use crate::task::reason;

    fn task(reason_code: &str, context: &[(&str, &str)]) -> pb::AgentTask {
        pb::AgentTask {
            task_id: "t1".into(),
            state: pb::TaskState::TaskFinished as i32,
            reason_code: reason_code.into(),
            reason_message: "exited".into(),
            task_context: context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_cannot_claim_the_control_plane_s_reasons_or_context() {
        let r = agent_report("a1", task(reason::LOST, &[]), 5, &nets()).unwrap();
        assert_eq!(r.status.reason_code, reason::FAILED, "lost would not count against retries");
        assert!(r.status.reason_message.contains("\"lost\""), "{}", r.status.reason_message);
        assert_eq!(
            agent_report("a1", task(reason::CRASHED, &[]), 5, &nets()).unwrap().status.reason_code,
            reason::CRASHED
        );
        let r = agent_report(
            "a1",
            task("", &[("agent", "a2"), ("instanceId", "i-other"), ("containerIp", "10.0.0.7"), ("exitCode", "137")]),
            5,
            &nets(),
        )
        .unwrap();
        let keys: Vec<&str> = r.context.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["containerIp", "exitCode"]);
        let r =
            agent_report("a1", task("", &[("containerIp", "not an address"), ("exitCode", "x")]), 5, &nets()).unwrap();
        assert!(r.context.is_empty(), "{:?}", r.context);
        assert_eq!((r.status.reason_code.as_str(), r.status.timestamp_ms), (reason::NORMAL, 5));
    }

    fn nets() -> Vec<crate::agent::Cidr> {
        container_networks(&["10.0.0.0/24".to_string()], &[]).unwrap()
    }

    /// A containerIp goes into a load balancer: only an address of the agent's own container
    /// networks is kept.
    #[test]
    fn a_container_ip_outside_the_agent_s_networks_is_dropped() {
        let ip = |v: &str, networks: &[crate::agent::Cidr]| {
            agent_report("a1", task("", &[("containerIp", v)]), 5, networks)
                .unwrap()
                .context
                .get("containerIp")
                .cloned()
        };
        assert_eq!(ip("10.0.0.7", &nets()).as_deref(), Some("10.0.0.7"));
        assert_eq!(ip("10.0.1.7", &nets()), None, "another network");
        assert_eq!(ip("10.0.0.7", &[]), None, "an agent that declared no network");
        assert_eq!(ip("169.254.169.254", &nets()), None);
    }

    #[test]
    fn declared_networks_are_checked_and_bounded() {
        use crate::agent::Cidr;
        let allowed = [Cidr::parse("10.0.0.0/8").unwrap()];
        assert_eq!(container_networks(&["10.2.0.0/16".into()], &allowed).unwrap().len(), 1);
        let Err(Invalid(v)) = container_networks(&["10.2.0.0/16".into(), "0.0.0.0/0".into()], &allowed) else {
            panic!("the whole internet is not a container network")
        };
        assert_eq!(v[0].field, "container_networks[1]");
        let Err(Invalid(v)) = container_networks(&["nope".into()], &[]) else { panic!() };
        assert_eq!(v[0].field, "container_networks[0]");
        let many: Vec<String> = (0..17).map(|i| format!("10.{i}.0.0/16")).collect();
        let Err(Invalid(v)) = container_networks(&many, &[]) else { panic!() };
        assert_eq!(v[0].field, "container_networks");
    }

    #[test]
    fn reports_are_bounded_and_checked() {
        let mut t = task(reason::FAILED, &[]);
        t.reason_message = "é".repeat(MAX_AGENT_REASON_LEN);
        let r = agent_report("a1", t, 0, &nets()).unwrap();
        assert!(r.status.reason_message.len() <= MAX_AGENT_REASON_LEN);
        let mut t = task("", &[]);
        t.state = 99;
        assert!(agent_report("a1", t, 0, &nets()).is_err());
        let mut t = task("", &[]);
        t.task_id = "x".repeat(1000);
        assert!(agent_report("a1", t, 0, &nets()).is_err());
    }
}
