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
use crate::clock::now_ms;
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
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    // `?page=N` (from 1) on the pages that page.
    let page_no = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("page="))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 1_000_000);
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
            match job_page(replica, hub, id, page_no) {
                Some(body) => page(&format!("Job {id}"), &body),
                None => Response::text(404, format!("no job {id}\n")),
            }
        }
        p if p.starts_with("/ui/tasks/") => {
            let id = &p["/ui/tasks/".len()..];
            match task_page(replica, id) {
                Some(body) => page(&format!("Task {id}"), &body),
                None => Response::text(404, format!("no task {id}\n")),
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

/// How often a page reloads itself (no JavaScript: a refresh header in the page).
const REFRESH_SECS: u32 = 5;

/// `12s`, `5m`, `3h`, `2d` since `ms` (ms since the epoch), with the UTC time as its tooltip.
fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    let secs = (now_ms() - ms).max(0) / 1000;
    let short = match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    format!("<span title=\"{}\">{short} ago</span>", escape(&utc(ms)))
}

/// `2026-12-07 15:20:00 UTC`.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = titus_obs::admin::civil_date(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn page(title: &str, body: &str) -> Response {
    Response::html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>Titus — {}</title><style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}} th{{background:#eee}}\
         h2{{margin-top:1.2em}} .muted{{color:#777}} code{{font-size:12px}}</style></head>\
         <body><h1><a href=\"/ui\">Titus</a> — {}</h1>\
         <p class=\"muted\">As of {}; this page reloads itself every {REFRESH_SECS} s.</p>{body}</body></html>",
        escape(title),
        escape(title),
        utc(now_ms()),
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

/// Finished jobs listed on the cluster page, newest first.
const FINISHED_JOBS_SHOWN: usize = 50;

/// Rows of a job's task table per page.
const TASKS_PER_PAGE: usize = 100;

fn shown(out: &mut String, total: usize) {
    if total > MAX_ROWS {
        let _ = write!(out, "<p class=\"muted\">showing the first {MAX_ROWS} of {total}</p>");
    }
}

fn job_link(id: &str) -> String {
    format!("<a href=\"/ui/jobs/{}\">{}</a>", escape(id), escape(id))
}

fn task_link(id: &str) -> String {
    format!("<a href=\"/ui/tasks/{}\">{}</a>", escape(id), escape(id))
}

/// A job's size: a batch job's task count, a service's min/desired/max.
fn job_size(j: &Job) -> String {
    match &j.descriptor.job_type {
        JobType::Batch { size, .. } => size.to_string(),
        JobType::Service { capacity, .. } => format!("{}/{}/{}", capacity.min, capacity.desired, capacity.max),
    }
}

fn job_enabled(j: &Job) -> &'static str {
    match &j.descriptor.job_type {
        JobType::Batch { .. } => "—",
        JobType::Service { enabled: true, .. } => "yes",
        JobType::Service { enabled: false, .. } => "no",
    }
}

/// When a job was created: its first status.
fn job_created(j: &Job) -> i64 {
    j.status_history.first().unwrap_or(&j.status).timestamp_ms
}

/// When a task was created: its first status.
fn task_created(t: &Task) -> i64 {
    t.status_history.first().unwrap_or(&t.status).timestamp_ms
}

/// The most quick crashes in a row among a job's live tasks (a crash-looping service's), if any.
fn crash_loop(tasks: &[&Task]) -> Option<u32> {
    tasks
        .iter()
        .filter(|t| t.state().is_live())
        .filter_map(|t| t.context.get(context::CRASH_LOOP_COUNT)?.parse::<u32>().ok())
        .max()
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
                ago(a.registered_ms),
            ]
        })
        .collect();
    table(
        &mut out,
        &["agent", "group", "state", "healthy", "tasks", "cpu used", "memory MB used", "heard (leader)", "registered"],
        rows,
    );

    out.push_str("<h2>Jobs</h2>");
    let jobs = state.jobs().unwrap_or_default();
    shown(&mut out, jobs.len());
    let mut tasks_by_job: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in &tasks {
        tasks_by_job.entry(t.job_id.as_str()).or_default().push(t);
    }
    let rows = jobs
        .iter()
        .take(MAX_ROWS)
        .map(|j| {
            let of_job = tasks_by_job.get(j.id.as_str()).cloned().unwrap_or_default();
            let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
            for t in &of_job {
                *counts.entry(t.state().name()).or_default() += 1;
            }
            let mut summary = counts.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ");
            // One row per job however many times its tasks were replaced: a crash loop is a count.
            if let Some(n) = crash_loop(&of_job) {
                summary.push_str(&format!(" — crash-looping ({n} quick crashes in a row)"));
            }
            vec![
                job_link(&j.id),
                escape(&j.descriptor.application_name),
                job_type(j).into(),
                format!("{:?}", j.status.state),
                job_size(j),
                job_enabled(j).into(),
                escape(&summary),
                ago(job_created(j)),
            ]
        })
        .collect();
    table(
        &mut out,
        &["job", "application", "type", "state", "size (min/desired/max)", "enabled", "active tasks", "age"],
        rows,
    );

    out.push_str("<h2>Finished jobs</h2>");
    // Read newest first by the archive's order: the page reads 50 records, not the archive.
    let finished: Vec<Job> = state
        .newest_archived_job_ids(FINISHED_JOBS_SHOWN)
        .unwrap_or_default()
        .iter()
        .filter_map(|id| state.archived_job(id).ok().flatten())
        .collect();
    let total = state.counts().archived_jobs as usize;
    let rows = finished
        .iter()
        .map(|j| {
            vec![
                job_link(&j.id),
                escape(&j.descriptor.application_name),
                job_type(j).into(),
                escape(&format!("{} {}", j.status.reason_code, j.status.reason_message)),
                ago(j.status.timestamp_ms),
            ]
        })
        .collect();
    if total > FINISHED_JOBS_SHOWN {
        let _ = write!(out, "<p class=\"muted\">the newest {FINISHED_JOBS_SHOWN} of {total} kept</p>");
    }
    table(&mut out, &["job", "application", "type", "reason", "finished"], rows);

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
            vec![
                task_link(&t.id),
                job_link(&t.job_id),
                escape(&reasons.why(&t.id, by_id.get(t.job_id.as_str()).copied())),
                ago(task_created(t)),
            ]
        })
        .collect();
    table(&mut out, &["task", "job", "why it waits", "waiting"], rows);

    out.push_str("<h2>Recent events</h2>");
    let mut rows = Vec::new();
    for batch in state.changes.recent(30) {
        for change in &batch.changes {
            rows.push(vec![batch.revision.to_string(), escape(&describe(change)), ago(changed_at(change))]);
        }
    }
    table(&mut out, &["revision", "change", "when"], rows);
    out
}

fn job_type(j: &Job) -> &'static str {
    match j.descriptor.job_type {
        JobType::Batch { .. } => "batch",
        JobType::Service { .. } => "service",
    }
}

/// When a change happened, as far as its record says (0: it does not).
fn changed_at(change: &Change) -> i64 {
    match change {
        Change::Job(j) => j.status.timestamp_ms,
        Change::Task(t) => t.status.timestamp_ms,
        Change::Agent(a) => a.registered_ms,
        _ => 0,
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

fn job_page(replica: &Replica, hub: &AgentHub, id: &str, page_no: usize) -> Option<String> {
    let state = &replica.state;
    // Its finished tasks still kept, beside the active ones (a finished job has only those).
    let archived = || {
        state
            .archived_task_ids_of_job(id)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|t| state.archived_task(&t).ok().flatten())
    };
    let (job, mut tasks) = match state.job(id).ok().flatten() {
        Some(j) => (j, state.tasks_of_job(id).unwrap_or_default().into_iter().chain(archived()).collect::<Vec<_>>()),
        None => (state.archived_job(id).ok().flatten()?, archived().collect()),
    };
    let mut out = String::new();
    let d = &job.descriptor;
    let _ = write!(
        out,
        "<p>{} job of <b>{}</b> (owner {}). State <b>{:?}</b>{} — created {}, in this state since {}.</p>",
        job_type(&job),
        escape(&d.application_name),
        escape(&d.owner_email),
        job.status.state,
        if job.status.reason_message.is_empty() {
            String::new()
        } else {
            format!(": {}", escape(&job.status.reason_message))
        },
        ago(job_created(&job)),
        ago(job.status.timestamp_ms),
    );

    out.push_str("<h2>Spec</h2>");
    let c = &d.container;
    let image = match (&c.image.tag, &c.image.digest) {
        (_, Some(digest)) => format!("{}@{digest}", c.image.name),
        (Some(tag), None) => format!("{}:{tag}", c.image.name),
        (None, None) => c.image.name.clone(),
    };
    let map = |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
    let mut spec: Vec<(&str, String)> = vec![
        ("size (min/desired/max)", job_size(&job)),
        ("enabled", job_enabled(&job).into()),
        ("capacity group", d.capacity_group.clone()),
        (
            "job group (stack/detail/sequence)",
            format!("{}/{}/{}", d.job_group_info.stack, d.job_group_info.detail, d.job_group_info.sequence),
        ),
        ("image", image),
        ("entry point", format!("{:?}", c.entry_point)),
        ("command", format!("{:?}", c.command)),
        (
            "resources",
            format!(
                "{} cpu, {} MB memory, {} MB disk, {} Mbps network, {} GPU",
                c.resources.cpu, c.resources.memory_mb, c.resources.disk_mb, c.resources.network_mbps, c.resources.gpu
            ),
        ),
        // Values may be secrets, and this port has no authentication: names only.
        ("environment (names)", c.env.keys().cloned().collect::<Vec<_>>().join(", ")),
        ("hard constraints", map(&c.hard_constraints)),
        ("soft constraints", map(&c.soft_constraints)),
        ("attributes", map(&d.attributes)),
    ];
    if !c.capabilities.is_empty() {
        spec.push(("capabilities", c.capabilities.join(", ")));
    }
    if !c.security_profile.is_empty() {
        let p = &c.security_profile;
        spec.push(("IAM role", p.iam_role.clone()));
        spec.push(("security groups", p.security_groups.join(", ")));
    }
    match &d.job_type {
        JobType::Batch { runtime_limit_sec, retry_policy, .. } => {
            spec.push(("retry policy", format!("{retry_policy:?}")));
            spec.push((
                "runtime limit",
                if *runtime_limit_sec == 0 { "none".into() } else { format!("{runtime_limit_sec} s") },
            ));
        }
        JobType::Service { retry_policy, .. } => spec.push(("retry policy", format!("{retry_policy:?}"))),
    }
    table(&mut out, &["field", "value"], spec.into_iter().map(|(k, v)| vec![escape(k), escape(&v)]).collect());

    if !job.rollout.deployments.is_empty() {
        let _ = write!(out, "<h2>Deployments</h2><p>Spec version {}.</p>", job.rollout.version);
        let rows = job
            .rollout
            .deployments
            .iter()
            .rev()
            .map(|dep| {
                let progress = if dep.state.is_active() {
                    let (live, available, old) = crate::jobs::deployment::progress(dep, &tasks, &|t: &Task| {
                        crate::jobs::lifecycle::serves(&job, t, None)
                    });
                    format!(
                        "new {available} serving of {} ({live} live), old {old} left",
                        job.descriptor.wanted_tasks()
                    )
                } else {
                    String::new()
                };
                vec![
                    dep.id.to_string(),
                    dep.state.name().to_string(),
                    escape(&format!(
                        "{} ({}) → {} ({})",
                        dep.from_version, dep.from_image, dep.to_version, dep.to_image
                    )),
                    format!("{} steps, {} failures", dep.steps.len(), dep.failures),
                    progress,
                    ago(dep.started_ms),
                    escape(&dep.message),
                ]
            })
            .collect();
        table(&mut out, &["id", "state", "version", "steps", "progress", "started", "message"], rows);
    }

    // Live tasks one per row, by index; finished ones one row per index and reason with a count
    // (a crash-looping service's hundreds of replacements are one row), newest first.
    out.push_str("<h2>Tasks</h2>");
    let reasons = PendingReasons::new(replica, &hub.scheduling);
    tasks.sort_by(|a, b| (a.index, task_created(a)).cmp(&(b.index, task_created(b))));
    let (live, finished): (Vec<&Task>, Vec<&Task>) = tasks.iter().partition(|t| t.state().is_live());
    if let Some(n) = crash_loop(&live) {
        let _ = write!(out, "<p><b>Crash-looping</b>: {n} quick crashes in a row; replacements back off.</p>");
    }
    let mut groups: BTreeMap<(u32, String), Vec<&Task>> = BTreeMap::new();
    for t in finished {
        groups.entry((t.index, t.status.reason_code.clone())).or_default().push(t);
    }
    let mut rows: Vec<Vec<String>> = live
        .iter()
        .map(|t| {
            vec![
                task_link(&t.id),
                t.index.to_string(),
                t.state().name().into(),
                escape(agent_of(t).unwrap_or("—")),
                escape(t.context.get(context::CONTAINER_IP).map(String::as_str).unwrap_or("—")),
                if t.state() == TaskState::Accepted && agent_of(t).is_none() {
                    format!("waiting: {}", escape(&reasons.why(&t.id, Some(&job))))
                } else {
                    escape(&format!("{} {}", t.status.reason_code, t.status.reason_message))
                },
                ago(task_created(t)),
                ago(t.status.timestamp_ms),
            ]
        })
        .collect();
    let mut finished_rows: Vec<(i64, Vec<String>)> = groups
        .into_iter()
        .map(|((index, _), group)| {
            let last = group.iter().max_by_key(|t| t.status.timestamp_ms).copied().unwrap_or(group[0]);
            let count =
                if group.len() > 1 { format!(" ({} tasks; the last shown)", group.len()) } else { String::new() };
            let row = vec![
                format!("{}{}", task_link(&last.id), escape(&count)),
                index.to_string(),
                last.state().name().into(),
                escape(agent_of(last).unwrap_or("—")),
                escape(last.context.get(context::CONTAINER_IP).map(String::as_str).unwrap_or("—")),
                escape(&format!("{} {}", last.status.reason_code, last.status.reason_message)),
                ago(task_created(last)),
                ago(last.status.timestamp_ms),
            ];
            (last.status.timestamp_ms, row)
        })
        .collect();
    finished_rows.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    rows.extend(finished_rows.into_iter().map(|(_, r)| r));
    let pages = rows.len().div_ceil(TASKS_PER_PAGE).max(1);
    let page_no = page_no.min(pages);
    let shown: Vec<Vec<String>> = rows.into_iter().skip((page_no - 1) * TASKS_PER_PAGE).take(TASKS_PER_PAGE).collect();
    table(&mut out, &["task", "index", "state", "agent", "ip", "reason", "created", "in state since"], shown);
    if pages > 1 {
        let link = |n: usize, label: &str| format!("<a href=\"/ui/jobs/{}?page={n}\">{label}</a>", escape(id));
        let _ = write!(
            out,
            "<p>page {page_no} of {pages} {} {}</p>",
            if page_no > 1 { link(page_no - 1, "previous") } else { String::new() },
            if page_no < pages { link(page_no + 1, "next") } else { String::new() },
        );
    }
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

/// One task: where it runs and its state timeline, oldest first.
fn task_page(replica: &Replica, id: &str) -> Option<String> {
    let state = &replica.state;
    let task = state.task(id).ok().flatten().or_else(|| state.archived_task(id).ok().flatten())?;
    let mut out = String::new();
    let _ = write!(
        out,
        "<p>Task {} of job {} (index {}), <b>{}</b> since {}. Agent {}, address {}.{}</p>",
        escape(&task.id),
        job_link(&task.job_id),
        task.index,
        task.state().name(),
        ago(task.status.timestamp_ms),
        escape(agent_of(&task).unwrap_or("none")),
        escape(task.context.get(context::CONTAINER_IP).map(String::as_str).unwrap_or("none")),
        match &task.resubmit_of {
            Some(of) => format!(" It replaced {} (replacement {}).", task_link(of), task.resubmit_number),
            None => String::new(),
        },
    );
    out.push_str("<h2>Timeline</h2>");
    let rows = task
        .status_history
        .iter()
        .chain(std::iter::once(&task.status))
        .map(|s| {
            vec![
                s.state.name().into(),
                escape(&utc(s.timestamp_ms)),
                ago(s.timestamp_ms),
                escape(&format!("{} {}", s.reason_code, s.reason_message)),
            ]
        })
        .collect();
    table(&mut out, &["state", "at", "", "reason"], rows);
    out.push_str("<h2>Context</h2>");
    table(&mut out, &["key", "value"], task.context.iter().map(|(k, v)| vec![escape(k), escape(v)]).collect());
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
