//! A fleet: `pacer coordinator` and three `pacer run` replicas as child processes sharing
//! one leased budget (the harness is `pacer_tests::fleet`). The sink must see the global
//! budget, not three times it; a replica leaving cleanly hands its share to the others; a
//! budget reload (SIGHUP) re-rates the fleet without a burst; a dead coordinator leaves
//! the replicas on their fallback share.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pacer_tests::fleet::{BudgetSpec, Coordinator, Fleet, ReplicaView};

const BUDGET: f64 = 60.0;

/// Deliveries per second over `[from, from + secs)`.
fn rate_between(sink: &TestSink, from: Instant, secs: u64) -> f64 {
    let to = from + Duration::from_secs(secs);
    count_between(&sink.starts(), from, to) as f64 / secs as f64
}

/// The test budget: 60 msg/s, 6 in flight, `demand`, 2 s leases refreshed every 200 ms.
fn spec(name: &str, expected: u32) -> BudgetSpec {
    BudgetSpec {
        expected_members: expected,
        ..BudgetSpec::new(name, BUDGET, 6)
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

    let coordinator = Coordinator::start("fleet", spec("fleet", 3)).await;
    let mut fleet = Fleet::new(&kafka, "fleet", &sink.url(), coordinator);
    fleet.add(3).await;
    let state = sink.state.clone();
    wait_for("the fleet to deliver", Duration::from_secs(60), || {
        state.delivered_count() >= 100
    })
    .await;
    // Steady state: all three replicas leased, their grants adding up to the budget,
    // and the group's assignment complete; then measure.
    fleet
        .await_view(
            "three leased replicas sharing the budget and all six partitions",
            Duration::from_secs(20),
            |v| v.settled_at(BUDGET) && v.assigned_all(6),
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
    assert_eq!(fleet.stop(0).await, Some(0));
    // Wait until the leaver's lease is gone from the coordinator, the two remaining
    // replicas' grants add up to the whole budget again, and the group has handed them
    // all six partitions.
    let left = Instant::now();
    fleet
        .await_view(
            "the two remaining replicas to take over the leaver's share and partitions",
            Duration::from_secs(20),
            |v| {
                v.budget
                    .as_ref()
                    .is_some_and(|s| s.members.iter().all(|m| m.member != "r0"))
                    && v.settled_at(BUDGET)
                    && v.assigned_all(6)
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
    let raised = Instant::now();
    fleet.coordinator.reload(|b| b.rate = 2.0 * BUDGET).await;
    fleet
        .await_view(
            "the raised budget to reach the replicas",
            Duration::from_secs(10),
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
    let starts = sink.starts();
    let windows: Vec<usize> = (0..covered)
        .map(|w| {
            let a = raised + Duration::from_secs(w);
            count_between(&starts, a, a + Duration::from_secs(1))
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
    fleet.coordinator.kill().await;
    let died = Instant::now();
    let ports: Vec<u16> = fleet.replicas.iter().map(|r| r.admin_port).collect();
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
}

on_both_brokers!(an_idle_replica_reports_little_demand_so_the_busy_one_gets_most_of_the_budget);
async fn an_idle_replica_reports_little_demand_so_the_busy_one_gets_most_of_the_budget(
    kafka: Kafka<'static>,
) {
    // Two partitions, two replicas, and a backlog in partition 0 only.
    kafka.topic("skew", 2);
    kafka.produce("skew", 1, 0..2000, 50, |_| None);
    let sink = TestSink::ok().await;
    let coordinator = Coordinator::start("skew", spec("skew", 2)).await;
    let mut fleet = Fleet::new(&kafka, "skew", &sink.url(), coordinator);
    fleet.add(2).await;
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
    fleet
        .await_view(
            "the busy replica to be granted most of the budget",
            Duration::from_secs(15),
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
}
