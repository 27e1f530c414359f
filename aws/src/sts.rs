//! STS for the agent: temporary credentials of a task's IAM role (AssumeRole), which the agent's
//! metadata proxy serves to that task's containers.

use aws_sdk_sts::types::Tag;

use crate::{classify, shared_config, AwsError, AwsSettings, RateLimiter};

/// Temporary credentials of an assumed role.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// When they stop working, in milliseconds since the epoch.
    pub expiration_ms: i64,
    /// The assumed role's ARN as STS names it (`arn:aws:sts::<account>:assumed-role/<role>/<session>`).
    pub assumed_role_arn: String,
}

/// Never prints the secret or the session token.
impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration_ms", &self.expiration_ms)
            .field("assumed_role_arn", &self.assumed_role_arn)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct Sts {
    client: aws_sdk_sts::Client,
    limiter: RateLimiter,
}

impl std::fmt::Debug for Sts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sts").finish_non_exhaustive()
    }
}

impl Sts {
    /// Builds the client; its own credentials come from the standard chain. Nothing is called yet.
    pub async fn connect(settings: &AwsSettings) -> Sts {
        Sts {
            client: aws_sdk_sts::Client::new(&shared_config(settings).await),
            limiter: RateLimiter::new(settings.calls_per_second),
        }
    }

    /// AssumeRole of `role_arn` as session `session_name`, with session `tags`, for `duration_secs`.
    pub async fn assume_role(
        &self,
        role_arn: &str,
        session_name: &str,
        tags: &[(String, String)],
        duration_secs: i32,
    ) -> Result<RoleCredentials, AwsError> {
        self.limiter.acquire().await;
        let tags: Vec<Tag> = tags.iter().filter_map(|(k, v)| Tag::builder().key(k).value(v).build().ok()).collect();
        let out = self
            .client
            .assume_role()
            .role_arn(role_arn)
            .role_session_name(session_name)
            .set_tags((!tags.is_empty()).then_some(tags))
            .duration_seconds(duration_secs)
            .send()
            .await
            .map_err(|e| classify("AssumeRole", e))?;
        let Some(c) = out.credentials() else {
            return Err(AwsError::Rejected("AssumeRole: the answer carries no credentials".into()));
        };
        Ok(RoleCredentials {
            access_key_id: c.access_key_id().to_string(),
            secret_access_key: c.secret_access_key().to_string(),
            session_token: c.session_token().to_string(),
            expiration_ms: c.expiration().to_millis().unwrap_or(0),
            assumed_role_arn: out.assumed_role_user().map(|u| u.arn().to_string()).unwrap_or_default(),
        })
    }
}
