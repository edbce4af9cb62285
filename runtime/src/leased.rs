//! The leased allowance: the budget client's lease turned into an [`Allowance`], and
//! this replica's demand fed back to it.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Instant;

use pacer_budget::client::{self, ClientConfig, Demand, Lease, LeaseHandle, LeaseSource};
use pacer_budget::Share;
use tokio::sync::watch;

use crate::lease::{demand, Allowance, AllowanceSource};
use crate::metrics::{OutcomeLabels, ResultLabels};
use crate::pipeline::Shared;
use crate::DEMAND_EVERY;

/// A running budget client plus the channels around it.
pub struct Leased {
    handle: LeaseHandle,
    demand: watch::Sender<Demand>,
    allowance: watch::Receiver<Allowance>,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased")
            .field("allowance", &*self.allowance.borrow())
            .finish()
    }
}

/// The demand side, handed to [`report_demand`].
#[derive(Debug, Clone)]
pub struct DemandSink {
    demand: watch::Sender<Demand>,
    stats: Arc<client::ClientStats>,
}

/// Maps the client's lease to an allowance. A lease that has not arrived yet is
/// `Pending` (nothing is delivered until the coordinator answers).
pub fn to_allowance(lease: &Lease) -> Allowance {
    let source = match lease.source {
        LeaseSource::None => AllowanceSource::Pending,
        LeaseSource::Granted => AllowanceSource::Granted,
        LeaseSource::Fallback => AllowanceSource::Fallback,
    };
    Allowance {
        rate: lease.share.rate.max(0.0),
        in_flight: lease.share.in_flight,
        source,
    }
}

impl Leased {
    /// Starts the budget client on the current runtime.
    pub fn start(config: ClientConfig) -> Leased {
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
        Leased {
            handle,
            demand: demand_tx,
            allowance: rx,
        }
    }

    pub fn allowance(&self) -> watch::Receiver<Allowance> {
        self.allowance.clone()
    }

    pub fn clone_demand(&self) -> DemandSink {
        DemandSink {
            demand: self.demand.clone(),
            stats: self.handle.stats(),
        }
    }

    /// Gives the lease back at once (so other replicas get its share now, not at expiry).
    pub async fn release(self) {
        self.handle.release().await;
    }
}

/// A counter's rate per second, smoothed like the demand's arrival rate (each sample
/// weighs 0.3).
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
        let sample = total.saturating_sub(self.last) as f64 / dt.max(1e-3);
        self.last = total;
        self.rate = 0.7 * self.rate + 0.3 * sample;
        self.rate
    }
}

/// Messages this replica finished (acknowledged by the sink or written to the
/// dead-letter topic) so far.
fn processed(shared: &Shared) -> u64 {
    ["acked", "dead_lettered"]
        .into_iter()
        .map(|outcome| {
            shared
                .metrics
                .messages
                .get_or_create(&OutcomeLabels { outcome })
                .get()
        })
        .sum()
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
pub async fn report_demand(shared: Arc<Shared>, sink: DemandSink) {
    let mut processed_rate = Smoothed::new(processed(&shared));
    let mut last_arrivals = shared.arrivals.load(AtomicOrdering::Relaxed);
    let mut last_latency = (0u64, 0u64);
    let mut last_at = Instant::now();
    let mut rate_ewma = 0.0f64;
    let mut refreshes = (0u64, 0u64);
    let mut tick = tokio::time::interval(DEMAND_EVERY);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let dt = now.duration_since(last_at).as_secs_f64().max(1e-3);
        last_at = now;
        let arrivals = shared.arrivals.load(AtomicOrdering::Relaxed);
        let rate = (arrivals - last_arrivals) as f64 / dt;
        last_arrivals = arrivals;
        // Smooth over a few seconds so one quiet second does not drop the share.
        rate_ewma = 0.7 * rate_ewma + 0.3 * rate;
        let processed_ewma = processed_rate.update(processed(&shared), dt);
        let lat = (
            shared.latency_us.load(AtomicOrdering::Relaxed),
            shared.latency_count.load(AtomicOrdering::Relaxed),
        );
        let mean_latency = if lat.1 > last_latency.1 {
            (lat.0 - last_latency.0) as f64 / 1e6 / (lat.1 - last_latency.1) as f64
        } else {
            0.0
        };
        last_latency = lat;
        let backlog = {
            let core = shared.lock();
            !core.buffer.is_empty()
        } || shared.metrics.paused_partitions.get() > 0;
        let (d_rate, d_in_flight) = demand(backlog, rate_ewma, mean_latency);
        let sent = sink.demand.send(Demand {
            demand: Share {
                rate: d_rate,
                in_flight: d_in_flight,
            },
            observed_rate: Some(processed_ewma),
        });
        // Mirror the client's totals into counters (by their increase since last time).
        let m = &shared.metrics;
        for (result, total, seen) in [
            ("ok", &sink.stats.refresh_ok, &mut refreshes.0),
            ("error", &sink.stats.refresh_error, &mut refreshes.1),
        ] {
            let now = total.load(AtomicOrdering::Relaxed);
            m.lease_refreshes
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

    #[test]
    fn processed_counts_acked_and_dead_lettered_messages_only() {
        let shared = Shared::new(Ordering::None, 10, 1 << 20);
        for outcome in [
            "acked",
            "acked",
            "dead_lettered",
            "dropped_on_revoke",
            "abandoned",
        ] {
            shared.metrics.outcome(outcome);
        }
        // Fetched is not processed.
        shared.arrivals.store(1000, AtomicOrdering::Relaxed);
        assert_eq!(processed(&shared), 3);
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
}
