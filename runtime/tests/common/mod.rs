//! Test fixtures: the broker (`pacer_tests::Kafka`: librdkafka's mock cluster or Apache
//! Kafka), replicas run in-process, and `pacer run` arguments. The recording HTTP sink
//! (`pacer_tests::sink`), `pacer` child processes and the bounded wait
//! (`pacer_tests::process`) are shared with the fleet tests and re-exported here.
#![allow(dead_code)]

use std::time::Duration;

use pacer_runtime::allowance::Allowance;
use pacer_runtime::config::{
    Budget, GroupProtocol, Ordering as Order, RetryPolicy, RunConfig, SinkSpec,
};
use pacer_runtime::{ReplicaHandle, RunError, RunSummary};
use tokio::sync::{oneshot, watch};

#[allow(unused_imports)]
pub use pacer_tests::process::*;
#[allow(unused_imports)]
pub use pacer_tests::sink::*;
#[allow(unused_imports)]
pub use pacer_tests::{on_both_brokers, Kafka};

/// `c` speaking `protocol`. Under KIP-848 the broker sets the group timings (the test
/// broker's `group.consumer.*` match [`fast_group`]), and librdkafka refuses them
/// client-side.
pub fn with_protocol(mut c: RunConfig, protocol: GroupProtocol) -> RunConfig {
    c.group_protocol = protocol;
    if protocol == GroupProtocol::Consumer {
        c.kafka_config
            .retain(|(k, _)| k != "session.timeout.ms" && k != "heartbeat.interval.ms");
    }
    c
}

/// A standalone, unlimited, unordered configuration delivering to `sink`.
pub fn config(bootstrap: &str, topic: &str, group: &str, sink: SinkSpec) -> RunConfig {
    RunConfig {
        bootstrap_servers: bootstrap.to_string(),
        topics: vec![topic.to_string()],
        group_id: group.to_string(),
        kafka_config: fast_group(),
        group_protocol: Default::default(),
        budget: Budget::Standalone {
            rate: f64::INFINITY,
            in_flight: 16,
        },
        burst: 1,
        ordering: Order::None,
        buffer_messages: 1000,
        buffer_bytes: 16 << 20,
        sink,
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
        },
        dead_letter_topic: None,
        shutdown_grace: Duration::from_secs(10),
        admin_addr: None,
        termination_log: None,
    }
}

/// A replica running in this process.
pub struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<RunSummary, RunError>>,
    pub handle: ReplicaHandle,
    /// Keeps the allowance channel open for standalone runs.
    pub allowance: watch::Sender<Allowance>,
}

impl InProcess {
    pub async fn start(config: RunConfig) -> InProcess {
        let allowance = match config.budget {
            Budget::Standalone { rate, in_flight } => Allowance::standalone(rate, in_flight),
            Budget::Leased { .. } => Allowance::PENDING,
        };
        Self::start_with(config, allowance).await
    }

    pub async fn start_with(config: RunConfig, allowance: Allowance) -> InProcess {
        init_logs();
        let (tx, rx) = watch::channel(allowance);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (h_tx, h_rx) = oneshot::channel();
        let join = tokio::spawn(pacer_runtime::run_with_allowance(
            config,
            rx,
            async move {
                let _ = stop_rx.await;
            },
            move |h| {
                let _ = h_tx.send(h);
            },
        ));
        let handle = tokio::time::timeout(Duration::from_secs(10), h_rx)
            .await
            .expect("replica did not start in 10 s")
            .expect("replica failed to start");
        InProcess {
            stop: Some(stop_tx),
            join,
            handle,
            allowance: tx,
        }
    }

    /// Clean shutdown (as on SIGTERM); returns the run summary.
    pub async fn stop(mut self) -> RunSummary {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.join)
            .await
            .expect("replica did not stop in 60 s")
            .expect("replica task panicked")
            .expect("replica failed")
    }

    pub fn metrics(&self) -> String {
        self.handle.status.metrics().encode()
    }
}

/// Logs of in-process replicas go to the test output (`PACER_LOG`, default warn).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PACER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// `pacer run` arguments for a standalone replica, with [`fast_group`] timings.
pub fn run_args(
    bootstrap: &str,
    topic: &str,
    group: &str,
    sink: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--group-id",
        group,
        "--sink",
        sink,
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in fast_group() {
        a.push("--kafka-config".into());
        a.push(format!("{k}={v}"));
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}
