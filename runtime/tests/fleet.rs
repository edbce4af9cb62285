//! A fleet: `pacer coordinator` and three `pacer run` replicas as child processes sharing
//! one leased budget. The sink must see the global budget, not three times it; a replica
//! leaving cleanly hands its share to the others; a budget reload (SIGHUP) re-rates the
//! fleet without a burst; a dead coordinator leaves the replicas on their fallback share.

mod common;

use std::time::{Duration, Instant};

use common::*;

const BUDGET: f64 = 60.0;
const TOKEN: &str = "fleet-test-token-0123456789";

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Deliveries per second over `[from, from + secs)`.
fn rate_between(sink: &TestSink, from: Instant, secs: u64) -> f64 {
    let to = from + Duration::from_secs(secs);
    let n = sink
        .state
        .delivered()
        .iter()
        .filter(|s| s.start >= from && s.start < to)
        .count();
    n as f64 / secs as f64
}

/// One replica as its admin `/metrics` shows it (`None`: not scraped or not exposed).
#[derive(Debug, Default)]
struct ReplicaView {
    granted_rate: Option<f64>,
    assigned_partitions: Option<f64>,
    buffer_messages: Option<f64>,
    fallback: Option<f64>,
}

/// What the fleet shows at one instant: each replica's admin metrics and the
/// coordinator's snapshot of the budget.
#[derive(Debug)]
struct FleetView {
    replicas: Vec<ReplicaView>,
    budget: Option<pacer_budget::Snapshot>,
}

impl FleetView {
    /// Sum of the replicas' granted rates, if every replica answered.
    fn granted_rate(&self) -> Option<f64> {
        self.replicas.iter().map(|r| r.granted_rate).sum()
    }

    /// True once the group's assignment is complete: every replica holds at least one
    /// partition and together they hold all `partitions`.
    fn assigned_all(&self, partitions: usize) -> bool {
        let counts: Option<Vec<f64>> = self
            .replicas
            .iter()
            .map(|r| r.assigned_partitions)
            .collect();
        counts.is_some_and(|c| {
            c.iter().all(|n| *n >= 1.0) && c.iter().sum::<f64>() == partitions as f64
        })
    }

    /// True when no replica runs on its fallback share.
    fn all_leased(&self) -> bool {
        self.replicas.iter().all(|r| r.fallback == Some(0.0))
    }

    /// The live members in the coordinator's snapshot.
    fn live_members(&self) -> Vec<&str> {
        self.budget
            .iter()
            .flat_map(|s| &s.members)
            .filter(|m| m.state == pacer_budget::MemberState::Live)
            .map(|m| m.member.as_str())
            .collect()
    }
}

/// A `pacer coordinator` child serving one budget (`default/NAME`) from a file in a
/// fresh temporary folder, with the token file the replicas read.
struct Coordinator {
    /// The budget's name (`default/NAME`).
    name: String,
    dir: std::path::PathBuf,
    budgets: std::path::PathBuf,
    token: std::path::PathBuf,
    port: u16,
    process: Pacer,
}

impl Coordinator {
    fn start(folder: &str, name: &str, expected: u32) -> Coordinator {
        let dir = std::env::temp_dir().join(format!("pacer-{folder}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let budgets = dir.join("budgets.yaml");
        write(
            &budgets,
            &format!(
                "budgets:\n  - namespace: default\n    name: {name}\n    messagesPerSecond: {BUDGET}\n    maxInFlight: 6\n    policy: demand\n    leaseSeconds: 2\n    refreshMillis: 200\n    expectedMembers: {expected}\n    token: {TOKEN}\n"
            ),
        );
        let token = dir.join("token");
        write(&token, TOKEN);
        let port = free_port();
        let process = Pacer::spawn(&[
            "coordinator".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--budgets".into(),
            budgets.display().to_string(),
        ]);
        Coordinator {
            name: name.to_string(),
            dir,
            budgets,
            token,
            port,
            process,
        }
    }

    /// The budget as the coordinator sees it (`GET /v1/budgets/default/NAME`).
    async fn snapshot(&self) -> Option<pacer_budget::Snapshot> {
        reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/v1/budgets/default/{}",
                self.port, self.name
            ))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .error_for_status()
            .ok()?
            .json()
            .await
            .ok()
    }

    /// The replicas serving admin endpoints on `admin_ports` and this coordinator's
    /// budget, now.
    async fn view(&self, admin_ports: &[u16]) -> FleetView {
        let mut replicas = Vec::new();
        for port in admin_ports {
            let r = match scrape(*port).await {
                Some(m) => ReplicaView {
                    granted_rate: metric(&m, "pacer_granted_rate"),
                    assigned_partitions: metric(&m, "pacer_assigned_partitions"),
                    buffer_messages: metric(&m, "pacer_buffer_messages"),
                    fallback: metric(&m, "pacer_fallback"),
                },
                None => ReplicaView::default(),
            };
            replicas.push(r);
        }
        FleetView {
            replicas,
            budget: self.snapshot().await,
        }
    }

    /// Polls the fleet (every 100 ms) until `cond` holds; fails after `timeout`,
    /// showing the last view.
    async fn await_view(
        &self,
        what: &str,
        timeout: Duration,
        admin_ports: &[u16],
        cond: impl Fn(&FleetView) -> bool,
    ) -> FleetView {
        let until = Instant::now() + timeout;
        loop {
            let view = self.view(admin_ports).await;
            if cond(&view) {
                return view;
            }
            assert!(
                Instant::now() < until,
                "timed out after {timeout:?} waiting for {what}; last seen: {view:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Arguments of a `pacer run` replica that consumes `topic` in group `g-TOPIC`,
    /// delivers to `sink`, serves its admin endpoints on `admin_addr` and leases from
    /// this coordinator's budget as `member`.
    fn replica_args(
        &self,
        kafka: &Kafka,
        topic: &str,
        sink: &TestSink,
        admin_addr: &str,
        member: &str,
    ) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--bootstrap-servers",
            &kafka.bootstrap,
            "--topic",
            topic,
            "--group-id",
            &format!("g-{topic}"),
            "--sink",
            &sink.url(),
            "--admin-addr",
            admin_addr,
            "--coordinator",
            &format!("http://127.0.0.1:{}", self.port),
            "--budget",
            &format!("default/{}", self.name),
            "--token-file",
            &self.token.display().to_string(),
            "--member",
            member,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (k, v) in fast_group() {
            args.push("--kafka-config".into());
            args.push(format!("{k}={v}"));
        }
        args
    }
}

on_both_brokers!(
    leased_replicas_keep_the_global_budget_through_a_leave_a_budget_reload_and_a_coordinator_crash
);
async fn leased_replicas_keep_the_global_budget_through_a_leave_a_budget_reload_and_a_coordinator_crash(
    kafka: Kafka<'static>,
) {
    kafka.topic("fleet", 6);
    kafka.produce("fleet", 6, 0..3000, 50, |_| None);
    let sink = TestSink::ok().await;

    let coordinator = Coordinator::start("fleet", "fleet", 3);
    let budgets = &coordinator.budgets;

    let admin_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas: Vec<Pacer> = (0..3)
        .map(|i| {
            Pacer::spawn(&coordinator.replica_args(
                &kafka,
                "fleet",
                &sink,
                &format!("127.0.0.1:{}", admin_ports[i]),
                &format!("replica-{i}"),
            ))
        })
        .collect();
    let state = sink.state.clone();
    wait_for("the fleet to deliver", Duration::from_secs(60), || {
        state.delivered_count() >= 100
    })
    .await;
    // Steady state: all three replicas leased, their grants adding up to the budget,
    // and the group's assignment complete; then measure.
    coordinator
        .await_view(
            "three leased replicas sharing the budget and all six partitions",
            Duration::from_secs(20),
            &admin_ports,
            |v| {
                v.live_members().len() == 3
                    && v.all_leased()
                    && v.assigned_all(6)
                    && v.granted_rate()
                        .is_some_and(|r| (r - BUDGET).abs() <= 0.01 * BUDGET)
            },
        )
        .await;
    let from = Instant::now();
    measure_until(from, Duration::from_secs(4)).await;
    let together = rate_between(&sink, from, 4);
    let per_replica: Vec<usize> = {
        let mut by_partition = [0usize; 6];
        for s in sink.state.delivered().iter().filter(|s| s.start >= from) {
            by_partition[s.partition as usize] += 1;
        }
        by_partition.to_vec()
    };
    eprintln!("3 replicas: {together:.1} msg/s (budget {BUDGET}); per partition {per_replica:?}");
    assert!(
        together <= BUDGET * 1.05,
        "three replicas delivered {together:.1} msg/s over a budget of {BUDGET}"
    );
    assert!(
        together >= BUDGET * 0.8,
        "three replicas used only {together:.1} of {BUDGET} msg/s"
    );

    // One replica leaves cleanly: it releases its lease, the others take its share.
    let mut leaving = replicas.remove(0);
    leaving.signal(libc::SIGTERM);
    let code = tokio::task::spawn_blocking(move || leaving.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    // Wait until the leaver's lease is gone from the coordinator, the two remaining
    // replicas' grants add up to the whole budget again, and the group has handed them
    // all six partitions.
    let remaining = &admin_ports[1..];
    let left = Instant::now();
    coordinator
        .await_view(
            "the two remaining replicas to take over the leaver's share and partitions",
            Duration::from_secs(20),
            remaining,
            |v| {
                v.budget
                    .as_ref()
                    .is_some_and(|s| s.members.iter().all(|m| m.member != "replica-0"))
                    && v.live_members().len() == 2
                    && v.all_leased()
                    && v.assigned_all(6)
                    && v.granted_rate()
                        .is_some_and(|r| (r - BUDGET).abs() <= 0.01 * BUDGET)
            },
        )
        .await;
    eprintln!("the remaining replicas took over in {:?}", left.elapsed());
    let from = Instant::now();
    measure_until(from, Duration::from_secs(4)).await;
    let two = rate_between(&sink, from, 4);
    eprintln!("2 replicas: {two:.1} msg/s (budget {BUDGET})");
    assert!(
        two <= BUDGET * 1.05,
        "two replicas delivered {two:.1} msg/s over a budget of {BUDGET}"
    );
    assert!(
        two >= BUDGET * 0.8,
        "the leaver's share was not handed on: {two:.1} of {BUDGET} msg/s"
    );
    // The budget doubles: edit the file, SIGHUP the coordinator. The replicas' leases
    // follow within a few refreshes, without a burst.
    write(
        budgets,
        &std::fs::read_to_string(budgets).unwrap().replace(
            &format!("messagesPerSecond: {BUDGET}"),
            &format!("messagesPerSecond: {}", 2.0 * BUDGET),
        ),
    );
    coordinator.process.signal(libc::SIGHUP);
    let raised = Instant::now();
    coordinator
        .await_view(
            "the raised budget to reach the replicas",
            Duration::from_secs(10),
            remaining,
            |v| {
                v.budget
                    .as_ref()
                    .is_some_and(|s| s.capacity.rate == 2.0 * BUDGET)
                    && v.granted_rate()
                        .is_some_and(|r| (r - 2.0 * BUDGET).abs() <= 0.01 * 2.0 * BUDGET)
            },
        )
        .await;
    let from = Instant::now();
    eprintln!(
        "the raised budget reached the replicas in {:?}",
        from - raised
    );
    measure_until(from, Duration::from_secs(3)).await;
    let doubled = rate_between(&sink, from, 3);
    // Whole 1-s windows from the reload to the end of the measurement: the re-rate
    // happened inside them.
    let covered = (from + Duration::from_secs(3) - raised).as_secs();
    let windows: Vec<usize> = (0..covered)
        .map(|w| {
            let a = raised + Duration::from_secs(w);
            sink.state
                .delivered()
                .iter()
                .filter(|s| s.start >= a && s.start < a + Duration::from_secs(1))
                .count()
        })
        .collect();
    eprintln!(
        "budget raised to {}: {doubled:.1} msg/s; 1-s windows from the reload {windows:?}",
        2.0 * BUDGET
    );
    assert!(
        (doubled - 2.0 * BUDGET).abs() <= 0.1 * 2.0 * BUDGET,
        "after raising the budget to {}: {doubled:.1} msg/s",
        2.0 * BUDGET
    );
    for n in &windows {
        // One permit of burst per replica.
        assert!(
            *n as f64 <= 2.0 * BUDGET + 2.0,
            "a 1-s window had {n} messages at a budget of {}",
            2.0 * BUDGET
        );
    }

    // The coordinator dies: leases run out and the replicas fall back to their fallback
    // share (flagged in /metrics) instead of stopping or overshooting.
    coordinator.process.signal(libc::SIGKILL);
    let died = Instant::now();
    let ports: Vec<u16> = admin_ports[1..].to_vec();
    let mut fallback_seen = false;
    while died.elapsed() < Duration::from_secs(8) && !fallback_seen {
        for port in &ports {
            if let Some(m) = scrape(*port).await {
                fallback_seen |= metric(&m, "pacer_fallback") == Some(1.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fallback_seen,
        "no replica reported running on its fallback share"
    );
    let from = Instant::now();
    measure_until(from, Duration::from_secs(1)).await;
    let on_fallback = rate_between(&sink, from, 1);
    eprintln!("coordinator gone: {on_fallback:.1} msg/s on fallback shares");
    assert!(
        on_fallback > 0.0 && on_fallback <= 2.0 * BUDGET + 2.0,
        "{on_fallback} msg/s on fallback"
    );
    for r in &replicas {
        r.signal(libc::SIGTERM);
    }
    let _ = std::fs::remove_dir_all(&coordinator.dir);
}

on_both_brokers!(an_idle_replica_reports_little_demand_so_the_busy_one_gets_most_of_the_budget);
async fn an_idle_replica_reports_little_demand_so_the_busy_one_gets_most_of_the_budget(
    kafka: Kafka<'static>,
) {
    // Two partitions, two replicas, and a backlog in partition 0 only.
    kafka.topic("skew", 2);
    kafka.produce("skew", 1, 0..2000, 50, |_| None);
    let sink = TestSink::ok().await;
    let coordinator = Coordinator::start("skew", "skew", 2);
    let admin_ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let replicas: Vec<Pacer> = (0..2)
        .map(|i| {
            Pacer::spawn(&coordinator.replica_args(
                &kafka,
                "skew",
                &sink,
                &format!("127.0.0.1:{}", admin_ports[i]),
                &format!("skew-{i}"),
            ))
        })
        .collect();
    let state = sink.state.clone();
    wait_for(
        "the busy replica to deliver",
        Duration::from_secs(60),
        || state.delivered_count() >= 50,
    )
    .await;
    // Demand is reported every second and smoothed: wait until the group is settled
    // (one partition each) and the replica holding the backlog (a non-empty buffer; the
    // idle one's stays empty) has been granted nearly the whole budget.
    let settle = Instant::now();
    coordinator
        .await_view(
            "the busy replica to be granted most of the budget",
            Duration::from_secs(15),
            &admin_ports,
            |v| {
                let busy: Vec<&ReplicaView> = v
                    .replicas
                    .iter()
                    .filter(|r| r.buffer_messages.is_some_and(|n| n > 0.0))
                    .collect();
                v.assigned_all(2)
                    && v.all_leased()
                    && busy.len() == 1
                    && v.replicas.iter().all(|r| r.buffer_messages.is_some())
                    && busy[0].granted_rate.is_some_and(|r| r >= 0.9 * BUDGET)
            },
        )
        .await;
    eprintln!("demand settled in {:?}", settle.elapsed());
    let from = Instant::now();
    measure_until(from, Duration::from_secs(3)).await;
    let busy = rate_between(&sink, from, 3);
    eprintln!("one busy replica of two: {busy:.1} msg/s of {BUDGET}");
    // With an equal split it would get half; with demand it gets nearly all.
    assert!(
        busy >= BUDGET * 0.85,
        "the busy replica got {busy:.1} of {BUDGET} msg/s"
    );
    assert!(
        busy <= BUDGET * 1.05,
        "{busy:.1} msg/s over a budget of {BUDGET}"
    );
    for r in &replicas {
        r.signal(libc::SIGTERM);
    }
    let _ = std::fs::remove_dir_all(&coordinator.dir);
}
