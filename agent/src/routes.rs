//! Routes from containers to the metadata proxy: for each job network's subnet, an iptables rule
//! in the nat table's PREROUTING chain redirects TCP to 169.254.169.254:80 and 169.254.170.2:80 to
//! the proxy's port on the address the packet arrived at (the network's gateway, on the host).
//!
//! This is what a real host needs too (as root, with iptables):
//!
//! ```text
//! iptables -t nat -I PREROUTING -s <job subnet> -d 169.254.169.254/32 -p tcp --dport 80 -j REDIRECT --to-ports <port>
//! iptables -t nat -I PREROUTING -s <job subnet> -d 169.254.170.2/32   -p tcp --dport 80 -j REDIRECT --to-ports <port>
//! ```
//!
//! Each rule carries the comment `titus-metadata:<agent id>`, so the agent removes its own rules (a
//! job network's with the network, every one of them at start) and never another agent's.

use std::net::Ipv4Addr;
use std::sync::Arc;

use tokio::process::Command;

use crate::identity::{CREDENTIALS_ADDRESS, IMDS_ADDRESS};

#[derive(Debug, Clone)]
pub struct Routes {
    agent_id: String,
    port: u16,
    /// One change at a time: two launches on one network would otherwise both find no rule and
    /// both insert one.
    changing: Arc<tokio::sync::Mutex<()>>,
}

impl Routes {
    pub fn new(agent_id: &str, port: u16) -> Routes {
        Routes { agent_id: agent_id.to_string(), port, changing: Default::default() }
    }

    fn comment(&self) -> String {
        format!("titus-metadata:{}", self.agent_id)
    }

    fn rule(&self, subnet: &str, destination: Ipv4Addr) -> Vec<String> {
        let port = self.port.to_string();
        let destination = format!("{destination}/32");
        let comment = self.comment();
        [
            "-s",
            subnet,
            "-d",
            &destination,
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "80",
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Routes the metadata addresses from `subnet` to the proxy (idempotent).
    pub async fn add(&self, subnet: &str) -> Result<(), String> {
        let _one = self.changing.lock().await;
        for destination in [IMDS_ADDRESS, CREDENTIALS_ADDRESS] {
            let rule = self.rule(subnet, destination);
            if iptables(&["-t", "nat", "-C", "PREROUTING"], &rule).await.is_ok() {
                continue;
            }
            iptables(&["-t", "nat", "-I", "PREROUTING", "1"], &rule).await?;
            tracing::info!(%subnet, %destination, port = self.port, "metadata address routed to the proxy");
        }
        Ok(())
    }

    /// Removes `subnet`'s routes.
    pub async fn remove(&self, subnet: &str) -> Result<(), String> {
        let _one = self.changing.lock().await;
        for destination in [IMDS_ADDRESS, CREDENTIALS_ADDRESS] {
            let rule = self.rule(subnet, destination);
            while iptables(&["-t", "nat", "-C", "PREROUTING"], &rule).await.is_ok() {
                iptables(&["-t", "nat", "-D", "PREROUTING"], &rule).await?;
            }
        }
        Ok(())
    }

    /// Removes every route this agent made, whatever its port then (a previous run's).
    pub async fn remove_all(&self) -> Result<(), String> {
        let _one = self.changing.lock().await;
        let listing = iptables(&["-t", "nat", "-S", "PREROUTING"], &[]).await?;
        let comment = self.comment();
        for line in listing.lines() {
            let words: Vec<String> = line.split_whitespace().map(|w| w.trim_matches('"').to_string()).collect();
            if words.first().map(String::as_str) != Some("-A") || !words.iter().any(|w| *w == comment) {
                continue;
            }
            iptables(&["-t", "nat", "-D"], &words[1..]).await?;
        }
        Ok(())
    }
}

/// Runs iptables; its output, or why it failed.
async fn iptables(head: &[&str], rest: &[String]) -> Result<String, String> {
    let out = Command::new("iptables")
        .args(head)
        .args(rest)
        .arg("-w")
        .output()
        .await
        .map_err(|e| format!("running iptables: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("iptables {} {}: {}", head.join(" "), rest.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}
