//! Titus's agent management: instance groups (tier, lifecycle) and the agents that register with
//! the control plane, as replicated records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ResourceDimension, Tier};

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
}

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
}

impl ResourceDimension {
    pub fn add(&mut self, o: &ResourceDimension) {
        self.cpu += o.cpu;
        self.memory_mb += o.memory_mb;
        self.disk_mb += o.disk_mb;
        self.network_mbps += o.network_mbps;
        self.gpu += o.gpu;
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
