//! The dispatch side: the dispatcher (pull) and the workers (one message each, with
//! retries and dead-lettering).
//!
//! ```text
//!  Outlet --next_batch / next_message--> dispatcher --reserve--> slot --permit--> worker
//!                                                                               | sink
//!  InFlight::complete (offset advances) or drop (given up) <--------------------+
//! ```
//!
//! What a sink result means lives in [`crate::outcome`]; the slots and the buffer in
//! [`crate::state`]. Shaped like mini-redis's connection handler: a loop that takes
//! the next unit of work and hands it to its own task, with every resource (slot, key)
//! held by a guard that gives it back when the task ends, however it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use tracing::{trace, warn};

use crate::config::RetryPolicy;
use crate::message::Message;
use crate::metrics::ReasonLabels;
use crate::outcome::{backoff, decide, Attempt, Decision};
use crate::rate::RateLimiter;
use crate::sink::{dead_letter_headers, produce, Sink};
use crate::state::{InFlight, Outlet};

/// Most messages the unlimited fast path takes under one lock.
const MAX_DISPATCH_BATCH: usize = 256;

/// What a worker needs besides the message.
pub struct WorkerContext {
    /// `pacer_messages_total{outcome="acked"}`, resolved once (a family lookup per
    /// message costs a lock and a hash).
    pub acked: prometheus_client::metrics::counter::Counter,
    pub outlet: Outlet,
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

/// The dispatcher: hands ready messages to workers until the replica stops. Without a
/// rate limit, in batches; with one, message by message through a slot and a permit.
pub async fn dispatch(ctx: Arc<WorkerContext>) {
    loop {
        let more = if ctx.limiter.is_unlimited() {
            dispatch_batch(&ctx).await
        } else {
            dispatch_one(&ctx).await
        };
        if !more {
            return;
        }
    }
}

/// Without a rate limit: every ready message that has a free slot, under one lock (per
/// message locking capped a null sink far below the bare consumer; BENCHMARKS.md).
/// `false` once the dispatcher is done.
async fn dispatch_batch(ctx: &Arc<WorkerContext>) -> bool {
    let Some(mut batch) = ctx.outlet.next_batch(MAX_DISPATCH_BATCH).await else {
        return false;
    };
    if !ctx.sink.is_synchronous() {
        for m in batch.split_off(0) {
            tokio::spawn(work(ctx.clone(), m));
        }
        return true;
    }
    // Nothing to wait for: deliver inline and complete at once what was delivered. The
    // first message the sink refuses (stdout closed, say) and the rest of the batch go
    // through `work` like any sink's messages (retries, dead letter, or held): a message
    // is never completed unwritten.
    let delivered = deliver_inline(ctx, batch.messages()).await;
    let rest = batch.split_off(delivered);
    ctx.acked.inc_by(delivered as u64);
    batch.complete();
    for m in rest {
        tokio::spawn(work(ctx.clone(), m));
    }
    // Let the Kafka thread's notifications and other tasks in.
    tokio::task::yield_now().await;
    true
}

/// With a rate limit: the next message whose key (or partition) is free, then an
/// in-flight slot, then a rate permit, then a worker. `false` once the dispatcher is
/// done.
///
/// The slot comes before the permit: a permit taken first would be held while every
/// slot is busy and spent the moment one frees, right before the next permit, so the
/// sink could see one message per replica more in a second than the rate and burst
/// allow.
async fn dispatch_one(ctx: &Arc<WorkerContext>) -> bool {
    let Some(popped) = ctx.outlet.next_message().await else {
        return false;
    };
    let Some(reserved) = ctx.outlet.reserve(popped).await else {
        return true; // revoked meanwhile (or halted: the next call says so)
    };
    // The permit: re-rated live by the lease follower; the message goes out as soon as
    // it is granted. Halted meanwhile: the reserved slot goes back as it drops.
    tokio::select! {
        _ = ctx.limiter.acquire() => {}
        _ = ctx.outlet.halted() => return false,
    }
    if let Some(msg) = reserved.dispatch() {
        tokio::spawn(work(ctx.clone(), msg));
    }
    true
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
/// or given up (its partition taken away, or the shutdown grace over: the slot goes
/// back as `msg` drops, and the offset stays).
///
/// Without a rate limit, a worker that finished its message takes the next ready one
/// with the slot it already holds (see [`InFlight::complete_and_take_next`]), instead of
/// waking the dispatcher to spawn a new task.
pub async fn work(ctx: Arc<WorkerContext>, mut msg: InFlight) {
    loop {
        if !finish(&ctx, &msg).await {
            return;
        }
        if !ctx.limiter.is_unlimited() {
            msg.complete();
            return;
        }
        match msg.complete_and_take_next() {
            Some(next) => msg = next,
            None => return,
        }
    }
}

/// Delivers the message (retries, dead letter) until it is finished (`true`: acked or
/// dead-lettered) or should be given up (`false`: revoked or halted).
async fn finish(ctx: &WorkerContext, msg: &InFlight) -> bool {
    let m = ctx.outlet.metrics();
    // Attempts that count against `max_attempts`, and every call made.
    let mut attempt: u32 = 1;
    let mut calls: u32 = 0;
    loop {
        calls = calls.saturating_add(1);
        let result = deliver_timed(ctx, msg.message()).await;
        match decide(
            &result,
            attempt,
            &ctx.retry,
            ctx.dead_letter.is_some(),
            rand::random(),
        ) {
            Decision::Ack => {
                ctx.acked.inc();
                return true;
            }
            Decision::Retry {
                after,
                reason,
                counts,
            } => {
                m.retries
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
                trace!(tp = %msg.message().tp, offset = msg.message().offset, attempt = calls, error = %result.describe(), ?after, "Retrying");
                if counts {
                    attempt = attempt.saturating_add(1);
                }
                if !sleep_unless_given_up(msg, after).await {
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
                if !dead_letter(ctx, msg, &error, calls).await {
                    return false;
                }
                m.dead_lettered.inc();
                m.outcome("dead_lettered");
                return true;
            }
        }
    }
}

/// One sink call within the timeout, its latency recorded.
async fn deliver_timed(ctx: &WorkerContext, msg: &Message) -> Attempt {
    let started = Instant::now();
    let result = tokio::time::timeout(ctx.timeout, ctx.sink.deliver(msg))
        .await
        .unwrap_or(Attempt::Timeout);
    let elapsed = started.elapsed();
    ctx.outlet
        .metrics()
        .sink_latency
        .observe(elapsed.as_secs_f64());
    ctx.outlet.record_latency(elapsed);
    result
}

/// Sleeps `after` in short steps, returning `false` as soon as the message should be
/// given up (revoked partition, shutdown).
async fn sleep_unless_given_up(msg: &InFlight, after: Duration) -> bool {
    let until = tokio::time::Instant::now() + after;
    loop {
        if msg.should_give_up() {
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
async fn permit_unless_given_up(ctx: &WorkerContext, msg: &InFlight) -> bool {
    loop {
        if msg.should_give_up() {
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

/// Writes the message to the dead-letter topic, retrying until it is written (never
/// ack a message that is neither delivered nor dead-lettered). `false`: given up
/// (revoked).
async fn dead_letter(ctx: &WorkerContext, msg: &InFlight, error: &str, calls: u32) -> bool {
    let Some((producer, topic)) = &ctx.dead_letter else {
        return false;
    };
    let mut attempt = 1;
    loop {
        let headers = dead_letter_headers(msg.message(), error, calls);
        match produce(producer, topic, msg.message(), headers).await {
            Attempt::Delivered => return true,
            other => {
                ctx.outlet.metrics().kafka_errors.inc();
                warn!(topic = %topic, error = %other.describe(), "Cannot write to the dead-letter topic; retrying");
                let wait = backoff(attempt, &ctx.retry, rand::random());
                attempt += 1;
                if !sleep_unless_given_up(msg, wait).await {
                    return false;
                }
            }
        }
    }
}
