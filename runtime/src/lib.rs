//! `pacer-runtime`: one replica of a Pacer fleet — a Kafka consumer turned from push
//! into pull, so the service behind its sink sees at most the granted load.
//!
//! Guarantee: at-least-once. An offset is committed only after every message below it
//! in its partition was delivered or written to the dead-letter topic; without a
//! dead-letter topic a failing message is retried forever and never skipped.
//!
//! ```text
//!           +------------- pacer-kafka thread (consumer) ------------+
//!  Kafka -->| PollLoop: poll -> Intake::push_batch                   |  backpressure:
//!           | store offsets, rebalance callbacks (GroupContext)      |  hold off, pause,
//!           +----------------------------+---------------------------+  resume
//!                                        v
//!                       state: buffer (bounded, ordering none|key|partition),
//!                              offset tracker, in-flight slots, Lifecycle
//!                                        | Outlet::next_batch / next_message
//!                       dispatch --------+--> in-flight slot guard (limit resized live)
//!                                        +--> rate permit (GCRA, re-rated live)
//!                                        +--> worker task: sink, retries, dead letter
//!                                               | InFlight::complete -> offset tracker
//!  allowance (watch) -> allowance::follow -> limiter + in-flight limit
//!  budget_lease: coordinator lease -> allowance; report_demand -> coordinator
//! ```
//!
//! ## Layout
//!
//! - [`config`]: flags and env, validated up front (exit 2 on bad input).
//! - Pure policy: [`buffer`] (bounded buffer + ordering), [`offsets`] (committable
//!   offsets), [`rate`] (re-ratable GCRA), [`outcome`] (what a sink result means),
//!   [`backpressure`] (when to hold off, pause and resume), [`allowance::demand`].
//! - [`state`]: what the threads share, behind narrow handles ([`state::Intake`] for the
//!   Kafka thread, [`state::Outlet`] for the dispatcher, [`state::Status`] for readers),
//!   in-flight slots as guards, and the [`state::Lifecycle`].
//! - Shells: [`consumer`] (the Kafka thread), [`dispatch`] (dispatcher and workers),
//!   [`sink`], [`allowance`] (applying the allowance), [`budget_lease`] (the coordinator's
//!   lease and the demand sent back), [`admin`] (HTTP), [`metrics`].
//! - This file: starting a replica ([`run`]) and its shutdown, one call in a fixed order:
//!   drain (stop fetching, finish the buffered gaps and in-flight work within the grace
//!   period), halt, then commit and leave the group, then give the lease back.

#![deny(clippy::too_many_lines)]

pub mod admin;
pub mod allowance;
pub mod backpressure;
pub mod budget_lease;
pub mod buffer;
pub mod config;
pub mod consumer;
pub mod demo;
pub mod dispatch;
pub mod hash;
pub mod kafka_log;
pub mod message;
pub mod metrics;
pub mod offsets;
pub mod outcome;
pub mod rate;
pub mod sink;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::allowance::Allowance;
use crate::config::{Budget, RunConfig};
use crate::consumer::KafkaConsumer;
use crate::dispatch::WorkerContext;
use crate::rate::RateLimiter;
use crate::sink::Sink;
use crate::state::{Shared, Status};

/// Why a replica could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Consumer(#[from] consumer::ConsumerError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error("cannot bind the admin address {addr}: {source}")]
    AdminBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a finished run reports (used by tests and the demo).
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Largest buffer depth reached.
    pub max_buffer_depth: usize,
    /// Messages still in flight when the grace period ended.
    pub abandoned_in_flight: u32,
}

/// Handles a running replica exposes to its caller.
#[derive(Debug, Clone)]
pub struct ReplicaHandle {
    pub status: Status,
    pub admin_addr: Option<std::net::SocketAddr>,
}

/// Runs a replica until `shutdown` resolves, then shuts down cleanly: stop fetching,
/// finish in-flight work within the grace period, commit, leave the group, release the
/// lease.
pub async fn run(
    config: RunConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, RunError> {
    match config.budget.clone() {
        Budget::Standalone { rate, in_flight } => {
            let (_tx, rx) = watch::channel(Allowance::standalone(rate, in_flight));
            run_with_allowance(config, rx, shutdown, |_| {}).await
        }
        Budget::Leased { client } => {
            if let Some(path) = &config.termination_log {
                write_termination_message(path);
            }
            let lease = budget_lease::BudgetLease::start(client);
            let rx = lease.allowance();
            let reporter = lease.demand_reporter();
            let result = run_with_allowance(config, rx, shutdown, move |h| {
                tokio::spawn(budget_lease::report_demand(h.status, reporter));
            })
            .await;
            lease.release().await;
            result
        }
    }
}

/// Names this run in the container's termination message (see
/// [`config::RunArgs::termination_log`]). A failure costs only the faster reclaim.
fn write_termination_message(path: &std::path::Path) {
    let message = pacer_budget::protocol::termination_message(pacer_budget::client::incarnation());
    if let Err(e) = std::fs::write(path, message) {
        warn!(
            path = %path.display(),
            error = %e,
            "Cannot write the termination message; if this replica crashes, its share returns only after its lease and fallback window"
        );
    }
}

/// Runs a replica whose allowance comes from `allowance` (tests drive it directly).
/// `started` receives the replica's handles once it is running.
pub async fn run_with_allowance(
    config: RunConfig,
    allowance: watch::Receiver<Allowance>,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(ReplicaHandle),
) -> Result<RunSummary, RunError> {
    let replica = Replica::start(&config, allowance).await?;
    info!(
        topics = ?config.topics,
        group = %config.group_id,
        sink = %config.sink,
        ordering = ?config.ordering,
        "Replica running"
    );
    started(replica.handle());
    shutdown.await;
    Ok(replica.shutdown(config.shutdown_grace).await)
}

/// Idle HTTP connections kept per sink host when the in-flight limit comes from a lease
/// (it changes with every refresh, so the configured limit is unknown up front): enough
/// for the usual leased limits; past it, connections are opened and closed per request.
const LEASED_IDLE_CONNECTIONS: usize = 64;

/// A started replica: its tasks and the Kafka thread.
struct Replica {
    shared: Arc<Shared>,
    status: Status,
    consumer: KafkaConsumer,
    dispatcher: JoinHandle<()>,
    follower: JoinHandle<()>,
    admin: Option<(JoinHandle<std::io::Result<()>>, std::net::SocketAddr)>,
}

impl Replica {
    async fn start(
        config: &RunConfig,
        allowance: watch::Receiver<Allowance>,
    ) -> Result<Replica, RunError> {
        let (shared, intake, outlet, status) =
            Shared::new(config.ordering, config.buffer_messages, config.buffer_bytes);
        let limiter = Arc::new(RateLimiter::new(0.0, config.burst));
        let ctx = worker_context(config, outlet.clone(), limiter.clone())?;
        let admin = match config.admin_addr {
            Some(addr) => Some(serve_admin(addr, status.clone(), allowance.clone()).await?),
            None => None,
        };
        let follower = tokio::spawn(allowance::follow(allowance, outlet, limiter));
        let consumer = KafkaConsumer::start(config, intake)?;
        let dispatcher = tokio::spawn(dispatch::dispatch(Arc::new(ctx)));
        Ok(Replica {
            shared,
            status,
            consumer,
            dispatcher,
            follower,
            admin,
        })
    }

    fn handle(&self) -> ReplicaHandle {
        ReplicaHandle {
            status: self.status.clone(),
            admin_addr: self.admin.as_ref().map(|(_, addr)| *addr),
        }
    }

    /// Shutdown, in the only order the types allow: drain (nothing more is fetched;
    /// the buffered gaps and the in-flight work finish within `grace`), halt, then the
    /// Kafka thread commits and leaves the group.
    async fn shutdown(self, grace: Duration) -> RunSummary {
        info!(
            ?grace,
            "Shutting down: stop fetching, finish in-flight work"
        );
        let (halted, left) = self.shared.begin_drain().drain(grace).await;
        if left > 0 {
            warn!(
                in_flight = left,
                "Grace period over with work in flight; its offsets stay uncommitted"
            );
        }
        let _ = self.dispatcher.await;
        // Commit and leave the group (blocking: librdkafka's close).
        let consumer = self.consumer;
        let _ = tokio::task::spawn_blocking(move || consumer.close(halted)).await;
        self.follower.abort();
        if let Some((admin, _)) = self.admin {
            admin.abort();
        }
        let summary = RunSummary {
            max_buffer_depth: self.status.max_depth(),
            abandoned_in_flight: left,
        };
        info!(
            max_buffer_depth = summary.max_buffer_depth,
            consumed = self.status.arrivals(),
            "Replica stopped"
        );
        summary
    }
}

/// The sink, the dead-letter producer and what a worker needs besides.
fn worker_context(
    config: &RunConfig,
    outlet: state::Outlet,
    limiter: Arc<RateLimiter>,
) -> Result<WorkerContext, RunError> {
    let idle_connections = match config.budget {
        Budget::Standalone { in_flight, .. } => in_flight as usize,
        Budget::Leased { .. } => LEASED_IDLE_CONNECTIONS,
    };
    let sink = Sink::build(
        &config.sink,
        &config.bootstrap_servers,
        &config.kafka_config,
        config.timeout,
        idle_connections,
        &config.group_id,
    )?;
    let dead_letter = match &config.dead_letter_topic {
        Some(topic) => Some((
            sink::producer(
                &config.bootstrap_servers,
                &config.kafka_config,
                config.timeout,
            )?,
            topic.clone(),
        )),
        None => None,
    };
    let acked = outlet
        .metrics()
        .messages
        .get_or_create(&metrics::OutcomeLabels { outcome: "acked" })
        .clone();
    Ok(WorkerContext {
        acked,
        outlet,
        limiter,
        sink,
        timeout: config.timeout,
        retry: config.retry,
        dead_letter,
    })
}

/// Binds the admin address and serves `/livez`, `/readyz` and `/metrics` on it.
async fn serve_admin(
    addr: std::net::SocketAddr,
    status: Status,
    allowance: watch::Receiver<Allowance>,
) -> Result<(JoinHandle<std::io::Result<()>>, std::net::SocketAddr), RunError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::AdminBind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    info!(addr = %bound, "Admin HTTP listening");
    let router = admin::router(status, allowance);
    Ok((tokio::spawn(admin::serve(listener, router)), bound))
}

/// Registers SIGTERM and SIGINT now (inside a tokio runtime, before start-up goes on:
/// see [`pacer_budget::signals`]) and returns a future that resolves on the first of
/// them, including one that arrived during start-up; a second one exits the process at
/// once (exit code 130), for an operator who does not want to wait for the grace period.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut signals = pacer_budget::signals::Terminate::register()?;
    Ok(async move {
        signals.recv().await;
        tokio::spawn(async move {
            signals.recv().await;
            warn!("Second signal: exiting immediately");
            std::process::exit(130);
        });
    })
}

/// How often the demand is recomputed (the budget client sends it with each refresh).
/// Short, so that a replica whose new partitions just delivered a backlog asks for it
/// at its next refresh: at 1 s, new members of a settled fleet still asked for an idle
/// trickle for most of a second and the split waited for them (BENCHMARKS.md, the
/// adherence grid).
pub const DEMAND_EVERY: Duration = Duration::from_millis(100);
