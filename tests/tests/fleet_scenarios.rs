//! The fleet proof: real `pacer run` replicas leasing from a real `pacer coordinator`,
//! on Apache Kafka 4.4, delivering to a recording sink that takes 20 ms per request.
//! Each scenario changes the fleet (scale, SIGKILL, coordinator restart, skew, a live
//! budget change), waits for what it changed to be observed (the replicas' `/metrics`,
//! the coordinator's snapshot), and checks what the sink saw against the budget in force:
//!
//! - **never over**: every window of `1 s - SLACK` starting at an arrival holds at most
//!   1.02 x the budget in force plus one burst (1) per live replica, and the sink never
//!   holds more requests than the in-flight budget. `SLACK` (20 ms) absorbs the variation
//!   of the delay between a rate permit and the arrival it leads to (see
//!   `runtime/tests/rate.rs`);
//! - **used**: within 2 refresh intervals of a change being observed, the next second
//!   holds at least 0.9 x the budget, and the 3 s after that at least 0.98 x on average;
//! - **nothing lost**: at the end the budget is raised so the backlog drains, and every
//!   produced id reaches the sink; duplicates only where a replica was SIGKILLed, at most
//!   what it may have had uncommitted (its buffer and its in-flight grant).
//!
//! The harness is `pacer_tests::fleet`; the replicas and the coordinator are child
//! processes of this test, always reaped.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use pacer_tests::fleet::{BudgetSpec, Coordinator, Fleet, FleetView};
use pacer_tests::process::{measure_until, wait_for};
use pacer_tests::sim::{self, Event, Params, Scenario, Strategy};
use pacer_tests::sink::{count_between, ids, Reply, TestSink};
use pacer_tests::{Broker, Kafka};

/// The sink's time per request: with 8 in flight the fleet could do 400 msg/s, so a
/// 200 msg/s budget is what limits it.
const LATENCY: Duration = Duration::from_millis(20);
/// How much shorter than a second the checked windows are (see the module docs).
const SLACK: Duration = Duration::from_millis(20);
/// One permit of burst per replica (`pacer run --burst`, default 1).
const BURST: usize = 1;
/// The replicas' buffer (`--buffer-messages`, default 1,000): what a SIGKILLed replica
/// may have delivered and not committed, with its in-flight grant.
const BUFFER: usize = 1_000;

/// What was in force from `from` on: the budget's rate and the replicas that may send.
#[derive(Debug, Clone, Copy)]
struct InForce {
    from: Instant,
    rate: f64,
    replicas: usize,
}

/// The story of one scenario: what was in force when, and what the sink saw.
struct Story {
    sink: TestSink,
    timeline: Vec<InForce>,
    /// Where the checks begin (the first settled fleet): before it, the group forms.
    warm: Option<Instant>,
    lines: Vec<String>,
}

impl Story {
    async fn new() -> Story {
        let sink = TestSink::start(std::sync::Arc::new(|_| Reply {
            delay: LATENCY,
            ..Reply::OK
        }))
        .await;
        Story {
            sink,
            timeline: Vec::new(),
            warm: None,
            lines: Vec::new(),
        }
    }

    /// From now on (or from `at`), `rate` and `replicas` are in force.
    fn in_force(&mut self, at: Instant, rate: f64, replicas: usize) {
        self.timeline.push(InForce {
            from: at,
            rate,
            replicas,
        });
    }

    /// The bound of a window `[a, b)`: the highest rate and replica count in force at
    /// any point of it.
    fn bound(&self, a: Instant, b: Instant) -> usize {
        let mut rate: f64 = 0.0;
        let mut replicas = 0;
        for (i, f) in self.timeline.iter().enumerate() {
            let to = self.timeline.get(i + 1).map(|n| n.from);
            if f.from < b && to.is_none_or(|t| t > a) {
                rate = rate.max(f.rate);
                replicas = replicas.max(f.replicas);
            }
        }
        (1.02 * rate).floor() as usize + BURST * replicas
    }

    /// Waits until `cond` holds on the fleet, then for 2 refresh intervals and 4 s more,
    /// and checks the second after the 2 intervals (>= 0.9 x `rate`) and the 3 s after
    /// that (mean >= 0.98 x `rate`). Returns how long `cond` took from `since` and the
    /// mean.
    async fn phase(
        &mut self,
        fleet: &Fleet,
        what: &str,
        rate: f64,
        since: Instant,
        cond: impl Fn(&FleetView) -> bool,
    ) -> (Duration, f64) {
        self.phase_with(fleet, what, (rate, 0.9, 0.98), since, cond)
            .await
    }

    /// [`Story::phase`] with the thresholds `(rate, first second, mean)` given.
    async fn phase_with(
        &mut self,
        fleet: &Fleet,
        what: &str,
        (rate, first_min, mean_min): (f64, f64, f64),
        since: Instant,
        cond: impl Fn(&FleetView) -> bool,
    ) -> (Duration, f64) {
        fleet
            .await_view(what, Duration::from_secs(60), |v| cond(v))
            .await;
        let settled = Instant::now();
        self.warm.get_or_insert(settled);
        let start = settled + 2 * fleet.coordinator.spec.refresh();
        measure_until(start, Duration::from_secs(4)).await;
        let starts = self.sink.starts();
        let first = count_between(&starts, start, start + Duration::from_secs(1));
        let mean = count_between(
            &starts,
            start + Duration::from_secs(1),
            start + Duration::from_secs(4),
        ) as f64
            / 3.0;
        let line = format!(
            "{what}: observed after {:.2} s; then {first} in the first second ({:.3} x), {mean:.1}/s over the next 3 ({:.3} x), budget {rate}",
            (settled - since).as_secs_f64(),
            first as f64 / rate,
            mean / rate
        );
        eprintln!("{line}");
        self.lines.push(line);
        assert!(
            first as f64 >= first_min * rate,
            "{what}: {first} in the second after 2 refresh intervals < {first_min} x {rate}"
        );
        assert!(
            mean >= mean_min * rate,
            "{what}: mean {mean:.1}/s < {mean_min} x {rate}"
        );
        (settled - since, mean)
    }

    /// Every window of `1 s - SLACK` from the warm-up on within its bound, and the sink
    /// never above `in_flight` at once.
    fn check_never_over(&self, in_flight: u32) {
        let starts = self.sink.starts();
        let warm = self.warm.expect("a settled fleet");
        let len = Duration::from_secs(1) - SLACK;
        let mut worst = (0.0, 0, 0, warm);
        for (i, a) in starts.iter().enumerate().filter(|(_, a)| **a >= warm) {
            let n = starts[i..].partition_point(|t| *t < *a + len);
            let bound = self.bound(*a, *a + len);
            let ratio = n as f64 / bound as f64;
            if ratio > worst.0 {
                worst = (ratio, n, bound, *a);
            }
        }
        let most = self.sink.max_concurrent();
        eprintln!(
            "worst window of {len:?}: {} arrivals from {:.2} s after warm-up, bound {} ({:.3} of it); most at once at the sink {most} (bound {in_flight})",
            worst.1,
            (worst.3 - warm).as_secs_f64(),
            worst.2,
            worst.0
        );
        assert!(
            worst.1 <= worst.2,
            "{} arrivals in the {len:?} from {:.2} s after warm-up > the bound {}",
            worst.1,
            (worst.3 - warm).as_secs_f64(),
            worst.2
        );
        assert!(
            most <= in_flight,
            "the sink held {most} requests at once > the in-flight budget {in_flight}"
        );
    }

    /// Raises the budget so the backlog drains, waits for every id in `0..produced`, and
    /// returns the duplicates.
    async fn drain(&mut self, fleet: &mut Fleet, produced: usize) -> usize {
        let at = Instant::now();
        fleet
            .coordinator
            .reload(|b| {
                b.rate = 5_000.0;
                b.in_flight = 64;
            })
            .await;
        let replicas = fleet.replicas.len();
        self.in_force(at, 5_000.0, replicas);
        let state = self.sink.state.clone();
        let sink = &self.sink;
        wait_for(
            &format!("all {produced} produced messages at the sink"),
            Duration::from_secs(120),
            || state.delivered_count() >= produced && ids(sink).len() >= produced,
        )
        .await;
        let seen = ids(&self.sink);
        let lost: Vec<usize> = (0..produced).filter(|i| !seen.contains_key(i)).collect();
        assert!(
            lost.is_empty(),
            "lost {} messages: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        let delivered = self.sink.state.delivered_count();
        let duplicates = delivered - produced;
        let line = format!(
            "drained in {:.1} s: produced {produced}, delivered {delivered}, duplicates {duplicates}",
            at.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        self.lines.push(line);
        if duplicates > 0 {
            self.explain_duplicates(fleet, &seen);
        }
        duplicates
    }

    /// Prints each re-delivered record (partition, offset, attempt, when each delivery
    /// started, in UTC like the replicas' logs, and how long it took) and every replica's
    /// log lines about those partitions: where a hand-over left an offset behind.
    fn explain_duplicates(&self, fleet: &Fleet, seen: &HashMap<usize, usize>) {
        let twice: HashSet<usize> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect();
        let mut partitions = BTreeSet::new();
        let mut shown = 0;
        for s in self.sink.state.delivered() {
            if s.id.is_some_and(|id| twice.contains(&id)) && shown < 40 {
                shown += 1;
                partitions.insert(s.partition);
                eprintln!(
                    "re-delivered: id {:?} partition {} offset {} attempt {}, started {} UTC, took {:?}",
                    s.id,
                    s.partition,
                    s.offset,
                    s.attempt,
                    utc(s.start),
                    s.end.duration_since(s.start)
                );
            }
        }
        // The same record twice is the fleet's re-delivery; one id at two offsets was
        // written twice (a retried produce request), which the idempotent producer rules out.
        let mut records: HashMap<usize, BTreeSet<(i32, i64)>> = HashMap::new();
        for s in self.sink.state.delivered() {
            if let Some(id) = s.id.filter(|id| twice.contains(id)) {
                records
                    .entry(id)
                    .or_default()
                    .insert((s.partition, s.offset));
            }
        }
        let written_twice = records.values().filter(|r| r.len() > 1).count();
        eprintln!(
            "{} ids delivered more than once: {} re-delivered records, {written_twice} ids written twice by the producer",
            records.len(),
            records.len() - written_twice
        );
        let partitions: Vec<i32> = partitions.into_iter().collect();
        eprintln!(
            "replica logs about partitions {partitions:?}:\n{}",
            fleet.explain(&partitions)
        );
    }
}

/// `instant` as the time of day in UTC (`13:04:05.123`), as the replicas' log lines
/// show it.
fn utc(instant: Instant) -> String {
    let ago = instant.elapsed();
    let at = std::time::SystemTime::now() - ago;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1_000 % 60,
        ms % 1_000
    )
}

fn apache() -> Kafka<'static> {
    Kafka::start(Broker::Apache)
}

/// Every replica has fetched: its buffer holds messages (with a backlog on every
/// partition, a replica that holds none has not fetched from its new partitions yet).
fn all_fetched(v: &FleetView) -> bool {
    v.replicas
        .iter()
        .all(|r| r.buffer_messages.is_some_and(|n| n > 0.0))
}

/// The simulation (`pacer_tests::sim`) with this file's timings: 200 msg/s, 2 s leases
/// refreshed every 200 ms, a 6 s fallback window and a 6 s session timeout.
fn sim_params(partitions: u32) -> Params {
    Params {
        budget: 200.0,
        in_flight: 8,
        partitions,
        lease_ms: 2_000,
        refresh_ms: 200,
        fallback_ms: 6_000,
        session_timeout_ms: 6_000,
        duration_ms: 60_000,
        ..Params::default()
    }
}

/// A backlog of `n` messages over the first `busy` of the topic's partitions.
fn backlog(kafka: &Kafka<'_>, topic: &str, partitions: i32, busy: i32, n: usize) {
    kafka.topic(topic, partitions);
    kafka.produce(topic, busy, 0..n, 100, |_| None);
}

/// Scale 1 -> 3 -> 5 -> 2 at 200 msg/s and 8 in flight, then the budget 200 -> 50 ->
/// 200 live. Expected members are raised before replicas start and lowered after they
/// stop, as the operator does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_1_3_5_2_and_a_live_budget_change_keep_the_budget_used_and_never_exceeded() {
    const RATE: f64 = 200.0;
    const IN_FLIGHT: u32 = 8;
    const PARTITIONS: usize = 10;
    const N: usize = 30_000;
    let kafka = apache();
    backlog(&kafka, "scale", PARTITIONS as i32, PARTITIONS as i32, N);
    let mut story = Story::new().await;
    let coordinator = Coordinator::start("scale", BudgetSpec::new("scale", RATE, IN_FLIGHT)).await;
    let mut fleet = Fleet::new(&kafka, "scale", &story.sink.url(), coordinator);

    let mut alive = 0;
    for target in [1usize, 3, 5, 2] {
        let since = Instant::now();
        if target > alive {
            fleet
                .coordinator
                .reload(|b| b.expected_members = target as u32)
                .await;
            story.in_force(Instant::now(), RATE, target);
            fleet.add(target - alive).await;
        } else {
            while fleet.replicas.len() > target {
                assert_eq!(fleet.stop(0).await, Some(0), "a replica's clean exit");
            }
            fleet
                .coordinator
                .reload(|b| b.expected_members = target as u32)
                .await;
            story.in_force(Instant::now(), RATE, target);
        }
        alive = target;
        let _ = story
            .phase(&fleet, &format!("{target} replicas"), RATE, since, |v| {
                v.replicas.len() == target
                    && v.settled_at(RATE)
                    && v.assigned_all(PARTITIONS)
                    && all_fetched(v)
            })
            .await;
    }
    for rate in [50.0, 200.0] {
        let since = Instant::now();
        let old = fleet.coordinator.spec.rate;
        fleet.coordinator.reload(|b| b.rate = rate).await;
        // A lower budget binds one refresh after the reload: until then the old one is
        // in force.
        let binds = if rate < old {
            Instant::now() + fleet.coordinator.spec.refresh()
        } else {
            since
        };
        story.in_force(binds, rate, alive);
        let (followed, _) = story
            .phase(
                &fleet,
                &format!("budget {old} -> {rate}"),
                rate,
                since,
                |v| {
                    v.settled_at(rate) && v.budget.as_ref().is_some_and(|b| b.capacity.rate == rate)
                },
            )
            .await;
        eprintln!(
            "budget {old} -> {rate}: every replica's grant followed within {followed:?} of the reload (refresh {:?}, the view is polled every 100 ms)",
            fleet.coordinator.spec.refresh()
        );
    }
    story.check_never_over(IN_FLIGHT);
    let duplicates = story.drain(&mut fleet, N).await;
    // No replica was killed: a clean hand-over re-delivers nothing. This scenario found
    // the one way it did (1 of 30,000, about one run in 20): a replica stopped while its
    // dispatcher waited for a rate permit sent the message after the halt, and its close
    // committed without it (fixed in `Reserved::dispatch`). Should one come back, `drain`
    // has printed the record, how often it was delivered, and the replicas' lines about it.
    assert_eq!(
        duplicates, 0,
        "no replica was killed: a clean hand-over re-delivers nothing"
    );
}

/// SIGKILL one replica of 4: no release, no drain. Its lease runs out, then its fallback
/// window (a member that is only silent may still be sending on its fallback share), and
/// only then is its share granted to the others; Kafka hands its partitions over after the
/// session timeout. Never over the budget meanwhile, and nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_replica_s_share_is_used_again_within_its_lease_and_fallback_window() {
    const RATE: f64 = 200.0;
    const IN_FLIGHT: u32 = 8;
    const PARTITIONS: usize = 8;
    const N: usize = 12_000;
    let kafka = apache();
    backlog(&kafka, "kill", PARTITIONS as i32, PARTITIONS as i32, N);
    let mut story = Story::new().await;
    let spec = BudgetSpec {
        expected_members: 4,
        ..BudgetSpec::new("kill", RATE, IN_FLIGHT)
    };
    let window = Duration::from_secs(
        u64::from(spec.lease_seconds)
            + u64::from(spec.fallback_seconds.unwrap_or(3 * spec.lease_seconds)),
    );
    let coordinator = Coordinator::start("kill", spec).await;
    let mut fleet = Fleet::new(&kafka, "kill", &story.sink.url(), coordinator);
    let since = Instant::now();
    story.in_force(since, RATE, 4);
    fleet.add(4).await;
    let _ = story
        .phase(&fleet, "4 replicas", RATE, since, |v| {
            v.settled_at(RATE) && v.assigned_all(PARTITIONS) && all_fetched(v)
        })
        .await;
    let killed_at = Instant::now();
    let killed = fleet.kill(1).await;
    let (reclaimed, _) = story
        .phase(
            &fleet,
            &format!("{killed} SIGKILLed: its share used again"),
            RATE,
            killed_at,
            |v| {
                v.settled_at(RATE)
                    && v.assigned_all(PARTITIONS)
                    && all_fetched(v)
                    && !v.live_members().contains(&killed.as_str())
            },
        )
        .await;
    eprintln!(
        "{killed}'s share was granted again {reclaimed:?} after the SIGKILL (lease + fallback window {window:?})"
    );
    // Observed by polling every 100 ms: a second of grace for the poll and the scrape.
    assert!(
        reclaimed <= window + Duration::from_secs(1),
        "the killed replica's share came back after {reclaimed:?} > lease + fallback {window:?}"
    );
    // The simulation of the same crash: when do the others use the share again?
    let scenario = Scenario {
        name: "crash 1 of 4",
        replicas: 4,
        events: vec![(20_000, Event::Crash(1))],
        lost_responses: 0.0,
        pacer_only: true,
        fallback_ms: None,
    };
    let p = sim_params(PARTITIONS as u32);
    let m = sim::metrics(
        &sim::run(&scenario, Strategy::PacerDemand, &p),
        &scenario,
        &p,
    );
    let simulated = m
        .reclaim_s
        .flatten()
        .expect("the simulation reclaims the share");
    eprintln!(
        "reclaim: real {:.2} s (observed by polling), simulated {simulated:.2} s",
        reclaimed.as_secs_f64()
    );
    assert!(
        (reclaimed.as_secs_f64() - simulated).abs() <= 1.5,
        "the simulation ({simulated:.2} s) and the fleet ({reclaimed:?}) disagree on the reclaim"
    );
    story.check_never_over(IN_FLIGHT);
    let duplicates = story.drain(&mut fleet, N).await;
    let bound = BUFFER + IN_FLIGHT as usize;
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates > what {killed} may have had uncommitted ({bound})"
    );
}

/// The coordinator is SIGKILLed and, once the replicas run on their fallback shares,
/// started again on its port: its new ledger learns what the replicas hold before it
/// grants more. The replicas on fallback never sum above the budget, the sink never sees
/// more than the budget, and the fleet settles back at the whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_learns_the_leases_and_the_budget_is_never_exceeded() {
    const RATE: f64 = 200.0;
    const IN_FLIGHT: u32 = 8;
    const PARTITIONS: usize = 6;
    const N: usize = 10_000;
    let kafka = apache();
    backlog(&kafka, "restart", PARTITIONS as i32, PARTITIONS as i32, N);
    let mut story = Story::new().await;
    let spec = BudgetSpec {
        expected_members: 3,
        ..BudgetSpec::new("restart", RATE, IN_FLIGHT)
    };
    let coordinator = Coordinator::start("restart", spec).await;
    let mut fleet = Fleet::new(&kafka, "restart", &story.sink.url(), coordinator);
    let since = Instant::now();
    story.in_force(since, RATE, 3);
    fleet.add(3).await;
    let _ = story
        .phase(&fleet, "3 replicas", RATE, since, |v| {
            v.settled_at(RATE) && v.assigned_all(PARTITIONS) && all_fetched(v)
        })
        .await;
    fleet.coordinator.kill().await;
    let killed = Instant::now();
    // Every view from here on: the replicas on their fallback share sum to at most the
    // budget (each share is fixed while on fallback, so a view polled replica by replica
    // is exact for them).
    let fallback_sum = |v: &FleetView| -> f64 {
        v.replicas
            .iter()
            .filter(|r| r.fallback == Some(1.0))
            .filter_map(|r| r.granted_rate)
            .sum()
    };
    let mut most_on_fallback: f64 = 0.0;
    let on_fallback = fleet
        .await_view(
            "a replica on its fallback share",
            Duration::from_secs(30),
            |v| v.replicas.iter().any(|r| r.fallback == Some(1.0)),
        )
        .await;
    most_on_fallback = most_on_fallback.max(fallback_sum(&on_fallback));
    eprintln!(
        "coordinator down: first replica on fallback {:?} after the kill",
        killed.elapsed()
    );
    fleet.coordinator.restart().await;
    let restarted = Instant::now();
    let until = restarted + Duration::from_secs(60);
    let mut learning_seen = false;
    loop {
        let v = fleet.view().await;
        let sum = fallback_sum(&v);
        most_on_fallback = most_on_fallback.max(sum);
        assert!(
            sum <= RATE + 1e-6,
            "replicas on fallback hold {sum} msg/s > {RATE}: {v:#?}"
        );
        if let Some(b) = &v.budget {
            learning_seen |= b.learning;
            assert!(
                b.charged.rate <= RATE + 1e-6 && b.charged.in_flight <= IN_FLIGHT,
                "the restarted coordinator charged {} > {RATE}/{IN_FLIGHT}",
                b.charged
            );
            if !b.learning && v.settled_at(RATE) {
                break;
            }
        }
        assert!(
            Instant::now() < until,
            "no settled fleet 60 s after the restart: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        learning_seen,
        "the restarted coordinator never reported learning"
    );
    eprintln!(
        "restarted coordinator: learned and settled {:?} after the restart; the replicas on fallback held at most {most_on_fallback} msg/s together",
        restarted.elapsed()
    );
    let _ = story
        .phase(&fleet, "after the restart", RATE, restarted, |v| {
            v.settled_at(RATE) && v.assigned_all(PARTITIONS) && all_fetched(v)
        })
        .await;
    story.check_never_over(IN_FLIGHT);
    let duplicates = story.drain(&mut fleet, N).await;
    assert_eq!(
        duplicates, 0,
        "no replica was killed: nothing is re-delivered"
    );
}

/// Four replicas, one partition each, a backlog in two of them: under `demand` the busy
/// two take the idle two's share and the sink sees at least 0.95 x the budget; under
/// `equal` each replica gets a quarter whether it needs it or not, and the sink sees about
/// half. Both recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_skew_demand_uses_the_budget_and_equal_measurably_does_not() {
    const RATE: f64 = 200.0;
    const IN_FLIGHT: u32 = 8;
    const N: usize = 8_000;
    let kafka = apache();
    let mut means = Vec::new();
    for policy in ["demand", "equal"] {
        let topic = format!("skew-{policy}");
        backlog(&kafka, &topic, 4, 2, N);
        let mut story = Story::new().await;
        let spec = BudgetSpec {
            policy,
            expected_members: 4,
            ..BudgetSpec::new(&topic, RATE, IN_FLIGHT)
        };
        let coordinator = Coordinator::start(&topic, spec).await;
        let mut fleet = Fleet::new(&kafka, &topic, &story.sink.url(), coordinator);
        let since = Instant::now();
        story.in_force(since, RATE, 4);
        fleet.add(4).await;
        // Demand needs the idle replicas' reports (every second, smoothed): settled once
        // two replicas hold a backlog and, under `demand`, hold 95 % of the budget.
        let (_, mean) = story
            .phase_with(
                &fleet,
                &format!("skew under {policy}"),
                (
                    RATE,
                    if policy == "demand" { 0.9 } else { 0.0 },
                    if policy == "demand" { 0.95 } else { 0.0 },
                ),
                since,
                |v| {
                    let busy: Vec<f64> = v
                        .replicas
                        .iter()
                        .filter(|r| r.buffer_messages.is_some_and(|n| n > 0.0))
                        .filter_map(|r| r.granted_rate)
                        .collect();
                    v.settled_at(RATE)
                        && v.assigned_all(4)
                        && busy.len() == 2
                        && (policy == "equal" || busy.iter().sum::<f64>() >= 0.95 * RATE)
                },
            )
            .await;
        means.push(mean);
        story.check_never_over(IN_FLIGHT);
        let duplicates = story.drain(&mut fleet, N).await;
        assert_eq!(
            duplicates, 0,
            "no replica was killed: nothing is re-delivered"
        );
    }
    // The simulation of the same skew (4 replicas, 4 partitions, 2 idle from the
    // start): its mean use after the event, per policy.
    let scenario = Scenario {
        name: "skew",
        replicas: 4,
        events: vec![(10, Event::Idle(2))],
        lost_responses: 0.0,
        pacer_only: true,
        fallback_ms: None,
    };
    let p = sim_params(4);
    let simulated: Vec<f64> = [Strategy::PacerDemand, Strategy::PacerEqual]
        .iter()
        .map(|s| {
            let m = sim::metrics(&sim::run(&scenario, *s, &p), &scenario, &p);
            m.phase_means.last().copied().flatten().unwrap_or(0.0)
        })
        .collect();
    eprintln!(
        "half the partitions idle: demand {:.1} msg/s ({:.2} x), equal {:.1} msg/s ({:.2} x) of {RATE}; simulated: demand {:.2} x, equal {:.2} x",
        means[0],
        means[0] / RATE,
        means[1],
        means[1] / RATE,
        simulated[0],
        simulated[1]
    );
    for (real, sim) in means.iter().zip(&simulated) {
        assert!(
            (real / RATE - sim).abs() <= 0.1,
            "the simulation ({sim:.2} x) and the fleet ({:.2} x) disagree under skew",
            real / RATE
        );
    }
    assert!(
        means[1] <= 0.6 * RATE && means[1] < means[0] - 0.3 * RATE,
        "equal should leave the idle half's share unused: demand {}, equal {}",
        means[0],
        means[1]
    );
}
