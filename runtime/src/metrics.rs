//! Prometheus metrics of one replica, all under the `pacer_` prefix.
//!
//! Labels are built from fixed strings or Kafka identifiers, never from `{:?}`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Metric name prefix (one constant, so dashboards and the chart agree).
pub const PREFIX: &str = "pacer";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `acked`, `dead_lettered`, `dropped_on_revoke`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// All metrics of a replica; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    pub messages: Family<OutcomeLabels, Counter>,
    pub consumed: Counter,
    pub retries: Family<ReasonLabels, Counter>,
    pub dead_lettered: Counter,
    pub granted_rate: Gauge<f64, AtomicU64>,
    pub granted_in_flight: Gauge,
    pub in_flight: Gauge,
    pub buffer_messages: Gauge,
    pub buffer_bytes: Gauge,
    pub paused_partitions: Gauge,
    pub assigned_partitions: Gauge,
    pub lag: Family<PartitionLabels, Gauge>,
    pub sink_latency: Histogram,
    pub lease_refreshes: Family<ResultLabels, Counter>,
    pub fallback: Gauge,
    pub kafka_errors: Counter,
    pub brokers_down: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            messages: Family::default(),
            consumed: Counter::default(),
            retries: Family::default(),
            dead_lettered: Counter::default(),
            granted_rate: Gauge::default(),
            granted_in_flight: Gauge::default(),
            in_flight: Gauge::default(),
            buffer_messages: Gauge::default(),
            buffer_bytes: Gauge::default(),
            paused_partitions: Gauge::default(),
            assigned_partitions: Gauge::default(),
            lag: Family::default(),
            // 100 µs .. ~6.5 s in factors of 2: covers a local no-op handler up to the
            // default 5 s timeout.
            sink_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            lease_refreshes: Family::default(),
            fallback: Gauge::default(),
            kafka_errors: Counter::default(),
            brokers_down: Gauge::default(),
            registry: Registry::with_prefix(PREFIX),
        };
        m.register_pipeline();
        m.register_kafka_and_lease();
        m
    }

    /// The messages' way through the replica: outcomes, buffer, slots, sink.
    fn register_pipeline(&mut self) {
        let m = self;
        let r = &mut m.registry;
        r.register(
            "messages",
            "Messages finished, by outcome",
            m.messages.clone(),
        );
        r.register(
            "consumed",
            "Messages fetched from Kafka",
            m.consumed.clone(),
        );
        r.register(
            "retries",
            "Sink attempts that will be retried, by reason",
            m.retries.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages written to the dead-letter topic",
            m.dead_lettered.clone(),
        );
        r.register(
            "granted_rate",
            "Rate this replica may use (messages per second; +Inf when unlimited)",
            m.granted_rate.clone(),
        );
        r.register(
            "granted_in_flight",
            "Messages this replica may have in flight",
            m.granted_in_flight.clone(),
        );
        r.register("in_flight", "Messages in flight now", m.in_flight.clone());
        r.register(
            "buffer_messages",
            "Messages waiting in the buffer",
            m.buffer_messages.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes waiting in the buffer",
            m.buffer_bytes.clone(),
        );
        r.register(
            "sink_latency_seconds",
            "Duration of one sink attempt",
            m.sink_latency.clone(),
        );
    }

    /// What Kafka and the coordinator give the replica.
    fn register_kafka_and_lease(&mut self) {
        let m = self;
        let r = &mut m.registry;
        r.register(
            "paused_partitions",
            "Assigned partitions paused: all of them while the buffer stays above its refill mark, or one by one by their share of it (partition ordering)",
            m.paused_partitions.clone(),
        );
        r.register(
            "assigned_partitions",
            "Partitions assigned to this replica",
            m.assigned_partitions.clone(),
        );
        r.register(
            "consumer_lag",
            "Messages behind the high watermark, per partition (from librdkafka statistics)",
            m.lag.clone(),
        );
        r.register(
            "lease_refreshes",
            "Lease refreshes by result (counts reported by the budget client)",
            m.lease_refreshes.clone(),
        );
        r.register(
            "fallback",
            "1 while running on the fallback share (coordinator unreachable)",
            m.fallback.clone(),
        );
        r.register(
            "kafka_errors",
            "Errors reported by the Kafka consumer",
            m.kafka_errors.clone(),
        );
        r.register(
            "brokers_down",
            "1 while no Kafka broker answers (no new message is dispatched meanwhile)",
            m.brokers_down.clone(),
        );
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.messages
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
