//! The state one replica's threads and tasks share, reached only through narrow handles:
//!
//! - [`Intake`], the Kafka thread's: push a poll batch, read the fill level, wait for
//!   room, take the offsets to store, assign and revoke partitions, report the broker
//!   and group conditions.
//! - [`Outlet`], the dispatcher's: take ready messages together with their in-flight
//!   slots ([`InFlight`], [`Reserved`]), which free themselves when dropped.
//! - [`Status`], everyone else's (admin endpoints, demand reports, tests): read-only
//!   views and the metrics.
//!
//! ```text
//!  Intake --push_batch--> Core{buffer, tracker, slots} --take--> Outlet -> InFlight
//!     ^  take_to_store          ^                                   |
//!     |                         +------ complete / drop (abandon) --+
//!     +-- revoke waits for the partition's slots (`idle`)
//! ```
//!
//! Everything that decides lives in pure modules ([`crate::buffer`],
//! [`crate::offsets`], [`crate::rate`], [`crate::outcome`], [`crate::backpressure`]);
//! this module only moves messages between them under one mutex. The mutex is a `std`
//! one: critical sections are short and the Kafka thread (not async) takes it too.
//!
//! The replica's lifecycle is one [`Lifecycle`] value under that mutex, advanced only by
//! [`Shared::begin_drain`], [`Draining::drain`] and [`Halted::close`], each a method of
//! the token the step before returned, so shutdown cannot run out of order.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::backpressure::Level;
use crate::buffer::Buffer;
use crate::config::Ordering;
use crate::hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use crate::message::{Message, TopicPartition};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;

/// Where the replica is in its life. Only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lifecycle {
    /// Fetching and dispatching.
    Running,
    /// Shutdown started: nothing more is fetched (every partition is paused); only the
    /// gaps left in the buffer (see [`Buffer::retain_gaps`]) are still dispatched, and
    /// in-flight work goes on.
    Draining,
    /// The shutdown grace is over, or nothing was left: nothing more is dispatched and
    /// workers give up (their offsets stay uncommitted).
    Halted,
    /// The Kafka thread commits what is complete, leaves the group and ends; a revoke
    /// no longer waits for in-flight work (there is none left to wait for).
    Closing,
}

/// A partition's messages in flight are counted per assignment generation, so a
/// re-assigned partition's new work is not confused with the old one's.
type Assignment = (TopicPartition, u64);

/// The in-flight slots: the only place they are counted.
///
/// A slot is *reserved* (counted in the total only) while the dispatcher waits for a
/// rate permit, and *dispatched* (counted for its partition too) once the message goes
/// to a worker: a revoke waits for dispatched messages only, so it never waits on one
/// that has not gone out.
#[derive(Debug, Default)]
struct Slots {
    total: u32,
    dispatched: HashMap<Assignment, u32>,
}

impl Slots {
    fn free(&self, limit: u32) -> u32 {
        limit.saturating_sub(self.total)
    }

    fn reserve(&mut self) {
        self.total += 1;
    }

    /// Turns a reserved slot into a dispatched one.
    fn dispatch_reserved(&mut self, of: Assignment) {
        *self.dispatched.entry(of).or_default() += 1;
    }

    /// Reserves and dispatches `n` slots at once.
    fn dispatch(&mut self, of: Assignment, n: u32) {
        self.total += n;
        *self.dispatched.entry(of).or_default() += n;
    }

    fn unreserve(&mut self) {
        self.total = Self::minus(self.total, 1, "reserved");
    }

    /// Frees `n` dispatched slots of `of`; true when it has none left (what a revoke
    /// waits for).
    fn release(&mut self, of: &Assignment, n: u32) -> bool {
        self.total = Self::minus(self.total, n, "total");
        match self.dispatched.get_mut(of) {
            Some(left) if *left > n => {
                *left -= n;
                false
            }
            Some(left) => {
                if *left < n {
                    Self::minus(*left, n, "partition");
                }
                self.dispatched.remove(of);
                true
            }
            None => {
                Self::minus(0, n, "partition");
                false
            }
        }
    }

    /// A count going below zero is a slot released twice: impossible through the
    /// guards, so a bug. Loud in tests; logged, never a panic, in production.
    fn minus(count: u32, n: u32, what: &str) -> u32 {
        count.checked_sub(n).unwrap_or_else(|| {
            error!(count, n, what, "BUG: in-flight slot released twice");
            debug_assert!(
                false,
                "in-flight slot released twice ({what}: {count} - {n})"
            );
            0
        })
    }

    fn is_dispatched(&self, of: &Assignment) -> bool {
        self.dispatched.contains_key(of)
    }

    fn dispatched_total(&self) -> u32 {
        self.dispatched.values().sum()
    }
}

/// State guarded by the mutex of [`Shared`].
#[derive(Debug)]
struct Core {
    lifecycle: Lifecycle,
    buffer: Buffer,
    tracker: OffsetTracker<TopicPartition>,
    /// Assigned partitions and the generation of their current assignment.
    assigned: HashMap<TopicPartition, u64>,
    /// Partitions being revoked: their workers stop retrying and give up.
    revoking: HashSet<TopicPartition>,
    slots: Slots,
    /// Committable offsets not yet stored in the consumer (the Kafka thread stores them).
    to_store: HashMap<TopicPartition, i64>,
    next_generation: u64,
    /// Set while no broker answers: buffered messages wait. What completes while the
    /// group cannot be reached cannot be committed, and the partitions may already be
    /// another member's, so delivering on would only add duplicates; in-flight work
    /// finishes.
    brokers_down: bool,
    /// Set while the group refuses commits because it is rebalancing (or moved to a new
    /// generation): buffered messages wait, for the same reason. Cleared by the next
    /// assignment or by a commit that is accepted (the Kafka thread tries every 250 ms).
    commits_refused: bool,
    /// Partitions the Kafka thread has paused (all of them under back-pressure, or some
    /// held by their share of the buffer): fetched data waits in Kafka, a backlog.
    paused_partitions: usize,
    /// Largest buffer depth seen (for tests and the back-pressure benchmark).
    max_depth: usize,
}

impl Core {
    /// Whether new messages may be dispatched now (see `brokers_down`,
    /// `commits_refused`); in-flight work goes on either way.
    fn may_dispatch(&self) -> bool {
        self.lifecycle < Lifecycle::Halted && !self.brokers_down && !self.commits_refused
    }

    /// Whether the dispatcher is done: halted, or draining with nothing left to give.
    fn dispatcher_done(&self) -> bool {
        self.lifecycle >= Lifecycle::Halted
            || (self.lifecycle == Lifecycle::Draining && self.buffer.is_empty())
    }

    fn is_current(&self, msg: &Message) -> bool {
        self.assigned.get(&msg.tp) == Some(&msg.generation) && !self.revoking.contains(&msg.tp)
    }

    fn should_give_up(&self, msg: &Message) -> bool {
        self.lifecycle >= Lifecycle::Halted || !self.is_current(msg)
    }

    /// Starts `tp` clean under a new generation.
    fn assign(&mut self, tp: TopicPartition) {
        self.next_generation += 1;
        self.tracker.remove(&tp);
        self.buffer.drop_partition(&tp);
        self.to_store.remove(&tp);
        self.revoking.remove(&tp);
        self.assigned.insert(tp, self.next_generation);
    }

    /// Buffers a poll batch, emptying `batch`; messages of partitions not assigned (or
    /// being revoked) any more are dropped: their partition was revoked after the
    /// fetch. The assignment, the tracker and the buffer are looked up once per run of
    /// messages of one partition.
    fn push_batch(&mut self, batch: &mut Vec<Message>) {
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
                Some(&generation)
                    if self.lifecycle == Lifecycle::Running && !self.revoking.contains(&tp) =>
                {
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

    /// A finished message (acked or dead-lettered) lets its partition's offset advance.
    fn completed(&mut self, run: &[Message]) {
        let first = &run[0];
        if self.assigned.get(&first.tp) == Some(&first.generation) {
            if let Some(o) = self
                .tracker
                .completed_all(&first.tp, run.iter().map(|m| m.offset))
            {
                self.to_store.insert(first.tp.clone(), o);
            }
        }
    }

    /// Frees the keys and dispatched slots of a run of messages of one partition and
    /// generation; true when the partition has nothing in flight any more.
    fn release(&mut self, run: &[Message]) -> bool {
        let Some(first) = run.first() else {
            return false;
        };
        for msg in run {
            self.buffer.release(&msg.tp, msg.key.as_ref(), msg.offset);
        }
        self.slots
            .release(&(first.tp.clone(), first.generation), run.len() as u32)
    }
}

/// Splits `msgs` into runs of consecutive messages of the same partition and
/// generation.
fn runs(msgs: &[Message]) -> impl Iterator<Item = &[Message]> {
    msgs.chunk_by(|a, b| a.generation == b.generation && a.tp == b.tp)
}

/// Everything the threads and tasks of one replica share; reached through [`Intake`],
/// [`Outlet`] and [`Status`].
#[derive(Debug)]
pub struct Shared {
    core: Mutex<Core>,
    /// Signalled when a partition's dispatched work finishes (revokes wait on it).
    idle: Condvar,
    /// Signalled when the buffer drains below its refill mark (the Kafka thread waits
    /// on it after the buffer was full, instead of polling for messages it has no room
    /// for, or for one message per freed slot).
    room: Condvar,
    /// Wakes the dispatcher: a message arrived, a key or slot freed, the lease changed,
    /// the lifecycle moved.
    wake: Notify,
    /// Signalled (to all waiters) when the lifecycle reaches [`Lifecycle::Halted`].
    halted: Notify,
    /// Current in-flight limit from the lease.
    in_flight_limit: AtomicU32,
    metrics: Arc<Metrics>,
    /// Messages fetched so far (demand estimation).
    arrivals: AtomicU64,
    /// Sum of sink latencies in microseconds and their count (demand estimation).
    latency_us: AtomicU64,
    latency_count: AtomicU64,
    /// Set once any assignment (possibly empty) arrived: the replica is in the group.
    joined: AtomicBool,
    /// librdkafka's own view from its last statistics (see [`Status::describe`]).
    kafka_view: Mutex<String>,
}

/// Shutdown, step 2: draining started ([`Shared::begin_drain`]); [`Draining::drain`]
/// goes on.
#[derive(Debug)]
#[must_use = "shutdown goes on with Draining::drain"]
pub struct Draining(Arc<Shared>);

/// Shutdown, step 3: the replica halted, nothing is dispatched any more;
/// [`Halted::close`] (by the Kafka thread's handle) goes on.
#[derive(Debug)]
#[must_use = "shutdown goes on with Halted::close"]
pub struct Halted(Arc<Shared>);

impl Shared {
    /// A replica's state, with its three handles.
    pub fn new(
        ordering: Ordering,
        max_messages: usize,
        max_bytes: usize,
    ) -> (Arc<Self>, Intake, Outlet, Status) {
        let shared = Arc::new(Self {
            core: Mutex::new(Core {
                lifecycle: Lifecycle::Running,
                buffer: Buffer::new(ordering, max_messages, max_bytes),
                tracker: OffsetTracker::new(),
                assigned: HashMap::default(),
                revoking: HashSet::default(),
                slots: Slots::default(),
                to_store: HashMap::default(),
                next_generation: 0,
                brokers_down: false,
                commits_refused: false,
                paused_partitions: 0,
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
        });
        (
            shared.clone(),
            Intake(shared.clone()),
            Outlet(shared.clone()),
            Status(shared),
        )
    }

    /// Locks the core. A panic while holding it would be a bug; the state is still
    /// consistent enough to shut down, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_gauges(&self, core: &Core) {
        let m = &self.metrics;
        m.buffer_messages.set(core.buffer.len() as i64);
        m.buffer_bytes.set(core.buffer.bytes() as i64);
        m.in_flight.set(i64::from(core.slots.total));
    }

    /// Takes up to `max` ready messages (ordering rule) out of the buffer, and lets the
    /// Kafka thread take messages again if that brought the buffer below its refill
    /// mark. The one place where the buffer gives messages to the dispatch side (the
    /// caller updates the gauges once it counted their slots).
    fn pop(&self, core: &mut Core, max: usize, out: &mut Vec<Message>) {
        let was_above = !core.buffer.below_refill_mark();
        if max == 1 {
            out.extend(core.buffer.pop_ready());
        } else {
            core.buffer.pop_batch(max, out);
        }
        if was_above && core.buffer.below_refill_mark() {
            self.room.notify_one();
        }
    }

    /// Frees the slots of `run`s and wakes what waits on them; with `completed`, their
    /// offsets advance first.
    fn release(&self, msgs: &[Message], completed: bool) {
        let mut core = self.lock();
        let mut emptied = false;
        for run in runs(msgs) {
            if completed {
                core.completed(run);
            }
            emptied |= core.release(run);
        }
        self.update_gauges(&core);
        drop(core);
        self.after_release(emptied);
    }

    fn after_release(&self, emptied: bool) {
        // Only a partition running empty can end a revoke's wait; waking the condvar
        // on every completion would cost a futex call per message.
        if emptied {
            self.idle.notify_all();
        }
        self.wake.notify_one();
    }

    /// Start of shutdown: nothing more is fetched, and the buffered messages above the
    /// highest offset dispatched from their partition are dropped (the group's next
    /// owner fetches them again). The gaps below it stay for the dispatcher, so that once
    /// they and the in-flight work finish, every partition's commit covers everything
    /// processed and nothing is delivered twice.
    pub fn begin_drain(self: &Arc<Self>) -> Draining {
        let mut core = self.lock();
        core.lifecycle = Lifecycle::Draining;
        let (kept, dropped) = core.buffer.retain_gaps();
        self.update_gauges(&core);
        drop(core);
        debug!(
            kept,
            dropped, "Draining: buffered gaps kept, the rest dropped"
        );
        self.wake.notify_one();
        Draining(self.clone())
    }

    /// Moves to [`Lifecycle::Closing`]: the Kafka thread's loop ends. Reached through
    /// [`Halted::close`], or at once when the thread's handle was dropped early
    /// ([`Intake::abort`]).
    fn set_closing(&self) {
        self.lock().lifecycle = Lifecycle::Closing;
        self.room.notify_all();
    }
}

impl Draining {
    /// Waits (async) until nothing is dispatched and no gap is left in the buffer, or
    /// `grace` passed; then halts (the dispatcher ends, workers give up, the buffer is
    /// dropped). Returns the messages that were in flight at the halt.
    pub async fn drain(self, grace: Duration) -> (Halted, u32) {
        let shared = self.0;
        let until = tokio::time::Instant::now() + grace;
        loop {
            let left = {
                let mut core = shared.lock();
                // Dispatched messages only: a slot the dispatcher reserved while it waits
                // for a rate permit holds no message the sink has seen; the halt gives
                // it back and the message stays uncommitted for the next owner.
                let done = core.slots.dispatched.is_empty() && core.buffer.is_empty();
                if done || tokio::time::Instant::now() >= until {
                    core.lifecycle = Lifecycle::Halted;
                    core.buffer.clear();
                    shared.update_gauges(&core);
                    Some(core.slots.dispatched_total())
                } else {
                    None
                }
            };
            if let Some(left) = left {
                shared.halted.notify_waiters();
                shared.wake.notify_one();
                return (Halted(shared), left);
            }
            // Short poll: shutdown is rare and this keeps the completion path free of an
            // extra async notification.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Halted {
    /// The last step: the Kafka thread commits, leaves the group and ends.
    pub fn close(self) {
        self.0.set_closing();
    }
}

/// What the Kafka thread needs to know about the buffer before it polls.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    pub level: Level,
    /// Messages and bytes that still fit.
    pub room: usize,
    pub byte_room: usize,
    /// A partition's share of the buffer (see [`Buffer::holds`]).
    pub share: usize,
    pub lifecycle: Lifecycle,
}

/// The Kafka thread's handle (its consumer context holds one too).
#[derive(Debug, Clone)]
pub struct Intake(Arc<Shared>);

impl Intake {
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn fill(&self) -> Fill {
        let core = self.0.lock();
        Fill {
            level: core.buffer.level(),
            room: core.buffer.room(),
            byte_room: core.buffer.byte_room(),
            share: (core.buffer.max_messages() / core.assigned.len().max(1)).max(1),
            lifecycle: core.lifecycle,
        }
    }

    /// Waits up to `timeout` for the buffer to drain to its refill mark (the dispatch
    /// side signals it); returns at once if it is there already.
    pub fn wait_for_room(&self, timeout: Duration) {
        let core = self.0.lock();
        if !core.buffer.below_refill_mark() && core.lifecycle < Lifecycle::Closing {
            let _ = self.0.room.wait_timeout(core, timeout);
        }
    }

    /// Buffers a poll batch (emptying it) and wakes the dispatcher.
    pub fn push_batch(&self, batch: &mut Vec<Message>) {
        let n = batch.len() as u64;
        let mut core = self.0.lock();
        core.push_batch(batch);
        // Under the lock, so a concurrent pop cannot be overwritten by a stale value.
        self.0.update_gauges(&core);
        drop(core);
        self.0.metrics.consumed.inc_by(n);
        self.0.arrivals.fetch_add(n, AtomicOrdering::Relaxed);
        self.0.wake.notify_one();
    }

    /// The committable offsets that advanced since the last call.
    pub fn take_to_store(&self) -> Vec<(TopicPartition, i64)> {
        self.0.lock().to_store.drain().collect()
    }

    /// The committable offset of every partition still assigned.
    pub fn assigned_committable(&self) -> Vec<(TopicPartition, i64)> {
        let core = self.0.lock();
        core.tracker
            .all_committable()
            .into_iter()
            .filter(|(tp, _)| core.assigned.contains_key(tp))
            .collect()
    }

    pub fn assigned(&self) -> Vec<TopicPartition> {
        self.0.lock().assigned.keys().cloned().collect()
    }

    /// Starts `tps` clean under a new generation; the replica is in the group.
    pub fn assign(&self, tps: &[TopicPartition]) {
        let mut core = self.0.lock();
        for tp in tps {
            core.assign(tp.clone());
        }
        drop(core);
        self.0.joined.store(true, AtomicOrdering::Relaxed);
    }

    /// Revokes `tps`: drops their buffered messages, waits up to `deadline` (none while
    /// closing) for their dispatched work, forgets them and returns the offsets to
    /// commit. Blocking (called from the Kafka thread's rebalance callback).
    pub fn revoke(&self, tps: &[TopicPartition], deadline: Duration) -> Vec<(TopicPartition, i64)> {
        let shared = &self.0;
        let mut core = shared.lock();
        let mut dropped = 0;
        for tp in tps {
            dropped += core.buffer.drop_partition(tp);
            core.revoking.insert(tp.clone());
        }
        for _ in 0..dropped {
            shared.metrics.outcome("dropped_on_revoke");
        }
        let deadline = if core.lifecycle == Lifecycle::Closing {
            Duration::ZERO
        } else {
            deadline
        };
        let until = Instant::now() + deadline;
        let busy = |core: &Core| {
            tps.iter().any(|tp| {
                core.assigned
                    .get(tp)
                    .is_some_and(|g| core.slots.is_dispatched(&(tp.clone(), *g)))
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
            core = shared
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
        shared.update_gauges(&core);
        drop(core);
        shared.wake.notify_one();
        commit
    }

    /// With `partition` ordering: which partitions to hold and which to release (see
    /// [`Buffer::holds`]), given those held now.
    pub fn holds(
        &self,
        share: usize,
        held: &HashSet<TopicPartition>,
    ) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
        let core = self.0.lock();
        core.buffer
            .holds(share, held, |tp| core.assigned.contains_key(tp))
    }

    /// Keeps only the assigned partitions in `held`.
    pub fn retain_assigned(&self, held: &mut HashSet<TopicPartition>) {
        let core = self.0.lock();
        held.retain(|tp| core.assigned.contains_key(tp));
    }

    /// Ends the Kafka thread's loop without a shutdown (its handle was dropped early).
    pub(crate) fn abort(&self) {
        self.0.set_closing();
    }

    /// Records how many partitions are paused (state for the demand, and the gauge).
    pub fn set_paused_partitions(&self, n: usize) {
        self.0.lock().paused_partitions = n;
        self.0.metrics.paused_partitions.set(n as i64);
    }

    pub fn brokers_down(&self) -> bool {
        self.0.lock().brokers_down
    }

    /// Sets one of the conditions that hold dispatching back (`Core::brokers_down`,
    /// `Core::commits_refused`); true when it changed. Clearing one wakes the dispatcher.
    fn set_hold(&self, flag: fn(&mut Core) -> &mut bool, on: bool) -> bool {
        let mut core = self.0.lock();
        let current = flag(&mut core);
        if *current == on {
            return false;
        }
        *current = on;
        drop(core);
        if !on {
            self.0.wake.notify_one();
        }
        true
    }

    /// Records whether any broker answers (see `Core::brokers_down`).
    pub fn set_brokers_down(&self, down: bool) {
        if !self.set_hold(|core| &mut core.brokers_down, down) {
            return;
        }
        self.0.metrics.brokers_down.set(i64::from(down));
        if down {
            warn!("No Kafka broker answers; buffered messages wait until one does");
        } else {
            info!("A Kafka broker answers again; dispatching resumes");
        }
    }

    pub fn commits_refused(&self) -> bool {
        self.0.lock().commits_refused
    }

    /// Records whether the group refuses commits (see `Core::commits_refused`).
    pub fn set_commits_refused(&self, refused: bool) {
        if !self.set_hold(|core| &mut core.commits_refused, refused) {
            return;
        }
        if refused {
            info!("The group refuses commits (rebalancing); buffered messages wait");
        } else {
            debug!("Commits accepted again; dispatching resumes");
        }
    }

    /// Records librdkafka's view of the group and of the assigned partitions it is not
    /// fetching, from its statistics (for [`Status::describe`]).
    pub fn set_kafka_view(&self, view: String) {
        *self.0.kafka_view.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }
}

/// What the dispatch side found under the lock.
#[derive(Debug)]
enum Take<T> {
    Some(T),
    /// Nothing ready now: wait for a change.
    Wait,
    /// The dispatcher is done (halted, or drained).
    Done,
}

/// The dispatcher's handle.
#[derive(Debug, Clone)]
pub struct Outlet(Arc<Shared>);

impl Outlet {
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Applies the lease's in-flight limit and wakes the dispatcher.
    pub fn set_in_flight_limit(&self, limit: u32) {
        self.0.in_flight_limit.store(limit, AtomicOrdering::Relaxed);
        self.0.wake.notify_one();
    }

    /// The next ready messages, as many as the in-flight limit has free slots for (at
    /// most `max`), each dispatched at once: the fast path without a rate limit. Waits
    /// until there are some; `None` once the dispatcher is done (halted, or drained).
    pub async fn next_batch(&self, max: usize) -> Option<InFlightBatch> {
        self.wait_for(|outlet| outlet.take_batch(max)).await
    }

    /// Tries `take` until it finds something or the dispatcher is done, waiting for a
    /// change in between (the wake-up is armed before each try, so none is missed).
    async fn wait_for<T>(&self, mut take: impl FnMut(&Self) -> Take<T>) -> Option<T> {
        loop {
            let woken = self.0.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match take(self) {
                Take::Some(found) => return Some(found),
                Take::Done => return None,
                Take::Wait => woken.await,
            }
        }
    }

    fn take_batch(&self, max: usize) -> Take<InFlightBatch> {
        let mut core = self.0.lock();
        if core.dispatcher_done() {
            return Take::Done;
        }
        if !core.may_dispatch() {
            return Take::Wait;
        }
        let limit = self.0.in_flight_limit.load(AtomicOrdering::Relaxed);
        let slots = core.slots.free(limit) as usize;
        let mut msgs = Vec::new();
        self.0.pop(&mut core, slots.min(max), &mut msgs);
        if msgs.is_empty() {
            return Take::Wait;
        }
        for run in runs(&msgs) {
            core.slots
                .dispatch((run[0].tp.clone(), run[0].generation), run.len() as u32);
        }
        self.0.update_gauges(&core);
        Take::Some(InFlightBatch {
            shared: self.0.clone(),
            msgs,
        })
    }

    /// The next ready message (its key, or partition, is then busy), without a slot
    /// yet (see [`Outlet::reserve`]). Waits until there is one; `None` once the
    /// dispatcher is done.
    pub async fn next_message(&self) -> Option<Popped> {
        self.wait_for(Self::take_one).await
    }

    fn take_one(&self) -> Take<Popped> {
        let mut core = self.0.lock();
        if core.dispatcher_done() {
            return Take::Done;
        }
        if !core.may_dispatch() {
            return Take::Wait;
        }
        let mut one = Vec::with_capacity(1);
        self.0.pop(&mut core, 1, &mut one);
        self.0.update_gauges(&core);
        match one.pop() {
            Some(msg) => Take::Some(Popped {
                shared: self.0.clone(),
                msg: Some(msg),
            }),
            None => Take::Wait,
        }
    }

    /// An in-flight slot (the limit is resized live) for a popped message: waits until
    /// one is free. `None`: the partition was revoked meanwhile or the replica halted;
    /// the message is dropped (its key freed) and the caller takes the next one.
    pub async fn reserve(&self, mut popped: Popped) -> Option<Reserved> {
        loop {
            let woken = self.0.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match popped.reserve() {
                Reserve::Reserved(r) => return Some(r),
                Reserve::Gone => return None,
                Reserve::Full(p) => popped = p,
            }
            woken.await;
        }
    }

    /// Resolves when the shutdown grace is over.
    pub async fn halted(&self) {
        loop {
            let woken = self.0.halted.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.0.lock().lifecycle >= Lifecycle::Halted {
                return;
            }
            woken.await;
        }
    }

    /// Records one sink call's latency (demand estimation).
    pub fn record_latency(&self, latency: Duration) {
        self.0
            .latency_us
            .fetch_add(latency.as_micros() as u64, AtomicOrdering::Relaxed);
        self.0.latency_count.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

/// A message taken from the buffer (its ordering key is now busy) that holds no slot
/// yet. Dropped, its key frees; the message itself is not delivered and its offset stays
/// uncommitted (it is dropped only when its partition was revoked or the replica halted).
#[derive(Debug)]
pub struct Popped {
    shared: Arc<Shared>,
    msg: Option<Message>,
}

/// What [`Popped::reserve`] found.
#[derive(Debug)]
enum Reserve {
    Reserved(Reserved),
    /// No free slot: wait for a change and try again.
    Full(Popped),
    /// The partition was revoked meanwhile, or the replica halted: the message is
    /// dropped (its key freed); take the next one.
    Gone,
}

impl Popped {
    pub fn message(&self) -> &Message {
        self.msg
            .as_ref()
            .expect("a popped message is present until moved")
    }

    /// Reserves an in-flight slot for the message, if the limit has room.
    fn reserve(self) -> Reserve {
        let shared = self.shared.clone();
        let mut core = shared.lock();
        if core.should_give_up(self.message()) {
            drop(core);
            return Reserve::Gone; // dropped below: its key frees
        }
        if core
            .slots
            .free(shared.in_flight_limit.load(AtomicOrdering::Relaxed))
            == 0
        {
            return Reserve::Full(self);
        }
        core.slots.reserve();
        shared.update_gauges(&core);
        drop(core);
        Reserve::Reserved(Reserved { popped: self })
    }
}

impl Drop for Popped {
    fn drop(&mut self) {
        if let Some(msg) = self.msg.take() {
            let mut core = self.shared.lock();
            core.buffer.release(&msg.tp, msg.key.as_ref(), msg.offset);
            drop(core);
            self.shared.wake.notify_one();
        }
    }
}

/// A popped message that also holds a reserved in-flight slot, while it waits for its
/// rate permit. Dropped, the slot is given back (and the key, as the popped message
/// drops).
#[derive(Debug)]
pub struct Reserved {
    popped: Popped,
}

impl Reserved {
    /// Dispatches the message (its partition counts it in flight), or gives the slot
    /// back if the partition was revoked or the replica halted meanwhile.
    ///
    /// Halted counts: the drain waits for dispatched messages only, so a permit granted
    /// after the halt would send a message that the close's commit leaves out, and the
    /// partition's next owner would deliver it again (a fleet scenario re-delivered one
    /// message of 30,000 this way, once in about 20 runs, when the scale-down's SIGTERM
    /// caught a replica waiting for a permit).
    pub fn dispatch(mut self) -> Option<InFlight> {
        let shared = self.popped.shared.clone();
        let mut core = shared.lock();
        let msg = self.popped.msg.as_ref()?;
        if core.should_give_up(msg) {
            drop(core);
            return None; // the slot and the key go back as `self` drops
        }
        core.slots
            .dispatch_reserved((msg.tp.clone(), msg.generation));
        drop(core);
        Some(InFlight {
            msg: self.popped.msg.take(),
            shared,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.popped.msg.is_some() {
            let mut core = self.popped.shared.lock();
            core.slots.unreserve();
            self.popped.shared.update_gauges(&core);
        }
    }
}

/// A message dispatched to a worker, holding its in-flight slot. Completing it
/// ([`InFlight::complete`]) lets its offset advance; dropping it gives the slot back
/// and leaves the offset where it is (the message was given up: revoked or halted).
#[derive(Debug)]
pub struct InFlight {
    shared: Arc<Shared>,
    msg: Option<Message>,
}

impl InFlight {
    pub fn message(&self) -> &Message {
        self.msg
            .as_ref()
            .expect("an in-flight message is present until finished")
    }

    /// Whether to stop working on the message: its partition was revoked or the
    /// shutdown grace is over.
    pub fn should_give_up(&self) -> bool {
        self.shared.lock().should_give_up(self.message())
    }

    /// The message was acked or dead-lettered: its slot and key free, its offset may
    /// advance.
    pub fn complete(mut self) {
        if let Some(msg) = self.msg.take() {
            self.shared.release(std::slice::from_ref(&msg), true);
        }
    }

    /// [`InFlight::complete`], then, under the same lock, the next message allowed by
    /// the ordering rule if the in-flight limit still has room for it (this slot was
    /// just freed) and dispatching is allowed; it counts as in flight like one the
    /// dispatcher handed out. The dispatcher is woken only when there may be work left
    /// for it. Used without a rate limit: a worker goes on with the next message
    /// instead of waking the dispatcher to spawn a new task.
    pub fn complete_and_take_next(mut self) -> Option<InFlight> {
        let msg = self.msg.take()?;
        let shared = &self.shared;
        let mut core = shared.lock();
        core.completed(std::slice::from_ref(&msg));
        let emptied = core.release(std::slice::from_ref(&msg));
        let limit = shared.in_flight_limit.load(AtomicOrdering::Relaxed);
        let mut next = Vec::with_capacity(1);
        if core.may_dispatch() && core.slots.free(limit) > 0 {
            shared.pop(&mut core, 1, &mut next);
            if let Some(m) = next.first() {
                core.slots.dispatch((m.tp.clone(), m.generation), 1);
            }
        }
        let more = core.slots.free(limit) > 0 && !core.buffer.is_empty();
        shared.update_gauges(&core);
        drop(core);
        if emptied {
            shared.idle.notify_all();
        }
        let next = next.pop();
        if next.is_none() || more {
            shared.wake.notify_one();
        }
        next.map(|m| InFlight {
            shared: self.shared.clone(),
            msg: Some(m),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(msg) = self.msg.take() {
            self.shared.metrics.outcome("abandoned");
            self.shared.release(std::slice::from_ref(&msg), false);
        }
    }
}

/// Messages dispatched together (the fast path of a synchronous sink), holding their
/// slots; the same rules as [`InFlight`].
#[derive(Debug)]
pub struct InFlightBatch {
    shared: Arc<Shared>,
    msgs: Vec<Message>,
}

impl InFlightBatch {
    pub fn messages(&self) -> &[Message] {
        &self.msgs
    }

    /// Splits off the messages from `at` on, each on its own.
    pub fn split_off(&mut self, at: usize) -> Vec<InFlight> {
        self.msgs
            .split_off(at)
            .into_iter()
            .map(|m| InFlight {
                shared: self.shared.clone(),
                msg: Some(m),
            })
            .collect()
    }

    /// Every message was acked: see [`InFlight::complete`].
    pub fn complete(mut self) {
        let msgs = std::mem::take(&mut self.msgs);
        if !msgs.is_empty() {
            self.shared.release(&msgs, true);
        }
    }
}

impl Drop for InFlightBatch {
    fn drop(&mut self) {
        if !self.msgs.is_empty() {
            for _ in 0..self.msgs.len() {
                self.shared.metrics.outcome("abandoned");
            }
            self.shared.release(&self.msgs, false);
        }
    }
}

/// Read-only views of the replica (admin endpoints, demand, tests).
#[derive(Debug, Clone)]
pub struct Status(Arc<Shared>);

impl Status {
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    /// Whether any assignment (possibly empty) arrived: the replica is in its group.
    pub fn joined(&self) -> bool {
        self.0.joined.load(AtomicOrdering::Relaxed)
    }

    pub fn brokers_down(&self) -> bool {
        self.0.lock().brokers_down
    }

    /// Whether messages wait: buffered, or held in Kafka by paused partitions.
    pub fn has_backlog(&self) -> bool {
        let core = self.0.lock();
        !core.buffer.is_empty() || core.paused_partitions > 0
    }

    /// Messages fetched so far.
    pub fn arrivals(&self) -> u64 {
        self.0.arrivals.load(AtomicOrdering::Relaxed)
    }

    /// Sum of sink latencies in microseconds, and their count.
    pub fn latency_sum(&self) -> (u64, u64) {
        (
            self.0.latency_us.load(AtomicOrdering::Relaxed),
            self.0.latency_count.load(AtomicOrdering::Relaxed),
        )
    }

    /// Largest buffer depth reached.
    pub fn max_depth(&self) -> usize {
        self.0.lock().max_depth
    }

    /// One line on what the replica holds and why it may not be dispatching: its
    /// assignment, buffered messages per partition, slots in use and the conditions
    /// that stop dispatching. For a test's progress report (a stalled replica says why).
    pub fn describe(&self) -> String {
        let core = self.0.lock();
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
            "assigned=[{}] revoking={} buffered=[{}] in_flight={}/{} lifecycle={:?} brokers_down={} commits_refused={} paused={} consumed={} librdkafka: {}",
            assigned.join(","),
            core.revoking.len(),
            buffered.join(","),
            core.slots.total,
            self.0.in_flight_limit.load(AtomicOrdering::Relaxed),
            core.lifecycle,
            core.brokers_down,
            core.commits_refused,
            core.paused_partitions,
            self.0.metrics.consumed.get(),
            self.0.kafka_view.lock().unwrap_or_else(|e| e.into_inner()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::test_message;

    /// A replica's state with partition 0 assigned, `n` messages buffered and the
    /// in-flight limit at `limit`.
    fn state(n: i64, limit: u32) -> (Arc<Shared>, Intake, Outlet, Status) {
        let (shared, intake, outlet, status) = Shared::new(Ordering::None, 100, 1 << 20);
        intake.assign(&[TopicPartition::new("t", 0)]);
        let mut batch: Vec<Message> = (0..n).map(|o| test_message(0, o, None)).collect();
        intake.push_batch(&mut batch);
        outlet.set_in_flight_limit(limit);
        (shared, intake, outlet, status)
    }

    fn committable(intake: &Intake) -> Option<i64> {
        intake.assigned_committable().first().map(|(_, o)| *o)
    }

    #[tokio::test]
    async fn a_batch_takes_only_the_free_slots_and_completing_it_frees_them_and_advances_the_offset(
    ) {
        let (_s, intake, outlet, status) = state(5, 3);
        let batch = outlet.next_batch(100).await.expect("ready");
        assert_eq!(batch.messages().len(), 3);
        assert!(status.describe().contains("in_flight=3/3"));
        batch.complete();
        assert!(status.describe().contains("in_flight=0/3"));
        assert_eq!(committable(&intake), Some(3));
    }

    #[tokio::test]
    async fn a_dropped_in_flight_message_gives_its_slot_back_and_holds_the_offset() {
        let (_s, intake, outlet, status) = state(2, 2);
        let mut batch = outlet.next_batch(100).await.expect("ready");
        let mut rest = batch.split_off(1);
        batch.complete();
        drop(rest.pop()); // given up (revoked or halted), not finished
        assert!(status.describe().contains("in_flight=0/2"));
        assert_eq!(committable(&intake), Some(1), "offset 1 was not finished");
        let abandoned = status.metrics().encode();
        assert!(
            abandoned.contains("pacer_messages_total{outcome=\"abandoned\"} 1"),
            "{abandoned}"
        );
    }

    #[tokio::test]
    async fn a_reserved_slot_dropped_before_its_permit_goes_back_with_the_key() {
        let (_s, intake, outlet, status) = state(1, 1);
        let popped = outlet.next_message().await.expect("ready");
        let reserved = outlet.reserve(popped).await.expect("a free slot");
        assert!(status.describe().contains("in_flight=1/1"));
        drop(reserved);
        assert!(status.describe().contains("in_flight=0/1"));
        assert_eq!(committable(&intake), Some(0), "nothing finished");
    }

    #[tokio::test]
    async fn a_revoke_waits_for_dispatched_messages_only() {
        let (_s, intake, outlet, _status) = state(3, 3);
        // One message dispatched (completed later), one only reserved.
        let popped = outlet.next_message().await.expect("ready");
        let in_flight = outlet
            .reserve(popped)
            .await
            .expect("slot")
            .dispatch()
            .expect("current");
        let popped = outlet.next_message().await.expect("ready");
        let reserved = outlet.reserve(popped).await.expect("slot");
        let revoking = {
            let intake = intake.clone();
            std::thread::spawn(move || {
                intake.revoke(&[TopicPartition::new("t", 0)], Duration::from_secs(10))
            })
        };
        // The revoke cannot finish while the dispatched message is in flight.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!revoking.is_finished());
        in_flight.complete();
        let committed = revoking.join().expect("revoke");
        assert_eq!(committed, vec![(TopicPartition::new("t", 0), 1)]);
        // The reserved one belongs to a revoked partition: it is not dispatched.
        assert!(reserved.dispatch().is_none());
    }

    #[tokio::test]
    async fn a_message_whose_permit_comes_after_the_halt_is_not_dispatched() {
        let (shared, intake, outlet, _status) = state(2, 2);
        // Offset 0 waits for its permit: the drain does not wait for it.
        let popped = outlet.next_message().await.expect("ready");
        let reserved = outlet.reserve(popped).await.expect("slot");
        let (halted, left) = shared.begin_drain().drain(Duration::from_secs(10)).await;
        assert_eq!(left, 0, "nothing was dispatched");
        assert!(
            reserved.dispatch().is_none(),
            "halted: the close commits without it, so it must not reach the sink"
        );
        assert_eq!(committable(&intake), Some(0), "offset 0 stays uncommitted");
        halted.close();
    }

    #[tokio::test]
    async fn draining_keeps_only_the_gaps_and_halting_ends_the_dispatcher() {
        let (shared, _intake, outlet, _status) = state(4, 1);
        let first = outlet.next_batch(100).await.expect("ready");
        let (halted, left) = shared.begin_drain().drain(Duration::from_millis(20)).await;
        assert_eq!(left, 1, "the dispatched message was still in flight");
        assert!(
            outlet.next_batch(100).await.is_none(),
            "halted: nothing more"
        );
        assert!(first.messages()[0].offset == 0);
        drop(first);
        halted.close();
    }
}
