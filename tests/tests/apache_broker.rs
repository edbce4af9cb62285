//! The Apache Kafka test broker itself: starts, takes topics, keeps its data across a
//! clean restart on the same port, and is gone (process and data) after drop.

use std::time::Duration;

use pacer_tests::apache::ApacheKafka;
use pacer_tests::{Broker, Kafka};

#[test]
fn the_apache_broker_round_trips_messages_and_keeps_them_across_a_restart() {
    let mut broker = ApacheKafka::start();
    let rss = broker.rss_kib().unwrap_or(0);
    eprintln!(
        "Apache Kafka started in {:.1} s, {} MiB resident",
        broker.started_in.as_secs_f64(),
        rss / 1024
    );
    assert!(rss > 0, "the broker's JVM is running");
    let bootstrap = broker.bootstrap.clone();
    let kafka = Kafka::on(&broker);
    kafka.topic("round-trip", 3);
    kafka.produce("round-trip", 3, 0..30, 16, |_| None);
    assert_eq!(
        kafka
            .read_all("round-trip", 30, Duration::from_secs(30))
            .len(),
        30
    );

    broker.stop();
    assert!(broker.rss_kib().is_none(), "stopped");
    broker.restart();
    eprintln!("restarted in {:.1} s", broker.started_in.as_secs_f64());
    assert_eq!(broker.bootstrap, bootstrap, "same port");
    // A second group reads everything again: the data survived.
    let again = Kafka::on(&broker);
    let values = again.read_all_as("round-trip", "second-reader", 30, Duration::from_secs(30));
    assert_eq!(values.len(), 30);
    let dir = broker.dir().to_path_buf();
    drop(again);
    drop(broker);
    assert!(!dir.exists(), "the broker's data is removed on drop");
}

#[test]
fn creating_a_topic_twice_on_the_shared_broker_fails_loudly() {
    let kafka = Kafka::start(Broker::Apache);
    kafka.topic("twice", 1);
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kafka.topic("twice", 1)));
    assert!(again.is_err());
}
