//! Test support shared by every crate's tests, and the cross-crate tests in `tests/`.
//!
//! ```text
//!   Kafka ── Broker::Mock   librdkafka's mock cluster, in this process
//!        └── Broker::Apache Apache Kafka 4.4 (KRaft, one node), a child JVM (apache.rs)
//! ```
//!
//! Scenario tests take a [`Kafka`] and are declared once per broker with
//! [`on_both_brokers!`].
//!
//! [`k8s::ControlPlane`] is a Kubernetes control plane without a kubelet (etcd,
//! kube-apiserver, kube-controller-manager built from Go modules), as child processes;
//! [`kubelet::Kubelet`] plays the node for one namespace's Pods, running a container
//! of each as a local process.
//!
//! [`sink`] is a recording HTTP sink, [`process`] runs `pacer` children (and holds the
//! bounded wait every test uses), [`fleet`] puts them together: a `pacer coordinator`
//! child and `pacer run` replicas around one budget, scaled, killed, restarted and
//! re-budgeted by the fleet tests. The runtime's own tests share `sink` and `process`.
//!
//! [`sim`] is a deterministic fleet simulation comparing Pacer's ledger with the peers'
//! ways of splitting one budget (no broker, no processes).

pub mod apache;
pub mod fleet;
pub mod k8s;
pub mod kafka;
pub mod kubelet;
pub mod process;
pub mod sim;
pub mod sink;

pub use kafka::{shared_apache, Broker, Kafka};
