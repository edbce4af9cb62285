//! The allowance leased from the fleet's coordinator: the budget client's lease turned
//! into an [`Allowance`], and this replica's demand fed back to it.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Instant;

use pacer_budget::client::{self, ClientConfig, Demand, Lease, LeaseHandle, LeaseOrigin};
use pacer_budget::Share;
use tokio::sync::watch;

use crate::allowance::{demand, Allowance, AllowanceOrigin};
use crate::metrics::{OutcomeLabels, ResultLabels};
use crate::state::Status;
use crate::DEMAND_EVERY;

/// A running budget client plus the channels around it.
pub struct BudgetLease {
    handle: LeaseHandle,
    demand: watch::Sender<Demand>,
    allowance: watch::Receiver<Allowance>,
}

impl std::fmt::Debug for BudgetLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetLease")
            .field("allowance", &*self.allowance.borrow())
            .finish()
    }
}

/// Where [`report_demand`] sends this replica's demand (to the budget client), and
/// the client's refresh counters it mirrors into the metrics.
#[derive(Debug, Clone)]
pub struct DemandReporter {
    demand: watch::Sender<Demand>,
    stats: Arc<client::ClientStats>,
}

/// Maps the client's lease to an allowance. A lease that has not arrived yet is
/// `Pending` (nothing is delivered until the coordinator answers).
pub fn to_allowance(lease: &Lease) -> Allowance {
    let origin = match lease.origin {
        LeaseOrigin::None => AllowanceOrigin::Pending,
        LeaseOrigin::Granted => AllowanceOrigin::Granted,
        LeaseOrigin::Fallback => AllowanceOrigin::Fallback,
    };
    Allowance {
        rate: lease.share.rate.max(0.0),
        in_flight: lease.share.in_flight,
        origin,
    }
}

impl BudgetLease {
    /// Starts the budget client on the current runtime.
    pub fn start(config: ClientConfig) -> BudgetLease {
        let (demand_tx, demand_rx) = watch::channel(Demand {
            demand: Share {
                rate: 1.0,
                in_flight: 1,
            },
            observed_rate: None,
        });
        let handle = client::spawn(config, demand_rx);
        let mut lease = handle.lease();
        let (tx, rx) = watch::channel(to_allowance(&lease.borrow_and_update()));
        tokio::spawn(async move {
            while lease.changed().await.is_ok() {
                let a = to_allowance(&lease.borrow_and_update());
                tx.send_if_modified(|cur| {
                    let changed = *cur != a;
                    *cur = a;
                    changed
                });
            }
        });
        BudgetLease {
            handle,
            demand: demand_tx,
            allowance: rx,
        }
    }

    pub fn allowance(&self) -> watch::Receiver<Allowance> {
        self.allowance.clone()
    }

    pub fn demand_reporter(&self) -> DemandReporter {
        DemandReporter {
            demand: self.demand.clone(),
            stats: self.handle.stats(),
        }
    }

    /// Gives the lease back at once (so other replicas get its share now, not at expiry).
    pub async fn release(self) {
        self.handle.release().await;
    }
}

/// A counter's rate per second, smoothed like the demand's arrival rate: a second's
/// sample weighs 0.3, a shorter one less (`1 - 0.7^dt`), so the smoothing spans the
/// same few seconds however often it is sampled.
#[derive(Debug, Clone, Copy)]
struct Smoothed {
    last: u64,
    rate: f64,
}

impl Smoothed {
    fn new(total: u64) -> Self {
        Self {
            last: total,
            rate: 0.0,
        }
    }

    /// The smoothed rate after the counter reached `total`, `dt` seconds after the last
    /// update.
    fn update(&mut self, total: u64, dt: f64) -> f64 {
        let dt = dt.max(1e-3);
        let sample = total.saturating_sub(self.last) as f64 / dt;
        self.last = total;
        let keep = 0.7f64.powf(dt);
        self.rate = keep * self.rate + (1.0 - keep) * sample;
        self.rate
    }
}

/// Messages this replica finished (acknowledged by the sink or written to the
/// dead-letter topic) so far.
fn processed(status: &Status) -> u64 {
    ["acked", "dead_lettered"]
        .into_iter()
        .map(|outcome| {
            status
                .metrics()
                .messages
                .get_or_create(&OutcomeLabels { outcome })
                .get()
        })
        .sum()
}

/// What the demand is computed from, between two reports.
#[derive(Debug)]
struct DemandEstimate {
    processed: Smoothed,
    arrivals: Smoothed,
    /// Sink latency sum (microseconds) and count at the last report.
    latency: (u64, u64),
    at: Instant,
}

impl DemandEstimate {
    fn new(status: &Status) -> Self {
        Self {
            processed: Smoothed::new(processed(status)),
            arrivals: Smoothed::new(status.arrivals()),
            latency: (0, 0),
            at: Instant::now(),
        }
    }

    /// This replica's demand now, and the rate it processed (smoothed).
    fn update(&mut self, status: &Status) -> Demand {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64().max(1e-3);
        self.at = now;
        // Smoothed over a few seconds so one quiet second does not drop the share.
        let arrival_rate = self.arrivals.update(status.arrivals(), dt);
        let processed_rate = self.processed.update(processed(status), dt);
        let latency = status.latency_sum();
        let mean_latency = if latency.1 > self.latency.1 {
            (latency.0 - self.latency.0) as f64 / 1e6 / (latency.1 - self.latency.1) as f64
        } else {
            0.0
        };
        self.latency = latency;
        let (rate, in_flight) = demand(status.has_backlog(), arrival_rate, mean_latency);
        Demand {
            demand: Share { rate, in_flight },
            observed_rate: Some(processed_rate),
        }
    }
}

/// Every [`DEMAND_EVERY`], recomputes what this replica could use and what it processed,
/// and mirrors the client's refresh counters into the metrics. Ends when the client is
/// gone.
///
/// Two rates, both smoothed: what *arrived* from Kafka sizes the demand of an idle
/// replica; what was *processed* is the `observedRate` the coordinator sums into the
/// status. They differ whenever there is a backlog: a rate-limited replica fetches a
/// buffer-full at once and then nothing while it works through it, so its fetch rate
/// swings between 0 and thousands (the status showed 0.007 msg/s for a fleet processing
/// 200 msg/s).
pub async fn report_demand(status: Status, reporter: DemandReporter) {
    let mut estimate = DemandEstimate::new(&status);
    let mut refreshes = (0u64, 0u64);
    let mut tick = tokio::time::interval(DEMAND_EVERY);
    loop {
        tick.tick().await;
        let sent = reporter.demand.send(estimate.update(&status));
        // Mirror the client's totals into counters (by their increase since last time).
        for (result, total, seen) in [
            ("ok", &reporter.stats.refresh_ok, &mut refreshes.0),
            ("error", &reporter.stats.refresh_error, &mut refreshes.1),
        ] {
            let now = total.load(AtomicOrdering::Relaxed);
            status
                .metrics()
                .lease_refreshes
                .get_or_create(&ResultLabels { result })
                .inc_by(now.saturating_sub(*seen));
            *seen = now;
        }
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ordering;
    use crate::message::{test_message, Message, TopicPartition};
    use crate::state::Shared;

    #[test]
    fn processed_counts_acked_and_dead_lettered_messages_only() {
        let (_, intake, _, status) = Shared::new(Ordering::None, 10, 1 << 20);
        for outcome in [
            "acked",
            "acked",
            "dead_lettered",
            "dropped_on_revoke",
            "abandoned",
        ] {
            status.metrics().outcome(outcome);
        }
        // Fetched is not processed.
        intake.assign(&[TopicPartition::new("t", 0)]);
        let mut batch: Vec<Message> = (0..1000).map(|o| test_message(0, o, None)).collect();
        intake.push_batch(&mut batch);
        assert_eq!(status.arrivals(), 1000);
        assert_eq!(processed(&status), 3);
    }

    #[test]
    fn a_steady_100_per_second_is_reported_as_100_within_a_few_seconds() {
        let mut r = Smoothed::new(500);
        let mut total = 500;
        let mut last = 0.0;
        for _ in 0..15 {
            total += 100;
            last = r.update(total, 1.0);
        }
        assert!((last - 100.0).abs() < 1.0, "{last}");
        // A quiet second lowers it by 30 %, not to zero.
        assert!((r.update(total, 1.0) - 0.7 * last).abs() < 1e-9);
    }

    #[test]
    fn sampled_more_often_the_smoothing_spans_the_same_time() {
        let (mut every_second, mut every_fifth) = (Smoothed::new(0), Smoothed::new(0));
        let (mut a, mut b) = (0.0, 0.0);
        for s in 1..=3u64 {
            a = every_second.update(100 * s, 1.0);
            for k in 1..=5u64 {
                b = every_fifth.update(100 * (s - 1) + 20 * k, 0.2);
            }
        }
        // A steady 100/s for 3 s: 1 - 0.7^3 of the way there either way.
        assert!((a - 65.7).abs() < 1e-6, "{a}");
        assert!((b - a).abs() < 1e-6, "{b} vs {a}");
    }
}
