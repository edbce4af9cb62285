//! Rebalances: replicas join and leave a group mid-stream while one message keeps
//! failing. Nothing may be lost and no offset may be committed past the failing message.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pacer_runtime::config::{Budget, GroupProtocol, SinkSpec};

on_both_brokers!(
    replicas_joining_and_leaving_lose_nothing_and_never_commit_past_an_unfinished_message
);
async fn replicas_joining_and_leaving_lose_nothing_and_never_commit_past_an_unfinished_message(
    kafka: Kafka<'static>,
) {
    rebalance(kafka, GroupProtocol::Classic).await;
}

on_both_brokers!(with_the_consumer_group_protocol_replicas_joining_and_leaving_lose_nothing);
/// The same scenario under KIP-848 (`group.protocol=consumer`).
async fn with_the_consumer_group_protocol_replicas_joining_and_leaving_lose_nothing(
    kafka: Kafka<'static>,
) {
    rebalance(kafka, GroupProtocol::Consumer).await;
}

async fn rebalance(kafka: Kafka<'static>, protocol: GroupProtocol) {
    let (topic, group) = match protocol {
        GroupProtocol::Classic => ("reb", "g-reb"),
        GroupProtocol::Consumer => ("reb-848", "g-reb-848"),
    };
    kafka.topic(topic, 6);
    const N: usize = 4_800;
    const STUCK: usize = 1_000;
    kafka.produce(topic, 6, 0..N, 100, |_| None);
    // Message STUCK fails (500, no dead-letter topic: retried forever) until released.
    let release = Arc::new(AtomicBool::new(false));
    let rel = release.clone();
    let sink = TestSink::start(Arc::new(move |s| Reply {
        status: if s.id == Some(STUCK) && !rel.load(Ordering::SeqCst) {
            500
        } else {
            200
        },
        ..Reply::OK
    }))
    .await;
    let cfg = || {
        let mut c = with_protocol(
            config(&kafka.bootstrap, topic, group, SinkSpec::Http(sink.url())),
            protocol,
        );
        c.budget = Budget::Standalone {
            rate: 400.0,
            in_flight: 8,
        };
        c.retry.max_delay = Duration::from_millis(200);
        c.shutdown_grace = Duration::from_secs(2);
        c
    };
    let delivered_ids = |sink: &TestSink| -> HashSet<usize> {
        sink.state.delivered().iter().filter_map(|s| s.id).collect()
    };

    let a = InProcess::start(cfg()).await;
    let b = InProcess::start(cfg()).await;
    let state = sink.state.clone();
    wait_for(
        "1,200 deliveries by two replicas",
        Duration::from_secs(60),
        || state.delivered_count() >= 1_200,
    )
    .await;
    let c = InProcess::start(cfg()).await;
    wait_for(
        "2,400 deliveries after the third joined",
        Duration::from_secs(60),
        || state.delivered_count() >= 2_400,
    )
    .await;
    a.stop().await;
    let mut last_report = std::time::Instant::now();
    wait_for(
        "every message but the stuck one",
        Duration::from_secs(90),
        || {
            let ids = delivered_ids(&sink);
            if last_report.elapsed() > Duration::from_secs(5) {
                last_report = std::time::Instant::now();
                let mut missing = [0usize; 6];
                for i in (0..N).filter(|i| !ids.contains(i)) {
                    missing[i % 6] += 1;
                }
                eprintln!("{protocol}: not yet delivered, per partition: {missing:?}");
                for (name, r) in [("b", &b), ("c", &c)] {
                    eprintln!("  replica {name}: {}", r.handle.status.describe());
                }
            }
            ids.len() >= N - 1
        },
    )
    .await;
    let ids = delivered_ids(&sink);
    assert!(!ids.contains(&STUCK));
    assert!(
        (0..N).filter(|i| *i != STUCK).all(|i| ids.contains(&i)),
        "a message was lost"
    );
    // Stop everyone cleanly while STUCK is still failing; whatever they commit must not
    // pass it, so a fresh replica of the group gets it again.
    b.stop().await;
    c.stop().await;
    release.store(true, Ordering::SeqCst);
    let fresh_sink = TestSink::ok().await;
    let mut fc = cfg();
    fc.sink = SinkSpec::Http(fresh_sink.url());
    let fresh = InProcess::start(fc).await;
    let fs = fresh_sink.state.clone();
    wait_for(
        "the stuck message delivered by a fresh replica",
        Duration::from_secs(60),
        || fs.delivered().iter().any(|s| s.id == Some(STUCK)),
    )
    .await;
    fresh.stop().await;
    // Only the stuck message's partition resumes at it; every other partition was
    // committed to its end.
    let redelivered: HashSet<usize> = fresh_sink
        .state
        .delivered()
        .iter()
        .filter_map(|s| s.id)
        .collect();
    eprintln!(
        "{protocol}: the fresh replica got {} messages, all of the stuck message's partition: {}",
        redelivered.len(),
        redelivered.iter().all(|i| i % 6 == STUCK % 6)
    );
    assert!(
        redelivered.iter().all(|i| i % 6 == STUCK % 6),
        "other partitions were re-delivered: {redelivered:?}"
    );
}
