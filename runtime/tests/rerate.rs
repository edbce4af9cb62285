//! Live re-rating from a lease change, measured at the sink (its own test binary so it
//! does not share the CPU with the rate-accuracy test).

mod common;

use std::time::{Duration, Instant};

use common::*;
use pacer_runtime::config::{BudgetSource, SinkSpec};
use pacer_runtime::lease::{Allowance, AllowanceSource};

fn starts(sink: &TestSink) -> Vec<Instant> {
    let mut v: Vec<Instant> = sink.state.delivered().iter().map(|s| s.start).collect();
    v.sort();
    v
}

on_both_brokers!(a_lease_change_re_rates_at_once_and_releases_no_burst);
async fn a_lease_change_re_rates_at_once_and_releases_no_burst(kafka: Kafka<'static>) {
    kafka.topic("rerate", 4);
    kafka.produce("rerate", 4, 0..3000, 50, |_| None);
    let sink = TestSink::ok().await;
    let mut c = config(
        &kafka.bootstrap,
        "rerate",
        "g-rerate",
        SinkSpec::Http(sink.url()),
    );
    c.burst = 1;
    c.budget = BudgetSource::Standalone {
        rate: 100.0,
        in_flight: 16,
    };
    let granted = |rate: f64| Allowance {
        rate,
        in_flight: 16,
        source: AllowanceSource::Granted,
    };
    let r = InProcess::start_with(c, granted(100.0)).await;
    let state = sink.state.clone();
    wait_for("the first delivery", Duration::from_secs(20), || {
        state.delivered_count() > 0
    })
    .await;
    // Let a second pass at 100/s (the bucket is empty), then idle the limiter's view by
    // raising the rate: the re-rate must not hand out the time since the last permit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let up = Instant::now();
    r.allowance.send(granted(300.0)).unwrap();
    measure_until(up, Duration::from_millis(2100)).await;
    let down = Instant::now();
    r.allowance.send(granted(50.0)).unwrap();
    measure_until(down, Duration::from_millis(2100)).await;
    r.stop().await;
    let s = starts(&sink);
    let in_range = |a: Instant, b: Duration| s.iter().filter(|t| **t >= a && **t < a + b).count();
    let first_100ms = in_range(up, Duration::from_millis(100));
    assert!(
        first_100ms <= 32,
        "{first_100ms} messages in the 100 ms after raising to 300/s: a burst"
    );
    let up_rate = in_range(up, Duration::from_secs(2)) as f64 / 2.0;
    assert!(
        (up_rate - 300.0).abs() <= 9.0,
        "after raising to 300/s: {up_rate}/s"
    );
    let down_first = in_range(down, Duration::from_secs(1));
    assert!(
        down_first <= 52,
        "{down_first} messages in the first second at 50/s"
    );
    let down_rate = in_range(down, Duration::from_secs(2)) as f64 / 2.0;
    assert!(
        (down_rate - 50.0).abs() <= 2.0,
        "after lowering to 50/s: {down_rate}/s"
    );
}
