//! The replica's limits under load that would tempt it past them: retries count against
//! the rate budget, and the buffer holds no more bytes than `buffer_bytes` allows while
//! the sink is stalled.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pacer_runtime::config::{Budget, SinkSpec};

on_both_brokers!(
    retries_take_a_rate_permit_so_first_attempts_and_retries_together_stay_within_the_rate
);
async fn retries_take_a_rate_permit_so_first_attempts_and_retries_together_stay_within_the_rate(
    kafka: Kafka<'static>,
) {
    const RATE: u32 = 20;
    const BURST: u32 = 1;
    // 50 messages, two requests each: 100 requests, 5 s at the rate.
    const N: usize = 50;
    const WINDOWS: usize = 4;
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
    c.budget = Budget::Standalone {
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
    let m = r.handle.status.metrics().clone();
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

on_both_brokers!(a_stalled_sink_never_lets_the_buffer_hold_more_bytes_than_buffer_bytes);
async fn a_stalled_sink_never_lets_the_buffer_hold_more_bytes_than_buffer_bytes(
    kafka: Kafka<'static>,
) {
    const MSG: usize = 64 * 1024;
    const BOUND: usize = 512 * 1024;
    const N: usize = 40;
    kafka.topic("bytes", 2);
    // Values only (no key, no headers), so each message is exactly MSG bytes.
    kafka.produce("bytes", 2, 0..N, MSG, |_| None);
    let sink = TestSink::ok().await;
    sink.state.stalled.store(true, Ordering::SeqCst);
    let mut c = config(
        &kafka.bootstrap,
        "bytes",
        "g-bytes",
        SinkSpec::Http(sink.url()),
    );
    c.budget = Budget::Standalone {
        rate: f64::INFINITY,
        in_flight: 1,
    };
    c.buffer_messages = 1000;
    c.buffer_bytes = BOUND;
    // Longer than the stall: the held request must not time out and be retried.
    c.timeout = Duration::from_secs(60);
    let r = InProcess::start(c).await;
    let m = r.handle.status.metrics().clone();
    let state = sink.state.clone();
    // Sample the gauges every 5 ms from the start until 2 s after the sink holds a
    // request and the buffer has something in it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut filling_since: Option<Instant> = None;
    let (mut max_bytes, mut max_messages, mut samples) = (0i64, 0i64, 0u32);
    while filling_since.is_none_or(|t| t.elapsed() < Duration::from_secs(2)) {
        assert!(
            Instant::now() < deadline,
            "the stalled sink got no request, or the buffer stayed empty, for 30 s"
        );
        let bytes = m.buffer_bytes.get();
        max_bytes = max_bytes.max(bytes);
        max_messages = max_messages.max(m.buffer_messages.get());
        samples += 1;
        if filling_since.is_none() && bytes > 0 && state.current.load(Ordering::SeqCst) == 1 {
            filling_since = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let consumed = m.consumed.get() as usize;
    let (buffered, in_flight) = (m.buffer_bytes.get() as usize, m.in_flight.get() as usize);
    eprintln!(
        "stalled, buffer_bytes {BOUND}: max {max_bytes} bytes / {max_messages} messages buffered over {samples} samples; at the end {buffered} bytes buffered, {in_flight} in flight, {consumed} of {N} fetched"
    );
    // The rule (consumer.rs, `PollLoop::poll_batch`): a poll batch ends once its bytes reach the room left, so
    // the buffer goes over the bound by less than one message (with messages of
    // exactly BOUND / 8 bytes: never over it).
    assert!(
        (max_bytes as usize) < BOUND + MSG,
        "the buffer held {max_bytes} bytes ({max_messages} messages of {MSG}); the bound is {BOUND} plus less than one message"
    );
    // The same without sampling: nothing was delivered, so every fetched message is
    // buffered or held by the sink.
    assert_eq!(in_flight, 1);
    assert_eq!(
        consumed * MSG,
        buffered + in_flight * MSG,
        "fetched = buffered + held"
    );
    assert!(
        consumed * MSG < BOUND + MSG + in_flight * MSG,
        "{consumed} messages of {MSG} fetched for a buffer of {BOUND} and {in_flight} in flight"
    );
    // Fetching stopped at the byte bound, not at the end of the topic: after the buffer
    // was full it takes messages again only below three quarters of the bound.
    assert!(consumed < N, "all {N} messages were fetched");
    assert!(
        buffered > BOUND / 4 * 3,
        "fetching stopped with only {buffered} of {BOUND} bytes buffered"
    );

    sink.state.stalled.store(false, Ordering::SeqCst);
    wait_for(
        &format!("{N} deliveries after the stall"),
        Duration::from_secs(30),
        || state.delivered_count() >= N,
    )
    .await;
    r.stop().await;
    let delivered = sink.state.delivered();
    let ids: HashSet<usize> = delivered.iter().filter_map(|s| s.id).collect();
    assert_eq!(ids, (0..N).collect::<HashSet<_>>());
    assert!(delivered.iter().all(|s| s.body_len == MSG));
}
