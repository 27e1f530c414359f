//! Titus's `filteringCriteria` for FindJobs/FindTasks/ObserveJobs, parsed once and checked per
//! record, and cursor pagination.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::model::job::{Job, JobState};
use crate::model::task::{Task, TaskState};

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub job_ids: Option<BTreeSet<String>>,
    pub task_ids: Option<BTreeSet<String>>,
    pub job_state: Option<JobState>,
    pub task_states: Option<BTreeSet<TaskState>>,
    pub owner: Option<String>,
    pub app_name: Option<String>,
    pub capacity_group: Option<String>,
    pub batch: Option<bool>,
    pub attributes: Vec<(String, String)>,
}

fn list(v: &str) -> BTreeSet<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

impl Filter {
    /// Parses the criteria map; an unknown key or bad value is INVALID_ARGUMENT naming it.
    pub fn parse(criteria: &BTreeMap<String, String>, allow_task_keys: bool) -> Result<Filter> {
        let mut f = Filter::default();
        for (key, value) in criteria {
            let field = format!("filtering_criteria.{key}");
            match key.as_str() {
                "jobIds" => f.job_ids = Some(list(value)),
                "taskIds" if allow_task_keys => f.task_ids = Some(list(value)),
                "jobState" => {
                    f.job_state =
                        Some(JobState::parse(value).ok_or_else(|| {
                            Error::invalid(&field, "must be one of Accepted, KillInitiated, Finished")
                        })?)
                }
                "taskStates" if allow_task_keys => {
                    let mut states = BTreeSet::new();
                    for s in list(value) {
                        states.insert(
                            TaskState::parse(&s)
                                .ok_or_else(|| Error::invalid(&field, format!("{s:?} is not a task state")))?,
                        );
                    }
                    f.task_states = Some(states);
                }
                "owner" => f.owner = Some(value.clone()),
                "appName" | "applicationName" => f.app_name = Some(value.clone()),
                "capacityGroup" => f.capacity_group = Some(value.clone()),
                "jobType" => {
                    f.batch = Some(match value.to_ascii_uppercase().as_str() {
                        "BATCH" => true,
                        "SERVICE" => false,
                        _ => return Err(Error::invalid(&field, "must be BATCH or SERVICE")),
                    })
                }
                "attributes" => {
                    for pair in list(value) {
                        let (k, v) = pair
                            .split_once(':')
                            .ok_or_else(|| Error::invalid(&field, "must be key:value pairs separated by commas"))?;
                        f.attributes.push((k.to_string(), v.to_string()));
                    }
                }
                _ => return Err(Error::invalid(&field, "unknown filter")),
            }
        }
        Ok(f)
    }

    pub fn matches_job(&self, job: &Job) -> bool {
        let d = &job.descriptor;
        self.job_ids.as_ref().is_none_or(|ids| ids.contains(&job.id))
            && self.job_state.is_none_or(|s| s == job.status.state)
            && self.owner.as_ref().is_none_or(|o| *o == d.owner_email)
            && self.app_name.as_ref().is_none_or(|a| *a == d.application_name)
            && self.capacity_group.as_ref().is_none_or(|c| *c == d.capacity_group)
            && self.batch.is_none_or(|b| b == d.is_batch())
            && self.attributes.iter().all(|(k, v)| d.attributes.get(k) == Some(v))
    }

    pub fn matches_task(&self, task: &Task) -> bool {
        self.task_ids.as_ref().is_none_or(|ids| ids.contains(&task.id))
            && self.task_states.as_ref().is_none_or(|s| s.contains(&task.state()))
    }

    /// Whether finished (archived) records must be searched too.
    pub fn wants_finished(&self) -> bool {
        self.job_state == Some(JobState::Finished)
            || self.task_states.as_ref().is_some_and(|s| s.contains(&TaskState::Finished))
            || self.task_ids.is_some()
            || self.job_ids.is_some()
    }
}

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// One page of `items` (sorted by id), after `cursor`; returns the page, whether more follow, the
/// next cursor and the total count.
pub fn paginate<T>(
    mut items: Vec<T>,
    id: impl Fn(&T) -> &str,
    page_size: u32,
    cursor: &str,
) -> Result<(Vec<T>, bool, String, u32)> {
    if page_size > MAX_PAGE_SIZE {
        return Err(Error::invalid("page.page_size", format!("must be at most {MAX_PAGE_SIZE}")));
    }
    let size = if page_size == 0 { DEFAULT_PAGE_SIZE } else { page_size } as usize;
    items.sort_by(|a, b| id(a).cmp(id(b)));
    let total = items.len() as u32;
    let start = if cursor.is_empty() { 0 } else { items.partition_point(|t| id(t) <= cursor) };
    let mut page: Vec<T> = items.into_iter().skip(start).collect();
    let has_more = page.len() > size;
    page.truncate(size);
    let next = if has_more { page.last().map(|t| id(t).to_string()).unwrap_or_default() } else { String::new() };
    Ok((page, has_more, next, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_filters_and_bad_values_name_the_key() {
        let m = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(Filter::parse(&m("colour", "red"), true)
            .unwrap_err()
            .to_string()
            .contains("filtering_criteria.colour"));
        assert!(Filter::parse(&m("jobState", "Sleeping"), true)
            .unwrap_err()
            .to_string()
            .contains("filtering_criteria.jobState"));
        assert!(Filter::parse(&m("taskStates", "Started,Bogus"), true).is_err());
        assert!(Filter::parse(&m("taskStates", "Started"), false).is_err());
        let f = Filter::parse(&m("taskStates", "Started, finished"), true).unwrap();
        assert_eq!(f.task_states.unwrap().len(), 2);
    }

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<String> = (0..25).map(|i| format!("id-{i:02}")).collect();
        let mut seen = Vec::new();
        let mut cursor = String::new();
        loop {
            let (page, more, next, total) = paginate(items.clone(), |s| s.as_str(), 10, &cursor).unwrap();
            assert_eq!(total, 25);
            seen.extend(page);
            if !more {
                break;
            }
            cursor = next;
        }
        assert_eq!(seen, items);
        assert!(paginate(items, |s| s.as_str(), 5000, "").is_err());
    }
}
