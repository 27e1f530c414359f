//! Titus's V3 messages to ours and back, field by field (see `proto/TITUS-V3.md`). What we
//! cannot honor and Titus would not ignore is refused here, naming the field as Titus's JSON does
//! (`container.resources.efsMounts`); everything else becomes the request our own API already
//! checks, so both APIs share one set of rules.

use std::collections::BTreeMap;

use titus_proto as pb;
use titus_proto::v3;

use crate::error::{Error, Result};

fn refuse(field: &str, why: &str) -> Error {
    Error::invalid(field, why)
}

/// A V3 job descriptor as ours, or the first field we cannot honor.
pub fn descriptor_from_v3(d: v3::JobDescriptor) -> Result<pb::JobDescriptor> {
    if !d.extra_containers.is_empty() {
        return Err(refuse("extraContainers", "extra containers in a task are not supported"));
    }
    if !d.volumes.is_empty() {
        return Err(refuse("volumes", "volumes are not supported"));
    }
    if !d.platform_sidecars.is_empty() {
        return Err(refuse("platformSidecars", "platform sidecars are not supported"));
    }
    if let Some(n) = &d.network_configuration {
        use v3::network_configuration::NetworkMode;
        let mode = NetworkMode::try_from(n.network_mode).unwrap_or(NetworkMode::UnknownNetworkMode);
        if !matches!(mode, NetworkMode::UnknownNetworkMode | NetworkMode::Ipv4Only) {
            return Err(refuse(
                "networkConfiguration.networkMode",
                "only the default network mode (IPv4) is supported",
            ));
        }
    }
    let container = d.container.map(container_from_v3).transpose()?;
    let job_type = match d.job_spec {
        Some(v3::job_descriptor::JobSpec::Batch(b)) => Some(pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
            size: b.size,
            runtime_limit_sec: b.runtime_limit_sec,
            retry_policy: b.retry_policy.map(retry_from_v3),
            retry_on_runtime_limit: b.retry_on_runtime_limit,
        })),
        Some(v3::job_descriptor::JobSpec::Service(s)) => {
            Some(pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
                capacity: s.capacity.map(|c| pb::Capacity { min: c.min, desired: c.desired, max: c.max }),
                enabled: s.enabled,
                retry_policy: s.retry_policy.map(retry_from_v3),
                service_job_processes: s.service_job_processes.map(|p| pb::ServiceJobProcesses {
                    disable_increase_desired: p.disable_increase_desired,
                    disable_decrease_desired: p.disable_decrease_desired,
                }),
            }))
        }
        None => None,
    };
    let batch = matches!(job_type, Some(pb::job_descriptor::JobType::Batch(_)));
    let disruption_budget = d.disruption_budget.map(|b| budget_from_v3(b, batch)).transpose()?;
    Ok(pb::JobDescriptor {
        owner: d.owner.map(|o| pb::Owner { team_email: o.team_email }),
        application_name: d.application_name,
        capacity_group: d.capacity_group,
        job_group_info: d.job_group_info.map(|g| pb::JobGroupInfo {
            stack: g.stack,
            detail: g.detail,
            sequence: g.sequence,
        }),
        attributes: d.attributes,
        container,
        job_type,
        disruption_budget,
    })
}

fn container_from_v3(c: v3::Container) -> Result<pb::Container> {
    if !c.volume_mounts.is_empty() {
        return Err(refuse("container.volumeMounts", "volumes are not supported"));
    }
    let resources = match c.resources {
        Some(r) => {
            if !r.efs_mounts.is_empty() {
                return Err(refuse("container.resources.efsMounts", "EFS mounts are not supported"));
            }
            let static_ip = "static IP addresses are not supported (every task gets an address of its agent's network)";
            if r.static_ip_addresses.is_some() {
                return Err(refuse("container.resources.staticIPAddresses", static_ip));
            }
            if !r.signed_address_allocations.is_empty() {
                return Err(refuse("container.resources.signedAddressAllocations", static_ip));
            }
            Some(pb::ContainerResources {
                cpu: r.cpu,
                gpu: r.gpu,
                memory_mb: r.memory_mb,
                disk_mb: r.disk_mb,
                network_mbps: r.network_mbps,
                shm_size_mb: r.shm_size_mb,
            })
        }
        None => None,
    };
    Ok(pb::Container {
        resources,
        image: c.image.map(|i| pb::Image { name: i.name, tag: i.tag, digest: i.digest }),
        entry_point: c.entry_point,
        command: c.command,
        env: c.env,
        soft_constraints: constraints_from_v3(c.soft_constraints, "container.softConstraints")?,
        hard_constraints: constraints_from_v3(c.hard_constraints, "container.hardConstraints")?,
        capabilities: Vec::new(),
        security_profile: c.security_profile.map(|s| pb::SecurityProfile {
            security_groups: s.security_groups,
            iam_role: s.iam_role,
            attributes: s.attributes,
            allow_imds_v1: false,
        }),
        health_check: None,
    })
}

fn constraints_from_v3(c: Option<v3::Constraints>, field: &str) -> Result<Option<pb::Constraints>> {
    let Some(c) = c else { return Ok(None) };
    if !c.expression.is_empty() {
        return Err(refuse(
            &format!("{field}.expression"),
            "constraint expressions are not supported; use constraints",
        ));
    }
    Ok(Some(pb::Constraints { constraints: c.constraints }))
}

fn retry_from_v3(r: v3::RetryPolicy) -> pb::RetryPolicy {
    use pb::retry_policy::Policy as Ours;
    use v3::retry_policy::Policy;
    pb::RetryPolicy {
        policy: r.policy.map(|p| match p {
            Policy::Immediate(i) => Ours::Immediate(pb::retry_policy::Immediate { retries: i.retries }),
            Policy::Delayed(d) => Ours::Delayed(pb::retry_policy::Delayed {
                initial_delay_ms: d.initial_delay_ms,
                delay_ms: d.delay_ms,
                retries: d.retries,
            }),
            Policy::ExponentialBackOff(e) => Ours::ExponentialBackOff(pb::retry_policy::ExponentialBackOff {
                initial_delay_ms: e.initial_delay_ms,
                max_delay_interval_ms: e.max_delay_interval_ms,
                retries: e.retries,
            }),
        }),
    }
}

fn retry_to_v3(r: pb::RetryPolicy) -> v3::RetryPolicy {
    use pb::retry_policy::Policy as Ours;
    use v3::retry_policy::Policy;
    v3::RetryPolicy {
        policy: r.policy.map(|p| match p {
            Ours::Immediate(i) => Policy::Immediate(v3::retry_policy::Immediate { retries: i.retries }),
            Ours::Delayed(d) => Policy::Delayed(v3::retry_policy::Delayed {
                initial_delay_ms: d.initial_delay_ms,
                delay_ms: d.delay_ms,
                retries: d.retries,
            }),
            Ours::ExponentialBackOff(e) => Policy::ExponentialBackOff(v3::retry_policy::ExponentialBackOff {
                initial_delay_ms: e.initial_delay_ms,
                max_delay_interval_ms: e.max_delay_interval_ms,
                retries: e.retries,
            }),
        }),
    }
}

const HOUR_MS: u64 = 3_600_000;

/// Titus's budget (one policy, one rate, windows in a time zone) as ours (flat, UTC).
pub fn budget_from_v3(b: v3::JobDisruptionBudget, batch: bool) -> Result<pb::DisruptionBudget> {
    use v3::job_disruption_budget::{Policy, Rate};
    let mut out = pb::DisruptionBudget::default();
    match b.policy {
        None => {}
        Some(Policy::SelfManaged(s)) => out.self_managed_relocation_time_ms = s.relocation_time_ms,
        Some(Policy::AvailabilityPercentageLimit(a)) => {
            out.availability_percentage_limit = a.percentage_of_healthy_containers
        }
        Some(Policy::UnhealthyTasksLimit(u)) => out.unhealthy_tasks_limit = u.limit_of_unhealthy_containers,
        // Drains leave batch tasks to finish where they run: a limit on their relocations holds.
        Some(Policy::RelocationLimit(_)) if batch => {}
        Some(Policy::RelocationLimit(_)) => {
            return Err(refuse(
                "disruptionBudget.relocationLimit",
                "a relocation limit is for batch jobs; a service job takes an availability or unhealthy-tasks limit",
            ))
        }
    }
    match b.rate {
        None | Some(Rate::RateUnlimited(_)) => {}
        Some(Rate::RatePercentagePerHour(r)) => {
            out.rate_percentage_per_hour = r.max_percentage_of_containers_relocated_in_hour
        }
        Some(Rate::RatePerInterval(r)) => {
            out.rate_limit = r.limit_per_interval;
            out.rate_interval_ms = r.interval_ms;
        }
        Some(Rate::RatePercentagePerInterval(r)) if r.interval_ms == HOUR_MS => {
            out.rate_percentage_per_hour = r.percentage_limit_per_interval
        }
        Some(Rate::RatePercentagePerInterval(_)) => {
            return Err(refuse(
                "disruptionBudget.ratePercentagePerInterval.intervalMs",
                "a percentage rate is supported per hour (3600000) only; use ratePerInterval for other intervals",
            ))
        }
    }
    for (i, w) in b.time_windows.into_iter().enumerate() {
        let field = format!("disruptionBudget.timeWindows[{i}]");
        if !matches!(w.time_zone.as_str(), "" | "UTC" | "utc" | "Etc/UTC" | "GMT") {
            return Err(refuse(&format!("{field}.timeZone"), "time windows are in UTC only"));
        }
        // Titus's days run Monday (0) to Sunday (6); ours Sunday (0) to Saturday (6).
        let mut days = Vec::with_capacity(w.days.len());
        for d in w.days {
            if !(0..=6).contains(&d) {
                return Err(refuse(&format!("{field}.days"), "days are Monday (0) to Sunday (6)"));
            }
            days.push(((d + 1) % 7) as u32);
        }
        let hours = if w.hourly_time_windows.is_empty() {
            vec![(0, 24)]
        } else {
            w.hourly_time_windows.iter().map(|h| (h.start_hour, h.end_hour)).collect()
        };
        for (start_hour, end_hour) in hours {
            out.time_windows.push(pb::TimeWindow { days: days.clone(), start_hour, end_hour });
        }
    }
    Ok(out)
}

/// Ours as Titus's: the policy and rate set, windows in UTC.
pub fn budget_to_v3(b: pb::DisruptionBudget) -> v3::JobDisruptionBudget {
    use v3::job_disruption_budget as jdb;
    let policy = if b.availability_percentage_limit > 0.0 {
        jdb::Policy::AvailabilityPercentageLimit(jdb::AvailabilityPercentageLimit {
            percentage_of_healthy_containers: b.availability_percentage_limit,
        })
    } else if b.unhealthy_tasks_limit > 0 {
        jdb::Policy::UnhealthyTasksLimit(jdb::UnhealthyTasksLimit {
            limit_of_unhealthy_containers: b.unhealthy_tasks_limit,
        })
    } else {
        jdb::Policy::SelfManaged(jdb::SelfManaged { relocation_time_ms: b.self_managed_relocation_time_ms })
    };
    let rate = if b.rate_limit > 0 {
        jdb::Rate::RatePerInterval(jdb::RatePerInterval {
            interval_ms: b.rate_interval_ms,
            limit_per_interval: b.rate_limit,
        })
    } else if b.rate_percentage_per_hour > 0.0 {
        jdb::Rate::RatePercentagePerHour(jdb::RatePercentagePerHour {
            max_percentage_of_containers_relocated_in_hour: b.rate_percentage_per_hour,
        })
    } else {
        jdb::Rate::RateUnlimited(jdb::RateUnlimited {})
    };
    let time_windows = b
        .time_windows
        .into_iter()
        .map(|w| v3::TimeWindow {
            days: w.days.iter().map(|d| ((*d as i32) + 6) % 7).collect(),
            hourly_time_windows: vec![v3::time_window::HourlyTimeWindow {
                start_hour: w.start_hour,
                end_hour: w.end_hour,
            }],
            time_zone: "UTC".into(),
        })
        .collect();
    v3::JobDisruptionBudget {
        policy: Some(policy),
        rate: Some(rate),
        time_windows,
        container_health_providers: Vec::new(),
    }
}

pub fn descriptor_to_v3(d: pb::JobDescriptor) -> v3::JobDescriptor {
    let job_spec = d.job_type.map(|t| match t {
        pb::job_descriptor::JobType::Batch(b) => v3::job_descriptor::JobSpec::Batch(v3::BatchJobSpec {
            size: b.size,
            runtime_limit_sec: b.runtime_limit_sec,
            retry_policy: b.retry_policy.map(retry_to_v3),
            retry_on_runtime_limit: b.retry_on_runtime_limit,
        }),
        pb::job_descriptor::JobType::Service(s) => v3::job_descriptor::JobSpec::Service(v3::ServiceJobSpec {
            capacity: s.capacity.map(|c| v3::Capacity { min: c.min, max: c.max, desired: c.desired }),
            enabled: s.enabled,
            retry_policy: s.retry_policy.map(retry_to_v3),
            migration_policy: Some(v3::MigrationPolicy {
                policy: Some(v3::migration_policy::Policy::SystemDefault(v3::migration_policy::SystemDefault {})),
            }),
            service_job_processes: s.service_job_processes.map(|p| v3::service_job_spec::ServiceJobProcesses {
                disable_increase_desired: p.disable_increase_desired,
                disable_decrease_desired: p.disable_decrease_desired,
            }),
        }),
    });
    let container = d.container.map(|c| v3::Container {
        resources: c.resources.map(|r| v3::ContainerResources {
            cpu: r.cpu,
            gpu: r.gpu,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb,
            network_mbps: r.network_mbps,
            allocate_ip: true,
            shm_size_mb: r.shm_size_mb,
            ..Default::default()
        }),
        security_profile: c.security_profile.map(|s| v3::SecurityProfile {
            security_groups: s.security_groups,
            iam_role: s.iam_role,
            attributes: s.attributes,
        }),
        image: c.image.map(|i| v3::Image { name: i.name, tag: i.tag, digest: i.digest }),
        attributes: BTreeMap::new(),
        entry_point: c.entry_point,
        command: c.command,
        env: c.env,
        soft_constraints: c
            .soft_constraints
            .map(|s| v3::Constraints { constraints: s.constraints, expression: String::new() }),
        hard_constraints: c
            .hard_constraints
            .map(|s| v3::Constraints { constraints: s.constraints, expression: String::new() }),
        experimental: None,
        volume_mounts: Vec::new(),
    });
    v3::JobDescriptor {
        owner: d.owner.map(|o| v3::Owner { team_email: o.team_email }),
        application_name: d.application_name,
        capacity_group: d.capacity_group,
        job_group_info: d.job_group_info.map(|g| v3::JobGroupInfo {
            stack: g.stack,
            detail: g.detail,
            sequence: g.sequence,
        }),
        attributes: d.attributes,
        container,
        job_spec,
        disruption_budget: d.disruption_budget.map(budget_to_v3),
        network_configuration: None,
        extra_containers: Vec::new(),
        volumes: Vec::new(),
        platform_sidecars: Vec::new(),
    }
}

fn ms(t: i64) -> u64 {
    u64::try_from(t).unwrap_or(0)
}

fn job_status_to_v3(s: pb::JobStatus) -> v3::JobStatus {
    use v3::job_status::JobState;
    let state = match pb::JobState::try_from(s.state).unwrap_or(pb::JobState::JobAccepted) {
        pb::JobState::JobAccepted => JobState::Accepted,
        pb::JobState::JobKillInitiated => JobState::KillInitiated,
        pb::JobState::JobFinished => JobState::Finished,
    };
    v3::JobStatus {
        state: state as i32,
        reason_code: s.reason_code,
        reason_message: s.reason_message,
        timestamp: ms(s.timestamp_ms),
    }
}

pub fn job_to_v3(j: pb::Job) -> v3::Job {
    let status = j.status.map(job_status_to_v3);
    let version = status.as_ref().map(|s| v3::Version { timestamp: s.timestamp });
    v3::Job {
        id: j.id,
        job_descriptor: j.job_descriptor.map(descriptor_to_v3),
        status,
        status_history: j.status_history.into_iter().map(job_status_to_v3).collect(),
        version,
    }
}

/// Titus's task state for ours (Titus numbers Finished 6: its unused Disconnected is 5).
pub fn task_state_to_v3(state: i32) -> v3::task_status::TaskState {
    use v3::task_status::TaskState;
    match pb::TaskState::try_from(state).unwrap_or(pb::TaskState::TaskAccepted) {
        pb::TaskState::TaskAccepted => TaskState::Accepted,
        pb::TaskState::TaskLaunched => TaskState::Launched,
        pb::TaskState::TaskStartInitiated => TaskState::StartInitiated,
        pb::TaskState::TaskStarted => TaskState::Started,
        pb::TaskState::TaskKillInitiated => TaskState::KillInitiated,
        pb::TaskState::TaskFinished => TaskState::Finished,
    }
}

fn task_status_to_v3(s: pb::TaskStatus) -> v3::TaskStatus {
    v3::TaskStatus {
        state: task_state_to_v3(s.state) as i32,
        reason_code: s.reason_code,
        reason_message: s.reason_message,
        timestamp: ms(s.timestamp_ms),
        container_state: Vec::new(),
    }
}

pub fn task_to_v3(t: pb::Task) -> v3::Task {
    let mut context = t.task_context;
    // Titus's context keys for what ours keeps as fields.
    context.entry("taskIndex".into()).or_insert_with(|| t.index.to_string());
    context.entry("originalId".into()).or_insert_with(|| t.original_id.clone());
    if !t.resubmit_of.is_empty() {
        context.entry("resubmitOf".into()).or_insert_with(|| t.resubmit_of.clone());
    }
    context.entry("resubmitNumber".into()).or_insert_with(|| t.resubmit_number.to_string());
    context.entry("systemResubmitNumber".into()).or_insert_with(|| t.system_resubmit_number.to_string());
    let status = t.status.map(task_status_to_v3);
    let version = status.as_ref().map(|s| v3::Version { timestamp: s.timestamp });
    v3::Task {
        id: t.id,
        job_id: t.job_id,
        task_context: context,
        status,
        status_history: t.status_history.into_iter().map(task_status_to_v3).collect(),
        log_location: None,
        migration_details: None,
        attributes: t.attributes,
        version,
    }
}

/// Keeps the fields of a job that `fields` names (Titus's projection: top-level names, or
/// `jobDescriptor.<name>` for a part of the descriptor); the id always stays. None: all.
pub fn project_job(job: v3::Job, fields: &[String]) -> v3::Job {
    if fields.is_empty() {
        return job;
    }
    let wants = |name: &str| fields.iter().any(|f| f == name);
    let descriptor = job.job_descriptor.and_then(|d| {
        if wants("jobDescriptor") {
            return Some(d);
        }
        let sub: Vec<&str> = fields.iter().filter_map(|f| f.strip_prefix("jobDescriptor.")).collect();
        if sub.is_empty() {
            return None;
        }
        let has = |n: &str| sub.contains(&n);
        Some(v3::JobDescriptor {
            owner: d.owner.filter(|_| has("owner")),
            application_name: if has("applicationName") { d.application_name } else { String::new() },
            capacity_group: if has("capacityGroup") { d.capacity_group } else { String::new() },
            job_group_info: d.job_group_info.filter(|_| has("jobGroupInfo")),
            attributes: if has("attributes") { d.attributes } else { BTreeMap::new() },
            container: d.container.filter(|_| has("container")),
            job_spec: d.job_spec.filter(|s| match s {
                v3::job_descriptor::JobSpec::Batch(_) => has("batch") || has("jobSpec"),
                v3::job_descriptor::JobSpec::Service(_) => has("service") || has("jobSpec"),
            }),
            disruption_budget: d.disruption_budget.filter(|_| has("disruptionBudget")),
            ..Default::default()
        })
    });
    v3::Job {
        id: job.id,
        job_descriptor: descriptor,
        status: job.status.filter(|_| wants("status")),
        status_history: if wants("statusHistory") { job.status_history } else { Vec::new() },
        version: job.version.filter(|_| wants("version")),
    }
}

/// Keeps the fields of a task that `fields` names (the id always stays). None: all.
pub fn project_task(task: v3::Task, fields: &[String]) -> v3::Task {
    if fields.is_empty() {
        return task;
    }
    let wants = |name: &str| fields.iter().any(|f| f == name);
    let context_keys: Vec<&str> = fields.iter().filter_map(|f| f.strip_prefix("taskContext.")).collect();
    let task_context = if wants("taskContext") {
        task.task_context
    } else {
        task.task_context.into_iter().filter(|(k, _)| context_keys.contains(&k.as_str())).collect()
    };
    v3::Task {
        id: task.id,
        job_id: if wants("jobId") { task.job_id } else { String::new() },
        task_context,
        status: task.status.filter(|_| wants("status")),
        status_history: if wants("statusHistory") { task.status_history } else { Vec::new() },
        log_location: None,
        migration_details: None,
        attributes: if wants("attributes") { task.attributes } else { BTreeMap::new() },
        version: task.version.filter(|_| wants("version")),
    }
}

/// How deep a page asked by number may start: each page before it is read to find it.
pub const MAX_PAGE_NUMBER_ITEMS: u64 = 10_000;

/// Titus's page (a cursor, or a page number) as ours: the cursor, and how many pages of `size`
/// to skip first when it asks by number.
#[allow(deprecated)] // Titus marks page numbers deprecated; its clients still send them.
pub fn page_from_v3(p: Option<v3::Page>) -> Result<(pb::Page, u32)> {
    let p = p.unwrap_or_default();
    if p.page_size < 0 {
        return Err(refuse("page.pageSize", "must not be negative"));
    }
    let number = p.page_number;
    if number < 0 {
        return Err(refuse("page.pageNumber", "must not be negative"));
    }
    if number > 0 && !p.cursor.is_empty() {
        return Err(refuse("page.pageNumber", "give a cursor or a page number, not both"));
    }
    // A page by number walks every page before it: bounded, as a deep page by cursor is not.
    let size = if p.page_size == 0 { crate::jobs::query::DEFAULT_PAGE_SIZE } else { p.page_size as u32 };
    if u64::from(number as u32) * u64::from(size) > MAX_PAGE_NUMBER_ITEMS {
        return Err(refuse(
            "page.pageNumber",
            &format!("pages by number reach the first {MAX_PAGE_NUMBER_ITEMS} items (pageNumber × pageSize); page on by cursor"),
        ));
    }
    Ok((pb::Page { page_size: p.page_size as u32, cursor: p.cursor }, number as u32))
}

/// Our pagination as Titus's, for page `number` of `size` items.
#[allow(deprecated)] // totalPages and the page number: deprecated by Titus, still read by its clients.
pub fn pagination_to_v3(p: pb::Pagination, number: u32, size: u32, cursor_position: u32) -> v3::Pagination {
    let size = if size == 0 { crate::jobs::query::DEFAULT_PAGE_SIZE } else { size };
    v3::Pagination {
        current_page: Some(v3::Page { page_number: number as i32, page_size: size as i32, cursor: String::new() }),
        has_more: p.has_more,
        total_pages: p.total_items.div_ceil(size) as i32,
        total_items: p.total_items as i32,
        cursor: p.cursor,
        cursor_position: cursor_position as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(
        policy: v3::job_disruption_budget::Policy,
        rate: v3::job_disruption_budget::Rate,
    ) -> v3::JobDisruptionBudget {
        v3::JobDisruptionBudget { policy: Some(policy), rate: Some(rate), ..Default::default() }
    }

    #[test]
    fn a_budget_goes_both_ways_and_what_cannot_be_honored_is_refused_by_name() {
        use v3::job_disruption_budget as jdb;
        let mut b = budget(
            jdb::Policy::AvailabilityPercentageLimit(jdb::AvailabilityPercentageLimit {
                percentage_of_healthy_containers: 80.0,
            }),
            jdb::Rate::RatePerInterval(jdb::RatePerInterval { interval_ms: 60_000, limit_per_interval: 2 }),
        );
        b.time_windows.push(v3::TimeWindow {
            days: vec![v3::Day::Monday as i32, v3::Day::Sunday as i32],
            hourly_time_windows: vec![v3::time_window::HourlyTimeWindow { start_hour: 9, end_hour: 17 }],
            time_zone: "UTC".into(),
        });
        let ours = budget_from_v3(b.clone(), false).unwrap();
        assert_eq!((ours.availability_percentage_limit, ours.rate_limit, ours.rate_interval_ms), (80.0, 2, 60_000));
        assert_eq!(ours.time_windows[0].days, vec![1, 0], "Monday is our 1, Sunday our 0");
        assert_eq!(budget_to_v3(ours), b, "and back");

        let mut zoned = b.clone();
        zoned.time_windows[0].time_zone = "America/Los_Angeles".into();
        let e = budget_from_v3(zoned, false).unwrap_err().to_string();
        assert!(e.contains("disruptionBudget.timeWindows[0].timeZone"), "{e}");
        let relocation = budget(
            jdb::Policy::RelocationLimit(jdb::RelocationLimit { limit: 1 }),
            jdb::Rate::RateUnlimited(jdb::RateUnlimited {}),
        );
        assert!(budget_from_v3(relocation.clone(), true).is_ok(), "a batch job's relocation limit holds");
        assert!(budget_from_v3(relocation, false)
            .unwrap_err()
            .to_string()
            .contains("disruptionBudget.relocationLimit"));
    }

    #[test]
    fn unsupported_container_features_are_refused_naming_the_field() {
        let with = |f: &dyn Fn(&mut v3::JobDescriptor)| {
            let mut d = v3::JobDescriptor {
                container: Some(v3::Container { resources: Some(Default::default()), ..Default::default() }),
                ..Default::default()
            };
            f(&mut d);
            descriptor_from_v3(d).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(with(&|_| {}).is_ok());
        let efs =
            with(&|d| d.container.as_mut().unwrap().resources.as_mut().unwrap().efs_mounts.push(Default::default()));
        assert!(efs.unwrap_err().contains("container.resources.efsMounts"));
        let expr = with(&|d| {
            d.container.as_mut().unwrap().hard_constraints =
                Some(v3::Constraints { constraints: BTreeMap::new(), expression: "x".into() })
        });
        assert!(expr.unwrap_err().contains("container.hardConstraints.expression"));
        let mode = with(&|d| {
            d.network_configuration =
                Some(v3::NetworkConfiguration { network_mode: v3::network_configuration::NetworkMode::Ipv6Only as i32 })
        });
        assert!(mode.unwrap_err().contains("networkConfiguration.networkMode"));
        // Titus's executor parameters and the experimental field are accepted (and ignored).
        assert!(with(&|d| {
            d.container.as_mut().unwrap().attributes.insert("titusParameter.cpu.burstEnabled".into(), "true".into());
        })
        .is_ok());
    }

    /// Every field refused here, each named in its error.
    #[test]
    fn every_refused_field_is_named() {
        use v3::job_disruption_budget as jdb;
        type Change = fn(&mut v3::JobDescriptor);
        let service = v3::job_descriptor::JobSpec::Service(v3::ServiceJobSpec::default());
        let cases: Vec<(&str, Change)> = vec![
            ("extraContainers", |d| d.extra_containers.push(Default::default())),
            ("volumes", |d| d.volumes.push(Default::default())),
            ("platformSidecars", |d| d.platform_sidecars.push(Default::default())),
            ("networkConfiguration.networkMode", |d| {
                d.network_configuration = Some(v3::NetworkConfiguration { network_mode: 5 })
            }),
            ("container.volumeMounts", |d| d.container.as_mut().unwrap().volume_mounts.push(Default::default())),
            ("container.resources.efsMounts", |d| {
                d.container.as_mut().unwrap().resources.as_mut().unwrap().efs_mounts.push(Default::default())
            }),
            ("container.resources.staticIPAddresses", |d| {
                let r = d.container.as_mut().unwrap().resources.as_mut().unwrap();
                r.static_ip_addresses = Some(v3::container_resources::StaticIpAddresses::Pool("p".into()))
            }),
            ("container.resources.signedAddressAllocations", |d| {
                let r = d.container.as_mut().unwrap().resources.as_mut().unwrap();
                r.signed_address_allocations.push(Default::default())
            }),
            ("container.softConstraints.expression", |d| {
                d.container.as_mut().unwrap().soft_constraints =
                    Some(v3::Constraints { constraints: BTreeMap::new(), expression: "a".into() })
            }),
            ("container.hardConstraints.expression", |d| {
                d.container.as_mut().unwrap().hard_constraints =
                    Some(v3::Constraints { constraints: BTreeMap::new(), expression: "a".into() })
            }),
            ("disruptionBudget.relocationLimit", |d| {
                d.disruption_budget = Some(v3::JobDisruptionBudget {
                    policy: Some(jdb::Policy::RelocationLimit(jdb::RelocationLimit { limit: 1 })),
                    ..Default::default()
                })
            }),
            ("disruptionBudget.ratePercentagePerInterval.intervalMs", |d| {
                let rate = jdb::RatePercentagePerInterval { interval_ms: 60_000, percentage_limit_per_interval: 5.0 };
                d.disruption_budget = Some(v3::JobDisruptionBudget {
                    rate: Some(jdb::Rate::RatePercentagePerInterval(rate)),
                    ..Default::default()
                })
            }),
            ("disruptionBudget.timeWindows[0].timeZone", |d| {
                let w = v3::TimeWindow { time_zone: "PST".into(), ..Default::default() };
                d.disruption_budget = Some(v3::JobDisruptionBudget { time_windows: vec![w], ..Default::default() })
            }),
            ("disruptionBudget.timeWindows[0].days", |d| {
                let w = v3::TimeWindow { days: vec![7], ..Default::default() };
                d.disruption_budget = Some(v3::JobDisruptionBudget { time_windows: vec![w], ..Default::default() })
            }),
        ];
        for (field, change) in cases {
            let mut d = v3::JobDescriptor {
                container: Some(v3::Container { resources: Some(Default::default()), ..Default::default() }),
                job_spec: Some(service.clone()),
                ..Default::default()
            };
            change(&mut d);
            let e = descriptor_from_v3(d).map(|_| ()).expect_err(field).to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let page = |number: i32, size: i32, cursor: &str| {
            #[allow(deprecated)]
            let p = v3::Page { page_number: number, page_size: size, cursor: cursor.into() };
            page_from_v3(Some(p)).map(|_| ()).unwrap_err().to_string()
        };
        assert!(page(0, -1, "").contains("page.pageSize"));
        assert!(page(-1, 10, "").contains("page.pageNumber"));
        assert!(page(2, 10, "c").contains("page.pageNumber"), "a number and a cursor");
        assert!(page(i32::MAX, 1000, "").contains("page.pageNumber"), "deeper than a page by number reaches");
        assert!(page(101, 0, "").contains("page.pageNumber"), "the default size counts too");
        #[allow(deprecated)]
        let deepest = v3::Page { page_number: 10, page_size: 1000, cursor: String::new() };
        assert_eq!(page_from_v3(Some(deepest)).expect("within the bound").1, 10);
    }

    #[test]
    fn task_states_keep_titus_s_numbers() {
        assert_eq!(task_state_to_v3(pb::TaskState::TaskFinished as i32) as i32, 6);
        assert_eq!(task_state_to_v3(pb::TaskState::TaskStarted as i32) as i32, 3);
    }
}
