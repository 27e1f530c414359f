//! `titus job apply -f FILE`: makes the job a spec file describes be as it says. The file names
//! its job by `id` (as `titus job get -o yaml` writes it) or by application and jobGroupInfo among
//! the active jobs; no such job: it is created.
//!
//! The file is merged into the job: a field it gives replaces the job's, a field it leaves out
//! (or empty) stays as it is; a map it gives (attributes, env, constraints) replaces the job's
//! whole. What can change in place is changed (a service's capacity and enabled flag, the job's
//! attributes and disruption budget); a change to a service's container (image, command, env, constraints, resources,
//! ...) starts a rolling update; a change to anything else is refused, naming each field,
//! and nothing is changed.

use std::path::Path;

use serde_json::Value;
use titus_client::proto as pb;
use titus_client::spec::JobSpec;
use titus_client::{Client, Error, FieldViolation};

fn invalid(message: String) -> Error {
    Error::InvalidArgument { message, violations: vec![] }
}

/// A spec file's text; `-` is stdin.
pub fn read_spec_text(path: &Path) -> Result<String, Error> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| invalid(format!("stdin: {e}")))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// Maps whose value in a file replaces the job's whole (entries left out are removed).
const WHOLE: &[&str] = &[
    "attributes",
    "container.env",
    "container.softConstraints",
    "container.hardConstraints",
    "container.securityProfile.attributes",
];

/// The dotted paths where `wanted` (a file, defaults left out) differs from `current`.
fn changed(path: &str, current: &Value, wanted: &Value, out: &mut Vec<String>) {
    match (current, wanted) {
        (Value::Object(c), Value::Object(w)) if !WHOLE.contains(&path) => {
            for (key, w) in w {
                let p = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                changed(&p, c.get(key).unwrap_or(&Value::Null), w, out);
            }
        }
        (Value::Null, Value::Object(w)) if w.is_empty() => {}
        _ if current != wanted => out.push(path.to_string()),
        _ => {}
    }
}

/// Whether field `path` may change without replacing the job's tasks.
fn in_place(path: &str) -> bool {
    path == "attributes"
        || path == "service.enabled"
        || path.starts_with("service.capacity")
        || path.starts_with("disruptionBudget")
}

/// Whether field `path` of a service job changes by a rolling update.
fn by_rollout(path: &str) -> bool {
    path.starts_with("container.")
}

/// Sets the value at dotted `path` in `root` (objects made on the way).
fn set_path(root: &mut Value, path: &str, value: Value) {
    let mut at = root;
    for key in path.split('.') {
        if !at.is_object() {
            *at = Value::Object(Default::default());
        }
        at = at.as_object_mut().expect("made an object above").entry(key.to_string()).or_insert(Value::Null);
    }
    *at = value;
}

/// The value at dotted `path` in `root`.
fn get_path<'a>(root: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(root, |v, key| v.get(key).unwrap_or(&Value::Null))
}

fn as_value(spec: &JobSpec) -> Value {
    let mut v = serde_json::to_value(spec).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("status");
    }
    v
}

/// What `apply` did, for people and for `-o json`.
pub struct Applied {
    pub job_id: String,
    pub created: bool,
    pub changes: Vec<String>,
}

/// A spec file, read and parsed: the spec and the descriptor it makes.
fn read_spec(path: &Path) -> Result<(JobSpec, pb::JobDescriptor), Error> {
    let text = read_spec_text(path)?;
    let spec = titus_client::spec::parse(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let descriptor = spec.clone().into_descriptor().map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    Ok((spec, descriptor))
}

/// The job's container with the file's changes to it (the fields `changed` lists), as a rolling
/// update would deploy it.
/// The job as it is with `fields` as the file gives them.
fn merged(current: &JobSpec, spec: &JobSpec, fields: &[&String], path: &Path) -> Result<pb::JobDescriptor, Error> {
    let (before, wanted) = (as_value(current), as_value(spec));
    let mut merged = before;
    for f in fields {
        set_path(&mut merged, f, get_path(&wanted, f).clone());
    }
    let merged: JobSpec = serde_json::from_value(merged).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    merged.into_descriptor().map_err(|e| invalid(format!("{}: {e}", path.display())))
}

fn merged_container(
    current: &JobSpec,
    spec: &JobSpec,
    fields: &[&String],
    path: &Path,
) -> Result<pb::Container, Error> {
    Ok(merged(current, spec, fields, path)?.container.unwrap_or_default())
}

/// `titus job plan -f FILE`: a dry run of what `apply` would do — a new job's placements, or the
/// first step of the rolling update a changed container starts.
pub async fn plan(
    client: &Client,
    path: &Path,
    strategy: Option<pb::RolloutStrategy>,
) -> Result<(Option<String>, pb::JobPlan), Error> {
    let (spec, descriptor) = read_spec(path)?;
    let Some(job) = find_job(client, &spec, &descriptor).await? else {
        let request = pb::JobPlanRequest { job_descriptor: Some(descriptor), ..Default::default() };
        return Ok((None, client.plan_job(request).await?));
    };
    let current = JobSpec::from_job(&job);
    let mut fields = Vec::new();
    changed("", &as_value(&current), &as_value(&spec), &mut fields);
    let rollout: Vec<&String> = fields.iter().filter(|f| by_rollout(f)).collect();
    let container = merged_container(&current, &spec, &rollout, path)?;
    let request =
        pb::JobPlanRequest { job_id: job.id.clone(), container: Some(container), strategy, ..Default::default() };
    Ok((Some(job.id), client.plan_job(request).await?))
}

/// The job a spec file names: by `id`, else the one active job of its application and
/// jobGroupInfo; None: the file describes a new job.
async fn find_job(client: &Client, spec: &JobSpec, descriptor: &pb::JobDescriptor) -> Result<Option<pb::Job>, Error> {
    Ok(match spec.id.as_str() {
        "" => {
            let found = client
                .find_jobs(&[("appName", &spec.application_name), ("jobState", "Accepted")], 1000, "")
                .await?
                .items;
            let group = descriptor.job_group_info.clone().unwrap_or_default();
            let mut same: Vec<pb::Job> = found
                .into_iter()
                .filter(|j| {
                    j.job_descriptor.as_ref().and_then(|d| d.job_group_info.clone()).unwrap_or_default() == group
                })
                .collect();
            match same.len() {
                0 => None,
                1 => same.pop(),
                n => {
                    let ids: Vec<&str> = same.iter().map(|j| j.id.as_str()).collect();
                    return Err(invalid(format!(
                        "{n} active jobs of application {:?} have this jobGroupInfo ({}): name one with `id`",
                        spec.application_name,
                        ids.join(", ")
                    )));
                }
            }
        }
        id => {
            let id = client.resolve_job_id(id).await?;
            let job = client.find_job(&id).await?;
            if job.status.as_ref().is_some_and(|s| s.state == pb::JobState::JobFinished as i32) {
                return Err(Error::FailedPrecondition(format!(
                    "job {id} is finished: leave `id` out to submit the spec as a new job"
                )));
            }
            Some(job)
        }
    })
}

pub async fn apply(client: &Client, path: &Path, strategy: Option<pb::RolloutStrategy>) -> Result<Applied, Error> {
    let (spec, descriptor) = read_spec(path)?;
    let job = find_job(client, &spec, &descriptor).await?;
    let Some(job) = job else {
        let job_id = client.create_job(descriptor).await?;
        return Ok(Applied { job_id, created: true, changes: vec!["created".into()] });
    };
    let current = JobSpec::from_job(&job);
    let mut fields = Vec::new();
    changed("", &as_value(&current), &as_value(&spec), &mut fields);
    let service = current.service.is_some();
    let refused: Vec<&String> = fields.iter().filter(|f| !in_place(f) && !(service && by_rollout(f))).collect();
    if !refused.is_empty() {
        let why = if service {
            "cannot change in place or by a rolling update (submit a new job for it)"
        } else {
            "cannot change in place: a batch job's spec is fixed (submit a new job)"
        };
        let violations =
            refused.iter().map(|f| FieldViolation { field: f.to_string(), description: why.into() }).collect();
        let names: Vec<&str> = refused.iter().map(|f| f.as_str()).collect();
        return Err(Error::InvalidArgument {
            message: format!("job {}: {} {why}; nothing was changed", job.id, names.join(", ")),
            violations,
        });
    }
    let mut changes = Vec::new();
    let rollout: Vec<&String> = fields.iter().filter(|f| by_rollout(f)).collect();
    if !rollout.is_empty() {
        let container = merged_container(&current, &spec, &rollout, path)?;
        let names: Vec<&str> = rollout.iter().map(|f| f.as_str()).collect();
        match client.update_job_spec(&job.id, container, strategy).await? {
            0 => {}
            id => changes.push(format!(
                "deployment {id} started ({}): titus job deploy status {}",
                names.join(", "),
                job.id
            )),
        }
    }
    if let (Some(before), Some(after)) = (&current.service, &spec.service) {
        let (b, a) = (&before.capacity, &after.capacity);
        if fields.iter().any(|f| f.starts_with("service.capacity")) {
            // A field left out keeps its value: the file's `min` is 0 when it gives none.
            let min = if a.min == 0 && !fields.iter().any(|f| f == "service.capacity.min") { b.min } else { a.min };
            client.update_job_capacity(&job.id, Some(min), Some(a.desired), Some(a.max)).await?;
            changes.push(format!(
                "resized {}/{}/{} -> {}/{}/{} (min/desired/max)",
                b.min, b.desired, b.max, min, a.desired, a.max
            ));
        }
        if before.enabled != after.enabled {
            client.update_job_status(&job.id, after.enabled).await?;
            changes.push(if after.enabled { "enabled".into() } else { "disabled".into() });
        }
    }
    let budget: Vec<&String> = fields.iter().filter(|f| f.starts_with("disruptionBudget")).collect();
    if !budget.is_empty() {
        let wanted = merged(&current, &spec, &budget, path)?.disruption_budget;
        client.update_job_disruption_budget(&job.id, wanted).await?;
        let names: Vec<&str> = budget.iter().map(|f| f.as_str()).collect();
        changes.push(format!("disruption budget changed ({})", names.join(", ")));
    }
    if fields.iter().any(|f| f == "attributes") {
        let set: Vec<(&str, &str)> = spec
            .attributes
            .iter()
            .filter(|(k, v)| current.attributes.get(*k) != Some(*v))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let gone: Vec<&str> =
            current.attributes.keys().filter(|k| !spec.attributes.contains_key(*k)).map(String::as_str).collect();
        if !set.is_empty() {
            client.update_job_attributes(&job.id, &set).await?;
            changes.push(format!("attributes set: {}", set.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")));
        }
        if !gone.is_empty() {
            client.delete_job_attributes(&job.id, &gone).await?;
            changes.push(format!("attributes deleted: {}", gone.join(", ")));
        }
    }
    Ok(Applied { job_id: job.id, created: false, changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changes_what_it_gives_and_keeps_what_it_leaves_out() {
        let current = serde_json::json!({
            "applicationName": "web", "attributes": {"a": "1", "b": "2"},
            "container": {"image": {"name": "x", "tag": "1"}, "env": {"K": "v"}, "resources": {"cpu": 1.0, "diskMB": 10000}},
            "service": {"capacity": {"min": 1, "desired": 2, "max": 3}, "enabled": true}
        });
        let wanted = serde_json::json!({
            "applicationName": "web", "attributes": {"a": "1"},
            "container": {"image": {"name": "x", "tag": "2"}, "resources": {"cpu": 1.0}},
            "service": {"capacity": {"desired": 3, "max": 3}, "enabled": true}
        });
        let mut fields = Vec::new();
        changed("", &current, &wanted, &mut fields);
        fields.sort();
        assert_eq!(fields, ["attributes", "container.image.tag", "service.capacity.desired"]);
        assert!(in_place("service.capacity.desired") && in_place("attributes") && !in_place("container.image.tag"));
    }
}
