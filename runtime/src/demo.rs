//! `pacer demo`: a whole fleet on one machine, to see the global budget hold.
//!
//! Everything runs in this process: librdkafka's mock broker with a backlog, the
//! coordinator serving one budget on loopback, a local HTTP sink that counts arrivals,
//! and `--replicas` replicas leasing from the coordinator. One third of the way in, two
//! replicas join (the expected members are raised first, as the operator does on a
//! scale-up); two thirds in, one replica shuts down cleanly and releases its lease.
//! Every second the demo prints the rate the sink saw against the budget.
//!
//! ```text
//!   mock broker ──▶ replica r0..rN ──POST──▶ sink (counts per second)
//!                        │ leases
//!                        ▼
//!                   coordinator (budget demo/orders)
//! ```

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use pacer_budget::service::{self, BudgetId, Coordinator};
use pacer_budget::{BudgetConfig, Policy, Share};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{BudgetSource, DemoArgs, Ordering, RetryPolicy, RunConfig, SinkSpec};

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 12;
const TOKEN: &str = "pacer-demo-token-not-a-secret";
/// Short leases so the demo shows rebalancing within seconds.
const LEASE_MS: u64 = 2_000;
const REFRESH_MS: u64 = 200;
const FALLBACK_MS: u64 = 2_000;
/// The mock broker keeps at most 100,000 message sets per partition; stay well under.
const MAX_BACKLOG: u64 = 50_000 * PARTITIONS as u64;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting the embedded Kafka broker: {0}")]
    Broker(rdkafka::error::KafkaError),
    #[error("producing the backlog: {0}")]
    Produce(rdkafka::error::KafkaError),
    #[error("binding a loopback port: {0}")]
    Bind(std::io::Error),
    #[error("writing {path}: {source}")]
    WriteJson {
        path: String,
        source: std::io::Error,
    },
}

/// One second of the run, as printed and written to `--json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Second {
    pub t: u64,
    pub delivered: u64,
    pub replicas: usize,
    pub granted_rate: f64,
}

/// The whole run, written to `--json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub budget: f64,
    pub seconds: Vec<Second>,
    /// Most deliveries in any sliding 1-second window.
    pub worst_window: u64,
    /// `budget + replicas` (each replica may send its burst of 1 on top of its rate).
    pub window_bound: f64,
    pub mean_rate: f64,
}

#[derive(Default)]
struct Sink {
    arrivals: Mutex<Vec<Instant>>,
    total: AtomicU64,
}

async fn handle(State(sink): State<Arc<Sink>>, _body: Bytes) -> StatusCode {
    sink.arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Instant::now());
    sink.total.fetch_add(1, AtomicOrdering::Relaxed);
    // A little work per message, like a database call would take.
    tokio::time::sleep(Duration::from_millis(5)).await;
    StatusCode::OK
}

struct Replica {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

fn replica_config(bootstrap: &str, coordinator: &str, sink: &str, member: String) -> RunConfig {
    RunConfig {
        bootstrap_servers: bootstrap.to_string(),
        topics: vec![TOPIC.to_string()],
        group_id: "pacer-demo".to_string(),
        kafka_config: vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("heartbeat.interval.ms".into(), "300".into()),
        ],
        budget: BudgetSource::Leased {
            base_url: coordinator.to_string(),
            namespace: "demo".into(),
            name: "orders".into(),
            token: TOKEN.into(),
            member,
        },
        burst: 1,
        ordering: Ordering::None,
        buffer_messages: 1_000,
        buffer_bytes: 16 << 20,
        sink: SinkSpec::Http(sink.to_string()),
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        },
        dead_letter_topic: None,
        shutdown_grace: Duration::from_secs(5),
        admin_addr: None,
    }
}

fn start_replica(config: RunConfig) -> Replica {
    let (stop, rx) = oneshot::channel::<()>();
    let member = match &config.budget {
        BudgetSource::Leased { member, .. } => member.clone(),
        BudgetSource::Standalone { .. } => String::new(),
    };
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        if let Err(e) = crate::run(config, shutdown).await {
            tracing::error!(%member, error = %e, "Demo replica failed");
        }
    });
    Replica { stop, task }
}

/// Most arrivals in any window of `width`, anchored at each arrival (`sorted`).
pub fn worst_window(sorted: &[Instant], width: Duration) -> u64 {
    let mut best = 0;
    let mut j = 0;
    for i in 0..sorted.len() {
        while j < sorted.len() && sorted[j] < sorted[i] + width {
            j += 1;
        }
        best = best.max(j - i);
    }
    best as u64
}

fn produce_backlog(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    n: u64,
) -> Result<(), DemoError> {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(DemoError::Produce)?;
    for i in 0..n {
        let value = format!("{{\"order\":{i}}}");
        let key = format!("customer-{}", i % 1_000);
        let mut record = BaseRecord::to(TOPIC).key(&key).payload(&value);
        // A full local queue only needs the producer to catch up.
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::QueueFull) {
                        return Err(DemoError::Produce(e));
                    }
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(DemoError::Produce)
}

/// Runs the demo and prints one line per second.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let DemoArgs {
        budget,
        replicas,
        duration,
        json,
    } = args;
    let replicas = replicas as usize;

    let cluster = MockCluster::new(1).map_err(DemoError::Broker)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .map_err(DemoError::Broker)?;
    // Twice what the budget lets through in the run, so there is always a backlog.
    let backlog = ((budget * duration as f64 * 2.0) as u64).clamp(1_000, MAX_BACKLOG);
    println!("pacer demo: producing a backlog of {backlog} messages to '{TOPIC}' ({PARTITIONS} partitions)");
    produce_backlog(&cluster, backlog)?;

    let sink = Arc::new(Sink::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Bind)?;
    let sink_url = format!(
        "http://{}/handle",
        listener.local_addr().map_err(DemoError::Bind)?
    );
    let app = Router::new()
        .route("/handle", post(handle))
        .with_state(sink.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let coord = Coordinator::new();
    let id = BudgetId::new("demo", "orders");
    let in_flight = (2 * (replicas as u32 + 2)).max(4);
    coord.upsert(
        id.clone(),
        BudgetConfig {
            capacity: Share::new(budget, in_flight),
            policy: Policy::Demand,
            expected_members: replicas as u32,
            lease_ms: LEASE_MS,
            refresh_ms: REFRESH_MS,
            fallback_ms: FALLBACK_MS,
        },
        TOKEN.into(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Bind)?;
    let coord_url = format!("http://{}", listener.local_addr().map_err(DemoError::Bind)?);
    tokio::spawn(service::serve(
        listener,
        coord.clone(),
        std::future::pending(),
    ));
    let learning = Duration::from_millis(LEASE_MS + FALLBACK_MS);
    println!(
        "coordinator on {coord_url}: budget {budget} msg/s, {in_flight} in flight; a fresh coordinator grants nothing new for {:.0} s (learning), waiting",
        learning.as_secs_f64()
    );
    while coord.snapshot(&id).is_some_and(|s| s.learning) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let start_one = |n: usize| {
        start_replica(replica_config(
            &bootstrap,
            &coord_url,
            &sink_url,
            format!("replica-{n}"),
        ))
    };
    let mut fleet: Vec<Replica> = (0..replicas).map(start_one).collect();
    println!("{replicas} replicas joining the consumer group");
    let joined = Instant::now();
    while sink.total.load(AtomicOrdering::Relaxed) == 0 {
        if joined.elapsed() > Duration::from_secs(60) {
            println!("no delivery within 60 s; the run below will show zeros");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let scale_up_at = duration / 3;
    let leave_at = 2 * duration / 3;
    println!("first delivery: the clock starts; +2 replicas at {scale_up_at} s, one leaves at {leave_at} s");
    println!("   t  sink msg/s  budget  replicas  granted");

    let mut seconds = Vec::new();
    let mut last_total = 0;
    for t in 1..=duration {
        tokio::time::sleep_until((started + Duration::from_secs(t)).into()).await;
        if t == scale_up_at {
            coord.set_expected_members(&id, (fleet.len() + 2) as u32);
            let n = fleet.len();
            fleet.push(start_one(n));
            fleet.push(start_one(n + 1));
        }
        if t == leave_at && fleet.len() > 1 {
            let r = fleet.remove(0);
            let _ = r.stop.send(());
            let _ = r.task.await;
            coord.set_expected_members(&id, fleet.len() as u32);
        }
        let total = sink.total.load(AtomicOrdering::Relaxed);
        let granted = coord.snapshot(&id).map_or(0.0, |s| s.granted.rate);
        let s = Second {
            t,
            delivered: total - last_total,
            replicas: fleet.len(),
            granted_rate: granted,
        };
        last_total = total;
        println!(
            "{:>4}  {:>10}  {:>6}  {:>8}  {:>7.1}",
            s.t, s.delivered, budget, s.replicas, s.granted_rate
        );
        seconds.push(s);
    }

    for r in fleet {
        let _ = r.stop.send(());
        let _ = r.task.await;
    }
    let mut arrivals = sink
        .arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    arrivals.sort();
    let worst = worst_window(&arrivals, Duration::from_secs(1));
    let most_replicas = seconds.iter().map(|s| s.replicas).max().unwrap_or(replicas);
    let report = Report {
        budget,
        worst_window: worst,
        window_bound: budget + most_replicas as f64,
        mean_rate: seconds.iter().map(|s| s.delivered).sum::<u64>() as f64 / duration as f64,
        seconds,
    };
    println!(
        "mean {:.1} msg/s against a budget of {budget}; busiest 1-s window {worst} (bound: budget + one burst per replica = {})",
        report.mean_rate, report.window_bound
    );
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(&path, text).map_err(|source| DemoError::WriteJson {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}
