//! Submits a job from a spec file and prints its changes as they commit.
//!
//!     cargo run -p titus-client --example submit_and_watch -- deploy/examples/service.json
//!
//! Seeds come from TITUS_SERVERS (default: the local cluster's three replicas).

use titus_client::proto::job_change_notification::Notification;
use titus_client::{spec, Client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: submit_and_watch JOB_SPEC_FILE"))?;
    let descriptor = spec::parse(&std::fs::read_to_string(&path)?)
        .and_then(spec::JobSpec::into_descriptor)
        .map_err(anyhow::Error::msg)?;
    let servers =
        std::env::var("TITUS_SERVERS").unwrap_or_else(|_| "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003".into());
    let client = Client::connect([servers.as_str()])?;
    let id = client.create_job(descriptor).await?;
    println!("created job {id}");
    // The observer reconnects and resumes by itself if the replica it reads from dies.
    let mut changes = client.observe_job(&id);
    loop {
        match changes.next().await?.notification {
            Some(Notification::TaskUpdate(u)) => {
                let t = u.task.unwrap_or_default();
                let s = t.status.unwrap_or_default();
                println!("task {} #{} state {} {}", t.id, t.index, s.state, s.reason_code);
            }
            Some(Notification::JobUpdate(u)) => println!("job {:?}", u.job.and_then(|j| j.status).map(|s| s.state)),
            Some(Notification::SnapshotEnd(_)) | None => {}
        }
    }
}
