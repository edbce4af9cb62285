//! Test support shared by every crate's tests, and the cross-crate tests in `tests/`.
//!
//! ```text
//!   Kafka ── Broker::Mock   librdkafka's mock cluster, in this process
//!        └── Broker::Apache Apache Kafka 4.4 (KRaft, one node), a child JVM (apache.rs)
//! ```
//!
//! Scenario tests take a [`Kafka`] and are declared once per broker with
//! [`on_both_brokers!`].

pub mod apache;
pub mod kafka;

pub use kafka::{shared_apache, Broker, Kafka};
