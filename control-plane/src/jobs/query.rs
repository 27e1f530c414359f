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
    /// `key:value` (that value) or `key` (any value) pairs.
    pub attributes: Vec<(String, Option<String>)>,
    /// `attributes.op`: `or` — any one pair matches; `and` (the default) — all do.
    pub attributes_any: bool,
    pub image_name: Option<String>,
    pub image_tag: Option<String>,
    pub job_group_stack: Option<String>,
    pub job_group_detail: Option<String>,
    pub job_group_sequence: Option<String>,
    /// Tasks whose status reason is one of these.
    pub task_state_reasons: Option<BTreeSet<String>>,
    /// Leave out tasks that finished on a system error (Titus's `skipSystemFailures`).
    pub skip_system_failures: bool,
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
                "imageName" => f.image_name = Some(value.clone()),
                "imageTag" => f.image_tag = Some(value.clone()),
                "jobGroupStack" => f.job_group_stack = Some(value.clone()),
                "jobGroupDetail" => f.job_group_detail = Some(value.clone()),
                "jobGroupSequence" => f.job_group_sequence = Some(value.clone()),
                "taskStateReasons" if allow_task_keys => f.task_state_reasons = Some(list(value)),
                "skipSystemFailures" if allow_task_keys => {
                    f.skip_system_failures = match value.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" | "" => false,
                        _ => return Err(Error::invalid(&field, "must be true or false")),
                    }
                }
                "attributes.op" => {
                    f.attributes_any = match value.to_ascii_lowercase().as_str() {
                        "or" => true,
                        "and" | "" => false,
                        _ => return Err(Error::invalid(&field, "must be and or or")),
                    }
                }
                "jobType" => {
                    f.batch = Some(match value.to_ascii_uppercase().as_str() {
                        "BATCH" => true,
                        "SERVICE" => false,
                        _ => return Err(Error::invalid(&field, "must be BATCH or SERVICE")),
                    })
                }
                "attributes" => {
                    for pair in list(value) {
                        let (k, v) = match pair.split_once(':') {
                            Some((k, v)) => (k, Some(v.to_string())),
                            None => (pair.as_str(), None),
                        };
                        if k.is_empty() {
                            return Err(Error::invalid(&field, "must be key:value or key entries separated by commas"));
                        }
                        f.attributes.push((k.to_string(), v));
                    }
                }
                _ => return Err(Error::invalid(&field, "unknown filter")),
            }
        }
        Ok(f)
    }

    pub fn matches_job(&self, job: &Job) -> bool {
        let d = &job.descriptor;
        let same = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        let attribute = |(k, v): &(String, Option<String>)| match v {
            Some(v) => d.attributes.get(k) == Some(v),
            None => d.attributes.contains_key(k),
        };
        let attributes = if self.attributes_any {
            self.attributes.is_empty() || self.attributes.iter().any(attribute)
        } else {
            self.attributes.iter().all(attribute)
        };
        self.job_ids.as_ref().is_none_or(|ids| ids.contains(&job.id))
            && self.job_state.is_none_or(|s| s == job.status.state)
            && same(&self.owner, &d.owner_email)
            && same(&self.app_name, &d.application_name)
            && same(&self.capacity_group, &d.capacity_group)
            && self.batch.is_none_or(|b| b == d.is_batch())
            && same(&self.image_name, &d.container.image.name)
            && self.image_tag.as_deref().is_none_or(|t| d.container.image.tag.as_deref() == Some(t))
            && same(&self.job_group_stack, &d.job_group_info.stack)
            && same(&self.job_group_detail, &d.job_group_info.detail)
            && same(&self.job_group_sequence, &d.job_group_info.sequence)
            && attributes
    }

    pub fn matches_task(&self, task: &Task) -> bool {
        self.task_ids.as_ref().is_none_or(|ids| ids.contains(&task.id))
            && self.task_states.as_ref().is_none_or(|s| s.contains(&task.state()))
            && self.task_state_reasons.as_ref().is_none_or(|r| r.contains(&task.status.reason_code))
            && !(self.skip_system_failures && crate::model::task::reason::is_system_error(&task.status.reason_code))
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
            || self.image_name.is_some()
            || self.image_tag.is_some()
            || self.job_group_stack.is_some()
            || self.job_group_detail.is_some()
            || self.job_group_sequence.is_some()
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
    fn titus_s_filters_select_what_they_name() {
        use crate::model::job::fixtures::batch_descriptor;
        use crate::model::job::{Job, JobStatus};
        let m = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = batch_descriptor(1);
        d.attributes = [("team".to_string(), "a".to_string()), ("tier".to_string(), "1".to_string())].into();
        d.container.image.tag = Some("v2".into());
        d.job_group_info.stack = "main".into();
        let status = JobStatus {
            state: JobState::Accepted,
            reason_code: String::new(),
            reason_message: String::new(),
            timestamp_ms: 0,
        };
        let job = Job {
            id: "j".into(),
            descriptor: d,
            status,
            status_history: vec![],
            rollout: Default::default(),
            evictions_ms: vec![],
        };
        let matches = |pairs: &[(&str, &str)]| Filter::parse(&m(pairs), true).unwrap().matches_job(&job);
        assert!(matches(&[("attributes", "team:a,tier")]), "a key alone matches any value");
        assert!(!matches(&[("attributes", "team:a,zone")]), "all must match by default");
        assert!(matches(&[("attributes", "team:b,tier:1"), ("attributes.op", "or")]));
        assert!(!matches(&[("attributes", "team:b,tier:2"), ("attributes.op", "OR")]));
        assert!(matches(&[("imageTag", "v2"), ("jobGroupStack", "main"), ("applicationName", "app")]));
        assert!(!matches(&[("imageTag", "v1")]));
        assert!(Filter::parse(&m(&[("attributes.op", "xor")]), true)
            .unwrap_err()
            .to_string()
            .contains("attributes.op"));
        let f = Filter::parse(
            &m(&[("skipSystemFailures", "true"), ("taskStateReasons", "failed,transientSystemError")]),
            true,
        )
        .unwrap();
        let mut task = Task {
            id: "t".into(),
            job_id: "j".into(),
            index: 0,
            status: crate::model::task::TaskStatus {
                state: TaskState::Finished,
                reason_code: String::new(),
                reason_message: String::new(),
                timestamp_ms: 0,
            },
            status_history: vec![],
            context: Default::default(),
            original_id: "t".into(),
            resubmit_of: None,
            resubmit_number: 0,
            system_resubmit_number: 0,
            resources: None,
            attributes: Default::default(),
        };
        task.status.reason_code = "failed".into();
        assert!(f.matches_task(&task));
        task.status.reason_code = "transientSystemError".into();
        assert!(!f.matches_task(&task), "a system failure is skipped");
        task.status.reason_code = "normal".into();
        assert!(!f.matches_task(&task), "not one of the reasons");
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
