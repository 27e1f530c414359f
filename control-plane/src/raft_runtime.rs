//! The consensus runtime: a tokio runtime of its own for Raft — its core, replication streams,
//! state machine worker, the peer port's server and every peer connection — apart from the runtime
//! that serves clients and agents.
//!
//! Why: on a leader holding 10,000 agent streams, a heartbeat or vote that shares a runtime with
//! them waits in the same run queue as every agent message and client call; on 2 cores that wait
//! reached seconds, followers heard nothing for an election timeout and elected another leader
//! (the registration storm of a fleet reconnecting). Here Raft's tasks queue only behind Raft's;
//! the operating system shares the cores between the two runtimes' threads, so client load slows
//! Raft down but never parks it behind thousands of tasks.
//!
//! Anything that Raft spawns (openraft uses `tokio::spawn`) lands here when it is started from a
//! task of this runtime: [`RaftRuntime::spawn`] is how the replica starts Raft and the peer server.
//! Peer channels spawn their connection tasks here through [`RaftRuntime::executor`].

use std::future::Future;
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Worker threads: the Raft core and the state machine's applies run side by side, so a long
/// apply does not hold a heartbeat back.
const WORKERS: usize = 2;

pub struct RaftRuntime {
    /// Taken by `shutdown` (or dropped with the struct).
    runtime: Option<Runtime>,
    handle: Handle,
}

impl RaftRuntime {
    pub fn new(node_id: u64) -> Result<RaftRuntime> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name(format!("raft-{node_id}"))
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the consensus runtime's threads: {e}")))?;
        let handle = runtime.handle().clone();
        Ok(RaftRuntime { runtime: Some(runtime), handle })
    }

    /// Runs `future` on this runtime (and what it spawns, here too).
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// An executor for tonic channels: their connections are driven on this runtime.
    pub fn executor(&self) -> Executor {
        Executor(self.handle.clone())
    }

    /// Stops the runtime once its tasks are done with (Raft shut down first), waiting at most
    /// `within` for its blocking work (a snapshot being written) to finish. Callable from async
    /// code: the wait happens on a blocking thread.
    pub async fn shutdown(mut self, within: Duration) {
        if let Some(runtime) = self.runtime.take() {
            let _ = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(within)).await;
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        // Dropped without `shutdown` (an error on the way up): never block an async caller.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Spawns onto the consensus runtime (see [`RaftRuntime::executor`]).
#[derive(Clone)]
pub struct Executor(Handle);

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_work_runs_on_the_consensus_threads_and_shutdown_returns() {
        let rt = RaftRuntime::new(7).expect("runtime");
        let name = rt
            .spawn(async {
                // What a task spawns from here also runs here.
                tokio::spawn(async { std::thread::current().name().map(str::to_string) }).await.expect("inner")
            })
            .await
            .expect("outer");
        assert_eq!(name.as_deref(), Some("raft-7"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        hyper::rt::Executor::execute(&rt.executor(), async move {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        });
        assert_eq!(rx.await.expect("executed").as_deref(), Some("raft-7"));
        rt.shutdown(Duration::from_secs(5)).await;
    }
}
