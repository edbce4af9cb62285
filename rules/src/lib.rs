//! Rules that more than one crate enforces, defined once: the operator validates a
//! ThrottledConsumer with them, the standalone coordinator its budgets file, `pacer run`
//! its flags and env. A spec the operator accepts must start a replica, a budget the file
//! accepts must be one the CRD could have described, and a flag the replica refuses must
//! be refused on the CR first.
//!
//! Each check returns `Err(what is wrong and what is accepted)` without naming the field:
//! the caller prefixes its own spelling of it (`spec.budget.burst`, `--burst`,
//! `budgets[0].leaseSeconds`).
//!
//! Pure: no I/O, no dependencies.

pub mod duration;
mod enums;
pub mod kafka;
pub mod limits;
pub mod names;

pub use enums::{GroupProtocol, Ordering, Policy};
pub use kafka::refused_kafka_property;
