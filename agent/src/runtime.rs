//! What runs a task: the Docker daemon, or — for scale tests and the scheduler benchmark — a
//! simulation that speaks the same agent protocol without containers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::stream::BoxStream;
use futures::StreamExt;
use titus_proto as pb;

use crate::docker::{Death, DockerRuntime, Observed};
use crate::Result;

#[derive(Clone)]
pub enum Runtime {
    Docker(DockerRuntime),
    Simulated(SimRuntime),
}

impl Runtime {
    pub async fn health(&self) -> std::result::Result<(), String> {
        match self {
            Runtime::Docker(d) => d.health().await,
            Runtime::Simulated(_) => Ok(()),
        }
    }

    /// The networks its containers take addresses from (a simulated task has no address).
    pub async fn container_networks(&self) -> Result<Vec<String>> {
        match self {
            Runtime::Docker(d) => d.container_networks().await,
            Runtime::Simulated(_) => Ok(Vec::new()),
        }
    }

    /// Every task this agent holds, as the runtime sees it.
    pub async fn tasks(&self) -> Result<Vec<Observed>> {
        match self {
            Runtime::Docker(d) => d.tasks().await,
            Runtime::Simulated(s) => Ok(s.tasks()),
        }
    }

    pub async fn observe_with(&self, task_id: &str, killed: bool, oom_seen: bool) -> Result<Option<Observed>> {
        match self {
            Runtime::Docker(d) => d.observe_with(task_id, killed, oom_seen).await,
            Runtime::Simulated(s) => Ok(s.observe(task_id)),
        }
    }

    /// Starts the task (adopting what already runs under its id); the states it went through.
    /// Never starts it once `killed()` is true (see `DockerRuntime::launch`).
    pub async fn launch(
        &self,
        assign: &pb::TaskAssignment,
        killed: &(dyn Fn() -> bool + Send + Sync),
    ) -> Vec<Observed> {
        match self {
            Runtime::Docker(d) => d.launch(assign, killed).await,
            Runtime::Simulated(_) if killed() => vec![crate::docker::killed_before_start(&assign.task_id)],
            Runtime::Simulated(s) => s.launch(&assign.task_id),
        }
    }

    /// Stops the task; false when there was nothing to stop.
    pub async fn stop(&self, task_id: &str, grace_secs: i64) -> Result<bool> {
        match self {
            Runtime::Docker(d) => d.stop(task_id, grace_secs).await,
            Runtime::Simulated(s) => Ok(s.stop(task_id)),
        }
    }

    pub async fn remove(&self, task_id: &str) -> Result<()> {
        match self {
            Runtime::Docker(d) => d.remove(task_id).await,
            Runtime::Simulated(s) => {
                s.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(task_id);
                Ok(())
            }
        }
    }

    /// Tasks whose HTTP health check's verdict changed (a simulated task has none).
    pub fn health_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        match self {
            Runtime::Docker(d) => Some(d.probes.subscribe()),
            Runtime::Simulated(_) => None,
        }
    }

    /// Tasks that died on their own (a simulated task never does).
    pub async fn deaths(&self) -> Result<BoxStream<'static, std::result::Result<Death, String>>> {
        match self {
            Runtime::Docker(d) => Ok(d.deaths().await?.boxed()),
            Runtime::Simulated(_) => Ok(futures::stream::pending().boxed()),
        }
    }
}

/// Simulated tasks: started at once when assigned, stopped when killed, forgotten when told.
#[derive(Clone, Default)]
pub struct SimRuntime {
    tasks: Arc<Mutex<HashMap<String, pb::TaskState>>>,
}

impl SimRuntime {
    fn observed(task_id: &str, state: pb::TaskState) -> Observed {
        let killed = state == pb::TaskState::TaskFinished;
        Observed {
            task_id: task_id.to_string(),
            container_id: format!("sim-{task_id}"),
            state,
            reason_code: if killed { "killed".into() } else { String::new() },
            reason_message: if killed { "simulated task stopped".into() } else { String::new() },
            context: HashMap::new(),
        }
    }

    fn tasks(&self) -> Vec<Observed> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.iter().map(|(id, s)| Self::observed(id, *s)).collect()
    }

    fn observe(&self, task_id: &str) -> Option<Observed> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.get(task_id).map(|s| Self::observed(task_id, *s))
    }

    fn launch(&self, task_id: &str) -> Vec<Observed> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = tasks.get(task_id) {
            return vec![Self::observed(task_id, *s)]; // never run a task id twice
        }
        tasks.insert(task_id.to_string(), pb::TaskState::TaskStarted);
        vec![
            Self::observed(task_id, pb::TaskState::TaskStartInitiated),
            Self::observed(task_id, pb::TaskState::TaskStarted),
        ]
    }

    fn stop(&self, task_id: &str) -> bool {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        match tasks.get_mut(task_id) {
            Some(s) => {
                *s = pb::TaskState::TaskFinished;
                true
            }
            None => false,
        }
    }
}
