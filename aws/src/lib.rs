//! The AWS side of Titus: ALB target groups (aws-sdk-elasticloadbalancingv2) and EC2 instances
//! (aws-sdk-ec2), behind a small typed surface the control plane's leader duties call.
//!
//! This crate is a leaf on purpose: the two SDKs are most of the workspace's build time, and keeping
//! them here means an edit anywhere else never rebuilds them.
//!
//! Every call goes through one client-side rate limiter (calls per second) and the SDK's standard
//! retry policy (exponential back-off with jitter on throttling, 5xx and connection errors); what
//! still fails comes back as an [`AwsError`] that says whether trying again later can help.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::types as ec2t;
use aws_sdk_elasticloadbalancingv2::types as elbt;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

mod limiter;
mod sts;

pub use limiter::RateLimiter;
pub use sts::{RoleCredentials, Sts};

/// An endpoint URL (empty: AWS's own) must be http:// or https://.
pub fn check_endpoint_url(url: &str) -> Result<(), String> {
    if url.is_empty() || url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!("{url:?} must start with http:// or https://"))
    }
}

/// The SDK configuration every client here is built from: region, endpoint, retries and timeouts.
async fn shared_config(settings: &AwsSettings) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()))
        .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)))
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(settings.attempt_timeout)
                .connect_timeout(Duration::from_secs(3))
                .build(),
        );
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// Where and how to reach AWS. Credentials come from the standard chain (environment, profile,
/// instance role), never from this struct.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub region: String,
    /// An AWS-compatible endpoint (a moto server, a proxy) instead of AWS's own.
    pub endpoint_url: Option<String>,
    /// Attempts per call, the first included, before an error is returned.
    pub max_attempts: u32,
    /// Upper bound on calls per second from this replica, all APIs together.
    pub calls_per_second: f64,
    /// Bound on one attempt.
    pub attempt_timeout: Duration,
}

/// Why a call failed, sorted by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsError {
    /// The resource named does not exist (e.g. the target group was deleted). Retrying cannot help.
    #[error("{0}")]
    NotFound(String),
    /// The request was refused as invalid or forbidden. Retrying the same request cannot help.
    #[error("{0}")]
    Rejected(String),
    /// Throttling, a 5xx, a timeout or a connection failure that outlasted the SDK's retries:
    /// trying again later may succeed.
    #[error("{0}")]
    Transient(String),
}

impl AwsError {
    pub fn is_transient(&self) -> bool {
        matches!(self, AwsError::Transient(_))
    }
}

const THROTTLING_CODES: &[&str] =
    &["Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "RequestThrottled"];
const NOT_FOUND_CODES: &[&str] =
    &["TargetGroupNotFound", "InvalidInstanceID.NotFound", "InvalidLaunchTemplateId.NotFound"];

fn classify<E, R>(what: &str, e: aws_sdk_elasticloadbalancingv2::error::SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_elasticloadbalancingv2::error::SdkError;
    match &e {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("unknown");
            let message = se.err().message().unwrap_or("").to_string();
            let text = format!("{what}: {code}: {message}");
            if NOT_FOUND_CODES.contains(&code) {
                AwsError::NotFound(text)
            } else if THROTTLING_CODES.contains(&code)
                || code.starts_with("ServiceUnavailable")
                || code == "InternalFailure"
            {
                AwsError::Transient(text)
            } else {
                AwsError::Rejected(text)
            }
        }
        // A response that did not parse (e.g. a proxy's 5xx page), a timeout, a connection error.
        SdkError::ResponseError(_) | SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            AwsError::Transient(format!("{what}: {}", aws_smithy_types::error::display::DisplayErrorContext(&e)))
        }
        _ => AwsError::Rejected(format!("{what}: {}", aws_smithy_types::error::display::DisplayErrorContext(&e))),
    }
}

/// A target group as the control plane needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroup {
    pub arn: String,
    pub name: String,
    /// `ip`, `instance`, `lambda` or `alb`.
    pub target_type: String,
}

/// An EC2 instance launched for an instance group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    /// pending, running, shutting-down, terminated, stopping, stopped.
    pub state: String,
    pub launch_time_ms: i64,
    pub tags: Vec<(String, String)>,
    pub subnet_id: String,
}

/// What to launch for an instance group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchSpec {
    pub image_id: String,
    pub instance_type: String,
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    pub tags: Vec<(String, String)>,
}

/// Targets per RegisterTargets/DeregisterTargets call (the API takes a list; keep calls small).
pub const TARGETS_PER_CALL: usize = 100;

#[derive(Clone)]
pub struct Aws {
    elb: aws_sdk_elasticloadbalancingv2::Client,
    ec2: aws_sdk_ec2::Client,
    limiter: RateLimiter,
}

impl std::fmt::Debug for Aws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aws").finish_non_exhaustive()
    }
}

impl Aws {
    /// Builds the clients. Nothing is called yet: a wrong endpoint or missing credentials show up as
    /// errors of the first call.
    pub async fn connect(settings: &AwsSettings) -> Aws {
        let shared = shared_config(settings).await;
        Aws {
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&shared),
            ec2: aws_sdk_ec2::Client::new(&shared),
            limiter: RateLimiter::new(settings.calls_per_second),
        }
    }

    /// Looks a target group up by ARN.
    pub async fn target_group(&self, arn: &str) -> Result<TargetGroup, AwsError> {
        self.limiter.acquire().await;
        let out = self
            .elb
            .describe_target_groups()
            .target_group_arns(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTargetGroups", e))?;
        let tg = out
            .target_groups()
            .iter()
            .find(|t| t.target_group_arn() == Some(arn))
            .ok_or_else(|| AwsError::NotFound(format!("DescribeTargetGroups: target group {arn} not found")))?;
        Ok(TargetGroup {
            arn: arn.to_string(),
            name: tg.target_group_name().unwrap_or_default().to_string(),
            target_type: tg.target_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
        })
    }

    /// A target group's tags (DescribeTags).
    pub async fn target_group_tags(&self, arn: &str) -> Result<std::collections::BTreeMap<String, String>, AwsError> {
        self.limiter.acquire().await;
        let out = self.elb.describe_tags().resource_arns(arn).send().await.map_err(|e| classify("DescribeTags", e))?;
        Ok(out
            .tag_descriptions()
            .iter()
            .filter(|d| d.resource_arn() == Some(arn))
            .flat_map(|d| d.tags())
            .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
            .collect())
    }

    /// Registers IP targets (on the target group's port), in calls of at most [`TARGETS_PER_CALL`].
    pub async fn register_targets(&self, arn: &str, ips: &[String]) -> Result<(), AwsError> {
        for chunk in ips.chunks(TARGETS_PER_CALL) {
            self.limiter.acquire().await;
            self.elb
                .register_targets()
                .target_group_arn(arn)
                .set_targets(Some(targets(chunk)))
                .send()
                .await
                .map_err(|e| classify("RegisterTargets", e))?;
        }
        Ok(())
    }

    /// Deregisters IP targets; deregistering one that is not registered is not an error. (ELB
    /// refuses a call naming a target not in the group with `InvalidTarget`, whole: a leader that
    /// died after its call went through and before it recorded so left a target the next leader
    /// could never deregister. The targets still present are deregistered then.)
    pub async fn deregister_targets(&self, arn: &str, ips: &[String]) -> Result<(), AwsError> {
        for chunk in ips.chunks(TARGETS_PER_CALL) {
            self.limiter.acquire().await;
            let sent =
                self.elb.deregister_targets().target_group_arn(arn).set_targets(Some(targets(chunk))).send().await;
            let Err(e) = sent else { continue };
            let invalid_target = e.as_service_error().and_then(|se| se.code()) == Some("InvalidTarget");
            let e = classify("DeregisterTargets", e);
            if !invalid_target {
                return Err(e);
            }
            let present: std::collections::HashSet<String> = self.registered_targets(arn).await?.into_iter().collect();
            let left: Vec<String> = chunk.iter().filter(|ip| present.contains(*ip)).cloned().collect();
            if left.is_empty() {
                continue;
            }
            self.limiter.acquire().await;
            self.elb
                .deregister_targets()
                .target_group_arn(arn)
                .set_targets(Some(targets(&left)))
                .send()
                .await
                .map_err(|e| classify("DeregisterTargets", e))?;
        }
        Ok(())
    }

    /// The ids (IPs, for an `ip` target group) of every target the group has, whoever registered it.
    pub async fn registered_targets(&self, arn: &str) -> Result<Vec<String>, AwsError> {
        let mut ids: Vec<String> = self
            .target_health(arn)
            .await?
            .into_iter()
            // A target already draining is on its way out.
            .filter(|(_, state)| state != "draining")
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Every target of the group with its health state as AWS spells it (`initial`, `healthy`,
    /// `unhealthy`, `unused`, `draining`, `unavailable`).
    pub async fn target_health(&self, arn: &str) -> Result<Vec<(String, String)>, AwsError> {
        self.limiter.acquire().await;
        let out = self
            .elb
            .describe_target_health()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTargetHealth", e))?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let id = d.target().and_then(|t| t.id())?.to_string();
                let state = d.target_health().and_then(|h| h.state()).map_or("", |s| s.as_str()).to_string();
                Some((id, state))
            })
            .collect())
    }

    /// Launches `count` instances with the spec's tags (on the instance and its volumes). Returns
    /// their ids. `client_token` makes a retried launch start no second set.
    pub async fn run_instances(
        &self,
        spec: &LaunchSpec,
        count: u32,
        client_token: &str,
    ) -> Result<Vec<String>, AwsError> {
        self.limiter.acquire().await;
        let tags: Vec<ec2t::Tag> =
            spec.tags.iter().map(|(k, v)| ec2t::Tag::builder().key(k).value(v).build()).collect();
        let mut req = self
            .ec2
            .run_instances()
            .image_id(&spec.image_id)
            .instance_type(ec2t::InstanceType::from(spec.instance_type.as_str()))
            .min_count(count as i32)
            .max_count(count as i32)
            .client_token(client_token)
            .tag_specifications(
                ec2t::TagSpecification::builder()
                    .resource_type(ec2t::ResourceType::Instance)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .tag_specifications(
                ec2t::TagSpecification::builder()
                    .resource_type(ec2t::ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            );
        if let Some(subnet) = spec.subnet_ids.first() {
            req = req.subnet_id(subnet);
        }
        if !spec.security_group_ids.is_empty() {
            req = req.set_security_group_ids(Some(spec.security_group_ids.clone()));
        }
        let out = req.send().await.map_err(|e| classify("RunInstances", e))?;
        Ok(out.instances().iter().filter_map(|i| i.instance_id().map(str::to_string)).collect())
    }

    pub async fn terminate_instances(&self, ids: &[String]) -> Result<(), AwsError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.limiter.acquire().await;
        self.ec2
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| classify("TerminateInstances", e))?;
        Ok(())
    }

    /// Which of the security groups `ids` EC2 does not know (in VPC `vpc_id` when given), in the
    /// order given. Asked by filter rather than by id, so that unknown ids are answered as absent
    /// instead of failing the whole call.
    pub async fn missing_security_groups(&self, ids: &[String], vpc_id: Option<&str>) -> Result<Vec<String>, AwsError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut found = std::collections::BTreeSet::new();
        let mut next: Option<String> = None;
        loop {
            self.limiter.acquire().await;
            let mut call = self
                .ec2
                .describe_security_groups()
                .filters(ec2t::Filter::builder().name("group-id").set_values(Some(ids.to_vec())).build())
                .set_next_token(next.take());
            if let Some(vpc) = vpc_id {
                call = call.filters(ec2t::Filter::builder().name("vpc-id").values(vpc).build());
            }
            let page = call.send().await.map_err(|e| classify("DescribeSecurityGroups", e))?;
            found.extend(page.security_groups().iter().filter_map(|g| g.group_id().map(str::to_string)));
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(ids.iter().filter(|id| !found.contains(*id)).cloned().collect())
    }

    /// Instances carrying tag `key` = `value`, in any state but terminated.
    pub async fn instances_tagged(&self, key: &str, value: &str) -> Result<Vec<Instance>, AwsError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            self.limiter.acquire().await;
            let page = self
                .ec2
                .describe_instances()
                .filters(ec2t::Filter::builder().name(format!("tag:{key}")).values(value).build())
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| classify("DescribeInstances", e))?;
            for r in page.reservations() {
                for i in r.instances() {
                    let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
                    if state == "terminated" {
                        continue;
                    }
                    out.push(Instance {
                        id: i.instance_id().unwrap_or_default().to_string(),
                        state,
                        launch_time_ms: i.launch_time().map(|t| t.to_millis().unwrap_or(0)).unwrap_or(0),
                        tags: i
                            .tags()
                            .iter()
                            .map(|t| {
                                (t.key().unwrap_or_default().to_string(), t.value().unwrap_or_default().to_string())
                            })
                            .collect(),
                        subnet_id: i.subnet_id().unwrap_or_default().to_string(),
                    });
                }
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

fn targets(ips: &[String]) -> Vec<elbt::TargetDescription> {
    ips.iter().map(|ip| elbt::TargetDescription::builder().id(ip).build()).collect()
}
