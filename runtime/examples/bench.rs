//! Runtime overhead benchmark (run with `cargo run --release -p pacer-runtime --example
//! bench`). On one embedded broker, in one run:
//!
//! 1. a bare rdkafka `BaseConsumer` loop over the topic vs `pacer run --sink null` with
//!    no rate limit (the pipeline: buffer, dispatcher, workers, offset tracking);
//! 2. a bare reqwest loop at concurrency C against a no-op local HTTP server vs the
//!    pacer `http` sink at in-flight C over the same server.
//!
//! Throughput is measured from the first to the last message, so group joins and
//! connection set-up are excluded from both sides. Prints a Markdown table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pacer_runtime::config::{BudgetSource, Ordering as Order, RetryPolicy, RunConfig, SinkSpec};
use pacer_runtime::lease::Allowance;
use pacer_runtime::metrics::OutcomeLabels;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use tokio::sync::watch;

const PARTITIONS: i32 = 8;
const MESSAGES: usize = 300_000;
const SIZE: usize = 100;
const HTTP_MESSAGES: usize = 40_000;
const CONCURRENCY: u32 = 32;

fn produce(bootstrap: &str, topic: &str, n: usize) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let value = [b'x'; SIZE];
    for i in 0..n {
        loop {
            let rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                .partition((i % PARTITIONS as usize) as i32)
                .payload(&value[..]);
            match p.send(rec) {
                Ok(()) => break,
                Err(_) => {
                    p.poll(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

/// A bare consumer loop: poll until `n` messages, timed from the first.
fn bare_consumer(bootstrap: &str, topic: &str, n: usize) -> f64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-bare")
        // The same fetch back-off pacer sets (librdkafka's default of 1 s makes this
        // loop bimodal: 260k or 1.8M msg/s from run to run).
        .set("fetch.queue.backoff.ms", "10")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let mut got = 0usize;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    // The deadline is checked only while idle, not per message: a clock read per
    // message is harness cost, not consumer work.
    while got < n {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                if first.is_none() {
                    first = Some(Instant::now());
                }
                got += 1;
            }
            _ if Instant::now() >= deadline => break,
            _ => {}
        }
    }
    got as f64 / first.map_or(f64::INFINITY, |f| f.elapsed().as_secs_f64())
}

fn config(bootstrap: &str, topic: &str, group: &str, sink: SinkSpec, in_flight: u32) -> RunConfig {
    RunConfig {
        bootstrap_servers: bootstrap.to_string(),
        topics: vec![topic.to_string()],
        group_id: group.to_string(),
        kafka_config: Vec::new(),
        budget: BudgetSource::Standalone {
            rate: f64::INFINITY,
            in_flight,
        },
        burst: 1,
        ordering: Order::None,
        buffer_messages: 1000,
        buffer_bytes: 16 << 20,
        sink,
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        },
        dead_letter_topic: None,
        shutdown_grace: Duration::from_secs(10),
        admin_addr: None,
    }
}

/// Runs a replica until `n` messages are acked; msg/s from the first ack.
async fn pacer(config: RunConfig, n: usize) -> f64 {
    let in_flight = match config.budget {
        BudgetSource::Standalone { in_flight, .. } => in_flight,
        BudgetSource::Leased { .. } => 1,
    };
    let (_tx, rx) = watch::channel(Allowance::standalone(f64::INFINITY, in_flight));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (h_tx, h_rx) = tokio::sync::oneshot::channel();
    let run = tokio::spawn(pacer_runtime::run_with_allowance(
        config,
        rx,
        async move {
            let _ = stop_rx.await;
        },
        move |h| {
            let _ = h_tx.send(h);
        },
    ));
    let handle = h_rx.await.expect("replica started");
    let acked = handle
        .shared
        .metrics
        .messages
        .get_or_create(&OutcomeLabels { outcome: "acked" })
        .clone();
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked.get() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let start = Instant::now();
    let start_count = acked.get();
    while (acked.get() as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = (acked.get() - start_count) as f64 / start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = run.await;
    rate
}

/// A no-op HTTP server on port 0.
async fn noop_server() -> std::net::SocketAddr {
    let app = axum::Router::new().route("/", axum::routing::post(|| async { "" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// `CONCURRENCY` tasks posting 100-byte bodies until `n` requests succeeded.
async fn bare_http(url: &str, n: usize) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY as usize)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    // Parsed once and the body shared, as the pacer sink does (a `&str` URL is parsed
    // per request and a `Vec` body allocated per request).
    let url = reqwest::Url::parse(url).unwrap();
    let body = bytes::Bytes::from(vec![b'x'; SIZE]);
    // Warm the pool like the pacer sink's first requests do.
    let _ = client.post(url.clone()).body(body.clone()).send().await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, done, url, body) =
                (client.clone(), done.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                while (done.load(Ordering::Relaxed) as usize) < n {
                    if let Ok(r) = client.post(url.clone()).body(body.clone()).send().await {
                        let _ = r.bytes().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cluster = MockCluster::new(1).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic("bench", PARTITIONS, 1).expect("topic");
    cluster
        .create_topic("bench-http", PARTITIONS, 1)
        .expect("topic");
    eprintln!("producing {MESSAGES} x {SIZE} B and {HTTP_MESSAGES} x {SIZE} B ...");
    produce(&bootstrap, "bench", MESSAGES);
    produce(&bootstrap, "bench-http", HTTP_MESSAGES);

    // BENCH_ONLY=null|http runs one half (for profiling); the table needs both.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let (mut bare, mut null) = (f64::NAN, f64::NAN);
    if only != "http" {
        eprintln!("bare consumer ...");
        bare = bare_consumer(&bootstrap, "bench", MESSAGES);
        eprintln!("pacer --sink null ...");
        null = rt.block_on(pacer(
            config(&bootstrap, "bench", "bench-null", SinkSpec::Null, 64),
            MESSAGES,
        ));
    }
    if only == "null" {
        println!("bare {bare:.0} null {null:.0} ratio {:.2}", null / bare);
        return;
    }
    let (bare_http_rate, http_rate) = rt.block_on(async {
        let addr = noop_server().await;
        let url = format!("http://{addr}/");
        eprintln!("bare HTTP loop ...");
        let bare = bare_http(&url, HTTP_MESSAGES).await;
        eprintln!("pacer --sink http ...");
        let pacer_http = pacer(
            config(
                &bootstrap,
                "bench-http",
                "bench-http",
                SinkSpec::Http(url),
                CONCURRENCY,
            ),
            HTTP_MESSAGES,
        )
        .await;
        (bare, pacer_http)
    });
    println!("| Measurement | msg/s | Ratio |");
    println!("|---|---:|---:|");
    println!("| bare rdkafka `BaseConsumer` loop ({MESSAGES} x {SIZE} B, {PARTITIONS} partitions) | {bare:.0} | |");
    println!(
        "| `pacer run --sink null --rate unlimited --max-in-flight 64` (same topic) | {null:.0} | {:.2} |",
        null / bare
    );
    println!("| bare reqwest loop, {CONCURRENCY} concurrent, no-op axum server ({HTTP_MESSAGES} requests) | {bare_http_rate:.0} | |");
    println!(
        "| `pacer run --sink http --max-in-flight {CONCURRENCY}` (same server, {HTTP_MESSAGES} messages) | {http_rate:.0} | {:.2} |",
        http_rate / bare_http_rate
    );
}
