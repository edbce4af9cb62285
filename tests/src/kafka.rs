//! One broker abstraction, two brokers: librdkafka's mock cluster (in this process,
//! fast, a test double) and Apache Kafka (a real broker, see [`crate::apache`]). A
//! scenario takes a [`Kafka`] and runs unchanged on either, so a difference between them
//! is a failing test rather than a surprise in production.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, DeliveryResult, Producer, ProducerContext,
};
use rdkafka::ClientConfig;

use crate::apache::ApacheKafka;

/// A producer context that counts failed deliveries: a broker refusing a record (too
/// large, say) must fail the test that produced it, not look like a lost message later.
#[derive(Debug, Default)]
pub struct Counted {
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Counted {
    /// Fails the test if any delivery failed so far.
    pub fn assert_all_delivered(&self) {
        let failed = self.failed.load(Ordering::SeqCst);
        assert_eq!(
            failed,
            0,
            "{failed} records were refused by the broker, first: {:?}",
            self.first_error.lock().unwrap()
        );
    }
}

impl ClientContext for Counted {}

impl ProducerContext for Counted {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::SeqCst);
            self.first_error
                .lock()
                .unwrap()
                .get_or_insert(e.to_string());
        }
    }
}

/// Which broker a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// librdkafka's mock cluster: keeps at most 5 MiB and 100,000 message sets per
    /// partition (older data is deleted as new data arrives) and implements a subset of
    /// the group protocol.
    Mock,
    /// Apache Kafka 4.4 (KRaft, one node), shared by every test of this process.
    Apache,
}

enum Inner<'a> {
    Mock(MockCluster<'static, DefaultProducerContext>),
    Apache(&'a ApacheKafka),
}

/// A broker for one test. The mock cluster is not `Send`: keep it on the test's thread.
pub struct Kafka<'a> {
    inner: Inner<'a>,
    pub bootstrap: String,
    pub broker: Broker,
}

impl std::fmt::Debug for Kafka<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("broker", &self.broker)
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

static APACHE: OnceLock<ApacheKafka> = OnceLock::new();

/// The process's Apache Kafka broker, started on first use. It lives until the process
/// exits (its watching shell then kills it): one broker per test binary under
/// `cargo test`, one per test under nextest, which runs each test as its own process.
pub fn shared_apache() -> &'static ApacheKafka {
    APACHE.get_or_init(|| {
        let k = ApacheKafka::start();
        eprintln!(
            "Apache Kafka started in {:.1} s on {} ({} MiB resident)",
            k.started_in.as_secs_f64(),
            k.bootstrap,
            k.rss_kib().unwrap_or(0) / 1024
        );
        k
    })
}

impl<'a> Kafka<'a> {
    /// A broker of the given kind.
    pub fn start(broker: Broker) -> Kafka<'static> {
        match broker {
            Broker::Mock => Kafka::mock(),
            Broker::Apache => {
                let k = shared_apache();
                Kafka {
                    bootstrap: k.bootstrap.clone(),
                    inner: Inner::Apache(k),
                    broker,
                }
            }
        }
    }

    /// A test's own Apache Kafka broker (one it stops and restarts, say).
    pub fn on(broker: &'a ApacheKafka) -> Kafka<'a> {
        Kafka {
            bootstrap: broker.bootstrap.clone(),
            inner: Inner::Apache(broker),
            broker: Broker::Apache,
        }
    }

    /// librdkafka's mock cluster with one broker.
    pub fn mock() -> Kafka<'static> {
        let cluster = MockCluster::new(1).expect("mock cluster");
        Kafka {
            bootstrap: cluster.bootstrap_servers(),
            inner: Inner::Mock(cluster),
            broker: Broker::Mock,
        }
    }

    /// Creates `name` with `partitions` partitions and waits until each has a leader.
    /// On the shared Apache broker topic names must be unique per test binary: an
    /// existing topic fails the test rather than mixing two tests' messages.
    pub fn topic(&self, name: &str, partitions: i32) {
        match &self.inner {
            Inner::Mock(c) => c.create_topic(name, partitions, 1).expect("create topic"),
            Inner::Apache(_) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.bootstrap)
                    .create()
                    .expect("admin client");
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
                let results = futures::executor::block_on(admin.create_topics([&topic], &opts))
                    .expect("create_topics");
                for r in results {
                    if let Err((t, e)) = r {
                        panic!(
                            "creating topic {t}: {e} (topic names must be unique per test binary)"
                        );
                    }
                }
                self.await_leaders(name, partitions);
            }
        }
    }

    fn await_leaders(&self, name: &str, partitions: i32) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("consumer");
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = c
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics().first().map(|t| {
                        t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < until,
                "topic {name} has no leader for every partition after 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Apache Kafka broker behind this handle, if that is what it is.
    pub fn apache(&self) -> Option<&ApacheKafka> {
        match &self.inner {
            Inner::Apache(k) => Some(k),
            Inner::Mock(_) => None,
        }
    }

    /// A producer whose failed deliveries are counted (see [`Kafka::produce`]).
    pub fn producer(&self) -> BaseProducer<Counted> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            // A retried produce request is never written twice, so an id the sink sees
            // twice is a re-delivery by the fleet, not a producer retry.
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.max.bytes", "2000000")
            .create_with_context(Counted::default())
            .expect("producer")
    }

    /// Produces `range`: message `i` goes to partition `i % partitions` with key
    /// `key(i)` and a value starting with its id `i` (8 digits), padded to `size`.
    pub fn produce(
        &self,
        topic: &str,
        partitions: i32,
        range: std::ops::Range<usize>,
        size: usize,
        key: impl Fn(usize) -> Option<Vec<u8>>,
    ) {
        let p = self.producer();
        for i in range {
            let mut value = format!("{i:08}").into_bytes();
            value.resize(size.max(8), b'.');
            let k = key(i);
            loop {
                let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                    .partition((i % partitions as usize) as i32)
                    .payload(&value[..]);
                if let Some(k) = &k {
                    rec = rec.key(&k[..]);
                }
                match p.send(rec) {
                    Ok(()) => break,
                    Err((e, _)) => {
                        assert!(e.to_string().contains("Queue full"), "produce failed: {e}");
                        p.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(60)).expect("flush");
        p.context().assert_all_delivered();
    }

    /// Reads every message of `topic` (e.g. a dead-letter topic) within `timeout`,
    /// returning (value, headers).
    pub fn read_all(
        &self,
        topic: &str,
        expect: usize,
        timeout: Duration,
    ) -> Vec<(Vec<u8>, HashMap<String, String>)> {
        self.read_all_as(topic, &format!("reader-{topic}"), expect, timeout)
    }

    /// [`Kafka::read_all`] as the consumer group `group`.
    pub fn read_all_as(
        &self,
        topic: &str,
        group: &str,
        expect: usize,
        timeout: Duration,
    ) -> Vec<(Vec<u8>, HashMap<String, String>)> {
        use rdkafka::message::{Headers, Message};
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        c.subscribe(&[topic]).expect("subscribe");
        let until = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < expect && Instant::now() < until {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((m.payload().unwrap_or_default().to_vec(), headers));
            }
        }
        out
    }
}

/// Declares a scenario once per broker: after `on_both_brokers!(name);`, the
/// `async fn name(kafka: Kafka<'static>)` beside it runs as `name::on_the_mock_cluster`
/// and `name::on_apache_kafka` (a module and a function may share a name), each on a
/// multi-threaded tokio runtime.
#[macro_export]
macro_rules! on_both_brokers {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_the_mock_cluster() {
                super::$name($crate::Kafka::start($crate::Broker::Mock)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_apache_kafka() {
                super::$name($crate::Kafka::start($crate::Broker::Apache)).await;
            }
        }
    };
}
