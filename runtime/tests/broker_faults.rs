//! Broker faults, on Apache Kafka itself (the mock cluster cannot be stopped and started
//! again on the same port and data): a replica outlives a broker outage, and a replica
//! started before its broker waits for it.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pacer_tests::apache::ApacheKafka;

async fn readyz(port: u16) -> Option<u16> {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Polls `/readyz` every 50 ms until it answers `status`, failing after `timeout`.
async fn await_readyz(port: u16, status: u16, timeout: Duration) -> Duration {
    let from = Instant::now();
    loop {
        if readyz(port).await == Some(status) {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < timeout,
            "/readyz did not answer {status} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then the exit code must be 0; returns the replica's log (and removes it).
async fn stop_cleanly(p: Pacer, log: &std::path::Path) -> String {
    p.signal(libc::SIGTERM);
    let mut p = p;
    let code = tokio::task::spawn_blocking(move || p.wait(Duration::from_secs(60)))
        .await
        .unwrap();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let _ = std::fs::remove_file(log);
    assert_eq!(code, Some(0), "{text}");
    text
}

const RATE: usize = 200;
const IN_FLIGHT: usize = 8;
/// `auto.commit.interval.ms` of [`fast_group`] plus the 20 ms store interval.
const COMMIT_LAG: Duration = Duration::from_millis(220);
/// How long the test sink takes to answer.
const SINK_DELAY: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_for_ten_seconds_and_restarted_loses_nothing_and_the_replica_rides_it_out()
{
    let mut broker = ApacheKafka::start();
    const N: usize = 5_000;
    {
        let kafka = Kafka::on(&broker);
        kafka.topic("outage", 4);
        kafka.produce("outage", 4, 0..N, 100, |_| None);
    }
    let sink = TestSink::start(Arc::new(|_| Reply {
        delay: SINK_DELAY,
        ..Reply::OK
    }))
    .await;
    let log = tmp("outage");
    let args = run_args(
        &broker.bootstrap,
        "outage",
        "g-outage",
        &sink.url(),
        &[
            "--rate",
            &RATE.to_string(),
            "--max-in-flight",
            &IN_FLIGHT.to_string(),
        ],
    );
    let mut p = spawn_logged(&args, &log);
    let port = admin_port_of(&mut p, &log).await;
    let state = sink.state.clone();
    wait_for("1,000 deliveries", Duration::from_secs(60), || {
        state.delivered_count() >= 1_000
    })
    .await;
    await_readyz(port, 200, Duration::from_secs(10)).await;

    // The outage: a clean broker shutdown, ten seconds without it.
    let stop_called = Instant::now();
    broker.stop();
    let stopped = Instant::now();
    let noticed = await_readyz(port, 503, Duration::from_secs(10)).await;
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(metric(&m, "pacer_brokers_down"), Some(1.0), "{m}");
    measure_until(stopped, Duration::from_secs(10)).await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "the replica exited during the outage"
    );
    let during = sink
        .state
        .delivered()
        .iter()
        .filter(|s| s.start >= stopped + noticed)
        .count();
    broker.restart();
    let back = await_readyz(port, 200, Duration::from_secs(60)).await;
    wait_for("every message delivered", Duration::from_secs(120), || {
        ids(&sink).len() >= N
    })
    .await;
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(metric(&m, "pacer_brokers_down"), Some(0.0), "{m}");
    let text = stop_cleanly(p, &log).await;

    let seen = ids(&sink);
    assert!((0..N).all(|i| seen.contains_key(&i)), "a message was lost");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    // What may come again: what was dispatched after the last commit the broker took.
    // The broker's controlled shutdown takes a second or more (1.2 s here idle), and
    // while it runs the group coordinator has gone but fetched messages still flow
    // until librdkafka reports every broker down; so the window runs from one commit
    // interval (and one sink call) before `stop()` was called to the moment the replica
    // noticed. Every duplicate must have been first delivered in it, and there can be
    // no more duplicates than deliveries in it.
    let all = sink.state.delivered();
    let window_from = stop_called - COMMIT_LAG - SINK_DELAY;
    let window_to = stopped + noticed;
    let mut first: HashMap<usize, Instant> = HashMap::new();
    for s in &all {
        if let Some(id) = s.id {
            let t = first.entry(id).or_insert(s.start);
            *t = (*t).min(s.start);
        }
    }
    let in_window = first
        .values()
        .filter(|t| **t >= window_from && **t <= window_to)
        .count();
    let outside: Vec<usize> = seen
        .iter()
        .filter(|(id, n)| **n > 1 && !(window_from..=window_to).contains(&first[*id]))
        .map(|(id, _)| *id)
        .collect();
    eprintln!(
        "outage of 10 s: stop() took {:.2} s, not ready {noticed:?} after it returned, ready \
         {back:?} after the restart (broker up in {:.1} s), {during} deliveries while it was \
         down, {duplicates} duplicates of the {in_window} first delivered from one commit \
         interval before the stop until the replica noticed",
        (stopped - stop_called).as_secs_f64(),
        broker.started_in.as_secs_f64()
    );
    assert_eq!(
        during, 0,
        "messages were dispatched while no broker answered"
    );
    assert!(
        outside.is_empty(),
        "duplicates first delivered outside the outage window: {outside:?}"
    );
    assert!(
        duplicates <= in_window,
        "{duplicates} duplicates > {in_window} deliveries in the outage window"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_its_broker_reports_it_and_consumes_once_it_answers() {
    let mut broker = ApacheKafka::prepare();
    let sink = TestSink::ok().await;
    let log = tmp("early");
    let args = run_args(
        &broker.bootstrap,
        "early",
        "g-early",
        &sink.url(),
        &["--rate", "500"],
    );
    let mut p = spawn_logged(&args, &log);
    let port = admin_port_of(&mut p, &log).await;
    wait_for(
        "the replica to report the broker down",
        Duration::from_secs(30),
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("No Kafka broker answers")),
    )
    .await;
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(metric(&m, "pacer_brokers_down"), Some(1.0), "{m}");
    assert!(
        metric(&m, "pacer_kafka_errors_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    assert_eq!(readyz(port).await, Some(503));
    broker.restart();
    {
        let kafka = Kafka::on(&broker);
        kafka.topic("early", 2);
        kafka.produce("early", 2, 0..100, 16, |_| None);
    }
    let state = sink.state.clone();
    wait_for("100 deliveries", Duration::from_secs(60), || {
        state.delivered_count() >= 100
    })
    .await;
    await_readyz(port, 200, Duration::from_secs(10)).await;
    let text = stop_cleanly(p, &log).await;
    // librdkafka repeats "connection refused" every reconnect back-off: held back.
    let refused = text
        .lines()
        .filter(|l| l.contains("Connection refused"))
        .count();
    eprintln!("connection-refused lines in the log: {refused}");
    assert!(refused <= 4, "{refused} connection-refused lines:\n{text}");
}
