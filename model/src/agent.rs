//! Titus's agent management: instance groups (tier, lifecycle) and the agents that register with
//! the control plane, as replicated records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{truncated, validate_name, FieldViolation, ResourceDimension, Tier};

pub const DEFAULT_INSTANCE_GROUP: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifecycle {
    Inactive,
    Active,
    /// Being drained: no new tasks; scale-down takes these first.
    PhasedOut,
    /// May be terminated.
    Removable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceGroup {
    pub id: String,
    pub tier: Tier,
    pub lifecycle: Lifecycle,
    pub attributes: BTreeMap<String, String>,
    /// How to launch its instances in EC2; none: its agents are started by other means and the
    /// capacity duty leaves it alone.
    #[serde(default)]
    pub launch: Option<LaunchSettings>,
    /// Instance count bounds and target; the capacity duty moves `desired` within [min, max].
    #[serde(default)]
    pub min: u32,
    #[serde(default)]
    pub desired: u32,
    #[serde(default)]
    pub max: u32,
    /// A RunInstances call written ahead: a new leader repeats it with the same client token, which
    /// EC2 answers with the instances of the first call instead of launching more.
    #[serde(default)]
    pub pending_launch: Option<LaunchIntent>,
    /// Instances about to be terminated, written ahead of the TerminateInstances call: a new leader
    /// finishes the call — after checking again that none of them has an agent with live tasks —
    /// instead of an instance going without a trace in the replicated state.
    #[serde(default)]
    pub pending_terminations: Vec<String>,
    /// When `lifecycle` last changed (ms since the epoch): a PhasedOut group's drain, and a
    /// self-managed job's relocation time, run from it. Absent: before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_since_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchIntent {
    pub client_token: String,
    pub count: u32,
    pub created_ms: i64,
    /// How many go to each subnet (decided when written, so a repeat makes the same calls); empty
    /// when the group names no subnet.
    #[serde(default)]
    pub split: Vec<(String, u32)>,
}

/// Spreads `count` new instances over `subnets`, each to the subnet with the fewest instances so
/// far (`existing` plus those already assigned), ties to the first listed.
pub fn spread(count: u32, subnets: &[String], existing: &BTreeMap<String, u32>) -> Vec<(String, u32)> {
    let mut load: Vec<(String, u32, u32)> =
        subnets.iter().map(|s| (s.clone(), existing.get(s).copied().unwrap_or(0), 0)).collect();
    for _ in 0..count {
        let Some(least) = load.iter_mut().min_by_key(|(_, have, add)| have + add) else { break };
        least.2 += 1;
    }
    load.into_iter().filter(|(_, _, add)| *add > 0).map(|(s, _, add)| (s, add)).collect()
}

/// EC2 launch settings of an instance group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LaunchSettings {
    pub image_id: String,
    pub instance_type: String,
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    /// Extra tags; the capacity duty adds `titus:instance-group` and `titus:cluster`.
    pub tags: BTreeMap<String, String>,
    /// What one instance offers to tasks (for sizing a scale-up by the dominant resource).
    pub instance_resources: ResourceDimension,
}

/// The tag that ties an EC2 instance to its instance group.
pub const INSTANCE_GROUP_TAG: &str = "titus:instance-group";
/// The tag that ties an EC2 instance to its control plane.
pub const CLUSTER_TAG: &str = "titus:cluster";
/// The agent attribute carrying its EC2 instance id.
pub const INSTANCE_ID_ATTRIBUTE: &str = "instanceId";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    Online,
    /// Missed its heartbeats past the TTL; its tasks were declared lost.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub instance_group: String,
    pub resources: ResourceDimension,
    pub attributes: BTreeMap<String, String>,
    pub state: AgentState,
    pub healthy: bool,
    pub unhealthy_reason: String,
    pub registered_ms: i64,
    /// Its instance is being terminated by the capacity manager: it gets no new tasks.
    #[serde(default)]
    pub terminating: bool,
    /// When it was declared Lost (None while Online): the capacity manager keeps its instance for
    /// a grace period from then.
    #[serde(default)]
    pub lost_ms: Option<i64>,
    /// An operator drains it (`titus agent drain`): no new tasks, and its service tasks move
    /// elsewhere as their jobs' disruption budgets allow. Absent from records of agents never
    /// drained (older replicas read them unchanged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// When the drain began (ms since the epoch, as the command says): a self-managed job's
    /// relocation time runs from it. Absent while not draining, and on drains begun by a release
    /// that did not record it (their relocation time is over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since_ms: Option<i64>,
}

/// Most attributes an agent may register, and the longest key and value.
pub const MAX_AGENT_ATTRIBUTES: usize = 64;
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 256;
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 1024;

/// Checks the attributes of a machine (an agent's, an instance group's, launch tags): at most
/// [`MAX_AGENT_ATTRIBUTES`], keys of 1-[`MAX_ATTRIBUTE_KEY_LEN`] bytes, values of at most
/// [`MAX_ATTRIBUTE_VALUE_LEN`]; each violation names `field` and the key.
pub fn validate_machine_attributes<'a>(
    field: &str,
    attributes: impl IntoIterator<Item = (&'a String, &'a String)>,
    violations: &mut Vec<FieldViolation>,
) {
    let mut n = 0;
    for (k, v) in attributes {
        n += 1;
        if k.is_empty() || k.len() > MAX_ATTRIBUTE_KEY_LEN {
            violations.push(FieldViolation::new(
                format!("{field}[{:?}]", truncated(k)),
                format!("key must be 1-{MAX_ATTRIBUTE_KEY_LEN} bytes"),
            ));
        } else if v.len() > MAX_ATTRIBUTE_VALUE_LEN {
            violations.push(FieldViolation::new(
                format!("{field}.{k}"),
                format!("must be at most {MAX_ATTRIBUTE_VALUE_LEN} bytes"),
            ));
        }
    }
    if n > MAX_AGENT_ATTRIBUTES {
        violations.insert(0, FieldViolation::new(field, format!("must have at most {MAX_AGENT_ATTRIBUTES} entries")));
    }
}

impl Agent {
    /// Checks everything the agent said of itself at registration, each violation naming its field.
    pub fn validate(&self) -> Result<(), Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if let Err(v) = validate_name("agent_id", &self.id) {
            violations.push(v);
        }
        if let Err(v) = validate_name("instance_group", &self.instance_group) {
            violations.push(v);
        }
        violations.extend(self.resources.validate_offered("resources"));
        validate_machine_attributes("attributes", &self.attributes, &mut violations);
        // An agent named for an EC2 instance (as the AWS template enrolls them) is that instance:
        // its certificate names it, so it cannot say it runs anywhere else.
        if let Some(instance) = self.instance_id() {
            if is_ec2_instance_id(&self.id) && instance != self.id {
                violations.push(FieldViolation::new(
                    format!("attributes.{INSTANCE_ID_ATTRIBUTE}"),
                    format!(
                        "agent {:?} is EC2 instance {:?}; it cannot claim instance {:?}",
                        self.id,
                        self.id,
                        truncated(instance)
                    ),
                ));
            }
        }
        if self.unhealthy_reason.len() > MAX_ATTRIBUTE_VALUE_LEN {
            violations.push(FieldViolation::new(
                "unhealthy_reason",
                format!("must be at most {MAX_ATTRIBUTE_VALUE_LEN} bytes"),
            ));
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// The EC2 instance it said it runs on at registration (bound to it when applied: see
    /// `jobs::apply`), if any.
    pub fn instance_id(&self) -> Option<&str> {
        self.attributes.get(INSTANCE_ID_ATTRIBUTE).map(String::as_str).filter(|i| !i.is_empty())
    }

    /// Whether placement may give it new tasks (its instance group's lifecycle aside).
    pub fn accepts_tasks(&self) -> bool {
        self.state == AgentState::Online && self.healthy && !self.terminating && !self.draining
    }
}

/// Whether `id` has the form of an EC2 instance id: `i-` and 8 or 17 lowercase hex digits.
pub fn is_ec2_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A network as an address and a prefix length (`10.1.0.0/16`, `fd00::/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

/// The most container networks an agent may declare.
pub const MAX_CONTAINER_NETWORKS: usize = 16;

impl Cidr {
    /// Parses `ADDR/PREFIX`; the host bits need not be zero (Docker reports gateways that way).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) =
            text.split_once('/').ok_or_else(|| format!("{:?} is not ADDRESS/PREFIX", truncated(text)))?;
        let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("{:?} is not an IP address", truncated(addr)))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {:?} must be a number from 0 to {max}", truncated(prefix)))?;
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let (a, b, bits) = match (self.addr, ip) {
            (V4(a), V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
            (V6(a), V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        host_bits >= bits || (a >> host_bits) == (b >> host_bits)
    }

    /// Whether every address of `self` is in `outer`.
    pub fn within(&self, outer: &Cidr) -> bool {
        self.prefix >= outer.prefix && outer.contains(self.addr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The most CPUs one agent or instance type may offer (the largest EC2 instances have 896 vCPUs).
pub const MAX_OFFERED_CPU: f64 = 4096.0;

impl ResourceDimension {
    /// Adds, stopping at the largest value: sums over a whole fleet must not wrap.
    pub fn add(&mut self, o: &ResourceDimension) {
        self.cpu += o.cpu;
        self.memory_mb = self.memory_mb.saturating_add(o.memory_mb);
        self.disk_mb = self.disk_mb.saturating_add(o.disk_mb);
        self.network_mbps = self.network_mbps.saturating_add(o.network_mbps);
        self.gpu = self.gpu.saturating_add(o.gpu);
    }

    /// Checks what a machine offers (an agent's registration, an instance type): a finite,
    /// non-negative CPU count no larger than [`MAX_OFFERED_CPU`]. The integer fields cannot be
    /// out of range.
    pub fn validate_offered(&self, prefix: &str) -> Vec<FieldViolation> {
        let mut violations = Vec::new();
        if !self.cpu.is_finite() || self.cpu < 0.0 || self.cpu > MAX_OFFERED_CPU {
            violations.push(FieldViolation::new(
                format!("{prefix}.cpu"),
                format!("must be a number between 0 and {MAX_OFFERED_CPU} (got {})", self.cpu),
            ));
        }
        violations
    }

    /// Subtracts, stopping at zero.
    pub fn sub(&mut self, o: &ResourceDimension) {
        self.cpu = (self.cpu - o.cpu).max(0.0);
        self.memory_mb = self.memory_mb.saturating_sub(o.memory_mb);
        self.disk_mb = self.disk_mb.saturating_sub(o.disk_mb);
        self.network_mbps = self.network_mbps.saturating_sub(o.network_mbps);
        self.gpu = self.gpu.saturating_sub(o.gpu);
    }

    /// Whether `need` fits in what is left of `self` after `used`.
    pub fn fits(&self, used: &ResourceDimension, need: &ResourceDimension) -> bool {
        used.cpu + need.cpu <= self.cpu + 1e-9
            && used.memory_mb as u64 + need.memory_mb as u64 <= self.memory_mb as u64
            && used.disk_mb as u64 + need.disk_mb as u64 <= self.disk_mb as u64
            && used.network_mbps as u64 + need.network_mbps as u64 <= self.network_mbps as u64
            && used.gpu + need.gpu <= self.gpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let bridge = Cidr::parse("172.17.0.0/16").unwrap();
        assert!(bridge.contains(ip("172.17.3.4")));
        assert!(!bridge.contains(ip("172.18.0.1")));
        assert!(!bridge.contains(ip("::ffff:172.17.3.4")), "families never mix");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("fd00::1")));
        assert!(Cidr::parse("10.0.0.7/32").unwrap().contains(ip("10.0.0.7")));
        assert!(!Cidr::parse("10.0.0.7/32").unwrap().contains(ip("10.0.0.8")));
        assert!(Cidr::parse("fd00:1::/64").unwrap().contains(ip("fd00:1::42")));
        assert!(Cidr::parse("172.17.1.0/24").unwrap().within(&bridge));
        assert!(!bridge.within(&Cidr::parse("172.17.1.0/24").unwrap()));
        for bad in ["172.17.0.0", "172.17.0.0/33", "fd00::/129", "x/8", "10.0.0.0/-1", "10.0.0.0/ 8"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(bridge.to_string(), "172.17.0.0/16");
    }

    #[test]
    fn an_agent_named_for_an_instance_is_that_instance() {
        let mut a = agent();
        a.id = "i-0123456789abcdef0".into();
        a.attributes.insert(INSTANCE_ID_ATTRIBUTE.into(), "i-0123456789abcdef0".into());
        assert!(a.validate().is_ok());
        a.attributes.insert(INSTANCE_ID_ATTRIBUTE.into(), "i-0fedcba9876543210".into());
        let v = a.validate().unwrap_err();
        assert_eq!(v[0].field, "attributes.instanceId", "{v:?}");
        assert!(is_ec2_instance_id("i-12345678") && !is_ec2_instance_id("i-1234567") && !is_ec2_instance_id("agent-1"));
        assert!(!is_ec2_instance_id("i-0123456789ABCDEF0"));
    }

    fn agent() -> Agent {
        Agent {
            id: "a1".into(),
            instance_group: DEFAULT_INSTANCE_GROUP.into(),
            resources: ResourceDimension { cpu: 4.0, memory_mb: 8192, disk_mb: 10_000, network_mbps: 1000, gpu: 0 },
            attributes: BTreeMap::from([("zone".to_string(), "us-east-1a".to_string())]),
            state: AgentState::Online,
            healthy: true,
            unhealthy_reason: String::new(),
            registered_ms: 0,
            terminating: false,
            lost_ms: None,
            draining: false,
            draining_since_ms: None,
        }
    }

    #[test]
    fn an_agent_offering_a_non_finite_cpu_is_refused() {
        assert_eq!(agent().validate(), Ok(()));
        for cpu in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, MAX_OFFERED_CPU * 2.0] {
            let a = Agent { resources: ResourceDimension { cpu, ..agent().resources }, ..agent() };
            let fields: Vec<String> = a.validate().unwrap_err().into_iter().map(|v| v.field).collect();
            assert_eq!(fields, vec!["resources.cpu"], "{cpu}");
        }
    }

    #[test]
    fn an_agent_s_attributes_are_bounded() {
        let mut a = agent();
        a.attributes = (0..=MAX_AGENT_ATTRIBUTES).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(a.validate().unwrap_err()[0].field, "attributes");
        let mut a = agent();
        a.attributes.insert("big".into(), "x".repeat(MAX_ATTRIBUTE_VALUE_LEN + 1));
        assert_eq!(a.validate().unwrap_err()[0].field, "attributes.big");
        let a = Agent { instance_group: "no spaces".into(), ..agent() };
        assert_eq!(a.validate().unwrap_err()[0].field, "instance_group");
    }

    #[test]
    fn sums_of_resources_do_not_wrap() {
        let mut r = ResourceDimension { memory_mb: u32::MAX - 1, ..Default::default() };
        r.add(&ResourceDimension { memory_mb: 10, gpu: 1, ..Default::default() });
        assert_eq!((r.memory_mb, r.gpu), (u32::MAX, 1));
    }

    #[test]
    fn launches_fill_the_emptiest_subnet_first() {
        let subnets = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let existing = BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 0)]);
        assert_eq!(spread(4, &subnets, &existing), vec![("b".to_string(), 2), ("c".to_string(), 2)]);
        assert_eq!(spread(1, &subnets, &BTreeMap::new()), vec![("a".to_string(), 1)]);
        assert!(spread(3, &[], &BTreeMap::new()).is_empty());
    }
}
