//! The shared state between the Kafka thread, the dispatcher and the workers, and the
//! two async loops: the dispatcher (pull) and the worker (one message, with retries).
//!
//! ```text
//!  kafka thread --push--> Core{buffer, tracker} --pop_ready--> dispatcher
//!                                 ^                               | rate permit
//!                                 |                               | in-flight slot
//!                                 +--------complete-------- worker (sink, retries, DLQ)
//! ```
//!
//! Everything that decides lives in pure modules ([`crate::buffer`],
//! [`crate::offsets`], [`crate::rate`], [`crate::outcome`]); this module only moves
//! messages between them under one mutex. The mutex is a `std` one: critical sections
//! are short and the Kafka thread (not async) takes it too.

use crate::hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use tokio::sync::Notify;
use tracing::{debug, info, trace, warn};

use crate::buffer::Buffer;
use crate::config::{Ordering, RetryPolicy};
use crate::message::{Message, TopicPartition};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::outcome::{backoff, decide, Attempt, Decision};
use crate::rate::RateLimiter;
use crate::sink::{dead_letter_headers, produce, Sink};

/// State guarded by [`Shared::core`].
#[derive(Debug)]
pub struct Core {
    pub buffer: Buffer,
    pub tracker: OffsetTracker<TopicPartition>,
    /// Assigned partitions and the generation of their current assignment.
    pub assigned: HashMap<TopicPartition, u64>,
    /// Partitions being revoked: their workers stop retrying and give up.
    pub revoking: HashSet<TopicPartition>,
    /// Messages handed to workers, per partition and generation.
    pub in_flight: HashMap<(TopicPartition, u64), u32>,
    pub in_flight_total: u32,
    /// Committable offsets not yet stored in the consumer (the Kafka thread stores them).
    pub to_store: HashMap<TopicPartition, i64>,
    next_generation: u64,
    /// Set at shutdown: nothing more is fetched; only the gaps left in the buffer (see
    /// [`Buffer::retain_gaps`]) are still dispatched, and in-flight work goes on.
    pub stopping: bool,
    /// Set when the shutdown grace is over: nothing more is dispatched and workers give
    /// up (their offsets stay uncommitted).
    pub halted: bool,
    /// Set while no broker answers: buffered messages wait. What completes while the
    /// group cannot be reached cannot be committed, and the partitions may already be
    /// another member's, so delivering on would only add duplicates; in-flight work
    /// finishes.
    pub brokers_down: bool,
    /// Set while the group refuses commits because it is rebalancing (or moved to a new
    /// generation): buffered messages wait, for the same reason. Cleared by the next
    /// assignment or by a commit that is accepted (the Kafka thread tries every 250 ms).
    pub commits_refused: bool,
    /// Largest buffer depth seen (for tests and the back-pressure benchmark).
    pub max_depth: usize,
}

impl Core {
    /// Whether new messages may be dispatched now (see `brokers_down`,
    /// `commits_refused`); in-flight work goes on either way.
    fn may_dispatch(&self) -> bool {
        !self.halted && !self.brokers_down && !self.commits_refused
    }

    fn is_current(&self, msg: &Message) -> bool {
        self.assigned.get(&msg.tp) == Some(&msg.generation) && !self.revoking.contains(&msg.tp)
    }

    /// Starts `tp` clean under a new generation.
    pub fn assign(&mut self, tp: TopicPartition) {
        self.next_generation += 1;
        self.tracker.remove(&tp);
        self.buffer.drop_partition(&tp);
        self.to_store.remove(&tp);
        self.revoking.remove(&tp);
        self.assigned.insert(tp, self.next_generation);
    }

    /// Buffers a fetched message of an assigned partition; others are dropped (their
    /// partition was revoked after the fetch). Returns whether it was kept.
    pub fn push(&mut self, mut msg: Message) -> bool {
        let Some(&generation) = self.assigned.get(&msg.tp) else {
            return false;
        };
        if self.stopping || self.revoking.contains(&msg.tp) {
            return false;
        }
        msg.generation = generation;
        self.tracker.received(&msg.tp, msg.offset);
        self.buffer.push(msg);
        self.max_depth = self.max_depth.max(self.buffer.len());
        true
    }

    /// [`Core::push`] for a poll batch, emptying `batch`: the assignment, the tracker
    /// and the buffer are looked up once per run of messages of one partition.
    pub fn push_batch(&mut self, batch: &mut Vec<Message>) {
        let mut dropped = false;
        let mut start = 0;
        while start < batch.len() {
            let tp = batch[start].tp.clone();
            let mut end = start + 1;
            while end < batch.len() && batch[end].tp == tp {
                end += 1;
            }
            let run = &mut batch[start..end];
            match self.assigned.get(&tp) {
                Some(&generation) if !self.stopping && !self.revoking.contains(&tp) => {
                    for m in run.iter_mut() {
                        m.generation = generation;
                    }
                    self.tracker.received_all(&tp, run.iter().map(|m| m.offset));
                }
                // Not kept: generation 0 is never an assignment's (they start at 1).
                _ => {
                    for m in run.iter_mut() {
                        m.generation = 0;
                    }
                    dropped = true;
                }
            }
            start = end;
        }
        if dropped {
            batch.retain(|m| m.generation != 0);
        }
        self.buffer.extend(batch.drain(..));
        self.max_depth = self.max_depth.max(self.buffer.len());
    }
}

/// Everything the threads and tasks of one replica share.
#[derive(Debug)]
pub struct Shared {
    pub core: Mutex<Core>,
    /// Signalled when in-flight work finishes (revoke and shutdown wait on it).
    pub idle: Condvar,
    /// Wakes the dispatcher: a message arrived, a key or slot freed, the lease changed.
    pub wake: Notify,
    /// Signalled when the buffer drains below its refill mark (the Kafka thread waits
    /// on it after the buffer was full, instead of polling for messages it has no room
    /// for, or for one message per freed slot).
    pub room: Condvar,
    /// Signalled (to all waiters) when the shutdown grace is over.
    pub halted: Notify,
    /// Current in-flight limit from the lease.
    pub in_flight_limit: AtomicU32,
    pub metrics: Arc<Metrics>,
    /// Messages fetched so far (demand estimation).
    pub arrivals: AtomicU64,
    /// Sum of sink latencies in microseconds and their count (demand estimation).
    pub latency_us: AtomicU64,
    pub latency_count: AtomicU64,
    /// Set once any assignment (possibly empty) arrived: the replica is in the group.
    pub joined: AtomicBool,
    /// librdkafka's own view from its last statistics (see [`Shared::describe`]).
    kafka_view: Mutex<String>,
}

impl Shared {
    pub fn new(ordering: Ordering, max_messages: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            core: Mutex::new(Core {
                buffer: Buffer::new(ordering, max_messages, max_bytes),
                tracker: OffsetTracker::new(),
                assigned: HashMap::default(),
                revoking: HashSet::default(),
                in_flight: HashMap::default(),
                in_flight_total: 0,
                to_store: HashMap::default(),
                next_generation: 0,
                stopping: false,
                halted: false,
                brokers_down: false,
                commits_refused: false,
                max_depth: 0,
            }),
            idle: Condvar::new(),
            room: Condvar::new(),
            wake: Notify::new(),
            halted: Notify::new(),
            in_flight_limit: AtomicU32::new(0),
            metrics: Arc::new(Metrics::new()),
            arrivals: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            kafka_view: Mutex::default(),
        })
    }

    /// Records whether any broker answers (see [`Core::brokers_down`]); wakes the
    /// dispatcher when they are back.
    pub fn set_brokers_down(&self, down: bool) {
        let mut core = self.lock();
        if core.brokers_down == down {
            return;
        }
        core.brokers_down = down;
        drop(core);
        self.metrics.brokers_down.set(i64::from(down));
        if down {
            warn!("No Kafka broker answers; buffered messages wait until one does");
        } else {
            info!("A Kafka broker answers again; dispatching resumes");
            self.wake.notify_one();
        }
    }

    /// The committable offset of every partition still assigned.
    pub fn assigned_committable(&self) -> Vec<(TopicPartition, i64)> {
        let core = self.lock();
        core.tracker
            .all_committable()
            .into_iter()
            .filter(|(tp, _)| core.assigned.contains_key(tp))
            .collect()
    }

    /// One line on what the replica holds and why it may not be dispatching: its
    /// assignment, buffered messages per partition, slots in use and the flags that
    /// stop dispatching. For a test's progress report (a stalled replica says why).
    pub fn describe(&self) -> String {
        let core = self.lock();
        let mut assigned: Vec<String> = core
            .assigned
            .iter()
            .map(|(tp, g)| format!("{tp}#{g}"))
            .collect();
        assigned.sort();
        let buffered: Vec<String> = core
            .buffer
            .depths()
            .iter()
            .map(|(tp, n)| format!("{tp}:{n}"))
            .collect();
        format!(
            "assigned=[{}] revoking={} buffered=[{}] in_flight={}/{} halted={} stopping={} brokers_down={} commits_refused={} paused={} consumed={} librdkafka: {}",
            assigned.join(","),
            core.revoking.len(),
            buffered.join(","),
            core.in_flight_total,
            self.in_flight_limit.load(AtomicOrdering::Relaxed),
            core.halted,
            core.stopping,
            core.brokers_down,
            core.commits_refused,
            self.metrics.paused_partitions.get(),
            self.metrics.consumed.get(),
            self.kafka_view.lock().unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Records librdkafka's view of the group and of the assigned partitions it is not
    /// fetching, from its statistics (for [`Shared::describe`]).
    pub fn set_kafka_view(&self, view: String) {
        *self.kafka_view.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }

    /// Records whether the group refuses commits (see [`Core::commits_refused`]).
    pub fn set_commits_refused(&self, refused: bool) {
        let mut core = self.lock();
        if core.commits_refused == refused {
            return;
        }
        core.commits_refused = refused;
        drop(core);
        if refused {
            info!("The group refuses commits (rebalancing); buffered messages wait");
        } else {
            debug!("Commits accepted again; dispatching resumes");
            self.wake.notify_one();
        }
    }

    /// Locks the core. A panic while holding it would be a bug; the state is still
    /// consistent enough to shut down, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_gauges(&self, core: &Core) {
        let m = &self.metrics;
        m.buffer_messages.set(core.buffer.len() as i64);
        m.buffer_bytes.set(core.buffer.bytes() as i64);
        m.in_flight.set(i64::from(core.in_flight_total));
    }

    /// A worker finished `msg` (acked or dead-lettered): free its key and slot and let
    /// its offset advance.
    pub fn complete(&self, msg: &Message) {
        self.complete_all(std::slice::from_ref(msg));
    }

    /// [`Shared::complete`] for several messages under one lock (the synchronous
    /// sinks' fast path).
    /// Runs of messages of one partition and generation share the map lookups.
    pub fn complete_all(&self, msgs: &[Message]) {
        let mut core = self.lock();
        let mut emptied = false;
        for run in runs(msgs) {
            let first = &run[0];
            if core.assigned.get(&first.tp) == Some(&first.generation) {
                let tracker = &mut core.tracker;
                if let Some(o) = tracker.completed_all(&first.tp, run.iter().map(|m| m.offset)) {
                    core.to_store.insert(first.tp.clone(), o);
                }
            }
            emptied |= Self::release_slots(&mut core, run);
        }
        self.update_gauges(&core);
        drop(core);
        self.after_release(emptied);
    }

    /// [`Shared::complete`], then, under the same lock, the next message allowed by
    /// the ordering rule if the in-flight limit still has room for it (the caller's
    /// slot was just freed) and the replica is not halted; the message counts as in
    /// flight like one the dispatcher handed out. The dispatcher is woken only when
    /// there may be work left for it.
    pub fn complete_and_take_next(&self, msg: &Message) -> Option<Message> {
        let mut core = self.lock();
        if core.assigned.get(&msg.tp) == Some(&msg.generation) {
            if let Some(o) = core.tracker.completed(&msg.tp, msg.offset) {
                core.to_store.insert(msg.tp.clone(), o);
            }
        }
        let emptied = Self::release_slot(&mut core, msg);
        let limit = self.in_flight_limit.load(AtomicOrdering::Relaxed);
        let mut next = None;
        if core.may_dispatch() && core.in_flight_total < limit {
            let was_above = !core.buffer.below_refill_mark();
            if let Some(m) = core.buffer.pop_ready() {
                core.in_flight_total += 1;
                *core
                    .in_flight
                    .entry((m.tp.clone(), m.generation))
                    .or_default() += 1;
                if was_above && core.buffer.below_refill_mark() {
                    self.room.notify_one();
                }
                next = Some(m);
            }
        }
        let more = core.in_flight_total < limit && !core.buffer.is_empty();
        self.update_gauges(&core);
        drop(core);
        if emptied {
            self.idle.notify_all();
        }
        if next.is_none() || more {
            self.wake.notify_one();
        }
        next
    }

    /// A worker gave up on `msg` without finishing it (its partition was revoked or
    /// the shutdown grace is over): the offset stays where it is.
    pub fn abandon(&self, msg: &Message) {
        let mut core = self.lock();
        self.metrics.outcome("abandoned");
        let emptied = Self::release_slot(&mut core, msg);
        self.update_gauges(&core);
        drop(core);
        self.after_release(emptied);
    }

    /// Frees the key and in-flight slot of `msg`; true when its partition has nothing
    /// in flight any more (what a revoke waits for).
    fn release_slot(core: &mut Core, msg: &Message) -> bool {
        Self::release_slots(core, std::slice::from_ref(msg))
    }

    /// [`Self::release_slot`] for a run of messages of one partition and generation.
    fn release_slots(core: &mut Core, run: &[Message]) -> bool {
        let Some(first) = run.first() else {
            return false;
        };
        for msg in run {
            core.buffer.release(&msg.tp, msg.key.as_ref(), msg.offset);
        }
        let count = run.len() as u32;
        core.in_flight_total = core.in_flight_total.saturating_sub(count);
        let key = (first.tp.clone(), first.generation);
        match core.in_flight.get_mut(&key) {
            Some(n) if *n > count => {
                *n -= count;
                false
            }
            Some(_) => {
                core.in_flight.remove(&key);
                true
            }
            None => false,
        }
    }

    fn after_release(&self, emptied: bool) {
        // Only a partition running empty can end a revoke's wait; waking the condvar
        // on every completion would cost a futex call per message.
        if emptied {
            self.idle.notify_all();
        }
        self.wake.notify_one();
    }

    /// A popped message whose reserved in-flight slot (counted in the total only, see
    /// [`dispatch`]) is given back without it reaching a worker.
    fn unreserve(&self, msg: &Message) {
        let mut core = self.lock();
        debug_assert!(core.in_flight_total > 0, "a reserved slot is counted");
        core.in_flight_total -= 1;
        core.buffer.release(&msg.tp, msg.key.as_ref(), msg.offset);
        self.update_gauges(&core);
        drop(core);
        self.wake.notify_one();
    }

    /// Turns `msg`'s reserved slot into its partition's in-flight count, or gives it
    /// back if the partition was revoked meanwhile; true when `msg` may go to a worker.
    fn dispatch_reserved(&self, msg: &Message) -> bool {
        let mut core = self.lock();
        if !core.is_current(msg) {
            drop(core);
            self.unreserve(msg);
            return false;
        }
        *core
            .in_flight
            .entry((msg.tp.clone(), msg.generation))
            .or_default() += 1;
        true
    }

    /// A popped message that never reached a worker.
    fn unpop(&self, msg: &Message) {
        let mut core = self.lock();
        core.buffer.release(&msg.tp, msg.key.as_ref(), msg.offset);
        drop(core);
        self.wake.notify_one();
    }

    fn should_give_up(&self, msg: &Message) -> bool {
        let core = self.lock();
        core.halted || !core.is_current(msg)
    }

    /// Revokes `tps`: drops their buffered messages, waits up to `deadline` for their
    /// in-flight work, forgets them and returns the offsets to commit. Blocking (called
    /// from the Kafka thread's rebalance callback).
    pub fn revoke(&self, tps: &[TopicPartition], deadline: Duration) -> Vec<(TopicPartition, i64)> {
        let mut core = self.lock();
        let mut dropped = 0;
        for tp in tps {
            dropped += core.buffer.drop_partition(tp);
            core.revoking.insert(tp.clone());
        }
        for _ in 0..dropped {
            self.metrics.outcome("dropped_on_revoke");
        }
        let until = Instant::now() + deadline;
        let busy = |core: &Core| {
            tps.iter().any(|tp| {
                core.assigned
                    .get(tp)
                    .is_some_and(|g| core.in_flight.contains_key(&(tp.clone(), *g)))
            })
        };
        while busy(&core) {
            let now = Instant::now();
            if now >= until {
                warn!(
                    partitions = tps.len(),
                    ?deadline,
                    "In-flight work of revoked partitions did not finish in time; their offsets stay behind it"
                );
                break;
            }
            core = self
                .idle
                .wait_timeout(core, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut commit = Vec::new();
        for tp in tps {
            if let Some(o) = core.tracker.committable(tp) {
                commit.push((tp.clone(), o));
            }
            core.tracker.remove(tp);
            core.assigned.remove(tp);
            core.revoking.remove(tp);
            core.to_store.remove(tp);
        }
        self.update_gauges(&core);
        drop(core);
        self.wake.notify_one();
        commit
    }

    /// Start of shutdown (the source has stopped fetching): drops the buffered
    /// messages above the highest offset dispatched from their partition, which the
    /// group's next owner fetches again, and keeps the gaps below it for the
    /// dispatcher, so that once they and the in-flight work finish, every partition's
    /// commit covers everything processed and nothing is delivered twice. Returns how
    /// many buffered messages were kept.
    pub fn stop(&self) -> usize {
        let mut core = self.lock();
        core.stopping = true;
        let (kept, dropped) = core.buffer.retain_gaps();
        self.update_gauges(&core);
        drop(core);
        debug!(
            kept,
            dropped, "Stopping: buffered gaps kept, the rest dropped"
        );
        self.wake.notify_one();
        kept
    }

    /// Waits (async) until nothing is in flight and no gap is left in the buffer, or
    /// `grace` passed; then halts (the dispatcher ends, workers give up, the buffer is
    /// dropped). Returns the messages that were in flight at the halt.
    pub async fn drain(&self, grace: Duration) -> u32 {
        let until = tokio::time::Instant::now() + grace;
        loop {
            let left = {
                let mut core = self.lock();
                // Dispatched messages only: a slot the dispatcher reserved while it waits
                // for a rate permit holds no message the sink has seen; the halt gives
                // it back and the message stays uncommitted for the next owner.
                let done = core.in_flight.is_empty() && core.buffer.is_empty();
                if done || tokio::time::Instant::now() >= until {
                    core.halted = true;
                    core.buffer.clear();
                    self.update_gauges(&core);
                    Some(core.in_flight.values().sum())
                } else {
                    None
                }
            };
            if let Some(left) = left {
                self.halted.notify_waiters();
                self.wake.notify_one();
                return left;
            }
            // Short poll: shutdown is rare and this keeps the completion path free of an
            // extra async notification.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Splits `msgs` into runs of consecutive messages of the same partition and
/// generation.
fn runs(msgs: &[Message]) -> impl Iterator<Item = &[Message]> {
    msgs.chunk_by(|a, b| a.generation == b.generation && a.tp == b.tp)
}

/// Most messages the unlimited fast path takes under one lock.
const MAX_DISPATCH_BATCH: usize = 256;

/// What a worker needs besides the message.
pub struct WorkerContext {
    /// `pacer_messages_total{outcome="acked"}`, resolved once (a family lookup per
    /// message costs a lock and a hash).
    pub acked: prometheus_client::metrics::counter::Counter,
    pub shared: Arc<Shared>,
    pub limiter: Arc<RateLimiter>,
    pub sink: Sink,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub dead_letter: Option<(FutureProducer, String)>,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("sink", &self.sink)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("dead_letter", &self.dead_letter.as_ref().map(|(_, t)| t))
            .finish()
    }
}

/// The dispatcher: pull the next message whose ordering key is free, then an in-flight
/// slot, then a rate permit, then hand it to a worker task. Returns when the
/// replica stops.
pub async fn dispatch(ctx: Arc<WorkerContext>) {
    let shared = ctx.shared.clone();
    'next: loop {
        if ctx.limiter.is_unlimited() {
            // Fast path without a rate limit: take every ready message that has a free
            // slot under one lock (per-message locking capped a null sink at ~140k msg/s).
            let woken = shared.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let mut batch = {
                let mut core = shared.lock();
                if core.halted || (core.stopping && core.buffer.is_empty()) {
                    return;
                }
                let limit = shared.in_flight_limit.load(AtomicOrdering::Relaxed);
                let was_above = !core.buffer.below_refill_mark();
                let mut batch = Vec::new();
                let slots = if !core.may_dispatch() {
                    0
                } else {
                    limit.saturating_sub(core.in_flight_total) as usize
                };
                core.buffer
                    .pop_batch(slots.min(MAX_DISPATCH_BATCH), &mut batch);
                core.in_flight_total += batch.len() as u32;
                for run in runs(&batch) {
                    *core
                        .in_flight
                        .entry((run[0].tp.clone(), run[0].generation))
                        .or_default() += run.len() as u32;
                }
                if !batch.is_empty() {
                    shared.update_gauges(&core);
                    if was_above && core.buffer.below_refill_mark() {
                        shared.room.notify_one();
                    }
                }
                batch
            };
            if batch.is_empty() {
                woken.await;
                continue 'next;
            }
            if ctx.sink.is_synchronous() {
                // Nothing to wait for: deliver inline and complete at once what was
                // delivered. The first message the sink refuses (stdout closed, say) and
                // the rest of the batch go through `work` like any sink's messages
                // (retries, dead letter, or held): a message is never completed unwritten.
                let delivered = deliver_inline(&ctx, &batch).await;
                let rest = batch.split_off(delivered);
                ctx.acked.inc_by(batch.len() as u64);
                shared.complete_all(&batch);
                for m in rest {
                    tokio::spawn(work(ctx.clone(), m));
                }
                // Let the Kafka thread's notifications and other tasks in.
                tokio::task::yield_now().await;
            } else {
                for m in batch {
                    tokio::spawn(work(ctx.clone(), m));
                }
            }
            continue 'next;
        }
        // 1. A message whose key (or partition) is free.
        let msg = loop {
            let woken = shared.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut core = shared.lock();
                if core.halted || (core.stopping && core.buffer.is_empty()) {
                    return;
                }
                let was_above = !core.buffer.below_refill_mark();
                let next = if !core.may_dispatch() {
                    None
                } else {
                    core.buffer.pop_ready()
                };
                if let Some(m) = next {
                    shared.update_gauges(&core);
                    if was_above && core.buffer.below_refill_mark() {
                        shared.room.notify_one();
                    }
                    break m;
                }
            }
            woken.await;
        };
        // 2. An in-flight slot (resized live), before the rate permit: a permit taken
        //    first would be held while every slot is busy and spent the moment one
        //    frees, right before the next permit, so the sink could see one message per
        //    replica more in a second than the rate and burst allow. The slot is counted
        //    in the total only; the partition's count (what a revoke waits for) follows
        //    the permit, so a revoke never waits on a message that has not gone out.
        loop {
            let woken = shared.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut core = shared.lock();
                if core.halted {
                    drop(core);
                    shared.unpop(&msg);
                    return;
                }
                if !core.is_current(&msg) {
                    drop(core);
                    shared.unpop(&msg);
                    continue 'next;
                }
                if core.in_flight_total < shared.in_flight_limit.load(AtomicOrdering::Relaxed) {
                    core.in_flight_total += 1;
                    shared.update_gauges(&core);
                    break;
                }
            }
            woken.await;
        }
        // 3. A rate permit (re-rated live by the lease follower); the message goes out
        //    as soon as it is granted.
        tokio::select! {
            _ = ctx.limiter.acquire() => {}
            _ = halted(&shared) => { shared.unreserve(&msg); return; }
        }
        if !shared.dispatch_reserved(&msg) {
            continue 'next;
        }
        tokio::spawn(work(ctx.clone(), msg));
    }
}

/// Resolves when the shutdown grace is over.
async fn halted(shared: &Shared) {
    loop {
        let woken = shared.halted.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if shared.lock().halted {
            return;
        }
        woken.await;
    }
}

/// Delivers `batch` in order through a synchronous sink until one attempt fails;
/// returns how many were delivered.
async fn deliver_inline(ctx: &WorkerContext, batch: &[Message]) -> usize {
    for (i, m) in batch.iter().enumerate() {
        if !matches!(ctx.sink.deliver(m).await, Attempt::Delivered) {
            return i;
        }
    }
    batch.len()
}

/// One message through the sink, with retries and dead-lettering, until it is finished
/// or its partition is taken away.
///
/// Without a rate limit, a worker that finished its message takes the next ready one
/// with the slot it already holds (under the same lock as the completion), instead of
/// waking the dispatcher to spawn a new task: the in-flight limit, the ordering rule
/// and the stop flag are checked exactly as the dispatcher checks them.
pub async fn work(ctx: Arc<WorkerContext>, mut msg: Message) {
    loop {
        if !finish(&ctx, &msg).await {
            ctx.shared.abandon(&msg);
            return;
        }
        if !ctx.limiter.is_unlimited() {
            ctx.shared.complete(&msg);
            return;
        }
        match ctx.shared.complete_and_take_next(&msg) {
            Some(next) => msg = next,
            None => return,
        }
    }
}

/// Delivers `msg` (retries, dead letter) until it is finished (`true`: acked or
/// dead-lettered) or should be given up (`false`: revoked or halted).
async fn finish(ctx: &WorkerContext, msg: &Message) -> bool {
    let m = &ctx.shared.metrics;
    let mut attempt: u32 = 1;
    let mut tries: u32 = 0;
    loop {
        tries = tries.saturating_add(1);
        let started = Instant::now();
        let result = match tokio::time::timeout(ctx.timeout, ctx.sink.deliver(msg)).await {
            Ok(r) => r,
            Err(_) => Attempt::Timeout,
        };
        let elapsed = started.elapsed();
        m.sink_latency.observe(elapsed.as_secs_f64());
        ctx.shared
            .latency_us
            .fetch_add(elapsed.as_micros() as u64, AtomicOrdering::Relaxed);
        ctx.shared
            .latency_count
            .fetch_add(1, AtomicOrdering::Relaxed);
        let jitter: f64 = rand::random();
        match decide(
            &result,
            attempt,
            &ctx.retry,
            ctx.dead_letter.is_some(),
            jitter,
        ) {
            Decision::Ack => {
                ctx.acked.inc();
                break;
            }
            Decision::Retry {
                after,
                reason,
                counts,
            } => {
                m.retries
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
                trace!(tp = %msg.tp, offset = msg.offset, attempt = tries, error = %result.describe(), ?after, "Retrying");
                if counts {
                    attempt = attempt.saturating_add(1);
                }
                if !sleep_unless_given_up(&ctx.shared, msg, after).await {
                    return false;
                }
                // A retry is another call to the service: it needs a permit too. The
                // wait gives up like the back-off does (a lease at zero would otherwise
                // hold a revoke or the end of the shutdown grace).
                if !permit_unless_given_up(ctx, msg).await {
                    return false;
                }
            }
            Decision::DeadLetter { error } => {
                if !dead_letter(ctx, msg, &error, tries).await {
                    return false;
                }
                m.dead_lettered.inc();
                m.outcome("dead_lettered");
                break;
            }
        }
    }
    true
}

/// Sleeps `after` in short steps, returning `false` as soon as the message should be
/// given up (revoked partition, shutdown).
async fn sleep_unless_given_up(shared: &Shared, msg: &Message, after: Duration) -> bool {
    let until = tokio::time::Instant::now() + after;
    loop {
        if shared.should_give_up(msg) {
            return false;
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        // Check for revocation at least every 100 ms so a rebalance is not held up by
        // a message waiting out a long backoff.
        tokio::time::sleep_until(until.min(now + Duration::from_millis(100))).await;
    }
}

/// Waits for a rate permit, returning `false` as soon as the message should be given
/// up (checked every 100 ms; [`RateLimiter::acquire`] is cancel-safe).
async fn permit_unless_given_up(ctx: &WorkerContext, msg: &Message) -> bool {
    loop {
        if ctx.shared.should_give_up(msg) {
            return false;
        }
        if tokio::time::timeout(Duration::from_millis(100), ctx.limiter.acquire())
            .await
            .is_ok()
        {
            return true;
        }
    }
}

/// Writes `msg` to the dead-letter topic, retrying until it is written (never ack a
/// message that is neither delivered nor dead-lettered). `false`: given up (revoked).
async fn dead_letter(ctx: &WorkerContext, msg: &Message, error: &str, tries: u32) -> bool {
    let Some((producer, topic)) = &ctx.dead_letter else {
        return false;
    };
    let mut attempt = 1;
    loop {
        let headers = dead_letter_headers(msg, error, tries);
        match produce(producer, topic, msg, headers).await {
            Attempt::Delivered => return true,
            other => {
                ctx.shared.metrics.kafka_errors.inc();
                warn!(topic = %topic, error = %other.describe(), "Cannot write to the dead-letter topic; retrying");
                let wait = backoff(attempt, &ctx.retry, rand::random());
                attempt += 1;
                if !sleep_unless_given_up(&ctx.shared, msg, wait).await {
                    return false;
                }
            }
        }
    }
}
