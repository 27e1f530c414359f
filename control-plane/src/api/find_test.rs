//! FindJobs and FindTasks read pages through the store's key order and indexes; the pages, the
//! cursor walk and the totals are checked against a reference that reads every record and sorts
//! them (what the queries did before), over active and archived jobs and tasks, for every kind of
//! filter and page size.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tempfile::TempDir;

use super::{jobs_page, tasks_page, Page};
use crate::command::{Assignment, Command};
use crate::jobs::query::{paginate, Filter};
use crate::model::job::Job;
use crate::model::task::{Task, TaskState, TaskStatus};
use crate::state::StateRead;
use crate::store::store_test::{agent, apply_at, batch_job};
use crate::store::{StateReader, StateView};

/// Jobs `ja` (alpha, 5 tasks), `jb` (beta, 4), `jc` (alpha, 3, finished and archived), `jd`
/// (gamma, 2); task ids interleave across jobs (`00a`, `00b`, …); tasks placed, started and
/// finished; one of `ja`'s finished tasks archived by a replacement.
fn populated() -> (TempDir, StateReader) {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = crate::store::open(dir.path(), 1).unwrap();
    let mut index = 0;
    let mut apply = |command: Command| {
        index += 1;
        apply_at(&mut sm, index, command)
    };
    apply(Command::RegisterAgent { agent: agent("agent-1") });
    for (job_id, tag, app, n) in
        [("ja", "a", "alpha", 5), ("jb", "b", "beta", 4), ("jc", "c", "alpha", 3), ("jd", "d", "gamma", 2)]
    {
        let (mut job, mut tasks) = batch_job(job_id, "", n);
        job.descriptor.application_name = app.into();
        for t in &mut tasks {
            t.id = format!("{:02}{tag}", t.index);
            t.original_id = t.id.clone();
        }
        apply(Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
        apply(Command::CreateTasks { tasks, archive: vec![] });
    }
    let status = |state: TaskState| TaskStatus {
        state,
        reason_code: String::new(),
        reason_message: String::new(),
        timestamp_ms: 5,
    };
    let assignments = ["00a", "01b", "02a"].map(|t| Assignment { task_id: t.into(), agent_id: "agent-1".into() });
    apply(Command::AssignTasks { assignments: assignments.to_vec(), timestamp_ms: 2 });
    let mut report = |task: &str, state: TaskState| {
        let (task_id, status, context) = (task.to_string(), status(state), BTreeMap::new());
        apply(Command::UpdateTaskStatus { task_id, status, context, expected_state: None });
    };
    report("00a", TaskState::Started);
    for t in ["01a", "03b", "00c", "01c", "02c"] {
        report(t, TaskState::Finished);
    }
    let (_, mut replacement) = batch_job("ja", "", 1);
    (replacement[0].id, replacement[0].index) = ("09a".into(), 1);
    apply(Command::CreateTasks { tasks: replacement, archive: vec!["01a".into()] });
    apply(Command::FinishJob {
        job_id: "jc".into(),
        reason_code: "normal".into(),
        reason_message: "done".into(),
        timestamp_ms: 6,
    });
    (dir, reader)
}

/// What FindJobs answered before it read through indexes: every candidate read, filtered, sorted.
fn reference_jobs(view: &StateView<'_>, filter: &Filter, page_size: u32, cursor: &str) -> Page<Job> {
    let mut jobs: Vec<Job> = view.jobs().unwrap();
    if filter.wants_finished() {
        jobs.extend(view.archived_jobs().unwrap());
    }
    jobs.retain(|j| filter.matches_job(j));
    paginate(jobs, |j| j.id.as_str(), page_size, cursor).unwrap()
}

/// What FindTasks answered before: every candidate job's tasks read, filtered, sorted.
fn reference_tasks(view: &StateView<'_>, filter: &Filter, page_size: u32, cursor: &str) -> Page<(Task, bool)> {
    let mut jobs: Vec<(Job, bool)> = view.jobs().unwrap().into_iter().map(|j| (j, false)).collect();
    if filter.wants_finished() {
        jobs.extend(view.archived_jobs().unwrap().into_iter().map(|j| (j, true)));
    }
    let mut tasks = Vec::new();
    for (job, archived_job) in jobs.into_iter().filter(|(j, _)| filter.matches_job(j)) {
        if !archived_job {
            tasks.extend(view.tasks_of_job(&job.id).unwrap().into_iter().map(|t| (t, false)));
        }
        if filter.wants_finished() {
            for id in view.archived_task_ids_of_job(&job.id).unwrap() {
                tasks.extend(view.archived_task(&id).unwrap().map(|t| (t, true)));
            }
        }
    }
    tasks.retain(|(t, _)| filter.matches_task(t));
    paginate(tasks, |(t, _)| t.id.as_str(), page_size, cursor).unwrap()
}

/// Walks every page of one query both ways; they must agree page for page.
fn walk<T: PartialEq + std::fmt::Debug>(
    page_size: u32,
    query: impl Fn(&str) -> Page<T>,
    reference: impl Fn(&str) -> Page<T>,
) -> usize {
    let mut cursor = String::new();
    let mut seen = 0;
    loop {
        let (got, want) = (query(&cursor), reference(&cursor));
        assert_eq!(got, want, "page after {cursor:?} of size {page_size}");
        seen += got.0.len();
        assert_eq!(seen == got.3 as usize, !got.1, "the total counts what the pages hold");
        if !got.1 {
            return seen;
        }
        cursor = got.2;
    }
}

fn criteria() -> impl Strategy<Value = BTreeMap<String, String>> {
    let pick = |values: &'static [&'static str]| {
        prop::option::of(prop::sample::subsequence(values.to_vec(), 0..=values.len()).prop_map(|v| v.join(",")))
    };
    (
        pick(&["ja", "jb", "jc", "jd", "nope"]),
        pick(&["00a", "01a", "09a", "01b", "00c", "02c", "01d", "zz"]),
        pick(&["Accepted", "Launched", "Started", "Finished"]),
        prop::option::of(prop::sample::select(vec!["alpha", "beta", "gamma"])),
        prop::option::of(prop::sample::select(vec!["Accepted", "Finished"])),
    )
        .prop_map(|(jobs, tasks, states, app, job_state)| {
            let mut m = BTreeMap::new();
            for (k, v) in [("jobIds", jobs), ("taskIds", tasks), ("taskStates", states)] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            if let Some(a) = app {
                m.insert("appName".into(), a.to_string());
            }
            if let Some(s) = job_state {
                m.insert("jobState".into(), s.to_string());
            }
            m
        })
}

#[test]
fn an_unfiltered_walk_sees_every_active_task_once() {
    let (_dir, reader) = populated();
    let view = reader.snapshot();
    let filter = Filter::default();
    let n = walk(3, |c| tasks_page(&view, &filter, 3, c).unwrap(), |c| reference_tasks(&view, &filter, 3, c));
    assert_eq!(n, 5 + 4 + 2, "ja's 5 (one replaced), jb's 4, jd's 2; jc archived");
    let finished = Filter::parse(&BTreeMap::from([("taskStates".into(), "Finished".into())]), true).unwrap();
    let n = walk(2, |c| tasks_page(&view, &finished, 2, c).unwrap(), |c| reference_tasks(&view, &finished, 2, c));
    assert_eq!(n, 1 + 1 + 3, "03b active, 01a archived by its replacement, jc's 3 archived");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pages_agree_with_reading_everything(criteria in criteria(), page_size in 0u32..6) {
        let (_dir, reader) = populated();
        let view = reader.snapshot();
        let tasks = Filter::parse(&criteria, true).unwrap();
        walk(page_size, |c| tasks_page(&view, &tasks, page_size, c).unwrap(), |c| reference_tasks(&view, &tasks, page_size, c));
        let job_criteria: BTreeMap<String, String> =
            criteria.into_iter().filter(|(k, _)| k != "taskIds" && k != "taskStates").collect();
        let jobs = Filter::parse(&job_criteria, false).unwrap();
        walk(page_size, |c| jobs_page(&view, &jobs, page_size, c).unwrap(), |c| reference_jobs(&view, &jobs, page_size, c));
    }
}
