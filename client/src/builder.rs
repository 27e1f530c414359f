//! Typed builders for job descriptors.
//!
//! ```
//! use titus_client::JobBuilder;
//! let web = JobBuilder::service("web", "titus/busybox:latest", 1, 3, 5)
//!     .owner("edge@example.com")
//!     .cpu(1.0)
//!     .memory_mb(512)
//!     .command(["sleep", "3600"])
//!     .hard_constraint("uniqueHost", "true")
//!     .build();
//! assert_eq!(web.application_name, "web");
//! let nightly = JobBuilder::batch("nightly", "titus/busybox:latest", 10).retries(3).command(["sh", "-c", "echo done"]).build();
//! assert!(matches!(nightly.job_type, Some(titus_client::proto::job_descriptor::JobType::Batch(_))));
//! ```

use titus_proto as pb;

#[derive(Debug, Clone)]
pub struct JobBuilder {
    d: pb::JobDescriptor,
}

fn image(image: &str) -> pb::Image {
    match image.split_once('@') {
        Some((name, digest)) => pb::Image { name: name.into(), tag: String::new(), digest: digest.into() },
        None => {
            let (name, tag) = image.rsplit_once(':').filter(|(n, _)| !n.is_empty()).unwrap_or((image, "latest"));
            pb::Image { name: name.into(), tag: tag.into(), digest: String::new() }
        }
    }
}

impl JobBuilder {
    fn new(app: &str, image_ref: &str, job_type: pb::job_descriptor::JobType) -> Self {
        JobBuilder {
            d: pb::JobDescriptor {
                owner: Some(pb::Owner { team_email: String::new() }),
                application_name: app.into(),
                container: Some(pb::Container {
                    resources: Some(pb::ContainerResources { cpu: 1.0, memory_mb: 512, ..Default::default() }),
                    image: Some(image(image_ref)),
                    ..Default::default()
                }),
                job_type: Some(job_type),
                ..Default::default()
            },
        }
    }

    /// A batch job of `size` tasks (image as `name:tag` or `name@sha256:…`).
    pub fn batch(app: &str, image: &str, size: u32) -> Self {
        Self::new(app, image, pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size, ..Default::default() }))
    }

    /// An enabled service job with capacity min ≤ desired ≤ max.
    pub fn service(app: &str, image: &str, min: u32, desired: u32, max: u32) -> Self {
        Self::new(
            app,
            image,
            pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
                capacity: Some(pb::Capacity { min, desired, max }),
                enabled: true,
                ..Default::default()
            }),
        )
    }

    fn container(&mut self) -> &mut pb::Container {
        self.d.container.get_or_insert_with(Default::default)
    }

    fn resources(&mut self) -> &mut pb::ContainerResources {
        self.container().resources.get_or_insert_with(Default::default)
    }

    pub fn owner(mut self, team_email: &str) -> Self {
        self.d.owner = Some(pb::Owner { team_email: team_email.into() });
        self
    }
    pub fn capacity_group(mut self, name: &str) -> Self {
        self.d.capacity_group = name.into();
        self
    }
    pub fn cpu(mut self, cpu: f64) -> Self {
        self.resources().cpu = cpu;
        self
    }
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.resources().memory_mb = mb;
        self
    }
    pub fn disk_mb(mut self, mb: u32) -> Self {
        self.resources().disk_mb = mb;
        self
    }
    pub fn network_mbps(mut self, mbps: u32) -> Self {
        self.resources().network_mbps = mbps;
        self
    }
    pub fn command<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.container().command = args.into_iter().map(Into::into).collect();
        self
    }
    pub fn entry_point<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.container().entry_point = args.into_iter().map(Into::into).collect();
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.container().env.insert(key.into(), value.into());
        self
    }
    /// The IAM role (an ARN) whose credentials the job's containers get.
    pub fn iam_role(mut self, arn: &str) -> Self {
        self.container().security_profile.get_or_insert_with(Default::default).iam_role = arn.into();
        self
    }

    /// A security group (sg-...) the job's tasks belong to; repeatable.
    pub fn security_group(mut self, id: &str) -> Self {
        self.container().security_profile.get_or_insert_with(Default::default).security_groups.push(id.into());
        self
    }

    /// Serve instance metadata without an IMDSv2 session token too.
    pub fn allow_imds_v1(mut self) -> Self {
        self.container().security_profile.get_or_insert_with(Default::default).allow_imds_v1 = true;
        self
    }

    pub fn attribute(mut self, key: &str, value: &str) -> Self {
        self.d.attributes.insert(key.into(), value.into());
        self
    }
    pub fn hard_constraint(mut self, name: &str, value: &str) -> Self {
        self.container()
            .hard_constraints
            .get_or_insert_with(Default::default)
            .constraints
            .insert(name.into(), value.into());
        self
    }
    pub fn soft_constraint(mut self, name: &str, value: &str) -> Self {
        self.container()
            .soft_constraints
            .get_or_insert_with(Default::default)
            .constraints
            .insert(name.into(), value.into());
        self
    }
    /// Immediate retries of failed tasks.
    pub fn retries(mut self, retries: u32) -> Self {
        let policy = Some(pb::RetryPolicy {
            policy: Some(pb::retry_policy::Policy::Immediate(pb::retry_policy::Immediate { retries })),
        });
        match self.d.job_type.as_mut() {
            Some(pb::job_descriptor::JobType::Batch(b)) => b.retry_policy = policy,
            Some(pb::job_descriptor::JobType::Service(s)) => s.retry_policy = policy,
            None => {}
        }
        self
    }
    pub fn build(self) -> pb::JobDescriptor {
        self.d
    }
}
