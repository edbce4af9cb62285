//! Test fixtures: the broker (`pacer_tests::Kafka`: librdkafka's mock cluster or Apache
//! Kafka), a recording HTTP sink on port 0, replicas run in-process or as `pacer` child processes,
//! and a bounded wait helper.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use pacer_runtime::allowance::Allowance;
use pacer_runtime::config::{
    Budget, GroupProtocol, Ordering as Order, RetryPolicy, RunConfig, SinkSpec,
};
use pacer_runtime::{ReplicaHandle, RunError, RunSummary};
use tokio::sync::{oneshot, watch};

#[allow(unused_imports)]
pub use pacer_tests::{on_both_brokers, Kafka};

/// What the test sink saw for one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub start: Instant,
    pub end: Instant,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The id at the start of the value (see [`Kafka::produce`]), if any.
    pub id: Option<usize>,
    pub body_len: usize,
    /// 1 for the first request for this (partition, offset), 2 for the next...
    pub attempt: u32,
    pub status: u16,
    pub headers: HashMap<String, String>,
}

/// What the sink answers: after `delay`, `status` with an optional `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub delay: Duration,
    pub status: u16,
    pub retry_after: Option<u64>,
}

impl Reply {
    pub const OK: Reply = Reply {
        delay: Duration::ZERO,
        status: 200,
        retry_after: None,
    };
}

pub type Behaviour = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

pub struct SinkState {
    pub seen: Mutex<Vec<Seen>>,
    pub current: AtomicU32,
    pub max_concurrent: AtomicU32,
    /// While set, requests wait (a stalled service).
    pub stalled: AtomicBool,
    attempts: Mutex<HashMap<(i32, i64), u32>>,
    behaviour: Behaviour,
}

impl SinkState {
    /// Delivered (2xx) requests.
    pub fn delivered(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| (200..300).contains(&s.status))
            .cloned()
            .collect()
    }

    pub fn delivered_count(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| (200..300).contains(&s.status))
            .count()
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

pub struct TestSink {
    pub addr: SocketAddr,
    pub state: Arc<SinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSink {
    pub async fn start(behaviour: Behaviour) -> TestSink {
        let state = Arc::new(SinkState {
            seen: Mutex::new(Vec::new()),
            current: AtomicU32::new(0),
            max_concurrent: AtomicU32::new(0),
            stalled: AtomicBool::new(false),
            attempts: Mutex::new(HashMap::new()),
            behaviour,
        });
        // `/moved` answers any GET with 200: a client that followed a redirect (turning
        // the POST into a bodiless GET) would count a message as delivered there.
        let app = Router::new()
            .route("/", post(handle))
            .route("/moved", axum::routing::get(|| async { StatusCode::OK }))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestSink { addr, state, task }
    }

    pub async fn ok() -> TestSink {
        Self::start(Arc::new(|_| Reply::OK)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for TestSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(s): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> Response {
    let start = Instant::now();
    let now = s.current.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_concurrent.fetch_max(now, Ordering::SeqCst);
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let partition: i32 = h("kafka-partition")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let offset: i64 = h("kafka-offset").and_then(|v| v.parse().ok()).unwrap_or(-1);
    let attempt = {
        let mut a = s.attempts.lock().unwrap();
        let e = a.entry((partition, offset)).or_default();
        *e += 1;
        *e
    };
    let id = std::str::from_utf8(&body[..body.len().min(8)])
        .ok()
        .and_then(|v| v.parse().ok());
    let mut seen = Seen {
        start,
        end: start,
        partition,
        offset,
        key: h("kafka-key"),
        id,
        body_len: body.len(),
        attempt,
        status: 0,
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
    };
    // A stalled sink holds requests (bounded, so a broken test cannot hang forever).
    let stall_until = Instant::now() + Duration::from_secs(120);
    while s.stalled.load(Ordering::SeqCst) && Instant::now() < stall_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = (s.behaviour)(&seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    seen.end = Instant::now();
    seen.status = reply.status;
    s.seen.lock().unwrap().push(seen);
    s.current.fetch_sub(1, Ordering::SeqCst);
    let status = StatusCode::from_u16(reply.status).unwrap();
    match reply.retry_after {
        Some(secs) => (status, [("retry-after", secs.to_string())]).into_response(),
        None if status.is_redirection() => (status, [("location", "/moved")]).into_response(),
        None => status.into_response(),
    }
}

/// Consumer settings that make group changes quick on the mock broker.
pub fn fast_group() -> Vec<(String, String)> {
    [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "300"),
        ("auto.commit.interval.ms", "200"),
        ("topic.metadata.refresh.interval.ms", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

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

/// Polls `cond` every 20 ms until it holds, failing the test after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `pacer` child process, killed and reaped on drop.
pub struct Pacer {
    pub child: Child,
}

impl Pacer {
    pub fn spawn(args: &[String]) -> Pacer {
        let child = Command::new(env!("CARGO_BIN_EXE_pacer"))
            .args(args)
            .env("PACER_LOG", "info,rdkafka=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pacer");
        Pacer { child }
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY-free: `kill` via the libc crate is a plain syscall wrapper; unsafe code
        // is forbidden in this workspace, so use the `kill` command instead.
        let name = match sig {
            libc::SIGKILL => "KILL",
            libc::SIGTERM => "TERM",
            libc::SIGINT => "INT",
            libc::SIGHUP => "HUP",
            _ => "TERM",
        };
        let _ = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status();
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let until = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        pacer_tests::apache::rss_kib_of(self.child.id())
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unused_imports)]
pub use pacer_tests::apache::free_port;

/// Reads one metric value from a Prometheus text exposition.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Lets `d` pass from `from`: the span over which a test counts deliveries. A fixed
/// window is the measurement itself, not a stand-in for a condition.
pub async fn measure_until(from: Instant, d: Duration) {
    tokio::time::sleep_until((from + d).into()).await;
}

/// Fetches `/metrics` of a child's admin port.
pub async fn scrape(port: u16) -> Option<String> {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        // A hung replica must fail the wait around this, not hang it.
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
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

/// The admin port a child logged ("Admin HTTP listening").
pub async fn admin_port_of(p: &mut Pacer, log: &std::path::Path) -> u16 {
    let mut port = None;
    wait_for(
        "the admin address in the log",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            port = text
                .lines()
                .find(|l| l.contains("Admin HTTP listening"))
                .and_then(|l| l.split("127.0.0.1:").nth(1))
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|d| d.parse().ok());
            port.is_some()
        },
    )
    .await;
    let _ = p;
    port.unwrap()
}

/// A `pacer` child whose log goes to `log`.
pub fn spawn_logged(args: &[String], log: &std::path::Path) -> Pacer {
    let file = std::fs::File::create(log).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(args)
        .env("PACER_LOG", "info,rdkafka=warn")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn pacer");
    Pacer { child }
}

/// A temporary log path, unique in this process.
///
/// Unique per call: under `cargo test` the mock-cluster and Apache Kafka variants of a
/// scenario run side by side in one process, and a name shared by the two let one
/// variant read (and remove) the other's log.
pub fn tmp(name: &str) -> std::path::PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("pacer-test-{}-{n}-{name}.log", std::process::id()))
}

/// How often the sink saw each message id (delivered requests).
pub fn ids(sink: &TestSink) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for s in sink.state.delivered() {
        if let Some(id) = s.id {
            *m.entry(id).or_default() += 1;
        }
    }
    m
}
