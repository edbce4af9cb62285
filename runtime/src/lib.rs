//! `pacer-runtime`: one replica of a Pacer fleet — a Kafka consumer turned from push
//! into pull, so the service behind its sink sees at most the granted load.
//!
//! Guarantee: at-least-once. An offset is committed only after every message below it
//! in its partition was delivered or written to the dead-letter topic; without a
//! dead-letter topic a failing message is retried forever and never skipped.
//!
//! ```text
//!           +------------- pacer-kafka thread --------------+
//!  Kafka -->| BaseConsumer.poll -> Core.buffer (bounded)    |  full: pause partitions
//!           | store offsets, rebalance callbacks, commit    |  low-water: resume
//!           +------------------------+----------------------+
//!                                    | pop_ready (ordering none|key|partition)
//!                       dispatcher --+--> in-flight slot (resized live)
//!                                    +--> rate permit (GCRA, re-rated live)
//!                                    +--> worker task: sink, retries, dead letter
//!                                               | complete -> offset tracker
//!  lease (watch) -> lease::follow -> limiter + in-flight limit
//! ```
//!
//! ## Layout
//!
//! - [`config`]: flags and env, validated up front (exit 2 on bad input).
//! - Pure policy: [`buffer`] (bounded buffer + ordering), [`offsets`] (committable
//!   offsets), [`rate`] (re-ratable GCRA), [`outcome`] (what a sink result means),
//!   [`lease::demand`].
//! - Shells: [`source`] (Kafka thread), [`pipeline`] (dispatcher and workers), [`sink`],
//!   [`lease`] (allowance), [`admin`] (HTTP), [`metrics`].

pub mod admin;
pub mod buffer;
pub mod config;
pub mod demo;
pub mod hash;
pub mod kafka_log;
pub mod lease;
pub mod leased;
pub mod message;
pub mod metrics;
pub mod offsets;
pub mod outcome;
pub mod pipeline;
pub mod rate;
pub mod sink;
pub mod source;

use std::future::Future;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{BudgetSource, RunConfig};
use crate::lease::Allowance;
use crate::pipeline::{Shared, WorkerContext};
use crate::rate::RateLimiter;
use crate::sink::Sink;
use crate::source::Source;

/// Why a replica could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] source::SourceError),
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
    pub shared: Arc<Shared>,
    pub admin_addr: Option<std::net::SocketAddr>,
}

/// Runs a replica until `shutdown` resolves, then shuts down cleanly: stop fetching,
/// finish in-flight work within the grace period, commit, release the lease, leave the
/// group.
pub async fn run(
    config: RunConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, RunError> {
    match config.budget.clone() {
        BudgetSource::Standalone { rate, in_flight } => {
            let (_tx, rx) = watch::channel(Allowance::standalone(rate, in_flight));
            run_with_allowance(config, rx, shutdown, |_| {}).await
        }
        BudgetSource::Leased { client } => {
            if let Some(path) = &config.termination_log {
                write_termination_message(path);
            }
            let lease = leased::Leased::start(client);
            let rx = lease.allowance();
            let demand = lease.clone_demand();
            let result = run_with_allowance(config, rx, shutdown, move |h| {
                tokio::spawn(leased::report_demand(h.shared, demand));
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
    let shared = Shared::new(config.ordering, config.buffer_messages, config.buffer_bytes);
    let limiter = Arc::new(RateLimiter::new(0.0, config.burst));
    let follower = tokio::spawn(lease::follow(
        allowance.clone(),
        shared.clone(),
        limiter.clone(),
    ));

    let hint = match config.budget {
        BudgetSource::Standalone { in_flight, .. } => in_flight as usize,
        BudgetSource::Leased { .. } => 64,
    };
    let sink = Sink::build(
        &config.sink,
        &config.bootstrap_servers,
        &config.kafka_config,
        config.timeout,
        hint,
        &config.group_id,
    )?;
    let dead_letter = match &config.dead_letter_topic {
        Some(t) => Some((
            sink::producer(
                &config.bootstrap_servers,
                &config.kafka_config,
                config.timeout,
            )?,
            t.clone(),
        )),
        None => None,
    };

    let mut admin_addr = None;
    let admin = match config.admin_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::AdminBind { addr, source })?;
            let bound = listener.local_addr().ok();
            admin_addr = bound;
            info!(addr = ?bound, "Admin HTTP listening");
            let router = admin::router(shared.clone(), allowance.clone());
            Some(tokio::spawn(admin::serve(listener, router)))
        }
        None => None,
    };

    let source = Source::start(&config, shared.clone())?;
    let ctx = Arc::new(WorkerContext {
        acked: shared
            .metrics
            .messages
            .get_or_create(&metrics::OutcomeLabels { outcome: "acked" })
            .clone(),
        shared: shared.clone(),
        limiter,
        sink,
        timeout: config.timeout,
        retry: config.retry,
        dead_letter,
    });
    let dispatcher = tokio::spawn(pipeline::dispatch(ctx));
    info!(
        topics = ?config.topics,
        group = %config.group_id,
        sink = %config.sink,
        ordering = ?config.ordering,
        "Replica running"
    );
    started(ReplicaHandle {
        shared: shared.clone(),
        admin_addr,
    });

    shutdown.await;
    info!(grace = ?config.shutdown_grace, "Shutting down: stop fetching, finish in-flight work");
    source.stop_fetching();
    shared.stop();
    let left = shared.drain(config.shutdown_grace).await;
    if left > 0 {
        warn!(
            in_flight = left,
            "Grace period over with work in flight; its offsets stay uncommitted"
        );
    }
    let _ = dispatcher.await;
    // Commit and leave the group (blocking: librdkafka's close).
    let _ = tokio::task::spawn_blocking(move || source.close()).await;
    follower.abort();
    if let Some(a) = admin {
        a.abort();
    }
    let summary = RunSummary {
        max_buffer_depth: shared.lock().max_depth,
        abandoned_in_flight: left,
    };
    info!(
        max_buffer_depth = summary.max_buffer_depth,
        consumed = shared.arrivals.load(AtomicOrdering::Relaxed),
        "Replica stopped"
    );
    Ok(summary)
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once
/// (exit code 130), for an operator who does not want to wait for the grace period.
pub async fn shutdown_signal() {
    first_signal().await;
    tokio::spawn(async {
        first_signal().await;
        warn!("Second signal: exiting immediately");
        std::process::exit(130);
    });
}

async fn first_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, only ctrl-c remains.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How often the demand is recomputed (the budget client sends it with each refresh).
pub const DEMAND_EVERY: Duration = Duration::from_secs(1);
