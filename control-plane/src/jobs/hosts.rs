//! An agent as the placement core sees it, and a job's constraints as the core reads them: one
//! definition for the leader's scheduler, which plans placements, and for `jobs::apply`, which checks
//! each planned placement again when it commits — so the two never disagree about what an agent is.

use std::collections::HashMap;

use titus_scheduler as core;

use crate::model::agent::{Agent, InstanceGroup};
use crate::model::job::Job;
use crate::model::ResourceDimension;

/// Agent attribute naming its instance type (else the instance group's launch settings do).
pub const MACHINE_TYPE_ATTRIBUTE: &str = "machineType";

pub fn resources(r: &ResourceDimension) -> core::Resources {
    core::Resources {
        cpu: r.cpu,
        memory_mb: r.memory_mb as u64,
        disk_mb: r.disk_mb as u64,
        network_mbps: r.network_mbps as u64,
        gpu: r.gpu as u64,
    }
}

/// A job's hard and soft constraints as the placement core reads them; the error names the
/// constraint (not possible for a job that passed validation, which parses them the same way).
pub fn constraints(job: &Job) -> Result<(core::Constraints, core::Constraints), String> {
    let c = &job.descriptor.container;
    let parse = |m: &std::collections::BTreeMap<String, String>| {
        core::Constraints::parse(m.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    };
    Ok((parse(&c.hard_constraints)?, parse(&c.soft_constraints)?))
}

/// What the live tasks on one agent hold.
#[derive(Debug, Clone, Default)]
pub struct Load {
    pub used: core::Resources,
    /// Live tasks per job.
    pub jobs: HashMap<String, u32>,
    /// How many of them want the agent alone (exclusiveHost).
    pub exclusive: u32,
}

impl Load {
    pub fn add(&mut self, job_id: &str, need: &core::Resources, exclusive: bool) {
        self.used.add(need);
        *self.jobs.entry(job_id.to_string()).or_default() += 1;
        self.exclusive += u32::from(exclusive);
    }
}

/// `a` as the placement core sees it, with `load` on it.
pub fn host(a: &Agent, group: Option<&InstanceGroup>, load: Load, ineligible: Option<core::Ineligible>) -> core::Agent {
    let machine_type = a
        .attributes
        .get(MACHINE_TYPE_ATTRIBUTE)
        .cloned()
        .or_else(|| group.and_then(|g| g.launch.as_ref()).map(|l| l.instance_type.clone()))
        .unwrap_or_default();
    core::Agent {
        id: a.id.clone(),
        zone: a.attributes.get(crate::model::task::context::ZONE).cloned().unwrap_or_default(),
        machine_type,
        attributes: a.attributes.clone(),
        total: resources(&a.resources),
        used: load.used,
        ineligible,
        jobs: load.jobs,
        exclusive: load.exclusive > 0,
    }
}
