//! Back-pressure of the Kafka thread as a pure state machine: the buffer's fill level,
//! whether the replica is draining, whether the assignment changed and the time go in;
//! what to do with the consumer comes out ([`Actions`]). The Kafka thread only carries
//! the actions out (see [`crate::consumer`]).
//!
//! The rule, in two steps:
//! 1. A full buffer first stops the Kafka thread taking messages (it waits for room)
//!    until the buffer drains to its refill mark; the dispatcher usually frees that
//!    room within milliseconds.
//! 2. Only when that holding-off lasts [`PAUSE_AFTER`] are the partitions paused, and
//!    they resume once the buffer is at or below its low-water mark. Every pause/resume
//!    cycle discards librdkafka's prefetch and costs a fetch round trip, so pausing at
//!    once made a fast sink wait on fetches (BENCHMARKS.md, "Runtime").
//!
//! Holding off, not fullness, starts the clock: a stalled sink leaves the buffer just
//! below full (its in-flight messages were taken out after it filled), and timing
//! fullness then never paused at all.

use std::time::{Duration, Instant};

/// How long the Kafka thread holds off (the buffer filled and has not drained to its
/// refill mark since) before it pauses every assigned partition.
pub const PAUSE_AFTER: Duration = Duration::from_millis(250);

/// How full the buffer is, against its three marks (see [`crate::buffer::Buffer::level`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// At or below the low-water mark (half): paused partitions may resume.
    Low,
    /// Above low water, at or below the refill mark (three quarters): a Kafka thread
    /// that held off takes messages again.
    BelowRefill,
    /// Above the refill mark, not full.
    High,
    /// At or above a bound: take nothing more.
    Full,
}

/// What the Kafka thread does with the consumer after one [`Backpressure::step`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Actions {
    /// Pause (`Some(true)`) or resume (`Some(false)`) every assigned partition. A
    /// resume also resumes the partitions held one by one, which must be held again.
    pub pause_all: Option<bool>,
    /// With `partition` ordering: hold or release single partitions by their share of
    /// the buffer now (not while everything is paused).
    pub update_holds: bool,
    /// Take no messages: wait (briefly) for the buffer to drain to its refill mark.
    pub wait_for_room: bool,
}

/// The Kafka thread's back-pressure state.
#[derive(Debug, Clone, Default)]
pub struct Backpressure {
    /// Since when the thread holds off taking messages (set when the buffer is full,
    /// cleared at the refill mark).
    holding_since: Option<Instant>,
    /// Whether every assigned partition is paused.
    paused: bool,
}

impl Backpressure {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether every assigned partition is paused (as far as this machine asked).
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// One turn of the Kafka thread's loop. `draining`: the replica stops fetching
    /// (shutdown). `assignment_changed`: partitions were assigned or revoked since the
    /// last step, so a pause or resume is applied again (a partition assigned again can
    /// still carry the pause it had when it was revoked: librdkafka keeps it across
    /// revoke and re-assign under KIP-848).
    pub fn step(
        &mut self,
        level: Level,
        draining: bool,
        assignment_changed: bool,
        now: Instant,
    ) -> Actions {
        match level {
            Level::Full => {
                self.holding_since.get_or_insert(now);
            }
            Level::Low | Level::BelowRefill => self.holding_since = None,
            Level::High => {}
        }
        let stalled = self
            .holding_since
            .is_some_and(|since| now.saturating_duration_since(since) >= PAUSE_AFTER);
        let want_paused = draining || stalled || (self.paused && level != Level::Low);
        let pause_all = if want_paused != self.paused || assignment_changed {
            Some(want_paused)
        } else {
            None
        };
        self.paused = want_paused;
        Actions {
            pause_all,
            update_holds: !want_paused,
            wait_for_room: self.holding_since.is_some() && !want_paused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn level() -> impl Strategy<Value = Level> {
        prop_oneof![
            Just(Level::Low),
            Just(Level::BelowRefill),
            Just(Level::High),
            Just(Level::Full)
        ]
    }

    #[test]
    fn a_full_buffer_first_holds_off_then_pauses_after_250_ms() {
        let t0 = Instant::now();
        let mut b = Backpressure::new();
        let a = b.step(Level::Full, false, false, t0);
        assert_eq!(
            a,
            Actions {
                pause_all: None,
                update_holds: true,
                wait_for_room: true
            }
        );
        // Still holding just before the deadline; a High level keeps holding.
        let a = b.step(Level::High, false, false, t0 + PAUSE_AFTER / 2);
        assert!(a.wait_for_room && a.pause_all.is_none());
        let a = b.step(Level::High, false, false, t0 + PAUSE_AFTER);
        assert_eq!(a.pause_all, Some(true));
        assert!(!a.wait_for_room && !a.update_holds);
        // Paused: stays paused until low water, then resumes once.
        assert_eq!(
            b.step(Level::BelowRefill, false, false, t0 + PAUSE_AFTER * 2)
                .pause_all,
            None
        );
        assert!(b.paused());
        assert_eq!(
            b.step(Level::Low, false, false, t0 + PAUSE_AFTER * 3)
                .pause_all,
            Some(false)
        );
        assert_eq!(
            b.step(Level::Low, false, false, t0 + PAUSE_AFTER * 4),
            Actions {
                pause_all: None,
                update_holds: true,
                wait_for_room: false
            }
        );
    }

    #[test]
    fn draining_at_the_refill_mark_in_time_never_pauses() {
        let t0 = Instant::now();
        let mut b = Backpressure::new();
        for i in 0..100u32 {
            let t = t0 + PAUSE_AFTER / 2 * i;
            b.step(Level::Full, false, false, t);
            let a = b.step(Level::BelowRefill, false, false, t + PAUSE_AFTER / 4);
            assert_eq!(a.pause_all, None);
            assert!(!a.wait_for_room);
        }
    }

    #[test]
    fn an_assignment_change_applies_the_current_pause_again() {
        let t0 = Instant::now();
        let mut b = Backpressure::new();
        assert_eq!(b.step(Level::Low, false, true, t0).pause_all, Some(false));
        assert_eq!(b.step(Level::Low, true, false, t0).pause_all, Some(true));
        assert_eq!(b.step(Level::Low, true, true, t0).pause_all, Some(true));
    }

    proptest! {
        /// Replays random turns against the rule stated in the module docs.
        #[test]
        fn the_machine_follows_the_rule(
            turns in proptest::collection::vec((level(), any::<bool>(), any::<bool>(), 0u64..400), 1..200)
        ) {
            let mut b = Backpressure::new();
            let mut now = Instant::now();
            // The model: what the consumer was told, and since when a full buffer has
            // not drained to the refill mark.
            let mut paused = false;
            let mut full_since: Option<Instant> = None;
            for (level, draining, changed, dt_ms) in turns {
                now += Duration::from_millis(dt_ms);
                match level {
                    Level::Full => { full_since.get_or_insert(now); }
                    Level::Low | Level::BelowRefill => full_since = None,
                    Level::High => {}
                }
                let was_paused = paused;
                let a = b.step(level, draining, changed, now);
                if let Some(p) = a.pause_all {
                    prop_assert!(p != was_paused || changed, "a repeated pause/resume without cause");
                    paused = p;
                }
                prop_assert_eq!(paused, b.paused());
                if draining {
                    prop_assert!(paused, "draining always pauses");
                }
                if paused && !was_paused && !draining {
                    let since = full_since.expect("paused without having filled");
                    prop_assert!(now.duration_since(since) >= PAUSE_AFTER, "paused before PAUSE_AFTER");
                }
                if was_paused && !paused {
                    prop_assert_eq!(level, Level::Low, "resumed above low water");
                }
                prop_assert_eq!(a.wait_for_room, full_since.is_some() && !paused);
                prop_assert_eq!(a.update_holds, !paused);
                if level == Level::Low && !draining {
                    prop_assert!(!paused && !a.wait_for_room, "a drained buffer takes messages");
                }
            }
        }
    }
}
