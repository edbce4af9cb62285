//! Offset tracking: which offset of a partition may be committed.
//!
//! Messages of a partition are received in offset order but complete in any order
//! (several in flight, retries, key ordering). Committing offset `n` tells the group
//! "everything below `n` is done", so the committable offset is the lowest offset that
//! was received and is not complete yet, or one past the highest received offset when
//! everything is complete. Offsets may have gaps (compaction, transaction markers).
//!
//! Pure: no I/O and no clock here. The caller stores the returned offsets in the
//! consumer.

use std::collections::VecDeque;
use std::hash::Hash;

use crate::hash::FxHashMap;

/// Per-partition bookkeeping.
#[derive(Debug, Default, Clone)]
struct PartitionOffsets {
    /// Received offsets from the lowest unfinished one on, in increasing order, each with
    /// a "done" flag. Finished offsets at the front are dropped at once, so the front is
    /// always the committable offset. A ring rather than a tree: offsets arrive in order,
    /// so receiving is a push and completing a binary search (this is on the per-message
    /// path of the Kafka thread).
    window: VecDeque<(i64, bool)>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// Last value returned as committable, so each advance is reported once.
    reported: Option<i64>,
}

impl PartitionOffsets {
    fn committable(&self) -> Option<i64> {
        self.window.front().map(|(o, _)| *o).or(self.next)
    }

    fn receive(&mut self, offset: i64) {
        match self.window.back() {
            Some((last, _)) if offset <= *last => {
                // Out of order (a re-delivery after a seek): keep the window sorted.
                match self.window.binary_search_by_key(&offset, |(o, _)| *o) {
                    Ok(i) => self.window[i].1 = false,
                    Err(i) => self.window.insert(i, (offset, false)),
                }
            }
            _ => self.window.push_back((offset, false)),
        }
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Marks `offset` done; false if it was not outstanding.
    fn complete(&mut self, offset: i64) -> bool {
        let Ok(i) = self.window.binary_search_by_key(&offset, |(o, _)| *o) else {
            return false;
        };
        if self.window[i].1 {
            return false;
        }
        self.window[i].1 = true;
        while self.window.front().is_some_and(|(_, done)| *done) {
            self.window.pop_front();
        }
        true
    }
}

/// Tracks received and completed offsets for any number of partitions, keyed by `P`.
#[derive(Debug, Clone)]
pub struct OffsetTracker<P> {
    partitions: FxHashMap<P, PartitionOffsets>,
}

impl<P> Default for OffsetTracker<P> {
    fn default() -> Self {
        Self {
            partitions: FxHashMap::default(),
        }
    }
}

impl<P: Eq + Hash + Clone> OffsetTracker<P> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was received and is not yet complete.
    pub fn received(&mut self, partition: &P, offset: i64) {
        self.received_all(partition, [offset]);
    }

    /// [`Self::received`] for several offsets of one partition, in the order given
    /// (one map lookup for the run).
    pub fn received_all(&mut self, partition: &P, offsets: impl IntoIterator<Item = i64>) {
        let mut offsets = offsets.into_iter();
        let Some(first) = offsets.next() else {
            return;
        };
        let p = match self.partitions.get_mut(partition) {
            Some(p) => p,
            // The first offset is where the partition starts: committing it would be
            // no progress, so it counts as already reported.
            None => self
                .partitions
                .entry(partition.clone())
                .or_insert_with(|| PartitionOffsets {
                    reported: Some(first),
                    ..PartitionOffsets::default()
                }),
        };
        p.receive(first);
        for o in offsets {
            p.receive(o);
        }
    }

    /// Records completion of `offset`. Returns the new committable offset when it
    /// advanced past what was last returned, `None` otherwise (including for offsets of
    /// an untracked partition, e.g. one revoked meanwhile).
    pub fn completed(&mut self, partition: &P, offset: i64) -> Option<i64> {
        self.completed_all(partition, [offset])
    }

    /// [`Self::completed`] for several offsets of one partition (one map lookup): the
    /// committable offset after all of them when it advanced past what was last
    /// returned.
    pub fn completed_all(
        &mut self,
        partition: &P,
        offsets: impl IntoIterator<Item = i64>,
    ) -> Option<i64> {
        let p = self.partitions.get_mut(partition)?;
        let mut any = false;
        for o in offsets {
            any |= p.complete(o);
        }
        if !any {
            return None;
        }
        let now = p.committable()?;
        if p.reported.is_some_and(|r| r >= now) {
            return None;
        }
        p.reported = Some(now);
        Some(now)
    }

    /// The offset to commit for `partition`: everything below it is complete.
    pub fn committable(&self, partition: &P) -> Option<i64> {
        self.partitions.get(partition)?.committable()
    }

    /// Number of received and not completed offsets of `partition`.
    pub fn outstanding(&self, partition: &P) -> usize {
        self.partitions
            .get(partition)
            .map_or(0, |p| p.window.iter().filter(|(_, done)| !done).count())
    }

    /// Forgets a partition (revoked, or reassigned and started clean).
    pub fn remove(&mut self, partition: &P) {
        self.partitions.remove(partition);
    }

    /// Committable offsets of every tracked partition.
    pub fn all_committable(&self) -> Vec<(P, i64)> {
        self.partitions
            .iter()
            .filter_map(|(k, p)| p.committable().map(|o| (k.clone(), o)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_out_of_order_completion_does_not_move_the_offset_past_an_unfinished_message() {
        let mut t = OffsetTracker::new();
        for o in 10..13 {
            t.received(&0, o);
        }
        assert_eq!(t.completed(&0, 11), None);
        assert_eq!(t.committable(&0), Some(10));
        assert_eq!(t.completed(&0, 10), Some(12));
        assert_eq!(t.completed(&0, 12), Some(13));
    }

    #[test]
    fn gaps_in_offsets_do_not_block_the_commit() {
        let mut t = OffsetTracker::new();
        t.received(&0, 5);
        t.received(&0, 9);
        assert_eq!(t.completed(&0, 5), Some(9));
        assert_eq!(t.completed(&0, 9), Some(10));
    }

    #[test]
    fn a_completion_for_a_forgotten_partition_is_ignored() {
        let mut t = OffsetTracker::new();
        t.received(&3, 1);
        t.remove(&3);
        assert_eq!(t.completed(&3, 1), None);
        assert_eq!(t.committable(&3), None);
    }

    #[test]
    fn a_second_completion_of_the_same_offset_changes_nothing() {
        let mut t = OffsetTracker::new();
        t.received(&0, 5);
        t.received(&0, 6);
        assert_eq!(t.completed(&0, 5), Some(6));
        assert_eq!(t.completed(&0, 5), None);
        assert_eq!(t.outstanding(&0), 1);
        assert_eq!(t.committable(&0), Some(6));
    }

    #[test]
    fn completing_a_run_at_once_equals_completing_it_one_by_one() {
        let mut t = OffsetTracker::new();
        t.received_all(&0, [10, 11, 12, 13]);
        assert_eq!(t.completed_all(&0, [12, 11]), None);
        assert_eq!(t.completed_all(&0, [10, 13]), Some(14));
        assert_eq!(t.completed_all(&0, [10]), None);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.received(&0, 0);
        t.received(&1, 0);
        assert_eq!(t.completed(&1, 0), Some(1));
        assert_eq!(t.committable(&0), Some(0));
    }

    proptest! {
        /// Whatever the completion order, the committable offset is exactly the lowest
        /// unfinished offset, never decreases, and ends one past the last offset.
        #[test]
        fn the_committable_offset_is_always_the_lowest_unfinished_offset(
            gaps in proptest::collection::vec(1i64..4, 1..60),
            order in any::<proptest::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let mut offsets = Vec::new();
            let mut o = 100;
            for g in &gaps { offsets.push(o); o += g; }
            let mut t = OffsetTracker::new();
            for &o in &offsets { t.received(&0, o); }
            // A deterministic shuffle from the seed.
            let mut pending = offsets.clone();
            let mut rng = seed ^ (order.index(1000) as u64);
            let mut last = t.committable(&0).unwrap();
            while !pending.is_empty() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let i = (rng >> 33) as usize % pending.len();
                let done = pending.swap_remove(i);
                let advanced = t.completed(&0, done);
                let now = t.committable(&0).unwrap();
                let expected = pending.iter().copied().min().unwrap_or(offsets[offsets.len() - 1] + 1);
                prop_assert_eq!(now, expected);
                prop_assert!(now >= last);
                prop_assert_eq!(advanced.is_some(), now > last);
                last = now;
            }
            prop_assert_eq!(last, offsets[offsets.len() - 1] + 1);
        }
    }
}
