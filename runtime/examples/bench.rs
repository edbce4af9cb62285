//! Runtime overhead benchmark (run with `cargo run --release -p pacer-runtime --example
//! bench`). On one broker, in one run: librdkafka's mock cluster by default, Apache
//! Kafka 4.4 (a single KRaft node started from the jars in `PACER_KAFKA_JARS`, see
//! `scripts/kafka-jars.sh`) with `BENCH_BROKER=apache`:
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

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};

use pacer_runtime::allowance::Allowance;
use pacer_runtime::config::{Budget, Ordering as Order, RetryPolicy, RunConfig, SinkSpec};
use pacer_runtime::message::{Message, TopicPartition};
use pacer_runtime::metrics::OutcomeLabels;
use pacer_runtime::sink::http_headers;
use pacer_tests::{Broker, Kafka};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use tokio::sync::watch;

const PARTITIONS: i32 = 24;
const MESSAGES: usize = 720_000;
const SIZE: usize = 100;
const HTTP_MESSAGES: usize = 100_000;
const CONCURRENCY: u32 = 32;
const ROUNDS: usize = 5;

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
fn bare_consumer(bootstrap: &str, topic: &str, group: &str, n: usize) -> f64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
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
        group_protocol: Default::default(),
        budget: Budget::Standalone {
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
        termination_log: None,
    }
}

/// Runs a replica until `n` messages are acked; msg/s from the first ack.
async fn pacer(config: RunConfig, n: usize) -> f64 {
    let in_flight = match config.budget {
        Budget::Standalone { in_flight, .. } => in_flight,
        Budget::Leased { .. } => 1,
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
        .status
        .metrics()
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
/// `same_request`: each request carries the headers the pacer sink sends (CloudEvents
/// binary mode and the Kafka coordinates, built by the same function), so only the
/// pipeline differs; otherwise a bare POST of the body.
async fn bare_http_loop(url: &str, n: usize, same_request: bool) -> f64 {
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
    let source = reqwest::header::HeaderValue::from_static("/pacer/bench-http");
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let (client, done, url, body, source) = (
                client.clone(),
                done.clone(),
                url.clone(),
                body.clone(),
                source.clone(),
            );
            tokio::spawn(async move {
                let mut offset = 0i64;
                while (done.load(Ordering::Relaxed) as usize) < n {
                    let sent = if same_request {
                        let msg = Message {
                            tp: TopicPartition::new("bench-http", task as i32 % PARTITIONS),
                            offset,
                            key: None,
                            payload: Some(body.clone()),
                            headers: Vec::new(),
                            timestamp_ms: Some(created),
                            generation: 0,
                        };
                        offset += 1;
                        let mut req = reqwest::Request::new(reqwest::Method::POST, url.clone());
                        *req.headers_mut() = http_headers(&msg, &source);
                        *req.body_mut() = Some(body.clone().into());
                        client.execute(req).await
                    } else {
                        client.post(url.clone()).body(body.clone()).send().await
                    };
                    if let Ok(r) = sent {
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

/// CPU seconds this process used so far (user + system, from /proc/self/stat; 10 ms
/// resolution), to give CPU per message besides throughput.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th,
    // stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    f.get(11).copied().unwrap_or(0.0) / 100.0 + f.get(12).copied().unwrap_or(0.0) / 100.0
}

/// Runs `f`, returning its result and the CPU microseconds it used per message.
fn with_cpu<T>(n: usize, f: impl FnOnce() -> T) -> (T, f64) {
    let before = cpu_seconds();
    let r = f();
    (r, (cpu_seconds() - before) * 1e6 / n as f64)
}

/// Median of a non-empty slice.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}-{hi:.2}")
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let broker = match std::env::var("BENCH_BROKER").as_deref() {
        Ok("apache") => Broker::Apache,
        Ok("mock") | Err(_) => Broker::Mock,
        Ok(other) => {
            eprintln!("BENCH_BROKER={other:?}: expected mock (the default) or apache");
            std::process::exit(2);
        }
    };
    let kafka = Kafka::start(broker);
    let bootstrap = kafka.bootstrap.clone();
    kafka.topic("bench", PARTITIONS);
    kafka.topic("bench-http", PARTITIONS);
    eprintln!("producing {MESSAGES} x {SIZE} B and {HTTP_MESSAGES} x {SIZE} B on {broker:?} ...");
    produce(&bootstrap, "bench", MESSAGES);
    produce(&bootstrap, "bench-http", HTTP_MESSAGES);

    // BENCH_ONLY=null|http runs one half (for profiling); the table needs both.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    // Rounds alternate bare and pacer, each reading the whole topic from the start in
    // a new consumer group, so a drift in machine speed hits both sides alike; the
    // table gives the median of each side and of the per-round ratios.
    let (mut bare, mut null, mut null_dlq) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bare_http, mut same_http, mut http) = (Vec::new(), Vec::new(), Vec::new());
    // CPU microseconds per message of each side (whole process, so pacer's includes
    // consuming from the embedded broker), per round.
    let (mut cpu_same, mut cpu_http) = (Vec::new(), Vec::new());
    let addr = rt.block_on(noop_server());
    let url = format!("http://{addr}/");
    for round in 0..rounds {
        if only != "http" {
            bare.push(bare_consumer(
                &bootstrap,
                "bench",
                &format!("bench-bare-{round}"),
                MESSAGES,
            ));
            null.push(rt.block_on(pacer(
                config(
                    &bootstrap,
                    "bench",
                    &format!("bench-null-{round}"),
                    SinkSpec::Null,
                    64,
                ),
                MESSAGES,
            )));
            // With a dead-letter topic the source copies every record's Kafka headers
            // (it could forward them), which the plain null sink skips.
            let mut c = config(
                &bootstrap,
                "bench",
                &format!("bench-dlq-{round}"),
                SinkSpec::Null,
                64,
            );
            c.dead_letter_topic = Some("bench-dead".into());
            null_dlq.push(rt.block_on(pacer(c, MESSAGES)));
            eprintln!(
                "round {round}: bare consumer {:.0}, pacer null {:.0} ({:.2}), with dead-letter topic {:.0} msg/s ({:.2})",
                bare[round],
                null[round],
                null[round] / bare[round],
                null_dlq[round],
                null_dlq[round] / bare[round]
            );
        }
        if only != "null" {
            bare_http.push(rt.block_on(bare_http_loop(&url, HTTP_MESSAGES, false)));
            let (rate, cpu) = with_cpu(HTTP_MESSAGES, || {
                rt.block_on(bare_http_loop(&url, HTTP_MESSAGES, true))
            });
            same_http.push(rate);
            cpu_same.push(cpu);
            let (rate, cpu) = with_cpu(HTTP_MESSAGES, || {
                rt.block_on(pacer(
                    config(
                        &bootstrap,
                        "bench-http",
                        &format!("bench-http-{round}"),
                        SinkSpec::Http(url.clone()),
                        CONCURRENCY,
                    ),
                    HTTP_MESSAGES,
                ))
            });
            http.push(rate);
            cpu_http.push(cpu);
            eprintln!(
                "round {round}: bare http {:.0}, bare with pacer's headers {:.0}, pacer http {:.0} req/s ({:.2}, {:.2}); CPU per request {:.1} vs {:.1} us",
                bare_http[round],
                same_http[round],
                http[round],
                http[round] / bare_http[round],
                http[round] / same_http[round],
                cpu_same[round],
                cpu_http[round]
            );
        }
    }
    let ratios =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(p, q)| p / q).collect() };
    println!("Broker: {broker:?}\n");
    println!("| Measurement (median of {rounds} alternating rounds) | msg/s | Ratio (median of rounds) | Ratio range |");
    println!("|---|---:|---:|---:|");
    if !bare.is_empty() {
        let r = ratios(&null, &bare);
        println!("| bare rdkafka `BaseConsumer` loop ({MESSAGES} x {SIZE} B, {PARTITIONS} partitions) | {:.0} | | |", median(&bare));
        println!(
            "| `pacer run --sink null --rate unlimited --max-in-flight 64` (same topic) | {:.0} | {:.2} | {} |",
            median(&null),
            median(&r),
            range(&r)
        );
        let r = ratios(&null_dlq, &bare);
        println!(
            "| the same with `--dead-letter-topic` (Kafka headers copied) | {:.0} | {:.2} | {} |",
            median(&null_dlq),
            median(&r),
            range(&r)
        );
    }
    if !bare_http.is_empty() {
        let r = ratios(&http, &bare_http);
        let same = ratios(&http, &same_http);
        println!("| bare reqwest loop, {CONCURRENCY} concurrent, no-op axum server ({HTTP_MESSAGES} requests) | {:.0} | | |", median(&bare_http));
        println!("| the same loop sending the pacer sink's requests (its CloudEvents/Kafka headers) | {:.0} | | |", median(&same_http));
        println!(
            "| `pacer run --sink http --max-in-flight {CONCURRENCY}` (same server, {HTTP_MESSAGES} messages), vs the bare loop | {:.0} | {:.2} | {} |",
            median(&http),
            median(&r),
            range(&r)
        );
        println!(
            "| the same pacer runs vs the loop sending the same requests | | {:.2} | {} |",
            median(&same),
            range(&same)
        );
        println!(
            "\nCPU per request (whole process, median): loop sending the same requests {:.1} us, pacer {:.1} us (pacer's includes the whole run: group join, fetching and copying every record, shutdown)",
            median(&cpu_same),
            median(&cpu_http)
        );
    }
}
