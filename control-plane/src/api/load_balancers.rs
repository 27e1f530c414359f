//! LoadBalancerService: associate service jobs with ALB target groups (type `ip`). The leader's
//! load balancer duty does the registering; this service only records what users want.

use std::collections::BTreeMap;
use std::sync::Arc;

use titus_proto as pb;
use titus_proto::load_balancer_service_server::LoadBalancerService;
use tonic::{Request, Response, Status};

use super::jobs::now_ms;
use super::{authorize_job_change, client_deadline};
use crate::command::{Command, CommandResponse};
use crate::error::Error;
use crate::jobs::query::paginate;
use crate::model::load_balancer::{validate_target_group_arn, AssociationState, LbTarget, LoadBalancer, TargetState};
use crate::replica::Replica;
use crate::state::StateRead;

pub struct LoadBalancerApi {
    pub replica: Arc<Replica>,
    /// None: AWS is not configured on this replica, and load balancers cannot be added.
    pub aws: Option<titus_aws::Aws>,
}

fn done(response: CommandResponse) -> Result<Response<pb::Empty>, Status> {
    match response {
        CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
        _ => Ok(Response::new(pb::Empty {})),
    }
}

fn check_job_id(job_id: &str) -> Result<(), Status> {
    if job_id.is_empty() {
        return Err(Error::invalid("job_id", "must not be empty").into());
    }
    Ok(())
}

/// The job id and target group ARN of an add or remove request, each checked.
fn association_of(job_id: String, id: Option<pb::LoadBalancerId>) -> Result<(String, String), Status> {
    check_job_id(&job_id)?;
    let arn = id.map(|l| l.id).unwrap_or_default();
    validate_target_group_arn("load_balancer_id.id", &arn).map_err(|v| Error::InvalidArgument(vec![v]))?;
    Ok((job_id, arn))
}

/// The target group tag that names the applications whose jobs a user may put behind it
/// (comma-separated). Admins and operators may use any target group in the account.
pub const APPLICATION_TAG: &str = "titus:applications";

/// Whether a user may put a job of `application` behind a target group tagged `tags`: only when
/// the group's [`APPLICATION_TAG`] names the application — the account's target groups are not
/// every tenant's to register containers in.
fn target_group_allows(tags: &std::collections::BTreeMap<String, String>, application: &str) -> Result<(), String> {
    match tags.get(APPLICATION_TAG) {
        None => Err(format!(
            "has no {APPLICATION_TAG} tag; an AWS administrator tags it with the applications that may use it, or an admin adds it"
        )),
        Some(apps) if apps.split(',').any(|a| a.trim() == application) => Ok(()),
        Some(apps) => Err(format!("is for {APPLICATION_TAG}={apps:?}, not application {application:?}")),
    }
}

fn to_proto(job_id: &str, lbs: Vec<LoadBalancer>, targets: &[LbTarget]) -> pb::GetJobLoadBalancersResult {
    pb::GetJobLoadBalancersResult {
        job_id: job_id.to_string(),
        load_balancers: lbs
            .into_iter()
            .map(|lb| pb::LoadBalancerId {
                targets: targets
                    .iter()
                    .filter(|t| t.job_id == lb.job_id && t.target_group == lb.target_group)
                    .map(|t| pb::LoadBalancerTarget {
                        task_id: t.task_id.clone(),
                        ip: t.ip.clone(),
                        state: match t.state {
                            TargetState::Registering => pb::LoadBalancerTargetState::TargetRegistering,
                            TargetState::Registered => pb::LoadBalancerTargetState::TargetRegistered,
                            TargetState::Deregistering => pb::LoadBalancerTargetState::TargetDeregistering,
                            TargetState::Deregistered => pb::LoadBalancerTargetState::TargetDeregistered,
                        } as i32,
                        updated_ms: t.updated_ms,
                        health: t.health.clone(),
                    })
                    .collect(),
                id: lb.target_group,
                state: match lb.state {
                    AssociationState::Active => pb::LoadBalancerState::LbActive,
                    AssociationState::Orphaned => pb::LoadBalancerState::LbOrphaned,
                } as i32,
                state_message: lb.message,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl LoadBalancerService for LoadBalancerApi {
    async fn get_job_load_balancers(
        &self,
        request: Request<pb::JobId>,
    ) -> Result<Response<pb::GetJobLoadBalancersResult>, Status> {
        self.replica.read_barrier(client_deadline(&request)).await?;
        let job_id = request.into_inner().id;
        check_job_id(&job_id)?;
        let state = &self.replica.state;
        if state.job(&job_id)?.is_none() && state.archived_job(&job_id)?.is_none() {
            return Err(Error::Rejected(crate::command::Rejection::new(
                crate::command::RejectionKind::NotFound,
                "id",
                format!("job {job_id:?} does not exist"),
            ))
            .into());
        }
        let lbs: Vec<LoadBalancer> = state.load_balancers()?.into_iter().filter(|lb| lb.job_id == job_id).collect();
        let targets = state.lb_targets()?;
        Ok(Response::new(to_proto(&job_id, lbs, &targets)))
    }

    async fn get_all_load_balancers(
        &self,
        request: Request<pb::GetAllLoadBalancersRequest>,
    ) -> Result<Response<pb::GetAllLoadBalancersResult>, Status> {
        self.replica.read_barrier(client_deadline(&request)).await?;
        let page = request.into_inner().page.unwrap_or_default();
        let state = &self.replica.state;
        let mut by_job: BTreeMap<String, Vec<LoadBalancer>> = BTreeMap::new();
        for lb in state.load_balancers()? {
            by_job.entry(lb.job_id.clone()).or_default().push(lb);
        }
        let targets = state.lb_targets()?;
        let (items, has_more, cursor, total) =
            paginate(by_job.into_iter().collect(), |(job, _)| job.as_str(), page.page_size, &page.cursor)?;
        Ok(Response::new(pb::GetAllLoadBalancersResult {
            pagination: Some(pb::Pagination { has_more, cursor, total_items: total }),
            job_load_balancers: items.into_iter().map(|(job, lbs)| to_proto(&job, lbs, &targets)).collect(),
        }))
    }

    async fn add_load_balancer(
        &self,
        request: Request<pb::AddLoadBalancerRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let deadline = client_deadline(&request);
        authorize_job_change(&self.replica, &request, &request.get_ref().job_id).await?;
        let caller = crate::auth::caller(&request);
        let req = request.into_inner();
        let (job_id, target_group) = association_of(req.job_id, req.load_balancer_id)?;
        let Some(aws) = &self.aws else {
            return Err(Status::failed_precondition(
                "load balancers are off: this control plane has no [aws] configuration",
            ));
        };
        match aws.target_group(&target_group).await {
            Ok(tg) if tg.target_type == "ip" => {}
            Ok(tg) => {
                return Err(Error::invalid(
                    "load_balancer_id.id",
                    format!(
                        "target group {} has target type {:?}; only \"ip\" target groups are supported",
                        tg.name, tg.target_type
                    ),
                )
                .into())
            }
            Err(titus_aws::AwsError::NotFound(_)) => {
                return Err(Error::invalid(
                    "load_balancer_id.id",
                    format!("target group {target_group} does not exist"),
                )
                .into())
            }
            Err(e @ titus_aws::AwsError::Transient(_)) => {
                return Err(Status::unavailable(format!("checking the target group with AWS: {e}")))
            }
            Err(e) => return Err(Status::failed_precondition(format!("checking the target group with AWS: {e}"))),
        }
        if caller.role == Some(crate::auth::Role::User) {
            let application = match self.replica.state.job(&job_id)? {
                Some(job) => job.descriptor.application_name,
                // The command answers NOT_FOUND (or "finished") itself.
                None => String::new(),
            };
            if !application.is_empty() {
                let tags = match aws.target_group_tags(&target_group).await {
                    Ok(tags) => tags,
                    Err(e @ titus_aws::AwsError::Transient(_)) => {
                        return Err(Status::unavailable(format!("reading the target group's tags from AWS: {e}")))
                    }
                    Err(e) => {
                        return Err(Status::failed_precondition(format!(
                            "reading the target group's tags from AWS: {e}"
                        )))
                    }
                };
                if let Err(why) = target_group_allows(&tags, &application) {
                    let message =
                        format!("rule target-group-owner: {}: target group {target_group} {why}", caller.name);
                    tracing::warn!(caller = %caller.name, rule = "target-group-owner", %target_group, "permission denied");
                    return Err(Status::permission_denied(message));
                }
            }
        }
        let command = Command::AddLoadBalancer { job_id, target_group, timestamp_ms: now_ms() };
        done(self.replica.propose(command, deadline).await?)
    }

    async fn remove_load_balancer(
        &self,
        request: Request<pb::RemoveLoadBalancerRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let deadline = client_deadline(&request);
        authorize_job_change(&self.replica, &request, &request.get_ref().job_id).await?;
        let req = request.into_inner();
        let (job_id, target_group) = association_of(req.job_id, req.load_balancer_id)?;
        done(self.replica.propose(Command::RemoveLoadBalancer { job_id, target_group }, deadline).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_may_use_a_target_group_only_where_its_tag_names_the_application() {
        let tags = |v: Option<&str>| v.map(|v| (APPLICATION_TAG.to_string(), v.to_string())).into_iter().collect();
        assert!(target_group_allows(&tags(Some("web")), "web").is_ok());
        assert!(target_group_allows(&tags(Some("api, web")), "web").is_ok());
        let e = target_group_allows(&tags(Some("api")), "web").unwrap_err();
        assert!(e.contains("not application \"web\""), "{e}");
        assert!(target_group_allows(&tags(Some("webapp")), "web").is_err(), "names are matched whole");
        let e = target_group_allows(&tags(None), "web").unwrap_err();
        assert!(e.contains("has no titus:applications tag"), "{e}");
    }
}
