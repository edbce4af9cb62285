//! Live re-rating from a lease change, measured at the sink (its own test binary so it
//! does not share the CPU with the rate-accuracy test).

mod common;

use std::time::{Duration, Instant};

use common::*;
use pacer_runtime::allowance::{Allowance, AllowanceOrigin};
use pacer_runtime::config::{Budget, SinkSpec};

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
    c.budget = Budget::Standalone {
        rate: 100.0,
        in_flight: 16,
    };
    let granted = |rate: f64| Allowance {
        rate,
        in_flight: 16,
        origin: AllowanceOrigin::Granted,
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
    // Upper bounds hold always: rate x 2 s + the burst, + 20 ms of delivery jitter at
    // the sink (a permit taken just before the window may arrive inside it): 6 at 300/s,
    // 1 at 50/s. Lower bounds only tell "followed the change at
    // once" from "did not" (it would stay at 100/s, 200 in 2 s; at 300, 600 in 2 s):
    // 0.9 x, since the debug build on a busy 2-core machine stalls now and then (a cold
    // CI run saw 581 of 600 on Apache Kafka). Accuracy at a fixed rate is rate.rs's
    // test, against the same run's unthrottled reference.
    let up_count = in_range(up, Duration::from_secs(2));
    eprintln!("after raising to 300/s: {up_count} in 2 s");
    assert!(
        up_count <= 2 * 300 + 1 + 6,
        "after raising to 300/s: {up_count} in 2 s, above rate + burst"
    );
    assert!(
        up_count >= 540,
        "after raising to 300/s: only {up_count} in 2 s (not re-rated?)"
    );
    let down_first = in_range(down, Duration::from_secs(1));
    assert!(
        down_first <= 52,
        "{down_first} messages in the first second at 50/s"
    );
    let down_count = in_range(down, Duration::from_secs(2));
    eprintln!("after lowering to 50/s: {down_count} in 2 s");
    assert!(
        down_count <= 2 * 50 + 1 + 1,
        "after lowering to 50/s: {down_count} in 2 s, above rate + burst"
    );
    assert!(
        down_count >= 90,
        "after lowering to 50/s: only {down_count} in 2 s"
    );
}
