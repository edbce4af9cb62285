//! The rate limiter: a GCRA (generic cell rate algorithm, a token bucket kept as one
//! timestamp) that can be re-rated while running without releasing a burst.
//!
//! Why not `governor` directly: a governor limiter's quota is fixed at construction,
//! and rebuilding it on every lease change starts with a full bucket, which is the burst
//! re-rating must not release. The algorithm is small, so it lives here as a pure struct
//! ([`Gcra`], time passed in as a [`Duration`] since an arbitrary origin) with a thin
//! async shell ([`RateLimiter`]).
//!
//! Guarantee: in any window of length `W`, at most `floor(W * rate) + burst` permits are
//! granted (for `W * rate` whole), across any number of re-rates.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The burst is raised to at least this much time's worth of permits. tokio's timer
/// fires on 1 ms ticks and a busy 2-core machine wakes a task a few ms late; a bucket
/// smaller than that loses the late time for good and the limiter undershoots its rate
/// (measured: 5,000 msg/s with burst 1 delivered about 900 msg/s).
pub const TIMER_SLACK: Duration = Duration::from_millis(4);

/// The burst actually used for `rate` and a configured `burst`.
pub fn effective_burst(rate: f64, burst: u32) -> u32 {
    if !rate.is_finite() {
        return burst.max(1);
    }
    let slack = (rate * TIMER_SLACK.as_secs_f64()).ceil();
    burst.max(slack.min(f64::from(u32::MAX)) as u32).max(1)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// No limit (`--rate unlimited`).
    Unlimited,
    /// Rate 0: nothing may go until the rate changes (no lease yet).
    Closed,
    /// `interval` seconds per permit, `tolerance` = (burst - 1) * interval.
    Limited { interval: f64, tolerance: f64 },
}

/// Pure GCRA state.
#[derive(Debug, Clone)]
pub struct Gcra {
    mode: Mode,
    rate: f64,
    burst: u32,
    /// Theoretical arrival time of the next permit, in seconds since the origin.
    tat: f64,
}

/// Why [`Gcra::try_acquire`] said no.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wait {
    /// Try again at this time (since the origin).
    Until(Duration),
    /// Rate is zero: wait for [`Gcra::set_rate`].
    Closed,
}

impl Gcra {
    /// A limiter at `rate` per second (infinite: unlimited; zero: closed), starting with
    /// a full bucket of `burst` permits.
    pub fn new(rate: f64, burst: u32, now: Duration) -> Self {
        let mut g = Self {
            mode: Mode::Closed,
            rate: 0.0,
            burst: burst.max(1),
            tat: now.as_secs_f64(),
        };
        g.configure(rate);
        g
    }

    fn configure(&mut self, rate: f64) {
        self.rate = rate;
        self.mode = if rate.is_infinite() {
            Mode::Unlimited
        } else if rate.is_nan() || rate <= 0.0 {
            Mode::Closed
        } else {
            let interval = 1.0 / rate;
            let burst = effective_burst(rate, self.burst);
            Mode::Limited {
                interval,
                tolerance: f64::from(burst - 1) * interval,
            }
        };
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Changes the rate. The permits already granted stay accounted for in the new
    /// rate's units, and the bucket is never refilled by a re-rate: after it, at most one
    /// permit is available at once, so a lease change releases no burst.
    pub fn set_rate(&mut self, rate: f64, now: Duration) {
        if rate == self.rate {
            return;
        }
        let now = now.as_secs_f64();
        let debt_cells = match self.mode {
            Mode::Limited { interval, .. } => ((self.tat - now) / interval).max(0.0),
            Mode::Unlimited | Mode::Closed => 0.0,
        };
        self.configure(rate);
        if let Mode::Limited {
            interval,
            tolerance,
        } = self.mode
        {
            self.tat = (now + debt_cells * interval).max(now + tolerance);
        }
    }

    /// Takes one permit at `now`, or says how long to wait.
    pub fn try_acquire(&mut self, now: Duration) -> Result<(), Wait> {
        let now = now.as_secs_f64();
        match self.mode {
            Mode::Unlimited => Ok(()),
            Mode::Closed => Err(Wait::Closed),
            Mode::Limited {
                interval,
                tolerance,
            } => {
                // The epsilon absorbs float rounding of accumulated intervals.
                if self.tat <= now + tolerance + 1e-9 {
                    // A caller that woke late keeps up to half an interval of the lost
                    // time, so timer lateness does not erode the rate; half an interval
                    // cannot add a whole permit to any window.
                    self.tat = self.tat.max(now - interval / 2.0) + interval;
                    Ok(())
                } else {
                    Err(Wait::Until(Duration::from_secs_f64(
                        (self.tat - tolerance).max(0.0),
                    )))
                }
            }
        }
    }
}

/// The async shell: permits for the dispatcher and for retries, re-rated live.
#[derive(Debug)]
pub struct RateLimiter {
    origin: Instant,
    gcra: Mutex<Gcra>,
    changed: Notify,
    /// Whether the rate is infinite, readable without the mutex (workers check it per
    /// message); written under the mutex by [`Self::set_rate`].
    unlimited: AtomicBool,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            origin: Instant::now(),
            gcra: Mutex::new(Gcra::new(rate, burst, Duration::ZERO)),
            changed: Notify::new(),
            unlimited: AtomicBool::new(rate.is_infinite()),
        }
    }

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }

    pub fn set_rate(&self, rate: f64) {
        let now = self.now();
        let mut gcra = self.gcra.lock().unwrap_or_else(|e| e.into_inner());
        gcra.set_rate(rate, now);
        self.unlimited
            .store(gcra.rate().is_infinite(), AtomicOrdering::Relaxed);
        drop(gcra);
        self.changed.notify_waiters();
    }

    pub fn rate(&self) -> f64 {
        self.gcra.lock().unwrap_or_else(|e| e.into_inner()).rate()
    }

    /// No rate limit at all (`--rate unlimited`): callers may skip [`Self::acquire`].
    pub fn is_unlimited(&self) -> bool {
        self.unlimited.load(AtomicOrdering::Relaxed)
    }

    /// Waits for one permit.
    pub async fn acquire(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = self.now();
            let verdict = self
                .gcra
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_acquire(now);
            match verdict {
                Ok(()) => return,
                Err(Wait::Until(at)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(self.origin + at) => {}
                        _ = &mut changed => {}
                    }
                }
                Err(Wait::Closed) => changed.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_fresh_limiter_grants_its_burst_then_spaces_permits() {
        let mut g = Gcra::new(10.0, 3, ms(0));
        for _ in 0..3 {
            assert_eq!(g.try_acquire(ms(0)), Ok(()));
        }
        assert_eq!(g.try_acquire(ms(0)), Err(Wait::Until(ms(100))));
        assert_eq!(g.try_acquire(ms(100)), Ok(()));
    }

    #[test]
    fn a_zero_rate_is_closed_until_re_rated() {
        let mut g = Gcra::new(0.0, 1, ms(0));
        assert_eq!(g.try_acquire(ms(0)), Err(Wait::Closed));
        g.set_rate(10.0, ms(5));
        assert_eq!(g.try_acquire(ms(5)), Ok(()));
        assert!(g.try_acquire(ms(5)).is_err());
    }

    #[test]
    fn raising_the_rate_after_idling_releases_no_burst() {
        let mut g = Gcra::new(10.0, 5, ms(0));
        // Idle for ten seconds: the bucket is full at 10 msg/s...
        g.set_rate(100.0, ms(10_000));
        // ...but the re-rate leaves only one permit.
        assert_eq!(g.try_acquire(ms(10_000)), Ok(()));
        assert!(g.try_acquire(ms(10_000)).is_err());
    }

    #[test]
    fn lowering_the_rate_keeps_the_debt_of_permits_already_granted() {
        let mut g = Gcra::new(100.0, 1, ms(0));
        for t in 0..10 {
            assert_eq!(g.try_acquire(ms(t * 10)), Ok(()));
        }
        // tat = 100 ms; down to 1/s: the next permit is a full second away.
        g.set_rate(1.0, ms(90));
        assert_eq!(g.try_acquire(ms(90)), Err(Wait::Until(ms(1090))));
    }

    #[test]
    fn the_burst_covers_at_least_the_timer_slack() {
        assert_eq!(effective_burst(50.0, 1), 1);
        assert_eq!(effective_burst(5_000.0, 1), 20);
        assert_eq!(effective_burst(5_000.0, 50), 50);
        assert_eq!(effective_burst(f64::INFINITY, 3), 3);
    }

    proptest! {
        /// Greedy callers that wake at arbitrary times, with re-rates in between, never
        /// get more than rate * W + burst permits in any one-second window.
        #[test]
        fn no_one_second_window_exceeds_rate_plus_burst(
            rates in proptest::collection::vec(1u32..400, 1..4),
            burst in 1u32..8,
            jitter in proptest::collection::vec(0u64..3000, 50..400),
        ) {
            let mut g = Gcra::new(f64::from(rates[0]), burst, Duration::ZERO);
            let mut now = Duration::ZERO;
            let mut grants: Vec<(Duration, u32)> = Vec::new();
            let mut rate = rates[0];
            for (i, j) in jitter.iter().enumerate() {
                if i % 100 == 99 {
                    rate = rates[(i / 100) % rates.len()];
                    g.set_rate(f64::from(rate), now);
                }
                loop {
                    match g.try_acquire(now) {
                        Ok(()) => grants.push((now, rate)),
                        Err(Wait::Until(at)) => { now = at.max(now) + Duration::from_micros(*j); break; }
                        Err(Wait::Closed) => unreachable!(),
                    }
                }
            }
            let max_rate = *rates.iter().max().unwrap();
            let bound = max_rate + effective_burst(f64::from(max_rate), burst);
            for (i, (start, _)) in grants.iter().enumerate() {
                let in_window = grants[i..].iter().take_while(|(t, _)| *t < *start + Duration::from_secs(1)).count();
                prop_assert!(in_window as u32 <= bound, "{} > {}", in_window, bound);
            }
        }

        /// With a single rate, the long-run count matches the rate despite late wake-ups
        /// of up to half an interval.
        #[test]
        fn late_wakeups_do_not_erode_the_rate(rate in 10u32..2000, lateness_permille in 0u64..500) {
            let mut g = Gcra::new(f64::from(rate), 1, Duration::ZERO);
            let interval = 1.0 / f64::from(rate);
            let late = Duration::from_secs_f64(interval * lateness_permille as f64 / 1000.0);
            let mut now = Duration::ZERO;
            let mut n = 0u32;
            while now < Duration::from_secs(5) {
                match g.try_acquire(now) {
                    Ok(()) => n += 1,
                    Err(Wait::Until(at)) => now = at + late,
                    Err(Wait::Closed) => unreachable!(),
                }
            }
            let expected = 5 * rate;
            prop_assert!(n.abs_diff(expected) <= 2 + effective_burst(f64::from(rate), 1), "{} vs {}", n, expected);
        }
    }
}
