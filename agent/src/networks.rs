//! Per-job networks: each job's containers on this agent share one Docker bridge network of their
//! own, cut from the agent's `job-networks` pool, so a job's tasks reach each other and the outside
//! (through the host's NAT) but never another job's containers — Docker drops traffic between two
//! bridge networks. Titus gives each task its own security groups; on one host without a VPC, a
//! bridge per job is the boundary Docker itself enforces.
//!
//! Subnets come from the pool in /24 steps, so the agent declares one network (the pool) at
//! registration whatever jobs come and go, and never draws on the daemon's own address pools
//! (a few dozen networks by default).

use std::net::Ipv4Addr;

/// The prefix of each job's subnet: 254 containers of one job on one host.
pub const JOB_SUBNET_PREFIX: u8 = 24;

/// An IPv4 pool of /24 job subnets, e.g. `172.29.0.0/16` (256 of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    base: u32,
    prefix: u8,
}

impl SubnetPool {
    /// Parses `A.B.C.D/N` with N from 8 to 24; host bits must be zero.
    pub fn parse(text: &str) -> Result<SubnetPool, String> {
        let (addr, prefix) = text.split_once('/').ok_or_else(|| format!("{text:?} is not ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=JOB_SUBNET_PREFIX).contains(p))
            .ok_or_else(|| format!("prefix {prefix:?} must be a number from 8 to {JOB_SUBNET_PREFIX}"))?;
        let base = u32::from(addr);
        let host_mask = u32::MAX >> prefix;
        if base & host_mask != 0 {
            return Err(format!(
                "{text:?} has host bits set; the network is {}/{prefix}",
                Ipv4Addr::from(base & !host_mask)
            ));
        }
        Ok(SubnetPool { base, prefix })
    }

    /// Every /24 subnet of the pool, in address order, as `A.B.C.0/24`.
    pub fn subnets(&self) -> impl Iterator<Item = String> {
        let count = 1u32 << (JOB_SUBNET_PREFIX - self.prefix);
        let base = self.base;
        (0..count).map(move |i| format!("{}/{JOB_SUBNET_PREFIX}", Ipv4Addr::from(base + (i << 8))))
    }
}

impl std::fmt::Display for SubnetPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

/// The network of `job_id`'s containers on agent `agent_id`. Two agents sharing one daemon (tests,
/// several agents per host) keep apart networks.
pub fn job_network_name(agent_id: &str, job_id: &str) -> String {
    format!("titus-{agent_id}-{job_id}")
}

/// A job id as it may appear in a network name: ids are the control plane's UUIDs, but nothing
/// from a port is used unchecked.
pub fn valid_job_id(job_id: &str) -> bool {
    !job_id.is_empty() && job_id.len() <= 64 && job_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_yields_its_24s_in_order_and_bad_pools_say_why() {
        let pool = SubnetPool::parse("172.29.0.0/16").unwrap();
        assert_eq!(pool.to_string(), "172.29.0.0/16");
        let all: Vec<String> = pool.subnets().collect();
        assert_eq!(all.len(), 256);
        assert_eq!(all[0], "172.29.0.0/24");
        assert_eq!(all[1], "172.29.1.0/24");
        assert_eq!(all[255], "172.29.255.0/24");
        assert_eq!(SubnetPool::parse("10.1.2.0/24").unwrap().subnets().collect::<Vec<_>>(), ["10.1.2.0/24"]);
        assert!(SubnetPool::parse("172.29.1.0/16").unwrap_err().contains("host bits"));
        assert!(SubnetPool::parse("172.29.0.0/25").unwrap_err().contains("from 8 to 24"));
        assert!(SubnetPool::parse("172.29.0.0").unwrap_err().contains("ADDRESS/PREFIX"));
        assert!(SubnetPool::parse("fd00::/64").unwrap_err().contains("IPv4"));
    }

    #[test]
    fn only_plain_job_ids_name_a_network() {
        assert!(valid_job_id("3f2a9c1e-0b7d-4c52-9a51-0d6f6b1c2e3a"));
        assert!(!valid_job_id(""));
        assert!(!valid_job_id("a/b"));
        assert!(!valid_job_id(&"a".repeat(65)));
        assert_eq!(job_network_name("agent-1", "j1"), "titus-agent-1-j1");
    }
}
