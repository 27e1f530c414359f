//! Titus's capacity group: an application's SLA (tier, resources per instance, instance count).

use serde::{Deserialize, Serialize};

use super::{validate_name, FieldViolation};

/// Titus's tiers: Critical is placed first and has capacity reserved; Flex is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    Critical,
    Flex,
}

/// Resources of one task instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceDimension {
    pub cpu: f64,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub network_mbps: u32,
    pub gpu: u32,
}

/// An application's SLA: how many instances of what size it is guaranteed, and in which tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityGroup {
    pub name: String,
    pub tier: Tier,
    pub resources_per_instance: ResourceDimension,
    pub instance_count: u32,
    /// Decided by the leader before proposing, so every replica stores the same value.
    pub create_time_ms: i64,
    pub update_time_ms: i64,
    /// Linux capabilities its jobs may ask for beyond the agent's reduced default set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_capabilities: Vec<String>,
}

impl CapacityGroup {
    /// Checks every user-supplied field; `prefix` is the request field that holds the group.
    pub fn validate(&self, prefix: &str) -> Result<(), Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if let Err(v) = validate_name(&format!("{prefix}.name"), &self.name) {
            violations.push(v);
        }
        let r = &self.resources_per_instance;
        let res = format!("{prefix}.resources_per_instance");
        if !r.cpu.is_finite() || r.cpu <= 0.0 {
            violations.push(FieldViolation::new(format!("{res}.cpu"), "must be > 0"));
        }
        if r.memory_mb == 0 {
            violations.push(FieldViolation::new(format!("{res}.memory_mb"), "must be > 0"));
        }
        if r.disk_mb == 0 {
            violations.push(FieldViolation::new(format!("{res}.disk_mb"), "must be > 0"));
        }
        if r.network_mbps == 0 {
            violations.push(FieldViolation::new(format!("{res}.network_mbps"), "must be > 0"));
        }
        if self.instance_count == 0 {
            violations.push(FieldViolation::new(format!("{prefix}.instance_count"), "must be > 0"));
        }
        violations.extend(crate::validate_capabilities(
            &format!("{prefix}.allowed_capabilities"),
            &self.allowed_capabilities,
        ));
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_NAME_LEN;

    fn group() -> CapacityGroup {
        CapacityGroup {
            name: "netflix-api".into(),
            tier: Tier::Critical,
            resources_per_instance: ResourceDimension {
                cpu: 0.5,
                memory_mb: 512,
                disk_mb: 1024,
                network_mbps: 128,
                gpu: 0,
            },
            instance_count: 10,
            create_time_ms: 0,
            update_time_ms: 0,
            allowed_capabilities: Vec::new(),
        }
    }

    #[test]
    fn valid_group_passes() {
        assert_eq!(group().validate("group"), Ok(()));
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut g = group();
        g.name = String::new();
        g.resources_per_instance.cpu = -1.0;
        g.resources_per_instance.memory_mb = 0;
        g.instance_count = 0;
        let fields: Vec<String> = g.validate("group").unwrap_err().into_iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            vec![
                "group.name",
                "group.resources_per_instance.cpu",
                "group.resources_per_instance.memory_mb",
                "group.instance_count"
            ]
        );
    }

    #[test]
    fn names_with_odd_characters_are_rejected() {
        assert!(validate_name("n", "a b").is_err());
        assert!(validate_name("n", "ok-name_1.x").is_ok());
        assert!(validate_name("n", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
        let nan = CapacityGroup {
            resources_per_instance: ResourceDimension { cpu: f64::NAN, ..group().resources_per_instance },
            ..group()
        };
        assert!(nan.validate("g").is_err());
    }
}
