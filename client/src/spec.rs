//! Job specs as users write them (YAML or JSON files), in Titus's JSON field names
//! (`applicationName`, `memoryMB`, ...), converted to the API's job descriptor. Unknown fields are
//! errors, so a typo is reported instead of silently ignored; the server then validates values and
//! names any bad field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use titus_proto as pb;

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSpec {
    /// The job's id: set by `titus job get -o yaml`, read by `titus job apply` (which job to
    /// update); a new job's id is chosen by the server.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub owner: Owner,
    pub application_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub capacity_group: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub job_group_info: JobGroupInfo,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    pub container: Container,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudget>,
    /// What the server says of the job (`titus job get -o yaml`): read-only, ignored on input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Owner {
    pub team_email: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobGroupInfo {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stack: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sequence: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cpu: f64,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskMB", default, skip_serializing_if = "is_zero")]
    pub disk_mb: u32,
    #[serde(rename = "networkMbps", default, skip_serializing_if = "is_zero")]
    pub network_mbps: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpu: u32,
    #[serde(rename = "shmSizeMB", default, skip_serializing_if = "is_zero")]
    pub shm_size_mb: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tag: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Container {
    pub resources: Resources,
    pub image: Image,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entry_point: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub soft_constraints: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hard_constraints: BTreeMap<String, String>,
    /// Linux capabilities beyond the default set (the capacity group must allow them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// The job's AWS identity: IAM role and security groups (Titus's `securityProfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_profile: Option<SecurityProfile>,
    /// How the agent tells whether a task serves (a command in the container, or an HTTP GET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// A container's health check (`command`, or `httpPath` and `httpPort`); times in seconds.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub http_path: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub http_port: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval_sec: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_sec: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period_sec: u32,
    /// A service task unhealthy this long is replaced; 0: never.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replace_after_sec: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityProfile {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iam_role: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Instance metadata without an IMDSv2 session token.
    #[serde(default, rename = "allowImdsV1", skip_serializing_if = "is_false")]
    pub allow_imds_v1: bool,
}

/// Exactly one of the three, as in Titus's JSON (`{"immediate": {"retries": 3}}`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immediate: Option<Immediate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed: Option<Delayed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponential_back_off: Option<ExponentialBackOff>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Immediate {
    pub retries: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delayed {
    pub initial_delay_ms: u64,
    pub delay_ms: u64,
    pub retries: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExponentialBackOff {
    pub initial_delay_ms: u64,
    pub max_delay_interval_ms: u64,
    pub retries: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Batch {
    pub size: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub runtime_limit_sec: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub retry_on_runtime_limit: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min: u32,
    pub desired: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub capacity: Capacity,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
}

fn yes() -> bool {
    true
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DisruptionBudget {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub self_managed_relocation_time_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub availability_percentage_limit: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unhealthy_tasks_limit: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_limit: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_interval_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub rate_percentage_per_hour: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_windows: Vec<TimeWindow>,
}

/// Days 0 (Sunday) to 6 (none: every day), hours [startHour, endHour) UTC.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeWindow {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<u32>,
    pub start_hour: u32,
    pub end_hour: u32,
}

fn retry_policy(field: &str, p: Option<RetryPolicy>) -> Result<Option<pb::RetryPolicy>, String> {
    use pb::retry_policy::Policy;
    let Some(p) = p else { return Ok(None) };
    let policy = match (p.immediate, p.delayed, p.exponential_back_off) {
        (Some(i), None, None) => Policy::Immediate(pb::retry_policy::Immediate { retries: i.retries }),
        (None, Some(d), None) => Policy::Delayed(pb::retry_policy::Delayed {
            initial_delay_ms: d.initial_delay_ms,
            delay_ms: d.delay_ms,
            retries: d.retries,
        }),
        (None, None, Some(e)) => Policy::ExponentialBackOff(pb::retry_policy::ExponentialBackOff {
            initial_delay_ms: e.initial_delay_ms,
            max_delay_interval_ms: e.max_delay_interval_ms,
            retries: e.retries,
        }),
        _ => return Err(format!("{field}: exactly one of immediate, delayed and exponentialBackOff must be set")),
    };
    Ok(Some(pb::RetryPolicy { policy: Some(policy) }))
}

/// Parses a spec: JSON when it starts with `{`, YAML otherwise. The error names the field or the
/// line that is wrong.
pub fn parse(text: &str) -> Result<JobSpec, String> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }
}

fn retry_policy_from(p: Option<pb::RetryPolicy>) -> Option<RetryPolicy> {
    use pb::retry_policy::Policy;
    Some(match p?.policy? {
        Policy::Immediate(i) => RetryPolicy { immediate: Some(Immediate { retries: i.retries }), ..Default::default() },
        Policy::Delayed(d) => RetryPolicy {
            delayed: Some(Delayed { initial_delay_ms: d.initial_delay_ms, delay_ms: d.delay_ms, retries: d.retries }),
            ..Default::default()
        },
        Policy::ExponentialBackOff(e) => RetryPolicy {
            exponential_back_off: Some(ExponentialBackOff {
                initial_delay_ms: e.initial_delay_ms,
                max_delay_interval_ms: e.max_delay_interval_ms,
                retries: e.retries,
            }),
            ..Default::default()
        },
    })
}

impl JobSpec {
    /// A job as a spec file says it: what `into_descriptor` reads back into the same descriptor.
    pub fn from_job(job: &pb::Job) -> JobSpec {
        let d = job.job_descriptor.clone().unwrap_or_default();
        let c = d.container.unwrap_or_default();
        let r = c.resources.unwrap_or_default();
        let image = c.image.unwrap_or_default();
        let group = d.job_group_info.unwrap_or_default();
        let (batch, service) = match d.job_type {
            Some(pb::job_descriptor::JobType::Batch(b)) => (
                Some(Batch {
                    size: b.size,
                    runtime_limit_sec: b.runtime_limit_sec,
                    retry_policy: retry_policy_from(b.retry_policy),
                    retry_on_runtime_limit: b.retry_on_runtime_limit,
                }),
                None,
            ),
            Some(pb::job_descriptor::JobType::Service(s)) => {
                let cap = s.capacity.unwrap_or_default();
                let capacity = Capacity { min: cap.min, desired: cap.desired, max: cap.max };
                (None, Some(Service { capacity, enabled: s.enabled, retry_policy: retry_policy_from(s.retry_policy) }))
            }
            None => (None, None),
        };
        JobSpec {
            id: job.id.clone(),
            owner: Owner { team_email: d.owner.map(|o| o.team_email).unwrap_or_default() },
            application_name: d.application_name,
            capacity_group: d.capacity_group,
            job_group_info: JobGroupInfo { stack: group.stack, detail: group.detail, sequence: group.sequence },
            attributes: d.attributes.into_iter().collect(),
            container: Container {
                resources: Resources {
                    cpu: r.cpu,
                    memory_mb: r.memory_mb,
                    disk_mb: r.disk_mb,
                    network_mbps: r.network_mbps,
                    gpu: r.gpu,
                    shm_size_mb: r.shm_size_mb,
                },
                image: Image { name: image.name, tag: image.tag, digest: image.digest },
                entry_point: c.entry_point,
                command: c.command,
                env: c.env.into_iter().collect(),
                soft_constraints: c.soft_constraints.map(|c| c.constraints.into_iter().collect()).unwrap_or_default(),
                hard_constraints: c.hard_constraints.map(|c| c.constraints.into_iter().collect()).unwrap_or_default(),
                capabilities: c.capabilities,
                security_profile: c.security_profile.map(|p| SecurityProfile {
                    security_groups: p.security_groups,
                    iam_role: p.iam_role,
                    attributes: p.attributes.into_iter().collect(),
                    allow_imds_v1: p.allow_imds_v1,
                }),
                health_check: c.health_check.map(|h| HealthCheck {
                    command: h.command,
                    http_path: h.http_path,
                    http_port: h.http_port,
                    interval_sec: h.interval_sec,
                    timeout_sec: h.timeout_sec,
                    retries: h.retries,
                    start_period_sec: h.start_period_sec,
                    replace_after_sec: h.replace_after_sec,
                }),
            },
            batch,
            service,
            disruption_budget: d.disruption_budget.filter(|b| *b != pb::DisruptionBudget::default()).map(|b| {
                DisruptionBudget {
                    self_managed_relocation_time_ms: b.self_managed_relocation_time_ms,
                    availability_percentage_limit: b.availability_percentage_limit,
                    unhealthy_tasks_limit: b.unhealthy_tasks_limit,
                    rate_limit: b.rate_limit,
                    rate_interval_ms: b.rate_interval_ms,
                    rate_percentage_per_hour: b.rate_percentage_per_hour,
                    time_windows: b
                        .time_windows
                        .into_iter()
                        .map(|w| TimeWindow { days: w.days, start_hour: w.start_hour, end_hour: w.end_hour })
                        .collect(),
                }
            }),
            status: None,
        }
    }

    pub fn into_descriptor(self) -> Result<pb::JobDescriptor, String> {
        let job_type = match (self.batch, self.service) {
            (Some(b), None) => pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
                size: b.size,
                runtime_limit_sec: b.runtime_limit_sec,
                retry_policy: retry_policy("batch.retryPolicy", b.retry_policy)?,
                retry_on_runtime_limit: b.retry_on_runtime_limit,
            }),
            (None, Some(s)) => pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
                capacity: Some(pb::Capacity { min: s.capacity.min, desired: s.capacity.desired, max: s.capacity.max }),
                enabled: s.enabled,
                retry_policy: retry_policy("service.retryPolicy", s.retry_policy)?,
                service_job_processes: None,
            }),
            _ => return Err("exactly one of batch and service must be set".into()),
        };
        let c = self.container;
        Ok(pb::JobDescriptor {
            owner: Some(pb::Owner { team_email: self.owner.team_email }),
            application_name: self.application_name,
            capacity_group: self.capacity_group,
            job_group_info: Some(pb::JobGroupInfo {
                stack: self.job_group_info.stack,
                detail: self.job_group_info.detail,
                sequence: self.job_group_info.sequence,
            }),
            attributes: self.attributes.into_iter().collect(),
            container: Some(pb::Container {
                resources: Some(pb::ContainerResources {
                    cpu: c.resources.cpu,
                    gpu: c.resources.gpu,
                    memory_mb: c.resources.memory_mb,
                    disk_mb: c.resources.disk_mb,
                    network_mbps: c.resources.network_mbps,
                    shm_size_mb: c.resources.shm_size_mb,
                }),
                image: Some(pb::Image { name: c.image.name, tag: c.image.tag, digest: c.image.digest }),
                entry_point: c.entry_point,
                command: c.command,
                env: c.env.into_iter().collect(),
                soft_constraints: Some(pb::Constraints { constraints: c.soft_constraints.into_iter().collect() }),
                hard_constraints: Some(pb::Constraints { constraints: c.hard_constraints.into_iter().collect() }),
                capabilities: c.capabilities,
                security_profile: c.security_profile.map(|p| pb::SecurityProfile {
                    security_groups: p.security_groups,
                    iam_role: p.iam_role,
                    attributes: p.attributes.into_iter().collect(),
                    allow_imds_v1: p.allow_imds_v1,
                }),
                health_check: c.health_check.map(|h| pb::HealthCheck {
                    command: h.command,
                    http_path: h.http_path,
                    http_port: h.http_port,
                    interval_sec: h.interval_sec,
                    timeout_sec: h.timeout_sec,
                    retries: h.retries,
                    start_period_sec: h.start_period_sec,
                    replace_after_sec: h.replace_after_sec,
                }),
            }),
            job_type: Some(job_type),
            disruption_budget: self.disruption_budget.map(|d| pb::DisruptionBudget {
                self_managed_relocation_time_ms: d.self_managed_relocation_time_ms,
                availability_percentage_limit: d.availability_percentage_limit,
                unhealthy_tasks_limit: d.unhealthy_tasks_limit,
                rate_limit: d.rate_limit,
                rate_interval_ms: d.rate_interval_ms,
                rate_percentage_per_hour: d.rate_percentage_per_hour,
                time_windows: d
                    .time_windows
                    .into_iter()
                    .map(|w| pb::TimeWindow { days: w.days, start_hour: w.start_hour, end_hour: w.end_hour })
                    .collect(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_examples_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            parse(&text).and_then(JobSpec::into_descriptor).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert!(n >= 2);
    }

    #[test]
    fn a_job_read_back_as_a_spec_gives_the_same_descriptor() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let descriptor = parse(&std::fs::read_to_string(&path).unwrap()).unwrap().into_descriptor().unwrap();
            let job = pb::Job { id: "j-1".into(), job_descriptor: Some(descriptor.clone()), ..Default::default() };
            let spec = JobSpec::from_job(&job);
            let yaml = serde_yaml::to_string(&spec).unwrap();
            let back = parse(&yaml).unwrap_or_else(|e| panic!("{}: {e}\n{yaml}", path.display()));
            assert_eq!(back.id, "j-1");
            assert_eq!(back.into_descriptor().unwrap(), descriptor, "{}", path.display());
        }
    }

    #[test]
    fn typos_and_missing_fields_are_named() {
        let err = parse("owner: {teamEmail: a@b.c}\napplicationName: x\ncontainer:\n  resources: {cpu: 1, memoryMB: 10, memryMB: 3}\n  image: {name: i, tag: t}\nbatch: {size: 1}\n").unwrap_err();
        assert!(err.contains("memryMB"), "{err}");
        let err = parse("{\"owner\": {\"teamEmail\": \"a@b.c\"}}").unwrap_err();
        assert!(err.contains("applicationName"), "{err}");
        let both = parse("owner: {teamEmail: a@b.c}\napplicationName: x\ncontainer:\n  resources: {cpu: 1, memoryMB: 10}\n  image: {name: i, tag: t}\n").unwrap();
        assert!(both.into_descriptor().unwrap_err().contains("exactly one of batch and service"));
    }

    #[test]
    fn a_security_profile_is_read_as_titus_spells_it() {
        let text = "owner: {teamEmail: a@b.c}\napplicationName: x\ncontainer:\n  resources: {cpu: 1, memoryMB: 10}\n  image: {name: i, tag: t}\n  securityProfile:\n    iamRole: arn:aws:iam::123456789012:role/x\n    securityGroups: [sg-0123abcd]\n    allowImdsV1: true\nbatch: {size: 1}\n";
        let d = parse(text).unwrap().into_descriptor().unwrap();
        let p = d.container.unwrap().security_profile.unwrap();
        assert_eq!(p.iam_role, "arn:aws:iam::123456789012:role/x");
        assert_eq!(p.security_groups, vec!["sg-0123abcd".to_string()]);
        assert!(p.allow_imds_v1);
        let err = parse(&text.replace("iamRole", "iamRol")).unwrap_err();
        assert!(err.contains("iamRol"), "{err}");
    }

    #[test]
    fn a_disruption_budget_and_a_health_check_are_read_as_titus_spells_them() {
        let text = "owner: {teamEmail: a@b.c}\napplicationName: x\ncontainer:\n  resources: {cpu: 1, memoryMB: 10}\n  image: {name: i, tag: t}\n  healthCheck: {command: [true], intervalSec: 2}\nservice:\n  capacity: {min: 1, desired: 2, max: 3}\ndisruptionBudget:\n  unhealthyTasksLimit: 1\n  ratePercentagePerHour: 20\n  timeWindows:\n    - {days: [1, 5], startHour: 9, endHour: 17}\n";
        let d = parse(text).unwrap().into_descriptor().unwrap();
        let b = d.disruption_budget.clone().unwrap();
        assert_eq!((b.unhealthy_tasks_limit, b.rate_percentage_per_hour), (1, 20.0));
        assert_eq!((b.time_windows[0].days.clone(), b.time_windows[0].end_hour), (vec![1, 5], 17));
        assert_eq!(d.container.clone().unwrap().health_check.unwrap().interval_sec, 2);
        let job = pb::Job { id: "j".into(), job_descriptor: Some(d.clone()), ..Default::default() };
        assert_eq!(JobSpec::from_job(&job).into_descriptor().unwrap(), d, "read back the same");
        let err = parse(&text.replace("startHour", "start")).unwrap_err();
        assert!(err.contains("start"), "{err}");
    }
}
