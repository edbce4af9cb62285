//! `pacer demo`: the whole story on one machine, in about a minute.
//!
//! It starts librdkafka's mock cluster with a backlog, a recording HTTP sink, a
//! `pacer coordinator` and `pacer run` replicas (child processes of this binary), then
//! walks through a story, printing a table each second: the fleet scales 1 -> 3 -> 5
//! (`--replicas` is the peak), the budget drops to a quarter and comes back live, a
//! replica is SIGKILLed, the coordinator is killed and restarted, the fleet scales down
//! to 2. Then it raises the budget so the backlog drains, checks that every produced
//! message reached the sink, and writes `--json` (a record a second, the totals, the
//! events, the verdict) and `--plot` (an SVG of the rates against the budget).
//!
//! The verdict fails (exit code 3) if any window of `1 s - 20 ms` at the sink held more
//! than 1.02 x the budget in force plus one burst per replica, the sink ever held more
//! requests than the in-flight budget, or a message was lost.
//!
//! The mock cluster takes about 5 s per rebalance round (the cooperative assignor needs
//! two when members leave), so the sink dips for some seconds after each scale step
//! while partitions move; on Apache Kafka the same steps settle in about a second
//! (`tests/tests/fleet_scenarios.rs`).

mod children;
mod report;
mod sink;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use crate::config::DemoArgs;
use children::{Budget, Coordinator, Replica, RunTarget, FALLBACK_SECONDS, LEASE_SECONDS};
use report::{Event, InForce, Second, Totals};
pub use report::{Report, Verdict};

const TOPIC: &str = "demo";
/// The replicas' buffer (`--buffer-messages`' default): with the in-flight grant, what a
/// SIGKILLed replica may have delivered and not committed.
const BUFFER: u64 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Flags(String),
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
    #[error("cannot start a child process: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("a child did not show {what} (its log: {})", log.display())]
    Child {
        what: String,
        log: std::path::PathBuf,
    },
    #[error("the fleet did not deliver every message within {0:?} of the drain")]
    Drain(Duration),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw {}: {error}", path.display())]
    Plot {
        path: std::path::PathBuf,
        error: String,
    },
}

/// One step of the story.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Scale(usize),
    Budget(f64),
    Kill,
    RestartCoordinator,
}

/// The story over `duration` seconds: (second, step).
fn story(peak: usize, budget: f64, duration: u64) -> Vec<(u64, Step)> {
    let at = |pct: u64| duration * pct / 100;
    vec![
        (0, Step::Scale(1)),
        (at(12), Step::Scale(peak.div_ceil(2))),
        (at(25), Step::Scale(peak)),
        (at(40), Step::Budget(budget / 4.0)),
        (at(50), Step::Budget(budget)),
        (at(60), Step::Kill),
        (at(72), Step::RestartCoordinator),
        (at(85), Step::Scale(2)),
    ]
}

/// The fleet as the story changes it.
struct Fleet {
    target: RunTarget,
    coordinator: Coordinator,
    replicas: Vec<Replica>,
    started: usize,
    kills: u64,
    /// The story's in-flight budget (the drain raises the coordinator's).
    in_flight_budget: u32,
    partitions: usize,
    /// Replicas stopping or killed, reaped in the background.
    leaving: Vec<tokio::task::JoinHandle<Option<i32>>>,
    timeline: Vec<InForce>,
    events: Vec<Event>,
    t0: Instant,
}

impl Fleet {
    fn mark(&mut self, what: String) {
        let t = self.t0.elapsed().as_secs_f64();
        println!("  >> {what}");
        self.events.push(Event { t, what });
    }

    fn in_force(&mut self, from: Instant) {
        self.timeline.push(InForce {
            from,
            rate: self.coordinator.budget.rate,
            replicas: self.replicas.len(),
        });
    }

    async fn scale(&mut self, n: usize) -> Result<(), DemoError> {
        let before = self.replicas.len();
        if n > before {
            let b = Budget {
                expected: n as u32,
                ..self.coordinator.budget
            };
            self.coordinator.set(b).await?;
            for _ in before..n {
                let member = format!("r{}", self.started);
                self.started += 1;
                self.replicas
                    .push(Replica::start(&self.target, &member).await?);
            }
            self.in_force(Instant::now());
        } else {
            while self.replicas.len() > n {
                let mut r = self.replicas.remove(0);
                r.proc.signal("TERM");
                self.leaving.push(tokio::spawn(async move {
                    r.proc.wait(Duration::from_secs(30)).await
                }));
            }
            let b = Budget {
                expected: n as u32,
                ..self.coordinator.budget
            };
            self.coordinator.set(b).await?;
        }
        self.mark(format!("scale {before} -> {n}"));
        Ok(())
    }

    async fn step(&mut self, step: Step) -> Result<(), DemoError> {
        match step {
            Step::Scale(n) => self.scale(n).await?,
            Step::Budget(rate) => {
                let old = self.coordinator.budget.rate;
                let b = Budget {
                    rate,
                    ..self.coordinator.budget
                };
                self.coordinator.set(b).await?;
                // A lower budget binds once every replica refreshed: one interval.
                let refresh = Duration::from_millis(children::REFRESH_MILLIS);
                let binds = if rate < old {
                    Instant::now() + refresh
                } else {
                    Instant::now()
                };
                self.in_force(binds);
                self.mark(format!("budget {old} -> {rate}"));
            }
            Step::Kill => {
                if let Some(mut r) = self.replicas.pop() {
                    r.proc.signal("KILL");
                    self.kills += 1;
                    self.mark(format!("SIGKILL {}", r.member));
                    self.leaving.push(tokio::spawn(async move {
                        r.proc.wait(Duration::from_secs(10)).await
                    }));
                }
            }
            Step::RestartCoordinator => {
                self.coordinator.restart().await?;
                self.mark("coordinator restarted".into());
            }
        }
        Ok(())
    }
}

/// Runs the demo and returns its verdict (the files are written either way). The
/// children's logs stay in a temporary folder (named on stderr) when the demo fails.
pub async fn run(args: DemoArgs) -> Result<Verdict, DemoError> {
    if args.partitions < args.replicas {
        return Err(DemoError::Flags(format!(
            "--partitions {} is below --replicas {}: every replica needs a partition",
            args.partitions, args.replicas
        )));
    }
    let dir = std::env::temp_dir().join(format!("pacer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(DemoError::Spawn)?;
    let cluster = MockCluster::new(1).map_err(DemoError::Broker)?;
    let bootstrap = cluster.bootstrap_servers();
    let partitions = args.partitions as i32;
    cluster
        .create_topic(TOPIC, partitions, 1)
        .map_err(DemoError::Broker)?;
    let backlog = (args.budget * args.duration as f64 * 1.3) as usize + 1_000;
    produce(&bootstrap, partitions, backlog)?;
    let latency = Duration::from_millis(args.sink_latency_ms);
    let (sink_url, seen) = sink::start(latency, backlog)
        .await
        .map_err(DemoError::Bind)?;
    let budget = Budget {
        rate: args.budget,
        in_flight: args.in_flight,
        expected: 1,
    };
    let coordinator = Coordinator::start(&dir, budget).await?;
    println!(
        "broker {bootstrap}: {backlog} messages in {partitions} partitions; sink {sink_url} ({} ms a request); coordinator {}",
        args.sink_latency_ms,
        coordinator.url()
    );
    await_learning(&coordinator).await;
    let mut fleet = Fleet {
        target: RunTarget {
            bootstrap,
            topic: TOPIC.into(),
            sink: sink_url,
            coordinator: coordinator.url(),
            dir: dir.clone(),
        },
        coordinator,
        replicas: Vec::new(),
        started: 0,
        kills: 0,
        in_flight_budget: args.in_flight,
        partitions: args.partitions as usize,
        leaving: Vec::new(),
        timeline: Vec::new(),
        events: Vec::new(),
        t0: Instant::now(),
    };
    let result = tell(&mut fleet, &seen, &args, backlog as u64).await;
    stop(&mut fleet).await;
    drop(cluster);
    match &result {
        Ok(v) if v.pass => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        _ => eprintln!("the children's logs: {}", dir.display()),
    }
    result
}

/// SIGTERM to every replica left, and every child reaped.
async fn stop(fleet: &mut Fleet) {
    for r in &fleet.replicas {
        r.proc.signal("TERM");
    }
    for r in &mut fleet.replicas {
        r.proc.wait(Duration::from_secs(15)).await;
    }
    for h in fleet.leaving.drain(..) {
        let _ = h.await;
    }
}

/// A fresh coordinator grants nothing new for a lease plus the fallback window (it cannot
/// know what an earlier incarnation granted); the story starts once that is over.
async fn await_learning(c: &Coordinator) {
    println!(
        "a coordinator that just started learns for a lease and the fallback window ({} s) before it grants the whole budget",
        LEASE_SECONDS + FALLBACK_SECONDS
    );
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until && c.snapshot().await.is_none_or(|s| s.learning) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The story, a row a second, the drain, the report and the files.
async fn tell(
    fleet: &mut Fleet,
    seen: &sink::Seen,
    args: &DemoArgs,
    produced: u64,
) -> Result<Verdict, DemoError> {
    let steps = story(args.replicas as usize, args.budget, args.duration);
    println!(
        "{:>4} {:>8} {:>8} {:>8} {:>9} {:>8}  grants (msg/s per replica)",
        "t", "replicas", "budget", "sink/s", "in flight", "lag"
    );
    fleet.t0 = Instant::now();
    let mut seconds = Vec::new();
    let mut last = Sampler::default();
    let mut tick = tokio::time::interval_at(
        (fleet.t0 + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    for t in 0..=args.duration {
        // Second t is sampled first, then the steps due at t begin second t + 1.
        if t > 0 {
            tick.tick().await;
            let s = last.sample(fleet, seen, t, produced).await;
            print_row(&s);
            seconds.push(s);
        }
        if t < args.duration {
            for (_, step) in steps.iter().filter(|(at, _)| *at == t) {
                fleet.step(*step).await?;
            }
        }
    }
    drain(fleet, seen, produced).await?;
    let report = judge(fleet, seen, seconds, produced);
    report::write_json(&args.json, &report)?;
    report::write_svg(&args.plot, &report)?;
    print_verdict(&report, args);
    Ok(report.verdict)
}

fn print_verdict(report: &Report, args: &DemoArgs) {
    let v = &report.verdict;
    if v.duplicates > v.duplicate_bound {
        println!(
            "WARNING: {} duplicates, more than the SIGKILLed replicas may have had uncommitted ({}); by partition {:?}",
            v.duplicates, v.duplicate_bound, v.duplicates_by_partition
        );
    }
    println!(
        "{}: worst window {} (bound {}), most at once {} (in-flight budget {}), produced {}, delivered {}, lost {}, duplicates {} (bound {}); wrote {} and {}",
        if v.pass { "PASS" } else { "FAIL" },
        v.worst_window,
        v.worst_bound,
        v.max_in_flight,
        v.in_flight_budget,
        report.totals.produced,
        report.totals.delivered,
        v.lost,
        v.duplicates,
        v.duplicate_bound,
        args.json.display(),
        args.plot.display()
    );
}

/// Replicas' acknowledged counts at the previous sample, for per-second differences.
#[derive(Default)]
struct Sampler {
    acked: BTreeMap<String, f64>,
}

impl Sampler {
    async fn sample(&mut self, fleet: &Fleet, seen: &sink::Seen, t: u64, produced: u64) -> Second {
        // Exactly second t of the story, from the arrival instants.
        let arrivals = seen.arrivals();
        let from = fleet.t0 + Duration::from_secs(t - 1);
        let to = from + Duration::from_secs(1);
        let observed =
            arrivals.partition_point(|a| *a < to) - arrivals.partition_point(|a| *a < from);
        let client = reqwest::Client::new();
        let mut grants = BTreeMap::new();
        let mut per_replica = BTreeMap::new();
        for r in &fleet.replicas {
            if let Some((granted, acked)) = r.scrape(&client).await {
                grants.insert(r.member.clone(), granted);
                let before = self.acked.insert(r.member.clone(), acked).unwrap_or(0.0);
                per_replica.insert(r.member.clone(), acked - before);
            }
        }
        let (unique, _) = seen.unique_and_duplicates();
        Second {
            t,
            replicas: fleet.replicas.len() as u32,
            budget: fleet.coordinator.budget.rate,
            observed_rate: observed as f64,
            in_flight: seen.take_peak(),
            lag: produced.saturating_sub(unique),
            grants,
            per_replica,
        }
    }
}

fn print_row(s: &Second) {
    let grants: Vec<String> = s
        .grants
        .iter()
        .map(|(m, g)| format!("{m} {g:.1}"))
        .collect();
    println!(
        "{:>4} {:>8} {:>8.1} {:>8.0} {:>9} {:>8}  {}",
        s.t,
        s.replicas,
        s.budget,
        s.observed_rate,
        s.in_flight,
        s.lag,
        grants.join("  ")
    );
}

/// Raises the budget (ten times, at least 2,000 msg/s; four times the in-flight) so the
/// backlog drains, and waits until every produced message reached the sink.
async fn drain(fleet: &mut Fleet, seen: &sink::Seen, produced: u64) -> Result<(), DemoError> {
    let b = fleet.coordinator.budget;
    let raised = Budget {
        rate: (b.rate * 10.0).max(2_000.0),
        in_flight: b.in_flight * 4,
        ..b
    };
    fleet.coordinator.set(raised).await?;
    fleet.in_force(Instant::now());
    let (unique, _) = seen.unique_and_duplicates();
    println!(
        "draining the {} messages left at {} msg/s and {} in flight",
        produced - unique,
        raised.rate,
        raised.in_flight
    );
    let within = Duration::from_secs(60) + Duration::from_secs_f64(produced as f64 / raised.rate);
    let until = Instant::now() + within;
    while seen.unique_and_duplicates().0 < produced {
        if Instant::now() >= until {
            return Err(DemoError::Drain(within));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn judge(fleet: &Fleet, seen: &sink::Seen, seconds: Vec<Second>, produced: u64) -> Report {
    let arrivals = seen.arrivals();
    let (worst, bound, at) = report::worst_window(&arrivals, fleet.t0, &fleet.timeline);
    let (unique, duplicates) = seen.unique_and_duplicates();
    let in_flight_budget = fleet.in_flight_budget;
    // The story's seconds: the drain runs at four times the in-flight budget.
    let max_in_flight = seconds.iter().map(|s| s.in_flight).max().unwrap_or(0);
    let duplicate_bound = fleet.kills * (BUFFER + u64::from(in_flight_budget));
    let lost = produced - unique;
    let verdict = Verdict {
        worst_window: worst,
        worst_bound: bound,
        worst_at: (at - fleet.t0).as_secs_f64(),
        max_in_flight,
        in_flight_budget,
        lost,
        duplicates,
        duplicate_bound,
        duplicates_by_partition: seen.duplicates_by_partition(fleet.partitions),
        pass: worst <= bound && max_in_flight <= in_flight_budget && lost == 0,
    };
    Report {
        totals: Totals {
            produced,
            delivered: seen.delivered(),
            duplicates,
        },
        events: fleet.events.clone(),
        seconds,
        verdict,
    }
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
        // A retried produce request is never written twice: an order the sink sees twice
        // is then a re-delivery by the fleet. Without it one retried request could write
        // a partition's whole backlog twice (one request holds all of it at this size).
        .set("enable.idempotence", "true")
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
