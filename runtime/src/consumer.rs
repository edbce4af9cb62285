//! The Kafka consumer: one OS thread that owns the consumer, polls it, fills the buffer,
//! carries out back-pressure (pauses and resumes partitions), stores completed offsets
//! and handles rebalances.
//!
//! Guarantee (at-least-once): an offset is stored only when every message below it in
//! its partition has been delivered or dead-lettered (see [`crate::offsets`]), and
//! librdkafka auto-commits only stored offsets. Nothing is ever committed past a
//! message that is buffered, in flight or failing.
//!
//! Why a thread and not a `StreamConsumer`: the revoke callback must block until the
//! revoked partitions' in-flight work finishes and their offsets are committed, before
//! the rebalance proceeds. Blocking inside a tokio task would stall a runtime worker;
//! here it stalls only this thread, which is exactly what should wait.
//!
//! The thread keeps polling while partitions are paused, so heartbeats, rebalances and
//! `max.poll.interval.ms` are served even when the sink is stalled. Its loop
//! ([`PollLoop::run`]) is one short turn: probe the brokers if they were down, store
//! offsets, step the back-pressure machine ([`crate::backpressure`]) and carry out its
//! actions, then poll a batch into the buffer. Like Vector's Kafka source, the
//! consumer's callbacks only record what happened ([`GroupContext`]); the loop decides.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext, Message as _};
use tracing::{debug, info, warn};

use crate::backpressure::{Actions, Backpressure};
use crate::config::{GroupProtocol, Ordering, RunConfig, SinkSpec};
use crate::hash::{FxHashMap, FxHashSet};
use crate::kafka_log::{self, LogThrottle};
use crate::message::{Message, TopicPartition};
use crate::metrics::PartitionLabels;
use crate::state::{Fill, Halted, Intake, Lifecycle};

/// Longest single poll; bounds how late a stop request or a pause is acted on.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How many messages one lock of the core takes at most (amortises the mutex).
const MAX_BATCH: usize = 512;
/// How long shutdown keeps retrying a commit refused during a group rebalance.
const CLOSE_COMMIT_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for the Kafka thread to commit and close on shutdown: the commit
/// retries plus librdkafka's own close (leave group, final revoke) with room to spare.
const CLOSE_WAIT: Duration = Duration::from_secs(CLOSE_COMMIT_DEADLINE.as_secs() + 10);
/// Longest wait for room while holding off (rebalance callbacks wait at most this).
const FULL_WAIT: Duration = Duration::from_millis(2);
/// How often stored offsets are pushed to librdkafka. Auto-commit picks them up every
/// `auto.commit.interval.ms` (5 s by default) anyway, so this only needs to be small
/// against that.
const STORE_EVERY: Duration = Duration::from_millis(20);
/// While no broker answers, how often the Kafka thread asks for metadata to learn that
/// one is back (librdkafka reports "all brokers down" but not their return), and how
/// long it waits for the answer (it holds up polling that long, during an outage only).
const BROKER_PROBE_EVERY: Duration = Duration::from_millis(500);
const BROKER_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// While the group refuses commits, how often the Kafka thread tries one.
const COMMIT_RETRY_EVERY: Duration = Duration::from_millis(250);
/// Least time between two commits triggered by count (see [`CommitTrigger`]).
const MIN_COMMIT_GAP: Duration = Duration::from_millis(50);

/// Commits the stored offsets early, once half a buffer of messages completed since the
/// last such commit (at most every [`MIN_COMMIT_GAP`]), so a crash re-delivers about
/// half a buffer plus what was in flight and what completed in the last store interval:
/// within the buffer + in-flight bound up to about `buffer / 2 / 70 ms` messages per
/// second (~7,000/s with the default buffer). Auto-commit alone (every second)
/// re-delivers a second's worth at any rate.
#[derive(Debug)]
struct CommitTrigger {
    after: u64,
    since: u64,
    last: Instant,
    stored: FxHashMap<TopicPartition, i64>,
}

impl CommitTrigger {
    fn new(buffer_messages: usize) -> Self {
        Self {
            after: (buffer_messages as u64 / 2).max(1),
            since: 0,
            last: Instant::now(),
            stored: FxHashMap::default(),
        }
    }

    /// Counts how far the stored offsets advanced (gaps in offsets count too, so this
    /// over-counts and commits early, never late).
    fn stored(&mut self, offsets: &[(TopicPartition, i64)]) {
        for (tp, o) in offsets {
            if let Some(prev) = self.stored.insert(tp.clone(), *o) {
                self.since += o.saturating_sub(prev).max(0) as u64;
            }
        }
    }

    fn due(&mut self, now: Instant) -> bool {
        if self.since >= self.after && now.duration_since(self.last) >= MIN_COMMIT_GAP {
            self.since = 0;
            self.last = now;
            return true;
        }
        false
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create the Kafka consumer: {0}")]
    CreateConsumer(#[source] KafkaError),
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
    #[error("cannot start the Kafka thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The consumer context: rebalance callbacks and statistics (lag). It records what
/// happened; the poll loop acts on it.
#[derive(Debug)]
pub struct GroupContext {
    intake: Intake,
    /// How long a revoke waits for the revoked partitions' in-flight work.
    revoke_deadline: Duration,
    /// Set after an assignment change, so the poll loop re-applies a pause.
    assignment_changed: AtomicBool,
    /// Repeats of librdkafka's warnings held back (see [`crate::kafka_log`]).
    log_throttle: std::sync::Mutex<LogThrottle>,
    /// The classic group protocol: leaving with an empty assignment needs an explicit
    /// unsubscribe (see [`leave_explicitly`]).
    classic: bool,
}

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.intake.metrics().kafka_errors.inc();
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // Cleared by the poll loop once a metadata request is answered.
            self.intake.set_brokers_down(true);
        } else {
            warn!(target: "librdkafka", error = %error, reason, "Kafka client error");
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        kafka_log::forward(&self.log_throttle, level, fac, log_message);
    }

    fn stats(&self, stats: Statistics) {
        self.record_view(&stats);
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 {
                    continue;
                }
                let labels = PartitionLabels {
                    topic: topic.clone(),
                    partition: p.to_string(),
                };
                if part.consumer_lag >= 0 {
                    self.intake
                        .metrics()
                        .lag
                        .get_or_create(&labels)
                        .set(part.consumer_lag);
                } else {
                    self.intake.metrics().lag.remove(&labels);
                }
            }
        }
    }
}

impl GroupContext {
    /// The group's state and every assigned partition librdkafka is not actively
    /// fetching, for [`crate::state::Status::describe`]: a partition assigned here but never fetched
    /// shows its fetch state (`offset-query`, `none`, ...).
    fn record_view(&self, stats: &Statistics) {
        let mut view = match &stats.cgrp {
            Some(g) => format!(
                "group {}/{} assignment_size={} rebalances={}",
                g.state, g.join_state, g.assignment_size, g.rebalance_cnt
            ),
            None => "no group".to_string(),
        };
        let assigned = self.intake.assigned();
        for tp in assigned {
            let state = stats
                .topics
                .get(tp.topic)
                .and_then(|t| t.partitions.get(&tp.partition))
                .map_or("unknown", |p| p.fetch_state.as_str());
            if state != "active" {
                view.push_str(&format!(" {tp}:{state}"));
            }
        }
        self.intake.set_kafka_view(view);
    }
}

impl ConsumerContext for GroupContext {
    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            if is_rebalancing(&e) {
                self.intake.set_commits_refused(true);
            }
            debug!(error = %e, "Commit refused");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let tps = to_tps(tpl);
                // While closing, in-flight work was already waited for (grace period):
                // the revoke does not wait again.
                let offsets = self.intake.revoke(&tps, self.revoke_deadline);
                commit(consumer, &offsets, "revoke");
                info!(
                    partitions = %list(&tps),
                    committed = %list_offsets(&offsets),
                    "Partitions revoked"
                );
            }
            Rebalance::Assign(tpl) => {
                let tps = to_tps(tpl);
                self.intake.assign(&tps);
                info!(partitions = %list(&tps), "Partitions assigned");
            }
            Rebalance::Error(e) => {
                self.intake.metrics().kafka_errors.inc();
                warn!(error = %e, "Rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.assignment_changed.store(true, AtomicOrdering::Relaxed);
        self.intake.set_commits_refused(false);
        let n = consumer.assignment().map_or(0, |a| a.count());
        self.intake.metrics().assigned_partitions.set(n as i64);
    }
}

/// Whether a commit failed because the group is rebalancing or has moved to a new
/// generation (it succeeds once the rebalance completes).
fn is_rebalancing(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::StaleMemberEpoch
        )
    )
}

/// `topic/0,topic/3` for a log line.
fn list(tps: &[TopicPartition]) -> String {
    tps.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `topic/0@42,topic/3@7` for a log line.
fn list_offsets(offsets: &[(TopicPartition, i64)]) -> String {
    offsets
        .iter()
        .map(|(tp, o)| format!("{tp}@{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn to_tps(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn to_tpl(offsets: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (tp, o) in offsets {
        // Adding to a fresh list with a valid offset cannot fail.
        let _ = tpl.add_partition_offset(tp.topic, tp.partition, Offset::Offset(*o));
    }
    tpl
}

/// Stores, then commits synchronously. Storing first matters: with auto-commit on,
/// librdkafka commits a revoked partition's *stored* offset when it unassigns it, after
/// this callback returns. Had only the commit carried the new offset, that later commit
/// would put the older stored one back (seen under KIP-848 on Apache Kafka: the next
/// owner re-delivered what this replica had just committed).
fn commit(consumer: &BaseConsumer<GroupContext>, offsets: &[(TopicPartition, i64)], why: &str) {
    if offsets.is_empty() {
        return;
    }
    let tpl = to_tpl(offsets);
    if let Err(e) = consumer.store_offsets(&tpl) {
        debug!(error = %e, why, "Storing offsets before a commit");
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
        warn!(error = %e, why, "Synchronous commit failed; auto-commit of stored offsets will retry");
    }
}

/// A synchronous commit of every assigned partition's committable offset, while the
/// group refused commits: accepted, dispatching resumes.
fn try_commit(consumer: &BaseConsumer<GroupContext>, intake: &Intake) {
    let offsets = intake.assigned_committable();
    let tpl = to_tpl(&offsets);
    let _ = consumer.store_offsets(&tpl);
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => intake.set_commits_refused(false),
        Err(e) if is_rebalancing(&e) => debug!(error = %e, "Commit still refused"),
        // Anything else (nothing to commit, say) says the rebalance is not in the way.
        Err(e) => {
            debug!(error = %e, "Commit while refused");
            intake.set_commits_refused(false);
        }
    }
}

/// Handle to the Kafka thread.
#[derive(Debug)]
pub struct KafkaConsumer {
    intake: Intake,
    thread: Option<JoinHandle<()>>,
}

impl KafkaConsumer {
    /// Creates the consumer, subscribes and starts the thread.
    pub fn start(config: &RunConfig, intake: Intake) -> Result<KafkaConsumer, ConsumerError> {
        let context = GroupContext {
            intake: intake.clone(),
            revoke_deadline: config.shutdown_grace,
            assignment_changed: AtomicBool::new(false),
            log_throttle: Default::default(),
            classic: config.group_protocol == GroupProtocol::Classic,
        };
        let consumer: BaseConsumer<GroupContext> = consumer_config(config)
            .create_with_context(context)
            .map_err(ConsumerError::CreateConsumer)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| ConsumerError::Subscribe {
                topics: config.topics.clone(),
                source,
            })?;
        let poll_loop = PollLoop {
            consumer,
            intake: intake.clone(),
            backpressure: Backpressure::new(),
            held: FxHashSet::default(),
            hold_partitions: config.ordering == Ordering::Partition,
            copy_metadata: forwards_metadata(config),
            topics: FxHashMap::default(),
            headers: Vec::with_capacity(MAX_BATCH),
            batch: Vec::with_capacity(MAX_BATCH),
            trigger: CommitTrigger::new(config.buffer_messages),
            probe_topic: config.topics[0].clone(),
            last_store: Instant::now(),
            last_probe: Instant::now(),
            last_commit_try: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("pacer-kafka".into())
            .spawn(move || poll_loop.run())
            .map_err(ConsumerError::Thread)?;
        Ok(KafkaConsumer {
            intake,
            thread: Some(thread),
        })
    }

    /// The last step of shutdown: commits what is complete, leaves the group and ends
    /// the thread (blocking, for at most [`CLOSE_WAIT`]). librdkafka's close can block
    /// for as long as the group coordinator is unreachable (seen with the broker gone
    /// mid-shutdown); shutdown must stay bounded, so past the deadline the thread is
    /// left to finish on its own (the process exits over it) and what it did not commit
    /// is re-delivered.
    pub fn close(mut self, halted: Halted) {
        halted.close();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + CLOSE_WAIT;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!(
                    waited = ?CLOSE_WAIT,
                    "Kafka consumer did not close in time; leaving without a clean group leave"
                );
            }
        }
    }
}

impl Drop for KafkaConsumer {
    /// Not closed through shutdown (the replica failed to start): the thread ends.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.intake.abort();
        }
    }
}

/// The consumer's librdkafka configuration: pacer's defaults, then the user's
/// `--kafka-config` (which wins, except for the properties the config parser refuses).
pub fn consumer_config(config: &RunConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    // Prefetch no more than the buffer holds, so pausing actually bounds memory
    // (librdkafka's default prefetch is 64 MiB per consumer).
    let prefetch_kb = (config.buffer_bytes / 1024).clamp(1024, 65_536);
    c.set("bootstrap.servers", &config.bootstrap_servers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "true")
        // What a crash re-delivers is what completed since the last commit: commit the
        // stored offsets every second rather than librdkafka's default of 5 s.
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", prefetch_kb.to_string())
        // After its prefetch queue was over the threshold, librdkafka waits this long
        // before fetching a partition again (default 1 s). A consumer that holds off
        // polling while its buffer is full hits that threshold routinely, and waiting a
        // whole second then bounded a fast sink's throughput (BENCHMARKS.md, "Runtime").
        .set("fetch.queue.backoff.ms", "10")
        .set("statistics.interval.ms", "5000");
    match config.group_protocol {
        // Incremental rebalances: a join or leave moves only the partitions that change
        // owner, and the others keep flowing (eager assignors stop the whole group).
        GroupProtocol::Classic => c.set("partition.assignment.strategy", "cooperative-sticky"),
        // The broker assigns (incrementally too); client-side assignors and timings are
        // refused by librdkafka (and by `pacer_rules` before that).
        GroupProtocol::Consumer => c.set("group.protocol", "consumer"),
    };
    for (k, v) in &config.kafka_config {
        c.set(k, v);
    }
    c
}

/// Whether anything can forward a record's Kafka headers and timestamp: the `http`
/// and `kafka` sinks and the dead-letter topic do; `null` and `stdout` (which writes
/// the value only) do not, so without a dead-letter topic the source does not copy
/// them. Reading them is not free: librdkafka parses a record's header block on every
/// call, even an empty one (a sixth of the Kafka thread's time in the benchmark's
/// profile), and the timestamp is another call per record.
fn forwards_metadata(config: &RunConfig) -> bool {
    config.dead_letter_topic.is_some()
        || matches!(config.sink, SinkSpec::Http(_) | SinkSpec::Kafka(_))
}

/// The Kafka thread's loop and what it keeps between turns.
struct PollLoop {
    consumer: BaseConsumer<GroupContext>,
    intake: Intake,
    backpressure: Backpressure,
    /// With `partition` ordering: partitions paused one by one because they have their
    /// share of the buffer (see `Buffer::holds`).
    held: FxHashSet<TopicPartition>,
    hold_partitions: bool,
    /// Whether to copy Kafka headers and timestamps (see [`forwards_metadata`]).
    copy_metadata: bool,
    /// Interned topic names.
    topics: FxHashMap<String, &'static str>,
    /// Reused across polls: each polled record's headers, and the owned batch.
    headers: Vec<RecordHeaders>,
    batch: Vec<Message>,
    trigger: CommitTrigger,
    probe_topic: String,
    last_store: Instant,
    last_probe: Instant,
    last_commit_try: Instant,
}

impl PollLoop {
    fn run(mut self) {
        loop {
            let fill = self.intake.fill();
            if fill.lifecycle == Lifecycle::Closing {
                break;
            }
            self.probe_brokers();
            self.store_offsets();
            let changed = self
                .consumer
                .context()
                .assignment_changed
                .swap(false, AtomicOrdering::Relaxed);
            let draining = fill.lifecycle >= Lifecycle::Draining;
            let actions = self
                .backpressure
                .step(fill.level, draining, changed, Instant::now());
            self.apply(actions, changed, fill.share);
            if actions.wait_for_room {
                // Without taking messages; rebalance callbacks wait at most FULL_WAIT.
                self.intake.wait_for_room(FULL_WAIT);
                continue;
            }
            self.poll_batch(&fill);
        }
        self.close();
    }

    /// While no broker answers, asks for metadata every [`BROKER_PROBE_EVERY`] to learn
    /// that one is back.
    fn probe_brokers(&mut self) {
        if self.last_probe.elapsed() < BROKER_PROBE_EVERY || !self.intake.brokers_down() {
            return;
        }
        self.last_probe = Instant::now();
        if self
            .consumer
            .fetch_metadata(Some(&self.probe_topic), BROKER_PROBE_TIMEOUT)
            .is_ok()
        {
            self.intake.set_brokers_down(false);
        }
    }

    /// Every [`STORE_EVERY`]: stores the offsets that advanced; while the group refuses
    /// commits, tries one (is the rebalance over?); otherwise commits early when half a
    /// buffer completed (see [`CommitTrigger`]).
    fn store_offsets(&mut self) {
        if self.last_store.elapsed() < STORE_EVERY {
            return;
        }
        store(&self.consumer, &self.intake, &mut self.trigger);
        self.last_store = Instant::now();
        if self.intake.commits_refused() {
            if self.last_store.duration_since(self.last_commit_try) >= COMMIT_RETRY_EVERY {
                self.last_commit_try = self.last_store;
                try_commit(&self.consumer, &self.intake);
            }
        } else if self.trigger.due(self.last_store) {
            if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Async) {
                debug!(error = %e, "Early commit");
            }
        }
    }

    /// Carries out the back-pressure machine's actions on the consumer.
    fn apply(&mut self, actions: Actions, changed: bool, share: usize) {
        if changed && !self.held.is_empty() {
            self.intake.retain_assigned(&mut self.held);
        }
        match actions.pause_all {
            Some(true) => set_paused(&self.consumer, &self.intake, true),
            Some(false) => {
                set_paused(&self.consumer, &self.intake, false);
                // Resuming everything resumed the held partitions too.
                pause_some(&self.consumer, &self.held, true);
                self.intake.set_paused_partitions(self.held.len());
            }
            None => {}
        }
        if self.hold_partitions && actions.update_holds {
            self.update_holds(share);
        }
    }

    /// With `partition` ordering: holds the partitions that have their share of the
    /// buffer and releases those down to half of it (see `Buffer::holds`).
    fn update_holds(&mut self, share: usize) {
        let (hold, release) = self.intake.holds(share, &self.held);
        if hold.is_empty() && release.is_empty() {
            return;
        }
        pause_some(&self.consumer, &hold, true);
        pause_some(&self.consumer, &release, false);
        self.held.extend(hold);
        for tp in &release {
            self.held.remove(tp);
        }
        self.intake.set_paused_partitions(self.held.len());
    }

    /// Polls a batch and hands it to the buffer: the first poll waits, the rest take
    /// what is already fetched. The batch ends at the message room or once its bytes
    /// reach the byte room, so the buffer goes over `buffer_bytes` by less than one
    /// message (without the byte check, one batch of 64 KiB messages filled a 512 KiB
    /// buffer to 1.9 MB). With holds, a batch takes at most one partition's share:
    /// librdkafka hands over long runs of one partition, and a batch the size of the
    /// buffer would fill it with that partition before it could be held.
    fn poll_batch(&mut self, fill: &Fill) {
        let room = if self.hold_partitions {
            fill.room.min(fill.share)
        } else {
            fill.room
        };
        let limit = room.clamp(1, MAX_BATCH);
        let mut borrowed: Vec<BorrowedMessage<'_>> = Vec::with_capacity(limit);
        let mut timeout = POLL_TIMEOUT;
        let mut batch_bytes = 0;
        self.headers.clear();
        while borrowed.len() < limit {
            match self.consumer.poll(timeout) {
                Some(Ok(m)) => {
                    // Parsed once here: librdkafka re-parses a record's header block
                    // on every call when it holds no header.
                    let h = if self.copy_metadata {
                        read_headers(&m)
                    } else {
                        Vec::new()
                    };
                    batch_bytes += m.key_len() + m.payload_len() + headers_size(&h);
                    self.headers.push(h);
                    borrowed.push(m);
                    if batch_bytes >= fill.byte_room {
                        break;
                    }
                }
                Some(Err(e)) => {
                    self.intake.metrics().kafka_errors.inc();
                    warn!(error = %e, "Kafka consumer error");
                    break;
                }
                None => break,
            }
            timeout = Duration::ZERO;
        }
        owned_batch(
            &borrowed,
            &mut self.headers,
            self.copy_metadata,
            &mut self.topics,
            &mut self.batch,
        );
        // Released to librdkafka before the buffer lock is taken.
        drop(borrowed);
        if self.batch.is_empty() {
            return;
        }
        if fill.lifecycle != Lifecycle::Running {
            // Fetched before the pause took effect: not processed, not committed.
            self.batch.clear();
            return;
        }
        self.intake.push_batch(&mut self.batch);
    }

    /// Closing: stores and commits what is complete, then leaves the group (the
    /// consumer's drop).
    fn close(mut self) {
        store(&self.consumer, &self.intake, &mut self.trigger);
        commit_on_close(&self.consumer, &self.intake);
        if leave_explicitly(
            self.consumer.context().classic,
            self.consumer.assignment().ok().map(|a| a.count()),
        ) {
            info!("No partitions assigned: unsubscribing so that the close leaves the group");
            self.consumer.unsubscribe();
        }
        // Dropping closes the consumer: it leaves the group (so others take over at
        // once), serving the final revoke callback on the way.
    }
}

/// The commit on shutdown. While another member's join or leave is rebalancing the
/// group, the commit is refused (RebalanceInProgress, IllegalGeneration); keep serving
/// the group (partitions are paused, so nothing new arrives) and retry until it settles
/// or [`CLOSE_COMMIT_DEADLINE`] passes.
fn commit_on_close(consumer: &BaseConsumer<GroupContext>, intake: &Intake) {
    let deadline = Instant::now() + CLOSE_COMMIT_DEADLINE;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let offsets = intake.assigned_committable();
        if offsets.is_empty() {
            return;
        }
        let tpl = to_tpl(&offsets);
        // Stored too, for the same reason as in `commit`.
        let _ = consumer.store_offsets(&tpl);
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                info!(
                    partitions = offsets.len(),
                    attempts, "Committed on shutdown; leaving the group"
                );
                return;
            }
            Err(e) if Instant::now() < deadline => {
                debug!(error = %e, attempts, "Commit on shutdown refused; serving the group and retrying");
                // Serve callbacks; any message is of a paused partition's old fetch.
                let _ = consumer.poll(Duration::from_millis(100));
            }
            Err(e) => {
                warn!(error = %e, attempts, "Could not commit on shutdown; the next owner re-delivers from the last commit");
                return;
            }
        }
    }
}

/// Whether to unsubscribe before closing the consumer, given the protocol and the
/// number of partitions assigned (`None`: unknown).
///
/// librdkafka 2.12 sends no LeaveGroup when a consumer of the classic protocol with the
/// cooperative assignor closes while it owns no partition: its close goes from
/// "assignment done" straight to terminating (the KIP-848 path leaves first). Such a
/// member, typically a replica stopped before the second round of a join handed it
/// partitions, stays in the group until `session.timeout.ms` (45 s by default) and that
/// round waits for it, with the partitions it revoked from the others owned by nobody:
/// scaling a fleet up and at once down again stopped 6 of 10 partitions for 45 s on
/// Apache Kafka. `unsubscribe` takes the path that leaves (no subscription left, so it
/// leaves instead of rejoining); the close then waits for the LeaveGroup's answer. With
/// partitions assigned, the close revokes them and leaves as it should.
fn leave_explicitly(classic: bool, assigned: Option<usize>) -> bool {
    classic && assigned == Some(0)
}

fn store(consumer: &BaseConsumer<GroupContext>, intake: &Intake, trigger: &mut CommitTrigger) {
    let pending = intake.take_to_store();
    if pending.is_empty() {
        return;
    }
    if let Err(e) = consumer.store_offsets(&to_tpl(&pending)) {
        // Partitions revoked meanwhile refuse the store; their offsets were committed
        // by the revoke callback.
        debug!(error = %e, "Storing offsets");
    }
    trigger.stored(&pending);
}

/// Pauses (or resumes) some partitions; errors (a partition revoked meanwhile) are
/// logged only.
fn pause_some<'a>(
    consumer: &BaseConsumer<GroupContext>,
    tps: impl IntoIterator<Item = &'a TopicPartition>,
    pause: bool,
) {
    let mut tpl = TopicPartitionList::new();
    for tp in tps {
        tpl.add_partition(tp.topic, tp.partition);
    }
    if tpl.count() == 0 {
        return;
    }
    match pause_or_resume(consumer, &tpl, pause) {
        Ok(()) => debug!(partitions = tpl.count(), pause, "Partitions held/released"),
        Err(e) => debug!(error = %e, pause, "Cannot hold/release partitions"),
    }
}

fn pause_or_resume(
    consumer: &BaseConsumer<GroupContext>,
    tpl: &TopicPartitionList,
    pause: bool,
) -> rdkafka::error::KafkaResult<()> {
    if pause {
        consumer.pause(tpl)
    } else {
        consumer.resume(tpl)
    }
}

fn set_paused(consumer: &BaseConsumer<GroupContext>, intake: &Intake, pause: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    match pause_or_resume(consumer, &assignment, pause) {
        Ok(()) => {
            let n = if pause { assignment.count() } else { 0 };
            intake.set_paused_partitions(n);
            debug!(
                partitions = assignment.count(),
                pause, "Partitions paused/resumed"
            );
        }
        Err(e) => warn!(error = %e, pause, "Cannot pause/resume partitions"),
    }
}

/// Largest record (key + value) copied into a shared block; larger ones get their own.
const SMALL_RECORD: usize = 4 * 1024;
/// Size of a shared block: one message still in flight (say, retried for hours) pins at
/// most this much memory besides its own data.
const BLOCK: usize = 64 * 1024;

/// Copies a poll batch out of librdkafka. Keys and values of small records share
/// 64 KiB blocks that the messages slice, instead of two allocations per message (a
/// malloc here and a free on another thread showed in profiles).
fn owned_batch(
    borrowed: &[BorrowedMessage<'_>],
    headers: &mut Vec<RecordHeaders>,
    timestamps: bool,
    topics: &mut FxHashMap<String, &'static str>,
    out: &mut Vec<Message>,
) {
    type Span = Option<std::ops::Range<usize>>;
    let mut blocks: Vec<Bytes> = Vec::new();
    let mut block = bytes::BytesMut::new();
    // Per message: the block it went into (None: copied on its own), key and value spans.
    let mut spans: Vec<(Option<usize>, Span, Span)> = Vec::with_capacity(borrowed.len());
    for m in borrowed {
        let size = m.key_len() + m.payload_len();
        if size > SMALL_RECORD {
            spans.push((None, None, None));
            continue;
        }
        if block.len() + size > block.capacity() {
            if !block.is_empty() {
                blocks.push(std::mem::take(&mut block).freeze());
            }
            block = bytes::BytesMut::with_capacity(BLOCK);
        }
        let mut copy = |data: Option<&[u8]>| {
            data.map(|d| {
                let start = block.len();
                block.extend_from_slice(d);
                start..block.len()
            })
        };
        let key = copy(m.key());
        let payload = copy(m.payload());
        spans.push((Some(blocks.len()), key, payload));
    }
    if !block.is_empty() {
        blocks.push(block.freeze());
    }
    for ((m, h), (index, key, payload)) in borrowed.iter().zip(headers.drain(..)).zip(spans) {
        let mut msg = owned(m, h, topics);
        if timestamps {
            msg.timestamp_ms = m.timestamp().to_millis();
        }
        match index.and_then(|i| blocks.get(i)) {
            Some(b) => {
                msg.key = key.map(|r| b.slice(r));
                msg.payload = payload.map(|r| b.slice(r));
            }
            None => {
                msg.key = m.key().map(Bytes::copy_from_slice);
                msg.payload = m.payload().map(Bytes::copy_from_slice);
            }
        }
        out.push(msg);
    }
}

type RecordHeaders = Vec<(String, Option<Bytes>)>;

/// A record's Kafka headers, copied out.
fn read_headers(m: &BorrowedMessage<'_>) -> RecordHeaders {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.map(Bytes::copy_from_slice)))
                .collect()
        })
        .unwrap_or_default()
}

/// What headers count for in the buffer ([`Message::size`]).
fn headers_size(h: &RecordHeaders) -> usize {
    h.iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
        .sum()
}

/// Everything but the key, value and timestamp (see [`owned_batch`]).
fn owned(
    m: &BorrowedMessage<'_>,
    headers: RecordHeaders,
    topics: &mut FxHashMap<String, &'static str>,
) -> Message {
    let name = m.topic();
    let topic = match topics.get(name) {
        Some(t) => *t,
        None => {
            let t = crate::message::intern(name);
            topics.insert(name.to_string(), t);
            t
        }
    };
    Message {
        tp: TopicPartition {
            topic,
            partition: m.partition(),
        },
        offset: m.offset(),
        key: None,
        payload: None,
        headers,
        timestamp_ms: None,
        generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_classic_member_without_partitions_unsubscribes_before_closing() {
        assert!(leave_explicitly(true, Some(0)));
        assert!(
            !leave_explicitly(true, Some(3)),
            "the close revokes and leaves"
        );
        assert!(!leave_explicitly(true, None));
        assert!(!leave_explicitly(false, Some(0)), "KIP-848's close leaves");
    }

    #[test]
    fn an_early_commit_is_due_after_half_a_buffer_and_not_more_often_than_the_gap() {
        let mut t = CommitTrigger::new(100);
        let start = t.last;
        let a = TopicPartition::new("t", 0);
        let b = TopicPartition::new("t", 1);
        // First sight of a partition sets its base: nothing counted.
        t.stored(&[(a.clone(), 1000), (b.clone(), 50)]);
        assert!(!t.due(start + MIN_COMMIT_GAP));
        t.stored(&[(a.clone(), 1030), (b.clone(), 60)]);
        assert!(!t.due(start + MIN_COMMIT_GAP), "40 of 50");
        t.stored(&[(b.clone(), 70)]);
        assert!(!t.due(start + MIN_COMMIT_GAP / 2), "50 of 50, but too soon");
        assert!(t.due(start + MIN_COMMIT_GAP));
        assert!(
            !t.due(start + MIN_COMMIT_GAP * 3),
            "counted from zero again"
        );
        // An offset going back (a reassigned partition) counts nothing.
        t.stored(&[(a.clone(), 10)]);
        t.stored(&[(a, 59)]);
        assert!(!t.due(start + MIN_COMMIT_GAP * 4), "49 of 50");
    }
}
