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

    /// Whether it says anything of the job (so a task query starts from the jobs that match).
    pub fn has_job_criteria(&self) -> bool {
        self.job_ids.is_some()
            || self.job_state.is_some()
            || self.owner.is_some()
            || self.app_name.is_some()
            || self.capacity_group.is_some()
            || self.batch.is_some()
            || !self.attributes.is_empty()
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

/// The page size asked for, checked: 0 is the default, more than the server's cap is refused.
pub fn page_size(requested: u32) -> Result<usize> {
    if requested > MAX_PAGE_SIZE {
        return Err(Error::invalid("page.page_size", format!("must be at most {MAX_PAGE_SIZE}")));
    }
    Ok(if requested == 0 { DEFAULT_PAGE_SIZE } else { requested } as usize)
}

/// One page of `items` (sorted by id), after `cursor`; returns the page, whether more follow, the
/// next cursor and the total count.
pub fn paginate<T>(
    mut items: Vec<T>,
    id: impl Fn(&T) -> &str,
    page_size: u32,
    cursor: &str,
) -> Result<(Vec<T>, bool, String, u32)> {
    let size = self::page_size(page_size)?;
    items.sort_by(|a, b| id(a).cmp(id(b)));
    let total = items.len() as u32;
    let start = if cursor.is_empty() { 0 } else { items.partition_point(|t| id(t) <= cursor) };
    let (page, has_more, next) = first_page(items.into_iter().skip(start).map(Ok), size, id)?;
    Ok((page, has_more, next, total))
}

/// The first `size` of `items` (in id order, after the cursor already), whether more follow and
/// the cursor of the next page: reads at most one item past the page.
pub fn first_page<T>(
    items: impl Iterator<Item = Result<T>>,
    size: usize,
    id: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, bool, String)> {
    let mut page = Vec::with_capacity(size.min(1024));
    let mut has_more = false;
    for item in items {
        let item = item?;
        if page.len() == size {
            has_more = true;
            break;
        }
        page.push(item);
    }
    let next = if has_more { page.last().map(|t| id(t).to_string()).unwrap_or_default() } else { String::new() };
    Ok((page, has_more, next))
}

/// Two iterators in id order (no id in both), merged in id order.
pub fn merge_by_id<T>(
    a: impl Iterator<Item = Result<T>>,
    b: impl Iterator<Item = Result<T>>,
    id: impl Fn(&T) -> &str,
) -> impl Iterator<Item = Result<T>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(Ok(x)), Some(Ok(y))) => {
            if id(x) <= id(y) {
                a.next()
            } else {
                b.next()
            }
        }
        // An error is passed on first, whichever side it is on.
        (Some(Err(_)), _) | (_, None) => a.next(),
        (_, Some(_)) => b.next(),
    })
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
