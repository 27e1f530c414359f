//! The replica's admin port: `/metrics` (Prometheus), `/healthz` (live), `/readyz` (ready to
//! serve: knows a leader and is not far behind), and a read-only web view — server-rendered HTML,
//! no JavaScript — of the cluster, its agents, jobs, tasks, pending tasks and why they wait, and
//! recent events. Every page reads this replica's replicated state, so a follower shows the same
//! data as the leader (only "attached" and heartbeat ages are the leader's own knowledge).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use titus_obs::admin::{escape, Handler, Response};

use crate::agents::AgentHub;
use crate::events::Change;
use crate::jobs::apply::{agent_of, allocation_by_agent};
use crate::model::agent::{AgentState, Lifecycle};
use crate::model::job::{Job, JobType};
use crate::model::task::{context, Task, TaskState};
use crate::model::ResourceDimension;
use crate::replica::Replica;
use crate::state::StateRead;

/// A follower whose applied index is this far behind its log is not ready.
const READY_MAX_APPLY_LAG: u64 = 1000;

pub fn handler(replica: Arc<Replica>, hub: Arc<AgentHub>) -> Handler {
    Arc::new(move |path: String| {
        let (replica, hub) = (replica.clone(), hub.clone());
        Box::pin(async move { route(&replica, &hub, &path) })
    })
}

fn route(replica: &Replica, hub: &AgentHub, path: &str) -> Response {
    let path = path.split('?').next().unwrap_or("");
    match path {
        "/metrics" => Response::metrics(crate::collector::render(replica, hub)),
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => match readiness(replica) {
            Ok(()) => Response::text(200, "ready\n"),
            Err(why) => Response::text(503, format!("not ready: {why}\n")),
        },
        "/" | "/ui" | "/ui/" => page("Cluster", &cluster_page(replica, hub)),
        p if p.starts_with("/ui/jobs/") => {
            let id = &p["/ui/jobs/".len()..];
            match job_page(replica, hub, id) {
                Some(body) => page(&format!("Job {id}"), &body),
                None => Response::text(404, format!("no job {id}\n")),
            }
        }
        _ => Response::text(404, "not found: try /ui, /metrics, /healthz, /readyz\n"),
    }
}

/// Ready when this replica knows a leader and has applied (nearly) all of its log.
pub fn readiness(replica: &Replica) -> Result<(), String> {
    let m = replica.raft.metrics().borrow().clone();
    if m.current_leader.is_none() {
        return Err("no leader known (election in progress, or no quorum reachable)".into());
    }
    let last = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    if last.saturating_sub(applied) > READY_MAX_APPLY_LAG {
        return Err(format!("applied index {applied} is {} entries behind the log", last - applied));
    }
    Ok(())
}

fn page(title: &str, body: &str) -> Response {
    Response::html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Titus — {}</title><style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}} th{{background:#eee}}\
         h2{{margin-top:1.2em}} .muted{{color:#777}} code{{font-size:12px}}</style></head>\
         <body><h1><a href=\"/ui\">Titus</a> — {}</h1>{body}</body></html>",
        escape(title),
        escape(title)
    ))
}

fn table(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    out.push_str("<table><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>");
    if rows.is_empty() {
        let _ = write!(out, "<tr><td colspan=\"{}\" class=\"muted\">none</td></tr>", headers.len());
    }
    for r in rows {
        out.push_str("<tr>");
        for cell in r {
            // Cells are already escaped (some hold links).
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

/// Tables show at most this many rows: a page stays small on a large cluster.
const MAX_ROWS: usize = 500;

fn shown(out: &mut String, total: usize) {
    if total > MAX_ROWS {
        let _ = write!(out, "<p class=\"muted\">showing the first {MAX_ROWS} of {total}</p>");
    }
}

fn job_link(id: &str) -> String {
    format!("<a href=\"/ui/jobs/{}\">{}</a>", escape(id), escape(id))
}

fn cluster_page(replica: &Replica, hub: &AgentHub) -> String {
    let mut out = String::new();
    let m = replica.raft.metrics().borrow().clone();
    let leader = m.current_leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into());
    let _ = write!(
        out,
        "<p>This is replica <b>{}</b> ({:?}). Leader: <b>{}</b>. Term {}, last log {}, applied {}. Cluster id <code>{}</code>. Ready: {}.</p>",
        replica.id,
        m.state,
        escape(&leader),
        m.current_term,
        m.last_log_index.unwrap_or(0),
        m.last_applied.map(|l| l.index).unwrap_or(0),
        escape(&replica.state.cluster_id().unwrap_or_default()),
        escape(&readiness(replica).err().unwrap_or_else(|| "yes".into())),
    );

    out.push_str("<h2>Members</h2>");
    let voters: std::collections::BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
    let rows = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, node)| {
            let role = if Some(*id) == m.current_leader {
                "leader"
            } else if voters.contains(id) {
                "voter"
            } else {
                "learner"
            };
            vec![id.to_string(), role.into(), escape(&node.peer_addr), escape(&node.api_addr)]
        })
        .collect();
    table(&mut out, &["id", "role", "peer", "api"], rows);

    let state = &replica.state;
    let tasks = state.all_tasks().unwrap_or_default();
    let allocation = allocation_by_agent(state).unwrap_or_default();
    let ages: BTreeMap<String, std::time::Duration> = hub.heartbeat_ages().into_iter().collect();
    out.push_str("<h2>Agents</h2>");
    let agents = state.agents().unwrap_or_default();
    shown(&mut out, agents.len());
    let rows = agents
        .into_iter()
        .take(MAX_ROWS)
        .map(|a| {
            let used = allocation.get(&a.id).cloned().unwrap_or_default();
            vec![
                escape(&a.id),
                escape(&a.instance_group),
                if a.state == AgentState::Online { "online".into() } else { "lost".into() },
                match (a.healthy, a.terminating) {
                    (_, true) => "terminating (no new tasks)".into(),
                    (true, false) => "yes".into(),
                    (false, false) => format!("no: {}", escape(&a.unhealthy_reason)),
                },
                used.live_tasks.to_string(),
                format!("{:.2} / {:.2}", used.resources.cpu, a.resources.cpu),
                format!("{} / {}", used.resources.memory_mb, a.resources.memory_mb),
                ages.get(&a.id).map_or_else(|| "—".into(), |d| format!("{:.1} s ago", d.as_secs_f64())),
            ]
        })
        .collect();
    table(
        &mut out,
        &["agent", "group", "state", "healthy", "tasks", "cpu used", "memory MB used", "heard (leader)"],
        rows,
    );

    out.push_str("<h2>Jobs</h2>");
    let jobs = state.jobs().unwrap_or_default();
    shown(&mut out, jobs.len());
    let mut counts_by_job: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
    for t in &tasks {
        *counts_by_job.entry(t.job_id.as_str()).or_default().entry(t.state().name()).or_default() += 1;
    }
    let rows = jobs
        .iter()
        .take(MAX_ROWS)
        .map(|j| {
            let counts = counts_by_job.get(j.id.as_str()).cloned().unwrap_or_default();
            let summary = counts.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ");
            vec![
                job_link(&j.id),
                escape(&j.descriptor.application_name),
                job_type(j).into(),
                format!("{:?}", j.status.state),
                escape(&summary),
            ]
        })
        .collect();
    table(&mut out, &["job", "application", "type", "state", "tasks"], rows);

    out.push_str("<h2>Pending tasks</h2>");
    let reasons = PendingReasons::new(replica, &hub.scheduling);
    let by_id: BTreeMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    let pending: Vec<&Task> =
        tasks.iter().filter(|t| t.state() == TaskState::Accepted && agent_of(t).is_none()).collect();
    shown(&mut out, pending.len());
    let rows = pending
        .iter()
        .take(MAX_ROWS)
        .map(|t| {
            vec![escape(&t.id), job_link(&t.job_id), escape(&reasons.why(&t.id, by_id.get(t.job_id.as_str()).copied()))]
        })
        .collect();
    table(&mut out, &["task", "job", "why it waits"], rows);

    out.push_str("<h2>Recent events</h2>");
    let mut rows = Vec::new();
    for batch in state.changes.recent(30) {
        for change in &batch.changes {
            rows.push(vec![batch.revision.to_string(), escape(&describe(change))]);
        }
    }
    table(&mut out, &["revision", "change"], rows);
    out
}

fn job_type(j: &Job) -> &'static str {
    match j.descriptor.job_type {
        JobType::Batch { .. } => "batch",
        JobType::Service { .. } => "service",
    }
}

fn describe(change: &Change) -> String {
    match change {
        Change::Job(j) => format!("job {} ({}) {:?}", j.id, j.descriptor.application_name, j.status.state),
        Change::Task(t) => format!(
            "task {} of job {} {}{}",
            t.id,
            t.job_id,
            t.state().name(),
            if t.status.reason_code.is_empty() { String::new() } else { format!(" ({})", t.status.reason_code) }
        ),
        Change::Agent(a) => format!("agent {} {:?}, healthy {}", a.id, a.state, a.healthy),
        Change::InstanceGroup(g) => format!("instance group {} {:?}, desired {}", g.id, g.lifecycle, g.desired),
        Change::LoadBalancer(lb) => format!("job {} load balancer {} {:?}", lb.job_id, lb.target_group, lb.state),
        Change::LbTarget(t) => format!("target {} of task {} in {}: {:?}", t.ip, t.task_id, t.target_group, t.state),
    }
}

fn job_page(replica: &Replica, hub: &AgentHub, id: &str) -> Option<String> {
    let state = &replica.state;
    let (job, tasks) = match state.job(id).ok().flatten() {
        Some(j) => (j, state.tasks_of_job(id).unwrap_or_default()),
        None => {
            let j = state.archived_job(id).ok().flatten()?;
            let tasks = state
                .archived_task_ids_of_job(id)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|t| state.archived_task(&t).ok().flatten())
                .collect();
            (j, tasks)
        }
    };
    let mut out = String::new();
    let d = &job.descriptor;
    let _ = write!(
        out,
        "<p>{} job of <b>{}</b> (owner {}), capacity group {}, image <code>{}</code>, {:.2} cpu, {} MB. State <b>{:?}</b>{}.</p>",
        job_type(&job),
        escape(&d.application_name),
        escape(&d.owner_email),
        escape(&d.capacity_group),
        escape(&match (&d.container.image.tag, &d.container.image.digest) {
            (_, Some(digest)) => format!("{}@{digest}", d.container.image.name),
            (Some(tag), None) => format!("{}:{tag}", d.container.image.name),
            (None, None) => d.container.image.name.clone(),
        }),
        d.container.resources.cpu,
        d.container.resources.memory_mb,
        job.status.state,
        if job.status.reason_message.is_empty() { String::new() } else { format!(": {}", escape(&job.status.reason_message)) },
    );
    out.push_str("<h2>Tasks</h2>");
    let reasons = PendingReasons::new(replica, &hub.scheduling);
    shown(&mut out, tasks.len());
    let rows = tasks
        .iter()
        .take(MAX_ROWS)
        .map(|t: &Task| {
            vec![
                escape(&t.id),
                t.index.to_string(),
                t.state().name().into(),
                escape(agent_of(t).unwrap_or("—")),
                escape(t.context.get(context::CONTAINER_IP).map(String::as_str).unwrap_or("—")),
                escape(&format!("{} {}", t.status.reason_code, t.status.reason_message)),
                if t.state() == TaskState::Accepted && agent_of(t).is_none() {
                    escape(&reasons.why(&t.id, Some(&job)))
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    table(&mut out, &["task", "index", "state", "agent", "ip", "reason", "why it waits"], rows);
    let lbs: Vec<Vec<String>> = state
        .load_balancers()
        .unwrap_or_default()
        .into_iter()
        .filter(|lb| lb.job_id == id)
        .map(|lb| vec![escape(&lb.target_group), format!("{:?}", lb.state), escape(&lb.message)])
        .collect();
    if !lbs.is_empty() {
        out.push_str("<h2>Load balancers</h2>");
        table(&mut out, &["target group", "state", "message"], lbs);
    }
    Some(out)
}

/// Why Accepted tasks have no agent yet: on the leader, its last scheduling round's reason
/// (constraints and quotas included); elsewhere, from replicated state — no eligible agent at all,
/// or the resource no eligible agent has enough of. Built once per page.
pub struct PendingReasons<'a> {
    /// Eligible agents' (total, used) resources.
    eligible: Vec<(ResourceDimension, ResourceDimension)>,
    rounds: &'a crate::scheduling::results::Results,
}

impl<'a> PendingReasons<'a> {
    pub fn new(replica: &Replica, rounds: &'a crate::scheduling::results::Results) -> PendingReasons<'a> {
        let state = &replica.state;
        let allocation = allocation_by_agent(state).unwrap_or_default();
        let eligible = state
            .agents()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.accepts_tasks())
            .filter(|a| {
                state.instance_group(&a.instance_group).ok().flatten().is_none_or(|g| g.lifecycle == Lifecycle::Active)
            })
            .map(|a| {
                let used = allocation.get(&a.id).map(|x| x.resources.clone()).unwrap_or_default();
                (a.resources, used)
            })
            .collect();
        PendingReasons { eligible, rounds }
    }

    pub fn why(&self, task_id: &str, job: Option<&Job>) -> String {
        if let Some(w) = self.rounds.why(task_id) {
            return w.message;
        }
        let Some(job) = job else { return "its job is gone".into() };
        if self.eligible.is_empty() {
            return "no healthy agent online in an Active instance group".into();
        }
        let need = job.descriptor.container.resources.as_dimension();
        if self.eligible.iter().any(|(total, used)| total.fits(used, &need)) {
            return "an agent has room: waiting for the next placement round".into();
        }
        let most = |f: fn(&ResourceDimension, &ResourceDimension) -> f64| {
            self.eligible.iter().map(|(t, u)| f(t, u)).fold(0.0_f64, f64::max)
        };
        let checks: [(&str, f64, f64); 5] = [
            ("cpu", need.cpu, most(|t, u| t.cpu - u.cpu)),
            ("memory MB", need.memory_mb as f64, most(|t, u| t.memory_mb as f64 - u.memory_mb as f64)),
            ("disk MB", need.disk_mb as f64, most(|t, u| t.disk_mb as f64 - u.disk_mb as f64)),
            ("network Mbps", need.network_mbps as f64, most(|t, u| t.network_mbps as f64 - u.network_mbps as f64)),
            ("GPUs", need.gpu as f64, most(|t, u| t.gpu as f64 - u.gpu as f64)),
        ];
        let n = self.eligible.len();
        for (what, needed, best) in checks {
            if needed > best + 1e-9 {
                return format!(
                    "no agent with {needed} {what} free (the most free on any of {n} eligible agents: {best})"
                );
            }
        }
        format!("no single agent of {n} has every resource it needs free at once")
    }
}
