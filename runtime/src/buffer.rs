//! The bounded buffer between the Kafka consumer and the dispatcher, and the ordering
//! rule that decides which buffered message may go next.
//!
//! Messages wait per partition in offset order. [`Buffer::pop_ready`] walks partitions
//! round-robin (so one hot partition cannot starve the others) and returns the first
//! message whose ordering key is free:
//!
//! - `none`: the head of the next non-empty partition;
//! - `partition`: the head of a partition with nothing in flight;
//! - `key`: the earliest message of a partition whose key is neither in flight nor held
//!   by an earlier buffered message, so each key's messages go one at a time, in offset
//!   order. Messages without a key are not ordered.
//!
//! A popped message keeps its key (or partition) busy until [`Buffer::release`].
//! Pure: no I/O, no locking; the pipeline holds it under its mutex. The byte and message
//! bounds are enforced by the caller pausing the consumer (see [`Buffer::is_full`]).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::config::Ordering;
use crate::hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use crate::message::{Message, TopicPartition};

/// How far into a partition's queue `key` ordering looks for a free key. Bounded so a
/// long run of one busy key costs O(limit) per pop, not O(buffer); 1024 covers the
/// default buffer of 1000 messages.
const KEY_SCAN_LIMIT: usize = 1024;

/// Who holds a busy key: the partition and offset of the message in flight.
type Holder = (TopicPartition, i64);

/// One partition's buffered messages.
#[derive(Debug)]
struct Queue {
    tp: TopicPartition,
    msgs: VecDeque<Message>,
    /// Highest offset popped since the partition was added. At shutdown the buffered
    /// messages below it are the gaps holding back the partition's commit (with `key`
    /// ordering a later message can go before an earlier one).
    popped: Option<i64>,
}

impl Queue {
    fn note_popped(&mut self, offset: i64) {
        self.popped = Some(self.popped.map_or(offset, |p| p.max(offset)));
    }
}

#[derive(Debug)]
pub struct Buffer {
    ordering: Ordering,
    /// Partitions in round-robin order (scanned by position, without hashing);
    /// `cursor` is where the next scan starts.
    queues: Vec<Queue>,
    /// Position of each partition in `queues`.
    index: HashMap<TopicPartition, usize>,
    cursor: usize,
    busy_keys: HashMap<(&'static str, Bytes), Holder>,
    busy_partitions: HashSet<TopicPartition>,
    len: usize,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Buffer {
    pub fn new(ordering: Ordering, max_messages: usize, max_bytes: usize) -> Self {
        Self {
            ordering,
            queues: Vec::new(),
            index: HashMap::default(),
            cursor: 0,
            busy_keys: HashMap::default(),
            busy_partitions: HashSet::default(),
            len: 0,
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// At or above either bound: the consumer should pause.
    pub fn is_full(&self) -> bool {
        self.len >= self.max_messages || self.bytes >= self.max_bytes
    }

    /// At or below half of both bounds: a paused consumer may resume. Half leaves room
    /// for one fetch to land without pausing again at once.
    pub fn below_low_water(&self) -> bool {
        self.len <= self.max_messages / 2 && self.bytes <= self.max_bytes / 2
    }

    /// At or below three quarters of both bounds: a consumer that stopped taking
    /// messages because the buffer was full takes them again. Refilling a quarter at a
    /// time instead of a message per freed slot keeps the Kafka thread from waking once
    /// per message when the sink is the bottleneck.
    pub fn below_refill_mark(&self) -> bool {
        self.len <= self.max_messages / 4 * 3 && self.bytes <= self.max_bytes / 4 * 3
    }

    /// The fill level against the marks above, for the Kafka thread's back-pressure.
    pub fn level(&self) -> crate::backpressure::Level {
        use crate::backpressure::Level;
        if self.is_full() {
            Level::Full
        } else if self.below_low_water() {
            Level::Low
        } else if self.below_refill_mark() {
            Level::BelowRefill
        } else {
            Level::High
        }
    }

    /// With `partition` ordering, which partitions to pause and which to resume so that
    /// the buffer holds messages of every partition that has some to give: a partition
    /// with at least `share` buffered messages is held (the caller pauses it, so the
    /// Kafka thread's polls reach the other partitions' fetched runs instead of filling
    /// the buffer with one partition, which can have only one message in flight), and a
    /// held one is released at half its share. `held` is what the caller holds now;
    /// `assigned` says which partitions may be paused or resumed at all. Returns (hold,
    /// release).
    pub fn holds(
        &self,
        share: usize,
        held: &HashSet<TopicPartition>,
        assigned: impl Fn(&TopicPartition) -> bool,
    ) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
        let share = share.max(1);
        let hold = self
            .queues
            .iter()
            .filter(|q| q.msgs.len() >= share && !held.contains(&q.tp) && assigned(&q.tp))
            .map(|q| q.tp.clone())
            .collect();
        let release = held
            .iter()
            .filter(|tp| {
                assigned(tp)
                    && self
                        .index
                        .get(*tp)
                        .is_none_or(|&i| self.queues[i].msgs.len() <= share / 2)
            })
            .cloned()
            .collect();
        (hold, release)
    }

    /// Buffered messages per partition (for diagnostics).
    pub fn depths(&self) -> Vec<(TopicPartition, usize)> {
        self.queues
            .iter()
            .filter(|q| !q.msgs.is_empty())
            .map(|q| (q.tp.clone(), q.msgs.len()))
            .collect()
    }

    pub fn max_messages(&self) -> usize {
        self.max_messages
    }

    /// Free room before the message bound.
    pub fn room(&self) -> usize {
        self.max_messages.saturating_sub(self.len)
    }

    /// Free room before the byte bound.
    pub fn byte_room(&self) -> usize {
        self.max_bytes.saturating_sub(self.bytes)
    }

    pub fn push(&mut self, msg: Message) {
        self.len += 1;
        self.bytes += msg.size();
        let i = self.queue_of(&msg.tp);
        self.queues[i].msgs.push_back(msg);
    }

    /// Position of `tp`'s queue, added at the end of the round-robin order if new.
    fn queue_of(&mut self, tp: &TopicPartition) -> usize {
        if let Some(&i) = self.index.get(tp) {
            return i;
        }
        self.queues.push(Queue {
            tp: tp.clone(),
            msgs: VecDeque::new(),
            popped: None,
        });
        self.index.insert(tp.clone(), self.queues.len() - 1);
        self.queues.len() - 1
    }

    /// [`Self::push`] for a batch: one queue lookup per run of messages of the same
    /// partition (a poll batch comes in such runs).
    pub fn extend(&mut self, msgs: impl IntoIterator<Item = Message>) {
        let mut msgs = msgs.into_iter().peekable();
        while let Some(first) = msgs.next() {
            let tp = first.tp.clone();
            let i = self.queue_of(&tp);
            let queue = &mut self.queues[i].msgs;
            let mut next = Some(first);
            while let Some(m) = next {
                self.len += 1;
                self.bytes += m.size();
                queue.push_back(m);
                next = msgs.next_if(|m| m.tp == tp);
            }
        }
    }

    /// Up to `max` messages allowed by the ordering rule, each marked busy, appended
    /// to `out`. With ordering `none` this takes runs from each partition in
    /// round-robin order (an equal share of `max` per non-empty partition and pass), so
    /// one hot partition still cannot starve the others; otherwise it is
    /// [`Self::pop_ready`] repeated.
    pub fn pop_batch(&mut self, max: usize, out: &mut Vec<Message>) {
        if self.ordering != Ordering::None {
            while out.len() < max {
                let Some(m) = self.pop_ready() else { break };
                out.push(m);
            }
            return;
        }
        let target = out.len() + max;
        let n = self.queues.len();
        while out.len() < target && self.len > 0 {
            // Shares are split over the partitions that have messages: librdkafka
            // hands over long runs of one partition, and splitting over all of them
            // made a pass take a few messages per pass (a profile showed this loop as
            // the dispatcher's main cost with 24 partitions).
            let non_empty = self.queues.iter().filter(|q| !q.msgs.is_empty()).count();
            let share = (target - out.len()).div_ceil(non_empty.max(1));
            let start = self.cursor;
            for step in 0..n {
                if out.len() >= target {
                    break;
                }
                let i = (start + step) % n;
                let queue = &mut self.queues[i];
                if queue.msgs.is_empty() {
                    continue;
                }
                let take = share.min(target - out.len()).min(queue.msgs.len());
                for m in queue.msgs.drain(..take) {
                    self.bytes -= m.size();
                    out.push(m);
                }
                self.len -= take;
                if let Some(last) = out.last() {
                    queue.note_popped(last.offset);
                }
                self.cursor = (i + 1) % n;
            }
        }
    }

    /// The next message allowed by the ordering rule, marked busy.
    pub fn pop_ready(&mut self) -> Option<Message> {
        if self.len == 0 {
            return None;
        }
        let n = self.queues.len();
        for step in 0..n {
            let i = (self.cursor + step) % n;
            let queue = &mut self.queues[i];
            if queue.msgs.is_empty() {
                continue;
            }
            let index = match self.ordering {
                Ordering::None => Some(0),
                Ordering::Partition => (!self.busy_partitions.contains(&queue.tp)).then_some(0),
                Ordering::Key => first_free_key(&queue.msgs, &self.busy_keys),
            };
            let Some(index) = index else { continue };
            let msg = queue.msgs.remove(index)?;
            queue.note_popped(msg.offset);
            self.cursor = (i + 1) % n;
            self.len -= 1;
            self.bytes -= msg.size();
            match self.ordering {
                Ordering::None => {}
                Ordering::Partition => {
                    self.busy_partitions.insert(msg.tp.clone());
                }
                Ordering::Key => {
                    if let Some(k) = &msg.key {
                        self.busy_keys
                            .insert((msg.tp.topic, k.clone()), (msg.tp.clone(), msg.offset));
                    }
                }
            }
            return Some(msg);
        }
        None
    }

    /// Frees the key or partition held by a message popped earlier. A release from a
    /// stale holder (a revoked assignment's late worker) does not free a key that a newer
    /// message holds.
    pub fn release(&mut self, tp: &TopicPartition, key: Option<&Bytes>, offset: i64) {
        match self.ordering {
            Ordering::None => {}
            Ordering::Partition => {
                self.busy_partitions.remove(tp);
            }
            Ordering::Key => {
                if let Some(k) = key {
                    let id = (tp.topic, k.clone());
                    if self
                        .busy_keys
                        .get(&id)
                        .is_some_and(|(htp, ho)| htp == tp && *ho == offset)
                    {
                        self.busy_keys.remove(&id);
                    }
                }
            }
        }
    }

    /// Drops every buffered message of `tp` and its busy marks; returns how many messages
    /// were dropped. Used on revoke: those messages are uncommitted and will be fetched
    /// again by the partition's next owner.
    pub fn drop_partition(&mut self, tp: &TopicPartition) -> usize {
        self.busy_partitions.remove(tp);
        self.busy_keys.retain(|_, (htp, _)| htp != tp);
        let Some(i) = self.index.remove(tp) else {
            return 0;
        };
        let queue = self.queues.remove(i);
        for position in self.index.values_mut() {
            if *position > i {
                *position -= 1;
            }
        }
        self.cursor = 0;
        let dropped = queue.msgs.len();
        self.len -= dropped;
        self.bytes -= queue.msgs.iter().map(Message::size).sum::<usize>();
        dropped
    }

    /// Drops everything (end of shutdown).
    pub fn clear(&mut self) -> usize {
        let tps: Vec<_> = self.queues.iter().map(|q| q.tp.clone()).collect();
        tps.iter().map(|tp| self.drop_partition(tp)).sum()
    }

    /// Start of shutdown: keeps only the gaps, the messages below the highest offset
    /// already popped from their partition (their completion lets the partition's
    /// commit reach what was already processed, so the next owner re-delivers
    /// nothing), and drops the rest, which the next owner fetches again. Returns how
    /// many were kept and dropped.
    pub fn retain_gaps(&mut self) -> (usize, usize) {
        let mut dropped = 0;
        for queue in &mut self.queues {
            let limit = queue.popped.unwrap_or(i64::MIN);
            while queue.msgs.back().is_some_and(|m| m.offset > limit) {
                if let Some(m) = queue.msgs.pop_back() {
                    self.len -= 1;
                    self.bytes -= m.size();
                    dropped += 1;
                }
            }
        }
        (self.len, dropped)
    }
}

fn first_free_key(
    queue: &VecDeque<Message>,
    busy: &HashMap<(&'static str, Bytes), Holder>,
) -> Option<usize> {
    // Keys seen earlier in this scan are held by an earlier buffered message.
    let mut held: HashSet<&Bytes> = HashSet::default();
    for (i, m) in queue.iter().take(KEY_SCAN_LIMIT).enumerate() {
        let Some(k) = &m.key else { return Some(i) };
        if !held.contains(k) && !busy.contains_key(&(m.tp.topic, k.clone())) {
            return Some(i);
        }
        held.insert(k);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::test_message as msg;
    use proptest::prelude::*;

    fn offsets(popped: &[Message]) -> Vec<(i32, i64)> {
        popped.iter().map(|m| (m.tp.partition, m.offset)).collect()
    }

    #[test]
    fn unordered_pops_round_robin_across_partitions() {
        let mut b = Buffer::new(Ordering::None, 100, 1 << 20);
        for o in 0..2 {
            b.push(msg(0, o, None));
            b.push(msg(1, o, None));
        }
        let popped: Vec<_> = std::iter::from_fn(|| b.pop_ready()).collect();
        assert_eq!(offsets(&popped), vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn partition_ordering_allows_one_message_per_partition_until_released() {
        let mut b = Buffer::new(Ordering::Partition, 100, 1 << 20);
        b.push(msg(0, 0, None));
        b.push(msg(0, 1, None));
        let first = b.pop_ready().unwrap();
        assert!(b.pop_ready().is_none());
        b.release(&first.tp, None, first.offset);
        assert_eq!(b.pop_ready().unwrap().offset, 1);
    }

    #[test]
    fn a_partition_with_its_share_buffered_is_held_and_released_at_half() {
        let mut b = Buffer::new(Ordering::Partition, 100, 1 << 20);
        for o in 0..10 {
            b.push(msg(0, o, None));
        }
        for o in 0..3 {
            b.push(msg(1, o, None));
        }
        let all = |_: &TopicPartition| true;
        let mut held = HashSet::default();
        let (hold, release) = b.holds(10, &held, all);
        assert_eq!(hold, vec![TopicPartition::new("t", 0)]);
        assert!(release.is_empty());
        held.extend(hold);
        // Held partitions are not held again; partition 1 (3 < 10) is not held.
        assert_eq!(b.holds(10, &held, all), (vec![], vec![]));
        // Down to 6 (> 5): still held; down to 5: released.
        let p0 = TopicPartition::new("t", 0);
        let drain_to = |b: &mut Buffer, left: usize| {
            while b.queues[b.index[&p0]].msgs.len() > left {
                let m = b.pop_ready().unwrap();
                b.release(&m.tp, None, m.offset);
            }
        };
        drain_to(&mut b, 6);
        assert!(b.holds(10, &held, all).1.is_empty());
        drain_to(&mut b, 5);
        assert_eq!(b.holds(10, &held, all).1, vec![p0.clone()]);
        // A partition that is no longer assigned is neither held nor resumed.
        let none = |_: &TopicPartition| false;
        assert_eq!(b.holds(1, &held, none), (vec![], vec![]));
    }

    #[test]
    fn shutdown_keeps_only_the_gaps_below_what_was_popped() {
        let mut b = Buffer::new(Ordering::Key, 100, 1 << 20);
        for (o, k) in [(0, "a"), (1, "a"), (2, "b"), (3, "c")] {
            b.push(msg(0, o, Some(k)));
        }
        for o in 0..3 {
            b.push(msg(1, o, None));
        }
        b.push(msg(2, 7, None));
        let first = b.pop_ready().unwrap();
        assert_eq!((first.tp.partition, first.offset), (0, 0));
        // Key "a" is busy, so offset 2 (key "b") goes before offset 1.
        let second = b.pop_ready().unwrap();
        assert_eq!((second.tp.partition, second.offset), (1, 0));
        let third = b.pop_ready().unwrap();
        assert_eq!((third.tp.partition, third.offset), (2, 7));
        let fourth = b.pop_ready().unwrap();
        assert_eq!((fourth.tp.partition, fourth.offset), (0, 2));
        // Partition 0: offset 1 lies below the popped 2 (kept), 3 above it (dropped).
        // Partition 1: 1 and 2 lie above the popped 0 (dropped). Partition 2: empty.
        assert_eq!(b.retain_gaps(), (1, 3));
        assert_eq!((b.len(), b.bytes()), (1, 2), "one message: key a + value v");
        assert!(b.pop_ready().is_none(), "offset 1 still waits for key a");
        b.release(&first.tp, first.key.as_ref(), first.offset);
        let gap = b.pop_ready().unwrap();
        assert_eq!((gap.tp.partition, gap.offset), (0, 1));
        assert!(b.is_empty());
    }

    #[test]
    fn shutdown_drops_a_partition_nothing_was_popped_from() {
        let mut b = Buffer::new(Ordering::None, 100, 1 << 20);
        for o in 0..4 {
            b.push(msg(0, o, None));
        }
        let mut out = Vec::new();
        b.pop_batch(2, &mut out);
        b.drop_partition(&TopicPartition::new("t", 0));
        for o in 10..12 {
            b.push(msg(0, o, None));
        }
        // The reassigned partition starts clean: nothing of it was popped.
        assert_eq!(b.retain_gaps(), (0, 2));
        assert!(b.is_empty());
    }

    #[test]
    fn key_ordering_skips_a_busy_key_but_never_reorders_within_a_key() {
        let mut b = Buffer::new(Ordering::Key, 100, 1 << 20);
        b.push(msg(0, 0, Some("a")));
        b.push(msg(0, 1, Some("a")));
        b.push(msg(0, 2, Some("b")));
        let a0 = b.pop_ready().unwrap();
        assert_eq!(a0.offset, 0);
        // a@1 waits for a@0; b@2 may go.
        assert_eq!(b.pop_ready().unwrap().offset, 2);
        assert!(b.pop_ready().is_none());
        b.release(&a0.tp, a0.key.as_ref(), a0.offset);
        assert_eq!(b.pop_ready().unwrap().offset, 1);
    }

    #[test]
    fn a_stale_release_does_not_free_a_key_held_by_a_newer_message() {
        let mut b = Buffer::new(Ordering::Key, 100, 1 << 20);
        b.push(msg(0, 0, Some("a")));
        let old = b.pop_ready().unwrap();
        b.drop_partition(&old.tp);
        b.push(msg(0, 0, Some("a")));
        b.push(msg(0, 1, Some("a")));
        let new = b.pop_ready().unwrap();
        b.release(&old.tp, old.key.as_ref(), 99);
        assert!(b.pop_ready().is_none());
        b.release(&new.tp, new.key.as_ref(), new.offset);
        assert_eq!(b.pop_ready().unwrap().offset, 1);
    }

    #[test]
    fn dropping_a_partition_removes_its_messages_and_bytes() {
        let mut b = Buffer::new(Ordering::None, 2, 1 << 20);
        b.push(msg(0, 0, None));
        b.push(msg(1, 0, None));
        assert!(b.is_full());
        assert_eq!(b.drop_partition(&TopicPartition::new("t", 0)), 1);
        assert_eq!(b.len(), 1);
        assert_eq!(b.bytes(), 1);
        assert!(!b.is_full());
        assert_eq!(b.pop_ready().unwrap().tp.partition, 1);
    }

    #[test]
    fn a_batch_pop_takes_every_partition_in_turn_and_keeps_offset_order() {
        let mut b = Buffer::new(Ordering::None, 100, 1 << 20);
        b.extend((0..4).flat_map(|o| [msg(0, o, None), msg(1, o, None)]));
        b.extend((4..8).map(|o| msg(0, o, None)));
        assert_eq!(b.len(), 12);
        let mut out = Vec::new();
        b.pop_batch(4, &mut out);
        assert_eq!(offsets(&out), vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
        b.pop_batch(100, &mut out);
        assert_eq!(out.len(), 12);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
        for p in 0..2 {
            let o: Vec<i64> = out
                .iter()
                .filter(|m| m.tp.partition == p)
                .map(|m| m.offset)
                .collect();
            assert!(o.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn a_batch_pop_with_key_ordering_never_takes_a_busy_key() {
        let mut b = Buffer::new(Ordering::Key, 100, 1 << 20);
        b.extend([
            msg(0, 0, Some("a")),
            msg(0, 1, Some("a")),
            msg(0, 2, Some("b")),
        ]);
        let mut out = Vec::new();
        b.pop_batch(10, &mut out);
        assert_eq!(offsets(&out), vec![(0, 0), (0, 2)]);
    }

    proptest! {
        /// With key ordering, popping and releasing in any interleaving never has two
        /// messages of one key out at once and hands out each key's offsets in order.
        #[test]
        fn key_ordering_never_overlaps_or_reorders_a_key(
            keys in proptest::collection::vec(0u8..4, 1..80),
            releases in proptest::collection::vec(any::<bool>(), 1..200),
        ) {
            let mut b = Buffer::new(Ordering::Key, 1000, 1 << 20);
            for (o, k) in keys.iter().enumerate() {
                let key = format!("k{k}");
                b.push(msg((o % 2) as i32, o as i64, Some(&key)));
            }
            let mut out: Vec<Message> = Vec::new();
            let mut last: std::collections::HashMap<(i32, Bytes), i64> = std::collections::HashMap::new();
            let mut done = 0;
            for release in releases.iter().copied().chain(std::iter::repeat_n(true, 400)) {
                if release && !out.is_empty() {
                    let m = out.remove(0);
                    b.release(&m.tp, m.key.as_ref(), m.offset);
                } else if let Some(m) = b.pop_ready() {
                    let k = m.key.clone().unwrap();
                    prop_assert!(out.iter().all(|o| o.key.as_ref() != Some(&k)));
                    if let Some(prev) = last.insert((m.tp.partition, k), m.offset) {
                        prop_assert!(prev < m.offset);
                    }
                    out.push(m);
                    done += 1;
                }
            }
            prop_assert_eq!(done, keys.len());
        }
    }
}
