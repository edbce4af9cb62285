//! Rate accuracy measured at the sink. Timing-sensitive, so the three rates run
//! sequentially inside one test, alone in this binary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pacer_runtime::config::{BudgetSource, SinkSpec};

/// Start times of delivered requests, sorted.
fn starts(sink: &TestSink) -> Vec<Instant> {
    let mut v: Vec<Instant> = sink.state.delivered().iter().map(|s| s.start).collect();
    v.sort();
    v
}

/// Counts per consecutive 1-second window starting at `from`.
fn windows(starts: &[Instant], from: Instant, n: usize) -> Vec<usize> {
    (0..n)
        .map(|w| {
            let a = from + Duration::from_secs(w as u64);
            let b = a + Duration::from_secs(1);
            starts.iter().filter(|t| **t >= a && **t < b).count()
        })
        .collect()
}

on_both_brokers!(
    the_sink_sees_the_standalone_rate_within_three_percent_and_no_window_above_rate_plus_burst
);
async fn the_sink_sees_the_standalone_rate_within_three_percent_and_no_window_above_rate_plus_burst(
    kafka: Kafka<'static>,
) {
    for (rate, burst) in [(50u32, 1u32), (500, 5), (5000, 50)] {
        let topic = format!("rate-{rate}");
        kafka.topic(&topic, 8);
        // A backlog for well over the 5 s measured.
        kafka.produce(&topic, 8, 0..(rate as usize * 7), 100, |_| None);
        let sink = TestSink::ok().await;
        let mut c = config(
            &kafka.bootstrap,
            &topic,
            &format!("g-{topic}"),
            SinkSpec::Http(sink.url()),
        );
        c.budget = BudgetSource::Standalone {
            rate: f64::from(rate),
            in_flight: 64,
        };
        c.burst = burst;
        let r = InProcess::start(c).await;
        let state = sink.state.clone();
        wait_for("the first delivery", Duration::from_secs(20), || {
            state.delivered_count() > 0
        })
        .await;
        let t0 = starts(&sink)[0];
        // Windows start half a second after the first arrival: the first requests open
        // the pool's connections, which delays their arrival by a few milliseconds and
        // makes the sink see the start of the run compressed (at 5,000/s, 15 ms of
        // connection set-up put 30 extra messages into a window anchored at t0).
        let from = t0 + Duration::from_millis(500);
        measure_until(t0, Duration::from_millis(5600)).await;
        r.stop().await;
        let s = starts(&sink);
        let counts = windows(&s, from, 5);
        let total: usize = counts.iter().sum();
        let observed = total as f64 / 5.0;
        let error = (observed - f64::from(rate)).abs() / f64::from(rate);
        eprintln!("rate {rate}/s burst {burst}: observed {observed:.1}/s ({:.2}% off), windows {counts:?}", error * 100.0);
        assert!(
            error <= 0.03,
            "rate {rate}: observed {observed:.1} msg/s, windows {counts:?}"
        );
        for (i, n) in counts.iter().enumerate() {
            assert!(
                *n as u32 <= rate + burst,
                "rate {rate}: window {i} had {n} > {rate} + {burst}"
            );
        }
    }
}
