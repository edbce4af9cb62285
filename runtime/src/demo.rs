//! `pacer demo`: a whole fleet on one machine, to watch the global budget hold.
//!
//! Starts an embedded Kafka broker (librdkafka's mock cluster) with a backlog, an
//! in-process coordinator, N leased replicas and a local HTTP sink, then prints the
//! sink's rate each second next to the budget. Halfway through, one replica leaves
//! (releasing its lease) so the hand-over of its share is visible.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pacer_budget::ledger::BudgetConfig;
use pacer_budget::policy::Policy;
use pacer_budget::service::{BudgetId, Coordinator};
use pacer_budget::Share;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use tokio::sync::watch;

use crate::config::{Budget, DemoArgs, Ordering, RetryPolicy, RunConfig, SinkSpec};

const TOPIC: &str = "demo";
const TOKEN: &str = "pacer-demo-token-0123456789abcdef";
/// Short leases and fallback window, so the demo's start-up learning takes 4 s.
const LEASE_MS: u64 = 2_000;
const FALLBACK_MS: u64 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the embedded Kafka broker: {0}")]
    Broker(#[source] rdkafka::error::KafkaError),
    #[error("cannot produce the demo backlog: {0}")]
    Produce(#[source] rdkafka::error::KafkaError),
    #[error("the broker did not take {failed} of the {total} backlog messages: {error}")]
    NotProduced {
        failed: u64,
        total: usize,
        #[source]
        error: rdkafka::error::KafkaError,
    },
    #[error("cannot bind a local port: {0}")]
    Bind(#[source] std::io::Error),
    #[error("cannot write {path}: {source}")]
    Json {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One line of the demo's output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Second {
    pub t: u64,
    pub replicas: u32,
    pub sink_rate: f64,
    pub budget: f64,
}

/// Runs the demo: a mock broker with a backlog, a coordinator, a counting HTTP sink and
/// a fleet of in-process replicas; one replica leaves halfway.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let DemoArgs {
        budget,
        replicas,
        duration,
        json,
    } = args;
    let partitions = (replicas * 2) as i32;
    let cluster = MockCluster::new(1).map_err(DemoError::Broker)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster
        .create_topic(TOPIC, partitions, 1)
        .map_err(DemoError::Broker)?;
    // Enough backlog to stay busy for the whole run (capped: the mock broker keeps at
    // most 5 MiB per partition).
    let backlog = ((budget * duration as f64 * 1.5) as usize + 100).min(200_000);
    produce(&bootstrap, partitions, backlog)?;
    println!("broker {bootstrap}: {backlog} messages in {partitions} partitions");

    let (stop_tx, stop_rx) = watch::channel(false);
    let coord_addr = start_coordinator(budget, replicas, stop_rx).await?;
    let (sink_url, delivered) = start_sink().await?;
    let mut fleet = Vec::new();
    for i in 0..replicas {
        let (tx, mut rx) = watch::channel(false);
        let config = replica_config(&bootstrap, coord_addr, &sink_url, i);
        let task = tokio::spawn(crate::run(config, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        fleet.push((tx, task));
    }
    println!(
        "{replicas} replicas share {budget} msg/s; a coordinator that just started grants \
         nothing new for a lease plus the fallback window ({} s: it cannot know what an \
         earlier incarnation granted)",
        (LEASE_MS + FALLBACK_MS) / 1000
    );
    let series = watch_fleet(&delivered, &fleet, budget, replicas, duration).await;
    for (tx, _) in &fleet {
        let _ = tx.send(true);
    }
    for (_, task) in fleet {
        let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    }
    let _ = stop_tx.send(true);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&series).unwrap_or_default();
        std::fs::write(&path, text).map_err(|source| DemoError::Json { path, source })?;
    }
    drop(cluster);
    Ok(())
}

type Fleet = Vec<(
    watch::Sender<bool>,
    tokio::task::JoinHandle<Result<crate::RunSummary, crate::RunError>>,
)>;

/// A coordinator serving one `demand` budget on a loopback port, until `stop`.
async fn start_coordinator(
    budget: f64,
    replicas: u32,
    mut stop: watch::Receiver<bool>,
) -> Result<std::net::SocketAddr, DemoError> {
    let coord = Coordinator::new();
    coord.upsert(
        BudgetId::new("demo", "demo"),
        BudgetConfig {
            capacity: Share::new(budget, replicas * 4),
            policy: Policy::Demand,
            expected_members: replicas,
            lease_ms: LEASE_MS,
            refresh_ms: 250,
            fallback_ms: FALLBACK_MS,
        },
        TOKEN.to_string(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Bind)?;
    let addr = listener.local_addr().map_err(DemoError::Bind)?;
    tokio::spawn(pacer_budget::service::serve(listener, coord, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    Ok(addr)
}

/// An HTTP sink on a loopback port that counts deliveries.
async fn start_sink() -> Result<(String, Arc<AtomicU64>), DemoError> {
    let delivered = Arc::new(AtomicU64::new(0));
    let counter = delivered.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move || {
            let c = counter.clone();
            async move {
                c.fetch_add(1, AtomicOrdering::Relaxed);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Bind)?;
    let url = format!(
        "http://{}/",
        listener.local_addr().map_err(DemoError::Bind)?
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, delivered))
}

/// Replica `i` of the demo fleet.
fn replica_config(
    bootstrap: &str,
    coord_addr: std::net::SocketAddr,
    sink_url: &str,
    i: u32,
) -> RunConfig {
    RunConfig {
        bootstrap_servers: bootstrap.to_string(),
        topics: vec![TOPIC.into()],
        group_id: "demo".into(),
        kafka_config: vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("heartbeat.interval.ms".into(), "500".into()),
        ],
        group_protocol: Default::default(),
        budget: Budget::Leased {
            client: pacer_budget::client::ClientConfig {
                base_url: format!("http://{coord_addr}"),
                namespace: "demo".into(),
                name: "demo".into(),
                token: TOKEN.into(),
                member: format!("replica-{i}"),
            },
        },
        burst: 1,
        ordering: Ordering::None,
        buffer_messages: 1000,
        buffer_bytes: 16 << 20,
        sink: SinkSpec::Http(sink_url.to_string()),
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        },
        dead_letter_topic: None,
        shutdown_grace: Duration::from_secs(5),
        admin_addr: None,
        termination_log: None,
    }
}

/// Prints the sink's rate once a second for `duration` seconds from the first
/// delivery; replica 0 leaves halfway.
async fn watch_fleet(
    delivered: &AtomicU64,
    fleet: &Fleet,
    budget: f64,
    replicas: u32,
    duration: u64,
) -> Vec<Second> {
    // Group join (the mock broker delays the first rebalance by ~3 s) and the
    // coordinator's learning period come first; start the clock at the first delivery.
    let mut waited = 0;
    while delivered.load(AtomicOrdering::Relaxed) == 0 && waited < 300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    println!("first delivery after {:.1} s", f64::from(waited) / 10.0);
    let mut series = Vec::new();
    let mut live = replicas;
    let mut last = delivered.load(AtomicOrdering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for t in 1..=duration {
        tick.tick().await;
        let now = delivered.load(AtomicOrdering::Relaxed);
        let rate = (now - last) as f64;
        last = now;
        let bar = "#".repeat(((rate / budget.max(1.0)) * 40.0).round().min(80.0) as usize);
        println!("t={t:>3}s  replicas={live}  sink={rate:>8.1} msg/s  budget={budget:>8.1}  {bar}");
        series.push(Second {
            t,
            replicas: live,
            sink_rate: rate,
            budget,
        });
        if t == duration / 2 && live > 1 {
            if let Some((tx, _)) = fleet.first() {
                let _ = tx.send(true);
                live -= 1;
                println!(
                    "        replica-0 leaves (releases its lease; its share moves to the others)"
                );
            }
        }
    }
    series
}

/// Longest the demo waits for the broker to take its backlog.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(60);

fn produce(bootstrap: &str, partitions: i32, n: usize) -> Result<(), DemoError> {
    produce_within(bootstrap, partitions, n, PRODUCE_TIMEOUT)
}

/// Produces `n` messages spread over the partitions, or gives up with the producer's
/// error once `within` has passed (a full local queue is waited out until then; any
/// other error ends it at once).
fn produce_within(
    bootstrap: &str,
    partitions: i32,
    n: usize,
    within: Duration,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + within;
    let p: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "10")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", within.as_millis().max(1).to_string())
        .create_with_context(Deliveries::default())
        .map_err(DemoError::Produce)?;
    for i in 0..n {
        let value = format!("{{\"order\":{i}}}");
        let key = format!("customer-{}", i % 97);
        loop {
            let rec = BaseRecord::to(TOPIC)
                .partition((i % partitions as usize) as i32)
                .key(&key)
                .payload(&value);
            match p.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < deadline =>
                {
                    p.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(DemoError::Produce(e)),
            }
        }
    }
    p.flush(deadline.saturating_duration_since(Instant::now()))
        .map_err(DemoError::Produce)?;
    let failed = p.context().failed.load(AtomicOrdering::Relaxed);
    let first_error = match p.context().first_error.lock() {
        Ok(first) => first.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    match first_error {
        Some(error) => Err(DemoError::NotProduced {
            failed,
            total: n,
            error,
        }),
        None => Ok(()),
    }
}

/// Counts the backlog messages the broker did not take (a message that timed out is
/// reported here, not by `flush`).
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<KafkaError>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, AtomicOrdering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| e.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_gives_up_when_no_broker_takes_the_backlog() {
        // Port 1 on loopback: nothing listens, every connection is refused.
        let started = Instant::now();
        let err =
            produce_within("127.0.0.1:1", 2, 10, Duration::from_secs(2)).expect_err("no broker");
        assert!(
            matches!(
                err,
                DemoError::NotProduced {
                    failed: 10,
                    total: 10,
                    ..
                } | DemoError::Produce(_)
            ),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "gave up in {:?}",
            started.elapsed()
        );
    }
}
