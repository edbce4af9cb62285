//! A deterministic fleet simulation: one global budget split by Pacer's real lease ledger
//! and, under the same scripted events, by the strategies users would otherwise run.
//!
//! ```text
//!   Scenario ──events at fixed times──▶ world: replicas, Kafka group, partitions
//!                                          │ one 10 ms step at a time
//!   Strategy ── per-process │ even split by membership │ split by partition
//!            └─ Pacer equal │ Pacer demand: the real `Ledger::refresh` and the real
//!                             client `LeaseState`, driven as `client.rs` drives them
//!                                          ▼
//!                        Trace (msg/s each replica used, each step) ──▶ Metrics
//! ```
//!
//! Time-stepped, no sleeps, no threads: the ledger takes time as milliseconds, and the
//! client's `LeaseState` takes a `tokio::time::Instant`, built as one origin plus the
//! simulated offset (the origin is read once and only differences are ever compared, so
//! nothing depends on it). Refresh jitter, start offsets and lost responses come from a
//! seeded generator: the same parameters give the same trace, to the bit.
//!
//! What is modelled, and what is not, is listed on [`Params`] and in BENCHMARKS.md. In
//! short: a fluid model of rates (a replica uses `min(demand, allowed rate)` during each
//! step; no token-bucket burst, no in-flight limit, no per-message latency), Kafka
//! partitions assigned by a range assignor with rebalances that take no time, and the
//! peers' strategies at their best (membership, rebalances on join/leave and budget
//! changes take effect instantly for them).

use pacer_budget::client::LeaseState;
use pacer_budget::{BudgetConfig, LeaseRequest, Ledger, Policy, Share};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::time::Instant;

/// Simulation step: every rate is constant within one step.
pub const STEP_MS: u64 = 10;
/// Length of the sliding window the worst case is measured over.
pub const WINDOW_MS: u64 = 1_000;

/// The runtime's reported demand with a backlog (`pacer_runtime::allowance::DEMAND_ALL_*`:
/// "as much as you can give"); copied because the runtime dev-depends on this crate.
pub const DEMAND_ALL_RATE: f64 = 1e9;
pub const DEMAND_ALL_IN_FLIGHT: u32 = 1_000_000;
/// The runtime's headroom over the recent arrival rate when idle (`IDLE_HEADROOM`).
pub const IDLE_HEADROOM: f64 = 1.5;
/// The runtime recomputes its demand this often (`DEMAND_EVERY`).
pub const DEMAND_EVERY_MS: u64 = 100;
/// The budget client's retry backoff bounds (`client.rs`).
const MIN_BACKOFF_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 5_000;

/// Everything the model assumes, in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// The global budget in msg/s at the start of every scenario.
    pub budget: f64,
    /// The in-flight budget handed to the ledger (in-flight is not simulated).
    pub in_flight: u32,
    /// Partitions of the topic, assigned to replicas by Kafka's range assignor.
    pub partitions: u32,
    /// What one replica could process with a backlog and no limit (msg/s).
    pub replica_capacity: f64,
    /// Pacer's lease, refresh and fallback timings (`BudgetConfig::new`'s defaults).
    pub lease_ms: u64,
    pub refresh_ms: u64,
    pub fallback_ms: u64,
    /// Even split: a member that stopped heart-beating counts for this long.
    pub stale_member_ttl_ms: u64,
    /// Kafka notices a killed consumer after this long and rebalances its partitions
    /// (`session.timeout.ms`, 45 s by default since Kafka 3.0).
    pub session_timeout_ms: u64,
    /// From `kubectl scale` to a new replica consuming and refreshing (plus up to
    /// 0.5 s of seeded spread).
    pub pod_start_ms: u64,
    pub duration_ms: u64,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        let pacer = BudgetConfig::new(Share::new(200.0, 20), Policy::Demand, 1);
        Self {
            budget: pacer.capacity.rate,
            in_flight: pacer.capacity.in_flight,
            partitions: 12,
            replica_capacity: 1_000.0,
            lease_ms: pacer.lease_ms,
            refresh_ms: pacer.refresh_ms,
            fallback_ms: pacer.fallback_ms,
            stale_member_ttl_ms: 180_000,
            session_timeout_ms: 45_000,
            pod_start_ms: 5_000,
            duration_ms: 300_000,
            seed: 9,
        }
    }
}

/// How the fleet splits (or fails to split) the one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every replica limits itself to the whole budget (Broadway, Dapr).
    PerProcess,
    /// budget / members, a crashed member counting until the stale-member TTL after its
    /// last heartbeat (Numaflow's distributed throttling; Envoy's local limit / hosts).
    EvenSplit,
    /// budget / partitions for each owned partition (Uber uForwarder).
    PartitionSplit,
    /// The real ledger with `policy: equal`.
    PacerEqual,
    /// The real ledger with `policy: demand`.
    PacerDemand,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::PerProcess,
        Strategy::EvenSplit,
        Strategy::PartitionSplit,
        Strategy::PacerEqual,
        Strategy::PacerDemand,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Strategy::PerProcess => "per-process limit (Broadway, Dapr)",
            Strategy::EvenSplit => "even split, 180 s stale TTL (Numaflow, Envoy)",
            Strategy::PartitionSplit => "split by partition (uForwarder)",
            Strategy::PacerEqual => "Pacer `equal`",
            Strategy::PacerDemand => "Pacer `demand`",
        }
    }

    fn policy(self) -> Option<Policy> {
        match self {
            Strategy::PacerEqual => Some(Policy::Equal),
            Strategy::PacerDemand => Some(Policy::Demand),
            _ => None,
        }
    }

    pub fn is_pacer(self) -> bool {
        self.policy().is_some()
    }
}

/// Something that happens to the fleet at a scripted instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// `kubectl scale` to this many replicas: new pods start after `pod_start_ms`;
    /// surplus pods (the highest-numbered) shut down cleanly at once.
    Scale(usize),
    /// SIGKILL of this replica: it stops consuming and refreshing, and does not return.
    Crash(usize),
    /// The first `n` partitions drain their backlog and receive nothing more.
    Idle(u32),
    /// The budget's rate changes to this (operator edit or SIGHUP of the budgets file).
    Budget(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: &'static str,
    /// Replicas at the start (they start within the first refresh interval).
    pub replicas: usize,
    /// (milliseconds, event), in time order, each at a multiple of [`STEP_MS`].
    pub events: Vec<(u64, Event)>,
    /// Fraction of lease responses lost on the way back (the ledger applied them).
    pub lost_responses: f64,
    /// Only Pacer's rows mean something (the peers have no responses to lose, no
    /// fallback window to set).
    pub pacer_only: bool,
    /// `budget.fallbackSeconds` for this scenario, instead of [`Params::fallback_ms`].
    pub fallback_ms: Option<u64>,
}

/// The scripted events of issue 9, each its own scenario, plus lost lease responses.
pub fn scenarios() -> Vec<Scenario> {
    let s = |name, replicas, events| Scenario {
        name,
        replicas,
        events,
        lost_responses: 0.0,
        pacer_only: false,
        fallback_ms: None,
    };
    vec![
        s("scale up 2 -> 4", 2, vec![(60_000, Event::Scale(4))]),
        s(
            "scale down 4 -> 2 (clean)",
            4,
            vec![(60_000, Event::Scale(2))],
        ),
        s("crash 1 of 4 (SIGKILL)", 4, vec![(60_000, Event::Crash(3))]),
        s(
            "skew: half the partitions go idle",
            4,
            vec![(60_000, Event::Idle(6))],
        ),
        s(
            "budget 200 -> 50 -> 200",
            4,
            vec![
                (60_000, Event::Budget(50.0)),
                (120_000, Event::Budget(200.0)),
            ],
        ),
        Scenario {
            name: "scale up 2 -> 4, 25 % of lease responses lost",
            replicas: 2,
            events: vec![(60_000, Event::Scale(4))],
            lost_responses: 0.25,
            pacer_only: true,
            fallback_ms: None,
        },
        Scenario {
            name: "crash 1 of 4 (SIGKILL), fallbackSeconds 0",
            replicas: 4,
            events: vec![(60_000, Event::Crash(3))],
            lost_responses: 0.0,
            pacer_only: true,
            fallback_ms: Some(0),
        },
    ]
}

/// SplitMix64: small, seedable, identical on every platform.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A whole number of steps in [0, max_ms).
    fn offset_ms(&mut self, max_ms: u64) -> u64 {
        quantize(self.unit() * max_ms as f64).min(max_ms.saturating_sub(STEP_MS))
    }

    /// `ms` with the client's ±10 % jitter, on the step grid, at least one step.
    fn jitter_ms(&mut self, ms: u64) -> u64 {
        quantize(ms as f64 * (0.9 + 0.2 * self.unit())).max(STEP_MS)
    }
}

fn quantize(ms: f64) -> u64 {
    (ms / STEP_MS as f64).round() as u64 * STEP_MS
}

/// `pacer_runtime::allowance::demand` with no sink latency (in-flight is not simulated).
fn runtime_demand(backlog: bool, arrival_rate: f64) -> Share {
    if backlog {
        Share::new(DEMAND_ALL_RATE, DEMAND_ALL_IN_FLIGHT)
    } else {
        Share::new((arrival_rate.max(0.0) * IDLE_HEADROOM).max(1.0), 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Life {
    Pending { start_at: u64 },
    Running,
    Crashed { at: u64 },
    Left,
}

/// The replica side of the lease protocol, as `client.rs`'s refresh loop drives it.
#[derive(Debug, Clone)]
struct Client {
    state: LeaseState,
    refresh_every_ms: u64,
    backoff_ms: u64,
    next_refresh: u64,
    acked_shrink: bool,
}

#[derive(Debug, Clone)]
struct Replica {
    name: String,
    life: Life,
    client: Client,
    /// `report_demand`: ticks every `DEMAND_EVERY_MS` from the start, EWMA of arrivals.
    next_tick: u64,
    last_tick: u64,
    ticked: bool,
    arrived_since_tick: f64,
    arrival_ewma: f64,
    reported: Share,
}

impl Replica {
    fn new(index: usize, start_at: u64) -> Self {
        Self {
            name: format!("replica-{index}"),
            life: Life::Pending { start_at },
            client: Client {
                state: LeaseState::default(),
                refresh_every_ms: 1_000,
                backoff_ms: MIN_BACKOFF_MS,
                next_refresh: start_at,
                acked_shrink: false,
            },
            next_tick: start_at,
            last_tick: start_at,
            ticked: false,
            arrived_since_tick: 0.0,
            arrival_ewma: 0.0,
            // `Leased::start`'s initial demand, before the first tick.
            reported: Share::new(1.0, 1),
        }
    }
}

/// What one run produced, step by step.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The budget in force during each step (msg/s).
    pub budget: Vec<f64>,
    /// What the running replicas could have used together (msg/s), unlimited.
    pub demand: Vec<f64>,
    /// Msg/s each replica used during each step: `used[replica][step]`.
    pub used: Vec<Vec<f64>>,
    /// Pacer only: the rate the ledger counted as possibly in use (`Ledger::charged`)
    /// at each step, to check the modelled replicas against the ledger's accounting.
    pub charged: Vec<f64>,
}

impl Trace {
    pub fn steps(&self) -> usize {
        self.budget.len()
    }

    /// Msg/s the whole fleet used during `step`.
    pub fn aggregate(&self, step: usize) -> f64 {
        self.used.iter().map(|r| r[step]).sum()
    }
}

/// Runs one scenario under one strategy.
pub fn run(scenario: &Scenario, strategy: Strategy, p: &Params) -> Trace {
    for (at, _) in &scenario.events {
        assert!(
            at.is_multiple_of(STEP_MS),
            "event at {at} ms is off the step grid"
        );
        assert!(*at < p.duration_ms, "event at {at} ms is past the end");
    }
    let origin = Instant::now();
    let instant = |ms: u64| origin + Duration::from_millis(ms);
    // The same world (start offsets) for every strategy; jitter and losses separately.
    let mut world_rng = Rng::new(p.seed);
    let mut client_rng = Rng::new(p.seed ^ 0x5EED_C11E);
    let mut loss_rng = Rng::new(p.seed ^ 0x1057);

    let mut budget = p.budget;
    let mut desired = scenario.replicas;
    let mut replicas: Vec<Replica> = (0..scenario.replicas)
        .map(|i| Replica::new(i, world_rng.offset_ms(p.refresh_ms)))
        .collect();
    let mut busy = vec![true; p.partitions as usize];
    let mut ledger = strategy.policy().map(|policy| {
        Ledger::new(BudgetConfig {
            capacity: Share::new(budget, p.in_flight),
            policy,
            expected_members: desired as u32,
            lease_ms: p.lease_ms,
            refresh_ms: p.refresh_ms,
            fallback_ms: scenario.fallback_ms.unwrap_or(p.fallback_ms),
        })
    });

    let steps = (p.duration_ms / STEP_MS) as usize;
    let mut trace = Trace {
        budget: Vec::with_capacity(steps),
        demand: Vec::with_capacity(steps),
        used: Vec::new(),
        charged: Vec::with_capacity(steps),
    };
    let mut next_event = 0;
    for step in 0..steps {
        let t = step as u64 * STEP_MS;

        while let Some(&(at, event)) = scenario.events.get(next_event) {
            if at > t {
                break;
            }
            next_event += 1;
            match event {
                Event::Scale(n) if n > desired => {
                    for i in replicas.len()..n {
                        let start = t + p.pod_start_ms + world_rng.offset_ms(500);
                        replicas.push(Replica::new(i, start));
                    }
                    desired = n;
                }
                Event::Scale(n) => {
                    // The Deployment removes the surplus pods; each releases its lease
                    // on SIGTERM (clean shutdown) and leaves the Kafka group.
                    let mut alive: Vec<usize> = (0..replicas.len())
                        .filter(|&i| {
                            matches!(replicas[i].life, Life::Running | Life::Pending { .. })
                        })
                        .collect();
                    while alive.len() > n {
                        let i = alive.pop().expect("more than n");
                        replicas[i].life = Life::Left;
                        replicas[i].client.state.clear();
                        if let Some(l) = ledger.as_mut() {
                            l.release(&replicas[i].name);
                        }
                    }
                    desired = n;
                }
                Event::Crash(i) => replicas[i].life = Life::Crashed { at: t },
                Event::Idle(n) => busy.iter_mut().take(n as usize).for_each(|b| *b = false),
                Event::Budget(rate) => budget = rate,
            }
            if let Some(l) = ledger.as_mut() {
                // What the operator does on every reconcile: desired replicas and the
                // budget from the spec.
                l.set_config(BudgetConfig {
                    capacity: Share::new(budget, p.in_flight),
                    expected_members: desired as u32,
                    ..l.config().clone()
                });
            }
        }

        for r in &mut replicas {
            if let Life::Pending { start_at } = r.life {
                if start_at <= t {
                    r.life = Life::Running;
                }
            }
        }

        // The Kafka group: running replicas, and killed ones until the session timeout.
        let group: Vec<usize> = (0..replicas.len())
            .filter(|&i| match replicas[i].life {
                Life::Running => true,
                Life::Crashed { at } => t < at + p.session_timeout_ms,
                _ => false,
            })
            .collect();
        let owner = range_assign(p.partitions as usize, &group);
        let busy_owned = |i: usize| {
            owner
                .iter()
                .zip(&busy)
                .filter(|(o, b)| **o == Some(i) && **b)
                .count()
        };
        let running: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].life == Life::Running)
            .collect();
        let demand_of = |i: usize| {
            if busy_owned(i) > 0 {
                p.replica_capacity
            } else {
                0.0
            }
        };

        // Each replica recomputes the demand it reports (`report_demand`).
        for &i in &running {
            let backlog = busy_owned(i) > 0;
            let r = &mut replicas[i];
            if t >= r.next_tick {
                let dt = ((t - r.last_tick) as f64 / 1000.0).max(1e-3);
                let rate = r.arrived_since_tick / dt;
                let keep = 0.7f64.powf(dt);
                r.arrival_ewma = keep * r.arrival_ewma + (1.0 - keep) * rate;
                // At the very first tick nothing has been fetched yet: empty buffer.
                r.reported = runtime_demand(backlog && r.ticked, r.arrival_ewma);
                r.ticked = true;
                r.arrived_since_tick = 0.0;
                r.last_tick = t;
                r.next_tick = t + DEMAND_EVERY_MS;
            }
        }

        // Lease refreshes, in replica order within a step.
        if let Some(ledger) = ledger.as_mut() {
            for &i in &running {
                let r = &mut replicas[i];
                // A shrunk grant is acknowledged at once: at most two requests a step.
                for _ in 0..2 {
                    if r.client.next_refresh > t {
                        break;
                    }
                    let lost =
                        scenario.lost_responses > 0.0 && loss_rng.unit() < scenario.lost_responses;
                    refresh(
                        &mut r.client,
                        ledger,
                        &r.name,
                        r.reported,
                        t,
                        instant(t),
                        lost,
                        &mut client_rng,
                    );
                }
            }
        }

        // What each replica uses during this step.
        if trace.used.len() < replicas.len() {
            trace.used.resize(replicas.len(), vec![0.0; step]);
        }
        let members = replicas
            .iter()
            .filter(|r| match r.life {
                Life::Running => true,
                Life::Crashed { at } => t < at + p.stale_member_ttl_ms,
                _ => false,
            })
            .count()
            .max(1);
        let mut demand = 0.0;
        for (i, r) in replicas.iter_mut().enumerate() {
            let used = if r.life == Life::Running {
                let want = demand_of(i);
                demand += want;
                let allowed = match strategy {
                    Strategy::PerProcess => budget,
                    Strategy::EvenSplit => budget / members as f64,
                    Strategy::PartitionSplit => {
                        budget / f64::from(p.partitions) * busy_owned(i) as f64
                    }
                    Strategy::PacerEqual | Strategy::PacerDemand => {
                        r.client.state.effective(instant(t)).share.rate
                    }
                };
                want.min(allowed)
            } else {
                0.0
            };
            r.arrived_since_tick += used * STEP_MS as f64 / 1000.0;
            trace.used[i].push(used);
        }
        trace.budget.push(budget);
        trace.demand.push(demand);
        trace
            .charged
            .push(ledger.as_ref().map_or(0.0, |l| l.charged(t).rate));
    }
    trace
}

/// Kafka's range assignor: members in order, the first `partitions % n` one more.
fn range_assign(partitions: usize, members: &[usize]) -> Vec<Option<usize>> {
    let mut owner = vec![None; partitions];
    if members.is_empty() {
        return owner;
    }
    let n = members.len();
    let mut next = 0;
    for (k, &m) in members.iter().enumerate() {
        let count = partitions / n + usize::from(k < partitions % n);
        for o in owner.iter_mut().skip(next).take(count) {
            *o = Some(m);
        }
        next += count;
    }
    owner
}

/// One turn of `client.rs`'s refresh loop: report the holding, apply the grant (unless
/// its response is lost), and schedule the next request.
#[allow(clippy::too_many_arguments)]
fn refresh(
    c: &mut Client,
    ledger: &mut Ledger,
    member: &str,
    demand: Share,
    t: u64,
    now: Instant,
    lost: bool,
    rng: &mut Rng,
) {
    let holding = c.state.effective(now).share;
    let req = LeaseRequest {
        member: member.to_string(),
        demand,
        holding: Some(holding),
        holding_fallback: Some(c.state.holding_fallback(now)),
        holding_fallback_ms: c.state.holding_fallback_ms(),
        incarnation: None,
        observed_rate: None,
    };
    debug_assert_eq!(req.validate(), Ok(()));
    // The coordinator applies the request whether or not its answer arrives.
    let grant = ledger.refresh(t, &req);
    if lost {
        c.next_refresh = t + rng.jitter_ms(c.backoff_ms);
        c.backoff_ms = (c.backoff_ms * 2)
            .min(MAX_BACKOFF_MS)
            .min(c.refresh_every_ms.max(MIN_BACKOFF_MS));
        return;
    }
    c.backoff_ms = MIN_BACKOFF_MS;
    c.refresh_every_ms = grant.refresh_ms.max(1);
    // Sent and answered within the same instant: the lease counts from `t` on both sides.
    c.state.apply(grant, now);
    let shrank = grant.rate < holding.rate || grant.in_flight < holding.in_flight;
    if shrank && !c.acked_shrink {
        c.acked_shrink = true;
        c.next_refresh = t;
    } else {
        c.acked_shrink = false;
        c.next_refresh = t + rng.jitter_ms(c.refresh_every_ms);
    }
}

/// What the comparison reports for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// The most any 1 s window used, over what the budget allowed in it, a decrease
    /// counting from one jittered refresh interval after it (when every replica has
    /// asked again).
    pub worst_window: f64,
    /// The same with a decrease counting at once.
    pub worst_window_strict: f64,
    /// Mean of used / budget over the steps where demand exceeded the budget.
    pub mean_used: Option<f64>,
    /// The same per phase (before the first event, between events, after the last).
    pub phase_means: Vec<Option<f64>>,
    /// Per event: seconds until the aggregate is within [0.9, 1.0] x budget and stays
    /// there until the next event (or the end); `None` = never.
    pub reconverge_s: Vec<Option<f64>>,
    /// For a crash: seconds until the others use at least 90 % of the crashed
    /// replica's share on top of their own. `Some(None)` = never; `None` = no crash,
    /// or the fleet ran above the budget before it (no shares to reuse).
    pub reclaim_s: Option<Option<f64>>,
}

/// Relative tolerance for "at most the budget" (floating-point sums of shares).
pub const TOLERANCE: f64 = 1e-6;
/// Lower edge of the converged band, as a fraction of the budget.
pub const BAND_LOW: f64 = 0.9;
/// A phase must end with at least this long in the band to count as converged.
const SETTLED_MS: u64 = 10_000;

pub fn metrics(trace: &Trace, scenario: &Scenario, p: &Params) -> Metrics {
    let n = trace.steps();
    let agg: Vec<f64> = (0..n).map(|i| trace.aggregate(i)).collect();
    let propagation = (p.refresh_ms as f64 * 1.1).ceil() as u64;
    let worst = worst_window(&agg, &trace.budget, propagation);
    let worst_strict = worst_window(&agg, &trace.budget, 0);

    let event_steps: Vec<usize> = scenario
        .events
        .iter()
        .map(|(at, _)| (*at / STEP_MS) as usize)
        .collect();
    let mut bounds = vec![0];
    bounds.extend(&event_steps);
    bounds.push(n);
    let mean_over = |from: usize, to: usize| {
        let ratios: Vec<f64> = (from..to)
            .filter(|&i| trace.demand[i] > trace.budget[i])
            .map(|i| agg[i] / trace.budget[i])
            .collect();
        (!ratios.is_empty()).then(|| ratios.iter().sum::<f64>() / ratios.len() as f64)
    };
    let phase_means = bounds.windows(2).map(|w| mean_over(w[0], w[1])).collect();

    let reconverge_s = bounds
        .windows(2)
        .skip(1)
        .map(|w| {
            let (from, to) = (w[0], w[1]);
            let in_band = |i: usize| {
                agg[i] >= BAND_LOW * trace.budget[i]
                    && agg[i] <= trace.budget[i] * (1.0 + TOLERANCE)
            };
            let settled = (from..to)
                .rev()
                .find(|&i| !in_band(i))
                .map_or(from, |i| i + 1);
            ((to - settled) as u64 * STEP_MS >= SETTLED_MS)
                .then(|| (settled - from) as f64 * STEP_MS as f64 / 1000.0)
        })
        .collect();

    let reclaim_s = scenario.events.iter().find_map(|&(at, e)| match e {
        Event::Crash(c) => {
            let from = (at / STEP_MS) as usize;
            let before = from.checked_sub(1)?;
            let others = |i: usize| agg[i] - trace.used[c][i];
            let (others_before, crashed_before) = (others(before), trace.used[c][before]);
            if agg[before] > trace.budget[before] * 1.01 || crashed_before <= 0.0 {
                return None;
            }
            let goal = others_before + 0.9 * crashed_before - TOLERANCE;
            Some(
                (from..n)
                    .find(|&i| others(i) >= goal)
                    .map(|i| (i - from) as f64 * STEP_MS as f64 / 1000.0),
            )
        }
        _ => None,
    });

    Metrics {
        worst_window: worst,
        worst_window_strict: worst_strict,
        mean_used: mean_over(0, n),
        phase_means,
        reconverge_s,
        reclaim_s,
    }
}

/// The worst 1 s window of `used` (msg/s per step) over what `budget` allowed in it,
/// where a budget decrease counts only `propagation_ms` after it happened.
pub fn worst_window(used: &[f64], budget: &[f64], propagation_ms: u64) -> f64 {
    let lag = (propagation_ms / STEP_MS) as usize;
    let w = (WINDOW_MS / STEP_MS) as usize;
    // The budget a step is held to: the largest in force over the last `lag` steps.
    let allowed: Vec<f64> = (0..budget.len())
        .map(|i| {
            budget[i.saturating_sub(lag)..=i]
                .iter()
                .copied()
                .fold(f64::MIN, f64::max)
        })
        .collect();
    let prefix = |v: &[f64]| {
        let mut s = vec![0.0];
        for x in v {
            s.push(s.last().expect("non-empty") + x);
        }
        s
    };
    let (u, a) = (prefix(used), prefix(&allowed));
    (0..=used.len().saturating_sub(w))
        .take_while(|&i| i + w <= used.len())
        .map(|i| (u[i + w] - u[i]) / (a[i + w] - a[i]))
        .fold(0.0, f64::max)
}

/// One row of the comparison.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub strategy: Strategy,
    pub metrics: Metrics,
}

/// Every scenario under every strategy (Pacer only where the peers have nothing to
/// show), in a fixed order.
pub fn compare(p: &Params) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in scenarios() {
        for strategy in Strategy::ALL {
            if s.pacer_only && !strategy.is_pacer() {
                continue;
            }
            let trace = run(&s, strategy, p);
            rows.push(Row {
                scenario: s.name,
                strategy,
                metrics: metrics(&trace, &s, p),
            });
        }
    }
    rows
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

fn seconds(v: Option<f64>) -> String {
    v.map_or_else(|| "never".to_string(), |v| format!("{v:.1}"))
}

/// The comparison as a Markdown table.
pub fn markdown_table(p: &Params) -> String {
    let mut out = String::new();
    out.push_str(
        "| Scenario | Strategy | Worst 1 s window / budget | Mean used / budget (backlog) \
         | Mean per phase | Re-converged after each event (s) | Crashed share used again after (s) |\n\
         |---|---|---:|---:|---|---|---:|\n",
    );
    for row in compare(p) {
        let m = &row.metrics;
        let worst = if (m.worst_window_strict - m.worst_window).abs() > 0.005 {
            format!(
                "{:.2} (at once: {:.2})",
                m.worst_window, m.worst_window_strict
            )
        } else {
            format!("{:.2}", m.worst_window)
        };
        let phases = m
            .phase_means
            .iter()
            .map(|v| ratio(*v))
            .collect::<Vec<_>>()
            .join(" → ");
        let reconverge = m
            .reconverge_s
            .iter()
            .map(|v| seconds(*v))
            .collect::<Vec<_>>()
            .join(", ");
        let reclaim = match m.reclaim_s {
            Some(v) => seconds(v),
            None if row.scenario.starts_with("crash") => "n/a".to_string(),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.strategy.label(),
            worst,
            ratio(m.mean_used),
            phases,
            reconverge,
            reclaim
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: f64, steps: usize) -> Vec<f64> {
        vec![v; steps]
    }

    #[test]
    fn worst_window_finds_a_one_second_overshoot() {
        let mut used = flat(100.0, 500);
        for u in used.iter_mut().skip(200).take(100) {
            *u = 150.0;
        }
        let w = worst_window(&used, &flat(100.0, 500), 0);
        assert!((w - 1.5).abs() < 1e-9, "{w}");
        let w = worst_window(&flat(100.0, 500), &flat(100.0, 500), 0);
        assert!((w - 1.0).abs() < 1e-9, "{w}");
    }

    #[test]
    fn a_budget_decrease_is_allowed_one_propagation_interval_and_no_more() {
        // 200 until step 100, then 50; usage follows 110 steps (1.1 s) later.
        let budget: Vec<f64> = (0..400)
            .map(|i| if i < 100 { 200.0 } else { 50.0 })
            .collect();
        let used: Vec<f64> = (0..400)
            .map(|i| if i < 210 { 200.0 } else { 50.0 })
            .collect();
        assert!(worst_window(&used, &budget, 1_100) <= 1.0 + 1e-9);
        assert!(worst_window(&used, &budget, 0) > 3.0);
        // One more step of the old rate breaks the allowance.
        let late: Vec<f64> = (0..400)
            .map(|i| if i < 211 { 200.0 } else { 50.0 })
            .collect();
        assert!(worst_window(&late, &budget, 1_100) > 1.0 + 1e-6);
    }

    fn trace(budget: f64, used: Vec<Vec<f64>>) -> Trace {
        let n = used[0].len();
        Trace {
            budget: flat(budget, n),
            demand: flat(1e6, n),
            used,
            charged: flat(0.0, n),
        }
    }

    fn scenario(events: Vec<(u64, Event)>) -> Scenario {
        Scenario {
            name: "test",
            replicas: 2,
            events,
            lost_responses: 0.0,
            pacer_only: false,
            fallback_ms: None,
        }
    }

    #[test]
    fn reconvergence_counts_from_the_event_until_the_aggregate_stays_in_the_band() {
        let p = Params::default();
        // 2 replicas at 50 each; at step 1000 one drops to 0 for 5 s (500 steps).
        let a = flat(50.0, 4_000);
        let mut b = flat(50.0, 4_000);
        for u in b.iter_mut().skip(1_000).take(500) {
            *u = 0.0;
        }
        let m = metrics(
            &trace(100.0, vec![a.clone(), b]),
            &scenario(vec![(10_000, Event::Budget(100.0))]),
            &p,
        );
        assert_eq!(m.reconverge_s, vec![Some(5.0)]);
        // Never back in the band: never.
        let c = flat(0.0, 4_000);
        let m = metrics(
            &trace(100.0, vec![a, c]),
            &scenario(vec![(10_000, Event::Budget(100.0))]),
            &p,
        );
        assert_eq!(m.reconverge_s, vec![None]);
    }

    #[test]
    fn reclaim_is_when_the_others_pick_up_the_crashed_share() {
        let p = Params::default();
        let crashed: Vec<f64> = (0..4_000)
            .map(|i| if i < 1_000 { 50.0 } else { 0.0 })
            .collect();
        let other: Vec<f64> = (0..4_000)
            .map(|i| if i < 1_700 { 50.0 } else { 100.0 })
            .collect();
        let m = metrics(
            &trace(100.0, vec![other, crashed]),
            &scenario(vec![(10_000, Event::Crash(1))]),
            &p,
        );
        assert_eq!(m.reclaim_s, Some(Some(7.0)));
        assert_eq!(m.phase_means.len(), 2);
    }

    #[test]
    fn range_assignor_gives_the_first_members_the_remainder() {
        assert_eq!(
            range_assign(5, &[3, 7]),
            vec![Some(3), Some(3), Some(3), Some(7), Some(7)]
        );
        assert_eq!(range_assign(2, &[]), vec![None, None]);
    }

    #[test]
    fn jitter_stays_within_ten_percent_on_the_step_grid() {
        let mut rng = Rng::new(1);
        for _ in 0..1_000 {
            let j = rng.jitter_ms(1_000);
            assert!(
                (900..=1_100).contains(&j) && j.is_multiple_of(STEP_MS),
                "{j}"
            );
        }
    }

    #[test]
    fn modelled_replicas_never_use_more_than_the_ledger_counts() {
        let p = Params {
            duration_ms: 150_000,
            ..Params::default()
        };
        for s in scenarios() {
            for strategy in [Strategy::PacerEqual, Strategy::PacerDemand] {
                let t = run(&s, strategy, &p);
                for i in 0..t.steps() {
                    assert!(
                        t.aggregate(i) <= t.charged[i] * (1.0 + TOLERANCE) + TOLERANCE,
                        "{}, {strategy:?}, step {i}: used {} > charged {}",
                        s.name,
                        t.aggregate(i),
                        t.charged[i]
                    );
                }
            }
        }
    }
}
