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
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Lifecycle(l) => write!(f, "in a {l} instance group"),
            Ineligible::Unhealthy => f.write_str("unhealthy"),
            Ineligible::NotConnected => f.write_str("not connected"),
            Ineligible::Terminating => f.write_str("terminating"),
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
