//! Rate accuracy measured at the sink. Timing-sensitive: the three rates run
//! sequentially inside one test, and the binary is in nextest's serial `timing` group.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pacer_runtime::config::{Budget, SinkSpec};

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

/// The sink records arrivals, each later than its rate permit by a delay that varies a
/// little (scheduling, the HTTP client): a fixed 1-second window can hold the permits
/// of 1 s plus that variation, so at 5,000 msg/s 2 ms of variation put 5,058 arrivals in
/// a window whose permits numbered at most 5,050 (a CI run did). The strict bound is
/// checked on windows `SLACK` shorter than a second, starting at every arrival: they
/// hold at most `rate + burst` arrivals while the delay varies by less than `SLACK`.
const SLACK: Duration = Duration::from_millis(20);

/// Runs one replica at `rate` (`f64::INFINITY`: unlimited) over a fresh topic with a
/// backlog of `backlog` messages; returns the sorted start times the sink saw from the
/// first delivery until `span` after it.
async fn run_at(
    kafka: &Kafka<'_>,
    topic: &str,
    rate: f64,
    burst: u32,
    backlog: usize,
    span: Duration,
) -> Vec<Instant> {
    kafka.topic(topic, 8);
    kafka.produce(topic, 8, 0..backlog, 100, |_| None);
    let sink = TestSink::ok().await;
    let mut c = config(
        &kafka.bootstrap,
        topic,
        &format!("g-{topic}"),
        SinkSpec::Http(sink.url()),
    );
    c.budget = Budget::Standalone {
        rate,
        in_flight: 64,
    };
    c.burst = burst;
    let r = InProcess::start(c).await;
    let state = sink.state.clone();
    wait_for("the first delivery", Duration::from_secs(20), || {
        state.delivered_count() > 0
    })
    .await;
    let t0 = sink.starts()[0];
    measure_until(t0, span).await;
    r.stop().await;
    sink.starts()
}

/// A rate above the machine's ceiling must still get this share of the unlimited pass's
/// best second. Not 0.9: the unlimited pass takes the batch fast path a rate-limited
/// one cannot, and its best second is compared with the limited pass's mean (0.86 seen
/// on Apache Kafka with the ceiling measured twice at 2,687 msg/s).
const NO_WASTE: f64 = 0.8;

/// The most the sink saw in one second of an unlimited pass (windows from 0.5 s after
/// the first delivery until the backlog ran out).
async fn ceiling(kafka: &Kafka<'_>, topic: &str) -> f64 {
    let s = run_at(
        kafka,
        topic,
        f64::INFINITY,
        1,
        40_000,
        Duration::from_millis(3600),
    )
    .await;
    windows(&s, s[0] + Duration::from_millis(500), 3)
        .into_iter()
        .max()
        .unwrap_or(0) as f64
}

on_both_brokers!(
    the_sink_sees_the_standalone_rate_within_three_percent_and_no_window_above_rate_plus_burst
);
/// What the replica, the broker and the sink can do together on this machine, in this
/// run, bounds what a rate test may ask: an unlimited pass first measures that ceiling
/// (and warms Apache Kafka's JVM). A rate the ceiling leaves a 20 % margin above must be
/// met within 3 %; a rate above that must get at least NO_WASTE of the ceiling (the limiter
/// wastes no capacity). A pass that misses measures the ceiling again right after and
/// is judged against the lower one. No 1-second window may ever exceed rate + burst.
async fn the_sink_sees_the_standalone_rate_within_three_percent_and_no_window_above_rate_plus_burst(
    kafka: Kafka<'static>,
) {
    let ceiling = ceiling(&kafka, "rate-ceiling").await;
    eprintln!(
        "{:?}: unlimited, the sink saw up to {ceiling} msg/s",
        kafka.broker
    );
    for (rate, burst) in [(50u32, 1u32), (500, 5), (5000, 50)] {
        // A backlog for well over the 5 s measured.
        let s = run_at(
            &kafka,
            &format!("rate-{rate}"),
            f64::from(rate),
            burst,
            rate as usize * 7,
            Duration::from_millis(5600),
        )
        .await;
        // Windows start half a second after the first arrival: the first requests open
        // the pool's connections, which delays their arrival by a few milliseconds and
        // makes the sink see the start of the run compressed (at 5,000/s, 15 ms of
        // connection set-up put 30 extra messages into a window anchored at t0).
        let from = s[0] + Duration::from_millis(500);
        let counts = windows(&s, from, 5);
        let (most, at) = busiest(
            &s,
            from,
            from + Duration::from_secs(5),
            Duration::from_secs(1) - SLACK,
        );
        let total: usize = counts.iter().sum();
        let observed = total as f64 / 5.0;
        let error = (observed - f64::from(rate)).abs() / f64::from(rate);
        eprintln!(
            "{:?}: rate {rate}/s burst {burst}: observed {observed:.1}/s ({:.2}% off), windows {counts:?}, busiest {:?} {most}",
            kafka.broker,
            error * 100.0,
            Duration::from_secs(1) - SLACK
        );
        // The machine's speed can change between passes (another process takes a core):
        // when a pass misses, the ceiling is measured again right after and the lower of
        // the two is what the machine could do.
        let mut reached = ceiling;
        let met = if reached >= 1.2 * f64::from(rate) {
            error <= 0.03
        } else {
            observed >= NO_WASTE * reached
        };
        if !met {
            reached = reached.min(self::ceiling(&kafka, &format!("rate-ceiling-{rate}")).await);
            eprintln!("unlimited again, right after: up to {reached} msg/s");
        }
        if reached >= 1.2 * f64::from(rate) {
            assert!(
                error <= 0.03,
                "rate {rate}: observed {observed:.1} msg/s, windows {counts:?}"
            );
        } else {
            eprintln!(
                "WARNING: this machine reached only {reached} msg/s unlimited; rate {rate} \
                 is checked against {NO_WASTE} x that instead of within 3 %"
            );
            assert!(
                observed >= NO_WASTE * reached,
                "rate {rate}: observed {observed:.1} msg/s < {NO_WASTE} x the unlimited {reached}"
            );
        }
        assert!(
            most as u32 <= rate + burst,
            "rate {rate}: {most} arrivals in the {:?} from {:?} after the first > {rate} + {burst}",
            Duration::from_secs(1) - SLACK,
            at - s[0]
        );
    }
}

on_both_brokers!(a_message_waiting_for_a_free_slot_holds_no_rate_permit);
/// One slot and a sink that now and then takes 400 ms: the dispatcher must not take the
/// next message's rate permit while it waits for the slot. It did: the held permit was
/// spent the moment the slot freed and the next permit came at once, so the sink saw
/// `floor(rate) + burst + 1` requests in a second. At 10.5 msg/s with burst 1, eleven
/// permits span 952 ms and twelve 1,048 ms; the held permit put twelve arrivals into
/// about 955 ms.
///
/// The sink records arrivals, later than the permits by a varying delay: each window is
/// `1 s - SLACK` long, which a delay varying by less than 48 ms - `SLACK` keeps at
/// `floor(rate) + burst`, and which still holds the twelve arrivals of a held permit
/// unless they were delayed by more than `SLACK`.
async fn a_message_waiting_for_a_free_slot_holds_no_rate_permit(kafka: Kafka<'static>) {
    const RATE: f64 = 10.5;
    const BURST: u32 = 1;
    const N: usize = 48;
    // Every 12th offset is slow: four chances for a held permit.
    const SLOW_EVERY: i64 = 12;
    kafka.topic("held-permit", 1);
    kafka.produce("held-permit", 1, 0..N, 100, |_| None);
    let sink = TestSink::start(std::sync::Arc::new(|s: &Seen| Reply {
        delay: if s.offset % SLOW_EVERY == 5 {
            Duration::from_millis(400)
        } else {
            Duration::ZERO
        },
        ..Reply::OK
    }))
    .await;
    let mut c = config(
        &kafka.bootstrap,
        "held-permit",
        "g-held-permit",
        SinkSpec::Http(sink.url()),
    );
    c.budget = Budget::Standalone {
        rate: RATE,
        in_flight: 1,
    };
    c.burst = BURST;
    let r = InProcess::start(c).await;
    let state = sink.state.clone();
    wait_for(&format!("{N} deliveries"), Duration::from_secs(30), || {
        state.delivered_count() >= N
    })
    .await;
    r.stop().await;
    let s = sink.starts();
    let window = Duration::from_secs(1) - SLACK;
    let (worst, at) = busiest(&s, s[0], s[s.len() - 1] + window, window);
    let bound = RATE.floor() as usize + BURST as usize;
    eprintln!(
        "{:?}: rate {RATE}/s burst {BURST}, 1 slot, every {SLOW_EVERY}th request 400 ms: worst window of {window:?} (one starting at each of {} arrivals) {worst}, bound {bound}",
        kafka.broker,
        s.len()
    );
    assert!(
        worst <= bound,
        "the window of {window:?} from {:?} after the first arrival held {worst} requests > floor({RATE}) + {BURST}",
        at - s[0]
    );
    let most = state
        .max_concurrent
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(most, 1, "requests at once with one slot");
}
