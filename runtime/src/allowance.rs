//! The replica's current allowance (rate and in-flight) and how it reaches the
//! dispatcher, plus what this replica asks the coordinator for ([`demand`]).
//!
//! The allowance arrives on a `watch` channel, from a fixed standalone value or from the
//! budget client's lease; [`follow`] applies every change to the rate limiter and the
//! in-flight limit at once. [`demand`] is pure.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, info};

use crate::rate::RateLimiter;
use crate::state::Outlet;

/// Where the current allowance comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowanceOrigin {
    /// `--rate` / `--max-in-flight`.
    Standalone,
    /// No lease yet: nothing may be delivered.
    Pending,
    /// A lease granted by the coordinator.
    Granted,
    /// The lease expired without renewal: running on the fallback share.
    Fallback,
}

impl AllowanceOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            AllowanceOrigin::Standalone => "standalone",
            AllowanceOrigin::Pending => "pending",
            AllowanceOrigin::Granted => "granted",
            AllowanceOrigin::Fallback => "fallback",
        }
    }
}

/// What this replica may use right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allowance {
    /// Messages per second; infinite means unlimited.
    pub rate: f64,
    pub in_flight: u32,
    pub origin: AllowanceOrigin,
}

impl Allowance {
    pub fn standalone(rate: f64, in_flight: u32) -> Self {
        Self {
            rate,
            in_flight,
            origin: AllowanceOrigin::Standalone,
        }
    }

    pub const PENDING: Allowance = Allowance {
        rate: 0.0,
        in_flight: 0,
        origin: AllowanceOrigin::Pending,
    };
}

/// Applies every allowance change to the limiter and the in-flight limit until the
/// sender goes away.
pub async fn follow(mut rx: watch::Receiver<Allowance>, outlet: Outlet, limiter: Arc<RateLimiter>) {
    let mut last_origin = None;
    loop {
        let a = *rx.borrow_and_update();
        limiter.set_rate(a.rate);
        outlet.set_in_flight_limit(a.in_flight);
        let m = outlet.metrics();
        m.granted_rate.set(a.rate);
        m.granted_in_flight.set(i64::from(a.in_flight));
        m.fallback
            .set(i64::from(a.origin == AllowanceOrigin::Fallback));
        // A demand-driven lease can change every refresh: info only when its origin
        // changes (granted, fallback...), debug otherwise.
        if last_origin != Some(a.origin) {
            info!(
                rate = a.rate,
                in_flight = a.in_flight,
                origin = a.origin.as_str(),
                "Allowance applied"
            );
        } else {
            debug!(
                rate = a.rate,
                in_flight = a.in_flight,
                origin = a.origin.as_str(),
                "Allowance applied"
            );
        }
        last_origin = Some(a.origin);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Demand reported when there is a backlog: "as much as you can give"; the coordinator
/// caps it at the budget. Finite because the protocol refuses non-finite numbers.
pub const DEMAND_ALL_RATE: f64 = 1e9;
pub const DEMAND_ALL_IN_FLIGHT: u32 = 1_000_000;

/// Headroom over the recent arrival rate when idle, so a growing stream gets its share
/// one refresh before it builds a backlog.
pub const IDLE_HEADROOM: f64 = 1.5;

/// What this replica could use now. With a backlog (messages buffered or lag): all it
/// can get. Idle: the recent arrival rate with headroom (at least 1 msg/s, so a quiet
/// replica still receives a trickle), and the in-flight that rate needs at the observed
/// sink latency (Little's law).
pub fn demand(backlog: bool, arrival_rate: f64, mean_latency_secs: f64) -> (f64, u32) {
    if backlog {
        return (DEMAND_ALL_RATE, DEMAND_ALL_IN_FLIGHT);
    }
    let rate = (arrival_rate.max(0.0) * IDLE_HEADROOM).max(1.0);
    let in_flight = (rate * mean_latency_secs.max(0.0)).ceil().max(1.0);
    (rate, in_flight.min(f64::from(DEMAND_ALL_IN_FLIGHT)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_with_a_backlog_asks_for_everything() {
        assert_eq!(
            demand(true, 3.0, 0.1),
            (DEMAND_ALL_RATE, DEMAND_ALL_IN_FLIGHT)
        );
    }

    #[test]
    fn an_idle_replica_asks_for_its_arrival_rate_with_headroom() {
        assert_eq!(demand(false, 100.0, 0.02), (150.0, 3));
    }

    #[test]
    fn a_silent_replica_still_asks_for_a_trickle() {
        assert_eq!(demand(false, 0.0, 0.0), (1.0, 1));
    }
}
