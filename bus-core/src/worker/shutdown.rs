//! Stopping workers and RPC servers: one at a time, together, or on a
//! signal.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::engine::Stop;
use super::runtime::{Worker, WorkerStats};
use crate::error::{Error, Result};
use crate::rpc::RpcServer;

/// What a worker did when it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The queue it served.
    pub queue: String,
    /// Deliveries the transport had sent ahead and no handler had started:
    /// requeued.
    pub requeued: u64,
    /// Handlers that were running when the stop came and finished (their
    /// deliveries settled as usual).
    pub finished: u64,
    /// Handlers still running at the deadline: stopped, their deliveries
    /// requeued (with `redelivered` set).
    pub abandoned: u64,
    /// What the worker did over its whole life.
    pub stats: WorkerStats,
}

/// Asks a [`Worker`] to stop from anywhere; cheap to clone; asking twice
/// keeps the first deadline.
#[derive(Clone, Debug)]
pub struct Stopper {
    pub(crate) stop: Arc<watch::Sender<Stop>>,
}

impl Stopper {
    /// Stops the worker as [`Worker::shutdown`] does, without waiting;
    /// handlers in hand get `deadline` to finish.
    pub fn stop(&self, deadline: Duration) {
        self.stop.send_if_modified(|s| {
            if s.requested {
                return false;
            }
            *s = Stop {
                requested: true,
                deadline: Some(deadline),
            };
            true
        });
    }
}

/// Resolves when the process receives SIGINT (Ctrl-C) or SIGTERM (on
/// platforms without Unix signals: Ctrl-C).
///
/// # Errors
/// [`Error::Io`] when the signal handlers cannot be installed.
pub async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(Error::from)
    }
}

/// Several workers and RPC servers stopped together: a process's services.
#[derive(Debug, Default)]
pub struct Host {
    workers: Vec<Worker>,
    servers: Vec<RpcServer>,
}

impl Host {
    /// An empty host.
    #[must_use]
    pub fn new() -> Self {
        Host::default()
    }

    /// Adds a worker.
    #[must_use]
    pub fn with_worker(mut self, worker: Worker) -> Self {
        self.workers.push(worker);
        self
    }

    /// Adds an RPC server.
    #[must_use]
    pub fn with_rpc_server(mut self, server: RpcServer) -> Self {
        self.servers.push(server);
        self
    }

    /// Stops everything at once: no service takes new messages from the
    /// moment this is called; handlers in hand get `deadline` to finish.
    /// Returns each worker's report, in the order they were added.
    ///
    /// # Errors
    /// The first error among the services that had stopped on their own;
    /// every service is stopped regardless.
    pub async fn shutdown(self, deadline: Duration) -> Result<Vec<ShutdownReport>> {
        for worker in &self.workers {
            worker.stopper().stop(deadline);
        }
        for server in &self.servers {
            server.stop_within(deadline);
        }
        let workers = futures::future::join_all(self.workers.into_iter().map(Worker::wait));
        let servers = futures::future::join_all(self.servers.into_iter().map(RpcServer::wait));
        let (workers, servers) = futures::join!(workers, servers);
        let mut first: Option<Error> = None;
        let mut reports = Vec::new();
        for result in workers {
            match result {
                Ok(report) => reports.push(report),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        for result in servers {
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }

    /// Runs until SIGINT or SIGTERM ([`shutdown_signal`]), then stops
    /// everything as [`Host::shutdown`] does.
    ///
    /// # Errors
    /// As [`Host::shutdown`] and [`shutdown_signal`].
    pub async fn run_until_signal(self, deadline: Duration) -> Result<Vec<ShutdownReport>> {
        shutdown_signal().await?;
        self.shutdown(deadline).await
    }
}
