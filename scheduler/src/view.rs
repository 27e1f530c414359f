//! What the scheduler is given: a read-only view of the agents, the pending tasks and the capacity
//! groups. The control plane builds it from replicated state; tests and the benchmark build it by hand.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::Resources;

/// Titus's tiers: Critical is placed before Flex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Critical,
    Flex,
}

/// Why an agent takes no new tasks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ineligible {
    /// Its instance group is not Active (Inactive, PhasedOut or Removable).
    Lifecycle(String),
    Unhealthy,
    /// No stream to the leader, or declared lost.
    NotConnected,
    /// Its instance is being terminated.
    Terminating,
    /// An operator drains it.
    Draining,
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Lifecycle(l) => write!(f, "in a {l} instance group"),
            Ineligible::Unhealthy => f.write_str("unhealthy"),
            Ineligible::NotConnected => f.write_str("not connected"),
            Ineligible::Terminating => f.write_str("terminating"),
            Ineligible::Draining => f.write_str("draining"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Agent {
    pub id: String,
    /// Availability zone ("" when unknown).
    pub zone: String,
    pub machine_type: String,
    pub attributes: BTreeMap<String, String>,
    pub total: Resources,
    /// What its live tasks hold.
    pub used: Resources,
    /// `None`: it may get new tasks.
    pub ineligible: Option<Ineligible>,
    /// Its live tasks, counted per job.
    pub jobs: HashMap<String, u32>,
    /// It runs a task of a job with the exclusiveHost hard constraint: nothing else may join it.
    pub exclusive: bool,
}

impl Agent {
    /// Whether it has attribute `key` (names and values case-insensitive).
    pub fn has_attribute(&self, key: &str, value: &str) -> bool {
        self.attributes.iter().any(|(k, v)| k.eq_ignore_ascii_case(key) && v.eq_ignore_ascii_case(value))
    }
}

#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub job_id: String,
    pub need: Resources,
    pub capacity_group: String,
    pub tier: Tier,
    pub hard: Constraints,
    pub soft: Constraints,
}

/// A capacity group: `reserved` (resources per instance × instances) is placed before any
/// group's tasks beyond its reservation; `used` is what its live, placed tasks hold now.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub tier: Tier,
    pub reserved: Resources,
    pub used: Resources,
}

/// Titus's constraints (names case-insensitive): uniqueHost, exclusiveHost, zoneBalance,
/// availabilityZone, machineType, machineId and `host.<attribute>` matches. As hard constraints they
/// filter agents; as soft ones they score them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    pub unique_host: bool,
    pub exclusive_host: bool,
    pub zone_balance: bool,
    pub zone: Option<String>,
    pub machine_type: Option<String>,
    pub machine_id: Option<String>,
    /// `host.<attribute>` = value.
    pub attributes: Vec<(String, String)>,
}

impl Constraints {
    /// Parses a job's constraint map; the error names the constraint.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Constraints, String> {
        let mut c = Constraints::default();
        for (name, value) in pairs {
            let flag = || match value.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!("constraint {name}: value must be true or false, not {value:?}")),
            };
            let lower = name.to_ascii_lowercase();
            match lower.as_str() {
                "uniquehost" => c.unique_host = flag()?,
                "exclusivehost" => c.exclusive_host = flag()?,
                "zonebalance" => c.zone_balance = flag()?,
                "availabilityzone" => c.zone = Some(value.to_string()),
                "machinetype" => c.machine_type = Some(value.to_string()),
                "machineid" => c.machine_id = Some(value.to_string()),
                _ if lower.starts_with("host.") && lower.len() > 5 => {
                    c.attributes.push((name[5..].to_string(), value.to_string()))
                }
                _ => return Err(format!("unknown constraint {name:?}")),
            }
        }
        Ok(c)
    }

    pub fn is_empty(&self) -> bool {
        *self == Constraints::default()
    }

    /// Checks the value-matching terms (zone, machine type, machine id, host attributes) against
    /// what `a` is; the error names the first term it fails.
    pub fn matches(&self, a: &Agent) -> Result<(), &'static str> {
        if self.zone.as_ref().is_some_and(|z| !z.eq_ignore_ascii_case(&a.zone)) {
            return Err("availabilityZone");
        }
        if self.machine_type.as_ref().is_some_and(|m| !m.eq_ignore_ascii_case(&a.machine_type)) {
            return Err("machineType");
        }
        if self.machine_id.as_ref().is_some_and(|m| *m != a.id) {
            return Err("machineId");
        }
        if self.attributes.iter().any(|(k, v)| !a.has_attribute(k, v)) {
            return Err("hostAttribute");
        }
        Ok(())
    }

    /// Whether `a`, with the live tasks it holds now (`a.jobs`, `a.exclusive`), admits one more
    /// task of `job_id` under these hard constraints: the rule a placement planned earlier is
    /// checked against again when it is applied, since the agent may have been given other tasks
    /// in between. The error names the constraint that fails.
    pub fn admits(&self, a: &Agent, job_id: &str) -> Result<(), &'static str> {
        if a.exclusive || (self.exclusive_host && a.jobs.values().any(|&n| n > 0)) {
            return Err("exclusiveHost");
        }
        if self.unique_host && a.jobs.get(job_id).is_some_and(|&n| n > 0) {
            return Err("uniqueHost");
        }
        self.matches(a)
    }

    /// How many separate terms it has (for the share of soft constraints an agent meets).
    pub fn terms(&self) -> usize {
        usize::from(self.unique_host)
            + usize::from(self.exclusive_host)
            + usize::from(self.zone_balance)
            + usize::from(self.zone.is_some())
            + usize::from(self.machine_type.is_some())
            + usize::from(self.machine_id.is_some())
            + self.attributes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(jobs: &[(&str, u32)], exclusive: bool) -> Agent {
        Agent {
            id: "a1".into(),
            zone: "us-east-1a".into(),
            machine_type: "m5.large".into(),
            attributes: [("rack".to_string(), "R7".to_string())].into(),
            total: Resources::default(),
            used: Resources::default(),
            ineligible: None,
            jobs: jobs.iter().map(|(j, n)| (j.to_string(), *n)).collect(),
            exclusive,
        }
    }

    fn hard(pairs: &[(&str, &str)]) -> Constraints {
        Constraints::parse(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn admits_checks_the_tasks_an_agent_holds_now() {
        let empty = agent(&[], false);
        let busy = agent(&[("job-a", 1)], false);
        let alone = agent(&[("job-x", 1)], true);
        let unique = hard(&[("uniqueHost", "true")]);
        let exclusive = hard(&[("exclusiveHost", "true")]);
        assert_eq!(unique.admits(&empty, "job-a"), Ok(()));
        assert_eq!(unique.admits(&busy, "job-a"), Err("uniqueHost"));
        assert_eq!(unique.admits(&busy, "job-b"), Ok(()), "another job's task is no conflict");
        assert_eq!(exclusive.admits(&empty, "job-a"), Ok(()));
        assert_eq!(exclusive.admits(&busy, "job-b"), Err("exclusiveHost"));
        assert_eq!(
            Constraints::default().admits(&alone, "job-b"),
            Err("exclusiveHost"),
            "nothing joins an exclusive task"
        );
        // A count of zero left behind by a finished task is no task.
        assert_eq!(exclusive.admits(&agent(&[("job-a", 0)], false), "job-b"), Ok(()));
    }

    #[test]
    fn admits_checks_the_value_terms() {
        let a = agent(&[], false);
        assert_eq!(hard(&[("availabilityZone", "US-EAST-1A")]).admits(&a, "j"), Ok(()));
        assert_eq!(hard(&[("availabilityZone", "us-east-1b")]).admits(&a, "j"), Err("availabilityZone"));
        assert_eq!(hard(&[("machineType", "c5.xlarge")]).admits(&a, "j"), Err("machineType"));
        assert_eq!(hard(&[("machineId", "a2")]).admits(&a, "j"), Err("machineId"));
        assert_eq!(hard(&[("host.rack", "r7")]).admits(&a, "j"), Ok(()));
        assert_eq!(hard(&[("host.rack", "R8")]).admits(&a, "j"), Err("hostAttribute"));
    }
}
