//! TaskIoService: a task's container output and commands run in it. The leader relays both to
//! the agent that runs (or ran) the task, over a session the agent opens on request (see
//! [`AgentHub::open_session`]); nothing of it goes through the log.

use std::sync::Arc;
use std::time::Duration;

use titus_proto as pb;
use titus_proto::task_io_service_server::TaskIoService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::client_deadline;
use crate::agents::{AgentHub, SessionLink};
use crate::error::Error;
use crate::model::task::{Task, TaskState};
use crate::state::{agent_of, StateRead};

pub struct TaskIoApi {
    pub hub: Arc<AgentHub>,
}

/// Most arguments of an exec'd command, and most bytes in all of them.
const MAX_EXEC_ARGS: usize = 256;
const MAX_EXEC_BYTES: usize = 64 << 10;

/// How long an exec call may take to send its start message.
const START_WAIT: Duration = Duration::from_secs(10);

fn task_id_field(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 256 {
        return Err(Error::invalid(field, "must be 1-256 bytes").into());
    }
    Ok(())
}

impl TaskIoApi {
    /// The task (active or finished) and the agent it was placed on, read on the leader.
    async fn placed_task<T>(&self, request: &Request<T>, field: &str, task_id: &str) -> Result<(Task, String), Status> {
        let replica = self.hub.replica();
        replica.require_leader()?;
        replica.read_barrier(client_deadline(request)).await?;
        let state = &replica.state;
        let task = match state.task(task_id)? {
            Some(t) => t,
            None => state
                .archived_task(task_id)?
                .ok_or_else(|| Status::not_found(format!("{field}: task {task_id:?} does not exist")))?,
        };
        let Some(agent) = agent_of(&task).map(str::to_string) else {
            return Err(Status::failed_precondition(format!(
                "task {task_id} is {} and was never placed on an agent: it has no container",
                task.state().name()
            )));
        };
        Ok((task, agent))
    }
}

/// Relays what the agent sends up to the client until either end is done. An agent's error ends
/// the call with its status; the agent's values are bounded by the api port's message limit.
fn relay_output(link: SessionLink, out: mpsc::Sender<Result<pb::TaskOutput, Status>>) {
    tokio::spawn(async move {
        // The whole link lives as long as the relay: its input side (and its place among the
        // sessions) ends with it, not before.
        let mut link = link;
        loop {
            let message = tokio::select! {
                m = link.up.message() => m,
                _ = out.closed() => return,
            };
            let next = match message {
                Ok(Some(pb::SessionUp { message: Some(pb::session_up::Message::Output(o)) })) => Ok(o),
                Ok(Some(pb::SessionUp { message: Some(pb::session_up::Message::Error(e)) })) => {
                    let code = tonic::Code::from(e.code);
                    let code = if code == tonic::Code::Ok { tonic::Code::Unknown } else { code };
                    Err(Status::new(code, crate::model::bounded(e.message, 4096)))
                }
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(s) => Err(Status::unavailable(format!("the task's agent went away: {}", s.message()))),
            };
            let end = next.is_err();
            if out.send(next).await.is_err() || end {
                return;
            }
        }
    });
}

#[tonic::async_trait]
impl TaskIoService for TaskIoApi {
    type TaskLogsStream = ReceiverStream<Result<pb::TaskOutput, Status>>;
    type ExecTaskStream = ReceiverStream<Result<pb::TaskOutput, Status>>;

    async fn task_logs(&self, request: Request<pb::TaskLogsRequest>) -> Result<Response<Self::TaskLogsStream>, Status> {
        let r = request.get_ref().clone();
        task_id_field("task_id", &r.task_id)?;
        if r.since_ms < 0 {
            return Err(Error::invalid("since_ms", "must be >= 0").into());
        }
        let (_, agent) = self.placed_task(&request, "task_id", &r.task_id).await?;
        let task_id = r.task_id.clone();
        let link = self.hub.open_session(&agent, &task_id, pb::open_session::Kind::Logs(r)).await?;
        let (out, rx) = mpsc::channel(64);
        relay_output(link, out);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn exec_task(
        &self,
        request: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecTaskStream>, Status> {
        let (metadata, extensions, mut input) = request.into_parts();
        let first = tokio::time::timeout(START_WAIT, input.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no start message within {} s", START_WAIT.as_secs())))??;
        let Some(pb::ExecInput { input: Some(pb::exec_input::Input::Start(start)) }) = first else {
            return Err(Error::invalid("start", "the first message must be start").into());
        };
        task_id_field("start.task_id", &start.task_id)?;
        if start.command.is_empty() || start.command.len() > MAX_EXEC_ARGS {
            return Err(Error::invalid("start.command", format!("must have 1 to {MAX_EXEC_ARGS} arguments")).into());
        }
        if start.command.iter().map(String::len).sum::<usize>() > MAX_EXEC_BYTES {
            return Err(
                Error::invalid("start.command", format!("must be at most {MAX_EXEC_BYTES} bytes in all")).into()
            );
        }
        if let Some(i) = start.command.iter().position(|a| a.contains('\0')) {
            return Err(Error::invalid(format!("start.command[{i}]"), "must not contain NUL").into());
        }
        let request = Request::from_parts(metadata, extensions, ());
        super::authorize_task_change(self.hub.replica(), &request, &start.task_id).await?;
        let (task, agent) = self.placed_task(&request, "start.task_id", &start.task_id).await?;
        if !matches!(task.state(), TaskState::Started | TaskState::KillInitiated) {
            return Err(Status::failed_precondition(format!(
                "task {} is {}: a command runs only in a started task's container",
                task.id,
                task.state().name()
            )));
        }
        let shown: String = format!("{:?}", start.command).chars().take(256).collect();
        crate::auth::note_target(&request, format!("task {}: exec {shown}", task.id));
        tracing::info!(task_id = %task.id, %agent, command = %shown, caller = %crate::auth::caller(&request).name, "exec");
        let task_id = start.task_id.clone();
        let link = self.hub.open_session(&agent, &task_id, pb::open_session::Kind::Exec(start)).await?;
        // The client's input goes down as it comes, until the client or the agent is done.
        let down = link.down.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = input.message() => m,
                    _ = down.closed() => return,
                };
                match message {
                    Ok(Some(pb::ExecInput { input: Some(pb::exec_input::Input::Start(_)) })) => {
                        let _ = down.send(Err(Error::invalid("start", "sent twice").into())).await;
                        return;
                    }
                    Ok(Some(m)) => {
                        if down.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        });
        let (out, rx) = mpsc::channel(64);
        relay_output(link, out);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
