//! The product's promise end to end: a fleet of real `pacer run` processes leasing from
//! one coordinator never delivers more than the global budget to the sink, while the
//! fleet scales from 2 to 4 replicas and one replica is killed with SIGKILL.
//!
//! Pieces: the broker (librdkafka's mock cluster, or Apache Kafka as a child JVM) and the
//! coordinator run in this test process; the replicas are the `pacer` binary (built by `cargo build --bins`, which the test command
//! runs first) as child processes, always reaped.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use pacer_budget::service::{self, BudgetId, Coordinator};
use pacer_budget::{BudgetConfig, Policy, Share};
use pacer_tests::Kafka;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "fleet-test-token-0123456789abcdef";
/// The global budget: 40 msg/s and 4 in flight over the whole fleet.
const RATE: f64 = 40.0;
const IN_FLIGHT: u32 = 4;

/// The `pacer` binary next to this test's own target directory.
fn pacer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join("pacer");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p pacer-runtime --bins` first",
        bin.display()
    );
    bin
}

/// A replica process, killed and reaped however the test ends.
struct Replica {
    name: String,
    child: Child,
}

impl Replica {
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }

    /// Waits for the exit code, at most `timeout`.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct SinkState {
    arrivals: Mutex<Vec<Instant>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

async fn handle(State(s): State<Arc<SinkState>>, _body: Bytes) -> StatusCode {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    s.arrivals.lock().unwrap().push(Instant::now());
    // A little work, so in-flight limits matter.
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    StatusCode::OK
}

/// The largest number of arrivals in any window of `width` (sliding, anchored at each
/// arrival).
fn max_in_window(arrivals: &[Instant], width: Duration) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..arrivals.len() {
        while j < arrivals.len() && arrivals[j] < arrivals[i] + width {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pacer_tests::on_both_brokers!(
    a_fleet_scaling_from_two_to_four_with_a_crash_never_exceeds_the_global_budget
);
async fn a_fleet_scaling_from_two_to_four_with_a_crash_never_exceeds_the_global_budget(
    kafka: Kafka<'static>,
) {
    // Broker with a backlog far larger than the run can drain at 40 msg/s.
    kafka.topic("orders", 8);
    kafka.produce("orders", 8, 0..3_000, 8, |i| {
        Some(format!("k{}", i % 50).into_bytes())
    });
    let bootstrap = kafka.bootstrap.clone();

    // Sink.
    let sink = Arc::new(SinkState::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_url = format!("http://{}/handle", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/handle", post(handle))
        .with_state(sink.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Coordinator, with short leases so the test sees expiries.
    let coord = Coordinator::new();
    let id = BudgetId::new("ns", "orders");
    let config = |expected| BudgetConfig {
        capacity: Share::new(RATE, IN_FLIGHT),
        policy: Policy::Demand,
        expected_members: expected,
        lease_ms: 2_000,
        refresh_ms: 200,
        fallback_ms: 2_000,
    };
    coord.upsert(id.clone(), config(2), TOKEN.into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(service::serve(
        listener,
        coord.clone(),
        std::future::pending(),
    ));

    let dir = std::env::temp_dir().join(format!("pacer-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();

    let bin = pacer_bin();
    let spawn = |name: &str| -> Replica {
        let child = Command::new(&bin)
            .args([
                "run",
                "--bootstrap-servers",
                &bootstrap,
                "--topic",
                "orders",
            ])
            .args(["--group-id", "fleet", "--sink", &sink_url])
            .args(["--coordinator", &coord_url, "--budget", "ns/orders"])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--member", name, "--admin-addr", "127.0.0.1:0"])
            .args(["--shutdown-grace", "5s"])
            .args([
                "--kafka-config",
                "session.timeout.ms=6000",
                "--kafka-config",
                "heartbeat.interval.ms=300",
            ])
            .env("PACER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pacer");
        Replica {
            name: name.to_string(),
            child,
        }
    };

    let mut fleet = vec![spawn("r0"), spawn("r1")];
    wait_until("the first delivery", Duration::from_secs(30), || {
        !sink.arrivals.lock().unwrap().is_empty()
    })
    .await;
    let started = Instant::now();
    let phase = |s: u64| started + Duration::from_secs(s);

    // Two replicas for 4 s, then scale to 4 (expected members first, as the operator
    // does), then kill one after 4 more seconds, and run 4 more.
    wait_until("phase 1", Duration::from_secs(10), || {
        Instant::now() >= phase(4)
    })
    .await;
    coord.set_expected_members(&id, 4);
    fleet.push(spawn("r2"));
    fleet.push(spawn("r3"));
    wait_until("phase 2", Duration::from_secs(10), || {
        Instant::now() >= phase(8)
    })
    .await;
    fleet[1].signal("-KILL");
    assert!(fleet[1].wait(Duration::from_secs(5)).is_none_or(|c| c != 0));
    wait_until("phase 3", Duration::from_secs(10), || {
        Instant::now() >= phase(12)
    })
    .await;

    // The coordinator's own count never exceeds the budget once settled.
    let snap = coord.snapshot(&id).unwrap();
    assert!(snap.charged.rate <= RATE + 1e-9, "charged {}", snap.charged);
    assert!(
        snap.charged.in_flight <= IN_FLIGHT,
        "charged {}",
        snap.charged
    );
    let live: Vec<&str> = snap
        .members
        .iter()
        .filter(|m| m.state == pacer_budget::MemberState::Live)
        .map(|m| m.member.as_str())
        .collect();

    for r in fleet.iter().filter(|r| r.name != "r1") {
        r.signal("-TERM");
    }
    for r in fleet.iter_mut().filter(|r| r.name != "r1") {
        let code = r.wait(Duration::from_secs(15));
        assert_eq!(code, Some(0), "{} did not shut down cleanly", r.name);
    }

    let arrivals = {
        let mut a = sink.arrivals.lock().unwrap().clone();
        a.sort();
        a
    };
    // Each replica may send its burst (1) at once on top of its rate: 4 replicas.
    let worst = max_in_window(&arrivals, Duration::from_secs(1));
    let bound = RATE as usize + 4;
    let max_in_flight = sink.max_in_flight.load(Ordering::SeqCst);
    let measured: usize = arrivals
        .iter()
        .filter(|t| **t >= phase(1) && **t < phase(12))
        .count();
    let mean = measured as f64 / 11.0;
    eprintln!(
        "fleet on {:?}: {} deliveries, worst 1-s window {worst} (bound {bound}), mean {mean:.1}/s, max in flight {max_in_flight}, live at end {live:?}",
        kafka.broker,
        arrivals.len()
    );
    assert!(
        worst <= bound,
        "a 1-s window had {worst} deliveries > {bound}"
    );
    assert!(
        max_in_flight <= IN_FLIGHT as usize,
        "the sink saw {max_in_flight} concurrent requests > {IN_FLIGHT}"
    );
    // The budget is used, not just respected: a fleet stuck at zero would pass the
    // bounds above.
    assert!(
        mean >= RATE * 0.6,
        "mean rate {mean:.1}/s of a {RATE}/s budget"
    );
    assert!(
        live.contains(&"r2") && live.contains(&"r3"),
        "new replicas hold leases: {live:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
