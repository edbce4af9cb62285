//! The replica's limits under load that would tempt it past them: retries count against
//! the rate budget, and the buffer holds no more bytes than `buffer_bytes` allows while
//! the sink is stalled.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pacer_runtime::config::{BudgetSource, SinkSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_take_a_rate_permit_so_first_attempts_and_retries_together_stay_within_the_rate() {
    const RATE: u32 = 20;
    const BURST: u32 = 1;
    // 50 messages, two requests each: 100 requests, 5 s at the rate.
    const N: usize = 50;
    const WINDOWS: usize = 4;
    let kafka = Kafka::new();
    kafka.topic("retry-rate", 2);
    kafka.produce("retry-rate", 2, 0..N, 20, |_| None);
    // The first request for each offset fails; the second succeeds.
    let sink = TestSink::start(Arc::new(|s| Reply {
        status: if s.attempt == 1 { 500 } else { 200 },
        ..Reply::OK
    }))
    .await;
    let mut c = config(
        &kafka.bootstrap,
        "retry-rate",
        "g-retry-rate",
        SinkSpec::Http(sink.url()),
    );
    c.budget = BudgetSource::Standalone {
        rate: f64::from(RATE),
        in_flight: 16,
    };
    c.burst = BURST;
    // Retries become due 5-10 ms after the failure: without a permit they would go
    // at once, doubling the request rate.
    c.retry.initial_delay = Duration::from_millis(10);
    let r = InProcess::start(c).await;
    let state = sink.state.clone();
    wait_for(&format!("{N} deliveries"), Duration::from_secs(30), || {
        state.delivered_count() >= N
    })
    .await;
    // The sink records a request before the replica has read the answer: wait for the
    // last acks to be counted.
    let m = r.handle.shared.metrics.clone();
    let acked = || metric(&m.encode(), "pacer_messages_total{outcome=\"acked\"}");
    wait_for(&format!("{N} acks"), Duration::from_secs(10), || {
        acked() >= Some(N as f64)
    })
    .await;
    r.stop().await;
    let metrics = m.encode();

    let seen = sink.state.seen.lock().unwrap().clone();
    let mut starts: Vec<Instant> = seen.iter().map(|s| s.start).collect();
    starts.sort();
    let t0 = starts[0];
    let counts: Vec<usize> = (0..WINDOWS)
        .map(|w| {
            let a = t0 + Duration::from_secs(w as u64);
            let b = a + Duration::from_secs(1);
            starts.iter().filter(|t| **t >= a && **t < b).count()
        })
        .collect();
    let total: usize = counts.iter().sum();
    let span = starts[starts.len() - 1].duration_since(t0);
    eprintln!(
        "rate {RATE}/s burst {BURST}: {} requests in {span:?}; 1-s windows from the first {counts:?} ({:.1} req/s over {WINDOWS} s)",
        seen.len(),
        total as f64 / WINDOWS as f64
    );
    for (i, n) in counts.iter().enumerate() {
        assert!(
            *n as u32 <= RATE + BURST,
            "window {i} had {n} requests (first attempts and retries) > {RATE} + {BURST}: {counts:?}"
        );
    }
    assert!(
        total as u32 <= WINDOWS as u32 * RATE + BURST,
        "{total} requests in {WINDOWS} s at {RATE}/s: {counts:?}"
    );
    // The sink was busy all along (a slow run would pass the bounds above trivially).
    assert!(
        total as f64 >= 0.9 * (WINDOWS as u32 * RATE) as f64,
        "only {total} requests in {WINDOWS} s at {RATE}/s: {counts:?}"
    );

    // Every message: one 500, then one 200; acked exactly once.
    assert_eq!(seen.len(), 2 * N, "requests");
    let mut by_offset: HashMap<(i32, i64), Vec<u16>> = HashMap::new();
    for s in &seen {
        by_offset
            .entry((s.partition, s.offset))
            .or_default()
            .push(s.status);
    }
    assert_eq!(by_offset.len(), N);
    for (at, statuses) in &by_offset {
        assert_eq!(statuses, &[500, 200], "requests for {at:?}");
    }
    let ids: HashSet<usize> = sink.state.delivered().iter().filter_map(|s| s.id).collect();
    assert_eq!(ids, (0..N).collect::<HashSet<_>>());
    assert_eq!(
        metric(&metrics, "pacer_messages_total{outcome=\"acked\"}"),
        Some(N as f64),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "pacer_retries_total{reason=\"failure\"}"),
        Some(N as f64),
        "{metrics}"
    );
}
