//! Conversions between the wire types (titus-proto) and the replicated model.

use titus_proto as pb;

use crate::error::{Error, Result};
use crate::model::{CapacityGroup, ResourceDimension, Tier};

pub fn tier_from_proto(field: &str, t: i32) -> Result<Tier> {
    match pb::Tier::try_from(t) {
        Ok(pb::Tier::Critical) => Ok(Tier::Critical),
        // Titus's default tier.
        Ok(pb::Tier::Flex) | Ok(pb::Tier::Unspecified) => Ok(Tier::Flex),
        Err(_) => Err(Error::invalid(field, format!("{t} is not a tier (CRITICAL or FLEX)"))),
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
    let g = g.ok_or_else(|| Error::invalid(field, "is required"))?;
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
    };
    group.validate(field).map_err(Error::InvalidArgument)?;
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
    }
}
