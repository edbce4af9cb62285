//! # pacer-operator: ThrottledConsumer fleets on Kubernetes
//!
//! Users declare a fleet of throttled Kafka consumers as a `ThrottledConsumer`; the
//! operator runs the replicas as a Deployment of `pacer run` and, through the budget
//! coordinator embedded in this process, leases each replica its share of one global
//! budget, rebalancing on every scale event.
//!
//! ```text
//!  kubectl apply / scale / HPA            pods: pacer run (member = pod name)
//!            │                                      │  POST /v1/budgets/ns/x/leases
//!            ▼                                      ▼
//!  ThrottledConsumer ──watch──▶ reconcile ──upsert──▶ Coordinator (embedded, :8080)
//!                                 │   │
//!                  server-side    │   └─ status (conditions, allocations, rates)
//!                  apply          ▼
//!          Secret (token) · Deployment · PodDisruptionBudget
//!
//!  Pods of the fleets ──watch──▶ reclaim ──release_terminated──▶ Coordinator
//!  (a container reported terminated: its run's lease and fallback are released)
//! ```
//!
//! ## Layout
//!
//! - [`crd`]: the resource types; the CRD YAML is generated from them.
//! - [`validate`]: pure checks of a spec, mirroring the CRD's bounds and CEL rules.
//! - [`build`]: pure builders of the children (Deployment, Secret, PDB) and the env
//!   contract with `pacer run`.
//! - [`status`]: pure status and conditions, time passed in.
//! - [`reconcile`]: the steps, the error type and the backoff; the only API writer.
//! - [`controller`]: watches (through `DeserializeGuard`), readiness, budget sweep.
//! - [`events`]: Kubernetes Events for `kubectl describe` (invalid spec, scaled, budget
//!   changed, leases expired), decided by pure functions after each reconcile.
//! - [`reclaim`]: the Pod watch that releases a terminated replica's lease at once.
//! - [`admin`], [`metrics`]: `/livez`, `/readyz`, `/metrics`.
//!
//! The operator must run as a single replica: the coordinator's ledgers live in its
//! memory, and two coordinators would each hand out the whole budget. After a restart
//! the coordinator is in learning mode for one lease length plus the fallback window,
//! granting members no more than they report holding (see `pacer_budget::ledger`).

pub mod admin;
pub mod build;
pub mod controller;
pub mod crd;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod metrics;
pub mod reclaim;
pub mod reconcile;
#[cfg(test)]
mod scale_tests;
pub mod status;
pub mod validate;
