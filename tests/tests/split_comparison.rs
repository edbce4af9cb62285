//! Pacer's ledger side by side with the peers' ways of splitting one budget, in the
//! deterministic fleet simulation (`pacer_tests::sim`): the properties the comparison in
//! BENCHMARKS.md rests on. Each bound is a number the simulation could miss.

use pacer_tests::sim::{
    compare, metrics, run, scenarios, Event, Metrics, Params, Row, Strategy, TOLERANCE,
};
use std::sync::OnceLock;

/// Every scenario under every strategy, computed once for all tests.
fn rows() -> &'static [Row] {
    static ROWS: OnceLock<Vec<Row>> = OnceLock::new();
    ROWS.get_or_init(|| compare(&Params::default()))
}

fn row(scenario_starts: &str, strategy: Strategy) -> &'static Metrics {
    &rows()
        .iter()
        .find(|r| r.scenario.starts_with(scenario_starts) && r.strategy == strategy)
        .unwrap_or_else(|| panic!("no row for {scenario_starts:?} / {strategy:?}"))
        .metrics
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

#[test]
fn pacer_never_uses_more_than_the_budget_in_any_one_second_window_of_any_scenario() {
    let mut checked = 0;
    for r in rows().iter().filter(|r| r.strategy.is_pacer()) {
        let m = &r.metrics;
        assert!(
            m.worst_window <= 1.0 + TOLERANCE,
            "{} / {:?}: worst 1 s window {:.4} x budget",
            r.scenario,
            r.strategy,
            m.worst_window
        );
        // Only a budget decrease needs the one-refresh allowance; everywhere else the
        // budget holds at every instant.
        let decreases = scenarios()
            .iter()
            .find(|s| s.name == r.scenario)
            .is_some_and(|s| s.events.iter().any(|(_, e)| matches!(e, Event::Budget(_))));
        if !decreases {
            assert!(
                m.worst_window_strict <= 1.0 + TOLERANCE,
                "{} / {:?}: worst 1 s window {:.4} x budget without allowance",
                r.scenario,
                r.strategy,
                m.worst_window_strict
            );
        }
        checked += 1;
    }
    // Five scenarios, lost responses and a crash without a fallback window, two
    // policies each.
    assert_eq!(checked, 14);
}

#[test]
fn a_budget_decrease_overshoots_only_until_every_replica_has_refreshed() {
    for strategy in [Strategy::PacerEqual, Strategy::PacerDemand] {
        let m = row("budget", strategy);
        // Within a refresh the replicas still hold 200 msg/s of a budget now 50: the
        // strict window shows it, the one-refresh allowance covers all of it, and the
        // fleet is back inside the new budget within two refresh intervals.
        assert!(
            m.worst_window_strict > 1.0,
            "{strategy:?}: {}",
            m.worst_window_strict
        );
        let p = Params::default();
        let two_refreshes = 2.0 * 1.1 * secs(p.refresh_ms);
        for (i, r) in m.reconverge_s.iter().enumerate() {
            let r = r.unwrap_or_else(|| panic!("{strategy:?}: event {i} never re-converged"));
            assert!(r <= two_refreshes, "{strategy:?}: event {i}: {r} s");
        }
    }
}

#[test]
fn per_process_limits_multiply_the_budget_by_the_number_of_replicas() {
    for (scenario, replicas) in [
        ("scale up", 4.0),
        ("scale down", 4.0),
        ("crash", 4.0),
        ("skew", 4.0),
        ("budget", 4.0),
    ] {
        let m = row(scenario, Strategy::PerProcess);
        assert!(
            (m.worst_window - replicas).abs() < 0.01,
            "{scenario}: worst window {} x budget, expected {replicas}",
            m.worst_window
        );
    }
    // With 4 replicas for the whole run the mean is 4 x as well (bar the first second).
    let m = row("budget", Strategy::PerProcess);
    assert!(m.mean_used.expect("backlog") > 3.95, "{:?}", m.mean_used);
    // After the scale-down only 2 replicas remain: 2 x.
    let m = row("scale down", Strategy::PerProcess);
    let after = m.phase_means[1].expect("backlog");
    assert!((after - 2.0).abs() < 0.01, "{after}");
}

#[test]
fn the_even_split_leaves_a_crashed_members_share_unused_until_its_stale_ttl_runs_out() {
    let p = Params::default();
    let m = row("crash", Strategy::EvenSplit);
    let ttl = secs(p.stale_member_ttl_ms);
    let reclaim = m.reclaim_s.expect("a crash").expect("reclaimed at the TTL");
    assert!(
        (ttl - 1.0..=ttl + 1.0).contains(&reclaim),
        "share reused after {reclaim} s, TTL {ttl} s"
    );
    let reconverge = m.reconverge_s[0].expect("re-converges at the TTL");
    assert!(reconverge >= ttl - 1.0, "{reconverge}");

    // During the TTL the 3 survivors run at budget / 4 each: 0.75 x budget.
    let s = scenarios()
        .into_iter()
        .find(|s| s.name.starts_with("crash"))
        .expect("crash scenario");
    let trace = run(&s, Strategy::EvenSplit, &p);
    let crash_step = (s.events[0].0 / 10) as usize;
    let ttl_steps = (p.stale_member_ttl_ms / 10) as usize;
    for i in crash_step + 1..crash_step + ttl_steps - 100 {
        let ratio = trace.aggregate(i) / trace.budget[i];
        assert!(
            (ratio - 0.75).abs() < 0.01,
            "step {i}: {ratio} x budget during the TTL"
        );
    }
}

#[test]
fn pacer_demand_uses_the_budget_under_skew_while_equal_leaves_the_idle_half_unused() {
    let demand = row("skew", Strategy::PacerDemand);
    let equal = row("skew", Strategy::PacerEqual);
    // The phase after half the partitions went idle, including the seconds it takes
    // the idle replicas' reported demand to decay (the runtime's EWMA).
    let d = demand.phase_means[1].expect("backlog");
    let e = equal.phase_means[1].expect("backlog");
    assert!(d >= 0.95, "demand policy used {d} x budget under skew");
    assert!(e <= 0.55, "equal policy used {e} x budget under skew");
    assert!(d - e >= 0.3, "demand {d} vs equal {e}");
    assert!(
        demand.reconverge_s[0].is_some_and(|s| s <= 15.0),
        "{:?}",
        demand.reconverge_s
    );
    assert_eq!(equal.reconverge_s, vec![None]);
}

#[test]
fn pacer_demand_reclaims_a_crashed_share_once_its_lease_and_fallback_window_ran_out() {
    let p = Params::default();
    let m = row("crash", Strategy::PacerDemand);
    let reclaim = m.reclaim_s.expect("a crash").expect("reclaimed");
    // The killed replica's last refresh was at most one jittered interval before the
    // kill; the survivors ask again within one interval after its charge ends.
    let window = secs(p.lease_ms + p.fallback_ms);
    let interval = 1.1 * secs(p.refresh_ms);
    assert!(
        reclaim <= window + interval,
        "reclaimed after {reclaim} s, lease + fallback {window} s"
    );
    // ...and not before: until then the replica may still be running at its fallback
    // (a network partition looks the same), and reusing its share would overshoot.
    assert!(
        reclaim >= window - interval,
        "reclaimed after {reclaim} s, before lease + fallback {window} s"
    );
    // `equal` divides by the desired replicas (still 4): the share stays unused.
    assert_eq!(
        row("crash", Strategy::PacerEqual).reclaim_s,
        Some(None),
        "equal reuses the share only when a replacement pod joins"
    );
}

#[test]
fn with_fallback_seconds_0_pacer_demand_reclaims_a_crashed_share_one_lease_after_it_fell_silent() {
    let p = Params::default();
    let m = row(
        "crash 1 of 4 (SIGKILL), fallbackSeconds 0",
        Strategy::PacerDemand,
    );
    let reclaim = m.reclaim_s.expect("a crash").expect("reclaimed");
    let lease = secs(p.lease_ms);
    let interval = 1.1 * secs(p.refresh_ms);
    assert!(
        (lease - interval..=lease + interval).contains(&reclaim),
        "reclaimed after {reclaim} s, lease {lease} s"
    );
    let default = row("crash 1 of 4 (SIGKILL)", Strategy::PacerDemand)
        .reclaim_s
        .flatten()
        .expect("reclaimed");
    assert!(
        reclaim + secs(p.fallback_ms) - interval <= default,
        "{reclaim} s without the window vs {default} s with it"
    );
}

#[test]
fn the_partition_split_wastes_idle_partitions_and_waits_for_the_kafka_session_timeout() {
    let p = Params::default();
    let skew = row("skew", Strategy::PartitionSplit);
    let after = skew.phase_means[1].expect("backlog");
    assert!((after - 0.5).abs() < 0.01, "{after}");
    let crash = row("crash", Strategy::PartitionSplit);
    let reclaim = crash
        .reclaim_s
        .expect("a crash")
        .expect("after the rebalance");
    let timeout = secs(p.session_timeout_ms);
    assert!((reclaim - timeout).abs() <= 0.1, "{reclaim} vs {timeout}");
}

#[test]
fn the_simulation_is_deterministic() {
    let p = Params::default();
    let s = &scenarios()[5];
    assert!(
        s.lost_responses > 0.0,
        "the lossy scenario uses the generator most"
    );
    let a = metrics(&run(s, Strategy::PacerDemand, &p), s, &p);
    let b = metrics(&run(s, Strategy::PacerDemand, &p), s, &p);
    assert_eq!(a, b);
    // The table is a pure function of these rows.
    let again: Vec<Metrics> = compare(&p).into_iter().map(|r| r.metrics).collect();
    let first: Vec<Metrics> = rows().iter().map(|r| r.metrics.clone()).collect();
    assert_eq!(first, again);
}
