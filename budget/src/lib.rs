//! # pacer-budget: one global budget, leased to a fleet
//!
//! A fleet of consumer replicas shares one budget: at most R messages per second and at
//! most C messages in flight, summed over every replica. A coordinator keeps a
//! [`Ledger`] per budget and leases shares of it to replicas (after Google's Doorman);
//! replicas run a [`client`] that renews the lease and exposes the current share.
//!
//! ```text
//!   replica ──POST /leases {demand, holding}──▶ service ──▶ Ledger::refresh(now, req)
//!      ▲                                           │          (pure: policy targets,
//!      └──────────── Grant {rate, inFlight, ───────┘           room, charges)
//!                    lease, fallback}
//! ```
//!
//! The promise: at every instant the sum of what members may be using is at most the
//! capacity, for rate and for in-flight, whatever joins, leaves, crashes, lost responses
//! and coordinator restarts happen. See [`ledger`] for how it is kept.
//!
//! ## Layout
//!
//! - [`protocol`]: the JSON wire types and their validation.
//! - [`policy`]: pure allocation (`equal`, `demand` water-filling, largest remainder).
//! - [`ledger`]: the pure lease ledger of one budget, time passed in.
//! - [`service`]: the coordinator HTTP service over many ledgers (axum).
//! - [`client`]: the replica side: refresh loop, fallback, release.
//! - [`file`]: the budgets file of the standalone coordinator.
//! - [`signals`]: SIGTERM / SIGINT / SIGHUP, registered before start-up goes on.
//! - [`standalone`]: `pacer coordinator`: the service fed from that file, reloaded on SIGHUP.

pub mod client;
pub mod file;
pub mod ledger;
pub mod policy;
pub mod protocol;
pub mod service;
pub mod signals;
pub mod standalone;

pub use ledger::{BudgetConfig, Ledger};
pub use policy::Policy;
pub use protocol::{Grant, LeaseRequest, MemberSnapshot, MemberState, Share, Snapshot};
