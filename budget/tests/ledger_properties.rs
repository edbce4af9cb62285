//! Property tests of the lease ledger: random histories of honest clients.
//!
//! An honest client uses its grant until the lease (counted from when it sent the
//! request) expires, then its fallback share for `fallback_ms`, then nothing; it reports
//! what it uses in every request, and refreshes once more at once after a grant that
//! shrank it. Usage only rises at a refresh and only falls as time passes, so checking
//! after every event checks every instant.

use pacer_budget::{BudgetConfig, Grant, LeaseRequest, Ledger, Policy, Share};
use proptest::prelude::*;

const LEASE_MS: u64 = 1_000;
const REFRESH_MS: u64 = 100;
const FALLBACK_MS: u64 = 2_000;
/// The sink call timeout the operator passes with a terminated run.
const SINK_TIMEOUT_MS: u64 = 300;
/// Floating-point slack: sums of f64 shares may differ from capacity in the last bits.
const EPS: f64 = 1e-9;

fn config(rate: f64, in_flight: u32, policy: Policy, expected: u32) -> BudgetConfig {
    BudgetConfig {
        capacity: Share::new(rate, in_flight),
        policy,
        expected_members: expected,
        lease_ms: LEASE_MS,
        refresh_ms: REFRESH_MS,
        fallback_ms: FALLBACK_MS,
    }
}

#[derive(Debug, Clone, Default)]
struct Client {
    /// Crashed: uses nothing and sends nothing until it rejoins.
    down: bool,
    held: Option<(Grant, u64)>,
    /// Which run of the process this is (a kill and a rejoin start another).
    run: u32,
    /// Requests killed runs had sent, still running at the sink: (the run's lease, until
    /// the sink call timeout). Like a live client's, they count at most what that lease
    /// allows at each instant (this model, like the ledger, takes a shrinking share as
    /// used at once).
    orphans: Vec<(Option<(Grant, u64)>, u64)>,
}

impl Client {
    /// The fallback of what it uses now (what it would fall to if that ran out).
    fn usage_fallback(&self, now: u64) -> Share {
        match (self.down, &self.held) {
            (false, Some((g, _))) => g.fallback.min(self.usage(now)),
            _ => Share::ZERO,
        }
    }

    /// What the client and its killed run's requests use.
    fn total_usage(&self, now: u64) -> Share {
        let mut u = self.usage(now);
        for (held, until) in &self.orphans {
            if now < *until {
                let run = Client {
                    held: *held,
                    ..Client::default()
                };
                u.in_flight += run.usage(now).in_flight;
            }
        }
        u
    }

    fn usage(&self, now: u64) -> Share {
        match (self.down, &self.held) {
            (false, Some((g, sent))) if now < sent + g.lease_ms => g.share(),
            (false, Some((g, sent))) if now < sent + g.lease_ms + g.fallback_ms => g.fallback,
            _ => Share::ZERO,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Refresh {
        who: usize,
        rate: f64,
        in_flight: u32,
        lost: bool,
    },
    Release(usize),
    Crash(usize),
    /// The process is killed: its requests run on at the sink for up to
    /// [`SINK_TIMEOUT_MS`]. `reported`: the kubelet's report reaches the ledger at once
    /// (otherwise never, or only after the member's next run has leased).
    Kill {
        who: usize,
        reported: bool,
    },
    Rejoin(usize),
    Advance(u64),
    SetCapacity {
        rate: f64,
        in_flight: u32,
    },
    SetExpected(u32),
    /// `fallbackSeconds` changed live (never above [`FALLBACK_MS`], which bounds the
    /// window the checks allow for old leases).
    SetFallback(u64),
    Restart,
}

fn op(clients: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..clients, 0.0..200.0f64, 0..20u32, prop::bool::weighted(0.2))
            .prop_map(|(who, rate, in_flight, lost)| Op::Refresh { who, rate, in_flight, lost }),
        1 => (0..clients).prop_map(Op::Release),
        1 => (0..clients).prop_map(Op::Crash),
        1 => (0..clients, any::<bool>()).prop_map(|(who, reported)| Op::Kill { who, reported }),
        1 => (0..clients).prop_map(Op::Rejoin),
        4 => (0..1_500u64).prop_map(Op::Advance),
        1 => (1.0..300.0f64, 1..40u32).prop_map(|(rate, in_flight)| Op::SetCapacity { rate, in_flight }),
        1 => (1..8u32).prop_map(Op::SetExpected),
        1 => (0..=FALLBACK_MS).prop_map(Op::SetFallback),
        1 => Just(Op::Restart),
    ]
}

struct Sim {
    now: u64,
    ledger: Ledger,
    clients: Vec<Client>,
    /// (from, capacity) of every capacity in force, to bound usage right after a
    /// decrease: old leases may run out their lease and fallback window.
    history: Vec<(u64, Share)>,
    /// When the coordinator restarted.
    restarts: Vec<u64>,
    /// When `fallback_ms` was last lowered.
    fallback_lowered: Option<u64>,
}

impl Sim {
    fn new(clients: usize, cfg: BudgetConfig) -> Self {
        Self {
            now: 0,
            history: vec![(0, cfg.capacity)],
            restarts: Vec::new(),
            fallback_lowered: None,
            ledger: Ledger::new(cfg),
            clients: vec![Client::default(); clients],
        }
    }

    fn name(i: usize) -> String {
        format!("member-{i}")
    }

    /// Two clients in three name their run in their requests; older clients did not.
    fn names_its_run(i: usize) -> bool {
        i % 3 != 2
    }

    fn refresh(&mut self, who: usize, demand: Share, lost: bool) {
        if self.clients[who].down {
            return;
        }
        let holding = self.clients[who].usage(self.now);
        let req = LeaseRequest {
            member: Self::name(who),
            demand,
            holding: Some(holding),
            observed_rate: None,
            holding_fallback: Some(self.clients[who].usage_fallback(self.now)),
            // Older clients send no window; half the requests test that path.
            holding_fallback_ms: self.clients[who]
                .held
                .as_ref()
                .filter(|_| who.is_multiple_of(2))
                .map(|(g, _)| g.fallback_ms),
            incarnation: Self::names_its_run(who).then(|| format!("{:x}", self.clients[who].run)),
        };
        req.validate().unwrap();
        let g = self.ledger.refresh(self.now, &req);
        assert!(g.fallback.rate <= g.rate + EPS && g.fallback.in_flight <= g.in_flight);
        if !lost {
            self.clients[who].held = Some((g, self.now));
            let shrank = g.rate < holding.rate || g.in_flight < holding.in_flight;
            if shrank {
                let ack = LeaseRequest {
                    holding: Some(g.share()),
                    holding_fallback: Some(g.fallback),
                    holding_fallback_ms: req.holding_fallback_ms.map(|_| g.fallback_ms),
                    ..req
                };
                let g2 = self.ledger.refresh(self.now, &ack);
                self.clients[who].held = Some((g2, self.now));
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Refresh {
                who,
                rate,
                in_flight,
                lost,
            } => self.refresh(who, Share::new(rate, in_flight), lost),
            Op::Release(i) => {
                if !self.clients[i].down {
                    self.clients[i].held = None;
                    let run = format!("{:x}", self.clients[i].run);
                    let run = Self::names_its_run(i).then_some(run.as_str());
                    self.ledger.release_run(self.now, &Self::name(i), run);
                }
            }
            Op::Crash(i) => self.clients[i].down = true,
            Op::Kill { who, reported } => {
                let named = Self::names_its_run(who);
                let c = &mut self.clients[who];
                if !c.down {
                    // A client that does not name its run (older clients) is modelled as
                    // before: a crash, its requests ending with it. Its next run's first
                    // refresh (holding nothing) replaces its charge; a kubelet's restart
                    // back-off (10 s) outlasts a sink call timeout (5 s by default).
                    if named {
                        c.orphans.push((c.held, self.now + SINK_TIMEOUT_MS));
                    }
                    c.down = true;
                    let run = format!("{:x}", c.run);
                    if reported {
                        self.ledger.release_terminated(
                            self.now,
                            &Self::name(who),
                            &run,
                            SINK_TIMEOUT_MS,
                        );
                    }
                }
            }
            Op::Rejoin(i) => {
                let c = &self.clients[i];
                if c.down {
                    self.clients[i] = Client {
                        run: c.run + 1,
                        orphans: c.orphans.clone(),
                        ..Client::default()
                    };
                }
            }
            Op::Advance(ms) => self.now += ms,
            Op::SetCapacity { rate, in_flight } => {
                let cfg = BudgetConfig {
                    capacity: Share::new(rate, in_flight),
                    ..self.ledger.config().clone()
                };
                self.ledger.set_config(cfg);
                self.history.push((self.now, Share::new(rate, in_flight)));
            }
            Op::SetExpected(n) => self.ledger.set_expected_members(n),
            Op::SetFallback(ms) => {
                if ms < self.ledger.config().fallback_ms {
                    self.fallback_lowered = Some(self.now);
                }
                let cfg = BudgetConfig {
                    fallback_ms: ms,
                    ..self.ledger.config().clone()
                };
                self.ledger.set_config(cfg);
            }
            // Not within an old window of lowering the fallback window: a restarted
            // coordinator learns for a lease plus the window configured *now*, so a
            // member cut off since before the change may outlast it (the README's
            // documented limit of lowering `fallbackSeconds`).
            Op::Restart
                if self
                    .fallback_lowered
                    .is_some_and(|t| self.now < t + LEASE_MS + FALLBACK_MS) => {}
            Op::Restart => {
                self.ledger = Ledger::restarted(self.ledger.config().clone(), self.now);
                self.restarts.push(self.now);
            }
        }
    }

    /// What usage must stay under at `now`: the capacity, or right after a capacity
    /// decrease, the largest capacity in force during the last lease + fallback window
    /// (leases granted before the change run out). A restarted coordinator cannot know
    /// the leases it granted before, so it only stops usage from growing: during its
    /// learning window and the leases granted in it, the bound in force at the restart
    /// still applies.
    fn bound(&self) -> Share {
        self.bound_at(self.now, self.restarts.len())
    }

    fn bound_at(&self, t: u64, restarts_before: usize) -> Share {
        let window = LEASE_MS + FALLBACK_MS;
        let since = t.saturating_sub(window);
        let mut bound = Share::ZERO;
        for (k, (from, cap)) in self.history.iter().enumerate() {
            let until = self.history.get(k + 1).map_or(u64::MAX, |(next, _)| *next);
            if *from <= t && (until > since || *from >= since) {
                bound = bound.max(*cap);
            }
        }
        for (k, &r) in self.restarts[..restarts_before].iter().enumerate() {
            if r <= t && t < r + 2 * window {
                bound = bound.max(self.bound_at(r, k));
            }
        }
        bound
    }

    fn usage(&self) -> Share {
        let mut sum = Share::ZERO;
        for c in &self.clients {
            let u = c.total_usage(self.now);
            sum.rate += u.rate;
            sum.in_flight += u.in_flight;
        }
        sum
    }

    fn check_invariant(&self) -> Result<(), TestCaseError> {
        let used = self.usage();
        let bound = self.bound();
        prop_assert!(
            used.rate <= bound.rate + EPS,
            "rate used {} > capacity {} at t={}",
            used.rate,
            bound.rate,
            self.now
        );
        prop_assert!(
            used.in_flight <= bound.in_flight,
            "in-flight used {} > capacity {} at t={}",
            used.in_flight,
            bound.in_flight,
            self.now
        );
        // The ledger's own count is an upper bound on real usage, except while it is
        // re-learning after a restart (it cannot know leases it never granted).
        if !self.ledger.is_learning(self.now) {
            let charged = self.ledger.charged(self.now);
            prop_assert!(used.rate <= charged.rate + EPS);
            prop_assert!(used.in_flight <= charged.in_flight);
        }
        Ok(())
    }
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![Just(Policy::Equal), Just(Policy::Demand)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn honest_clients_never_use_more_than_the_capacity(
        policy in policy(),
        rate in 1.0..300.0f64,
        in_flight in 1..40u32,
        expected in 1..6u32,
        ops in prop::collection::vec(op(6), 1..120),
    ) {
        let mut sim = Sim::new(6, config(rate, in_flight, policy, expected));
        for op in &ops {
            sim.apply(op);
            sim.check_invariant()?;
        }
    }
}

/// One round: every member refreshes once with its fixed demand, in the given order.
fn round(sim: &mut Sim, order: &[usize], demands: &[Share]) {
    for &i in order {
        sim.refresh(i, demands[i], false);
    }
    sim.now += REFRESH_MS;
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut s = seed | 1;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

#[derive(Debug, Clone)]
enum Change {
    Join,
    Leave,
    Demand(usize, Share),
    Capacity(Share),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        Just(Change::Join),
        Just(Change::Leave),
        (0..4usize, 0.0..200.0f64, 0..20u32)
            .prop_map(|(i, r, f)| Change::Demand(i, Share::new(r, f))),
        (1.0..300.0f64, 5..40u32).prop_map(|(r, f)| Change::Capacity(Share::new(r, f))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// With stable membership otherwise, a join, a clean leave, a demand change or a capacity
    /// change converges to the policy's shares within two refresh rounds; then the
    /// `demand` policy hands out the whole capacity (work-conserving) and nobody with
    /// demand is starved.
    #[test]
    fn members_converge_to_policy_shares_within_two_refresh_intervals(
        policy in policy(),
        rate in 1.0..300.0f64,
        in_flight in 5..40u32,
        expected in 1..5u32,
        demands in prop::collection::vec((0.0..200.0f64, 0..20u32), 5),
        change in change(),
        seeds in (any::<u64>(), any::<u64>(), any::<u64>()),
    ) {
        let mut demands: Vec<Share> = demands.into_iter().map(|(r, f)| Share::new(r, f)).collect();
        let mut sim = Sim::new(5, config(rate, in_flight, policy, expected));
        let mut members = 4usize;
        // Settle: a few rounds with four members.
        for k in 0..3 {
            round(&mut sim, &shuffled(members, seeds.0 + k), &demands);
        }
        // The change reaches the coordinator (a joiner's or a changed member's request,
        // a release, a budget edit); two refresh rounds follow.
        match change {
            Change::Join => {
                members = 5;
                sim.refresh(4, demands[4], false);
            }
            Change::Leave => {
                members = 3;
                sim.apply(&Op::Release(3));
            }
            Change::Demand(i, d) => {
                demands[i] = d;
                sim.refresh(i, d, false);
            }
            Change::Capacity(c) => sim.apply(&Op::SetCapacity { rate: c.rate, in_flight: c.in_flight }),
        }
        round(&mut sim, &shuffled(members, seeds.1), &demands);
        round(&mut sim, &shuffled(members, seeds.2), &demands);

        let cap = sim.ledger.config().capacity;
        let snap = sim.ledger.snapshot("ns", "b", sim.now);
        // The demands the ledger acted on (it ignores changes under 1 %).
        let live: Vec<Share> = snap.members.iter().map(|m| m.demand).collect();
        prop_assert_eq!(live.len(), members);
        let want = pacer_budget::policy::targets(policy, cap, expected.max(members as u32), &live);
        for (i, w) in want.iter().enumerate() {
            let m = snap.members.iter().find(|m| m.member == Sim::name(i)).unwrap();
            prop_assert!((m.rate - w.rate).abs() < 1e-6, "member {i}: rate {} want {}", m.rate, w.rate);
            prop_assert_eq!(m.in_flight, w.in_flight, "member {} in-flight", i);
            if policy == Policy::Demand && demands[i].rate > 0.0 {
                prop_assert!(m.rate > 0.0, "member {i} starved");
            }
            if demands[i].in_flight > 0 && cap.in_flight >= members as u32 * expected.max(1) {
                prop_assert!(m.in_flight > 0, "member {i} starved of in-flight");
            }
        }
        if policy == Policy::Demand {
            let granted = snap.granted;
            prop_assert!((granted.rate - cap.rate).abs() < 1e-6, "granted {} of {}", granted.rate, cap.rate);
            prop_assert_eq!(granted.in_flight, cap.in_flight);
        }
    }
}

/// A member asking for the whole budget, reporting `holding`.
fn req(member: &str, holding: Share) -> LeaseRequest {
    LeaseRequest {
        member: member.into(),
        demand: Share::new(100.0, 10),
        holding: Some(holding),
        holding_fallback: None,
        holding_fallback_ms: None,
        incarnation: None,
        observed_rate: None,
    }
}

/// [`req`] from run `incarnation` of the member's process.
fn req_from(member: &str, holding: Share, incarnation: &str) -> LeaseRequest {
    LeaseRequest {
        incarnation: Some(incarnation.into()),
        ..req(member, holding)
    }
}

#[test]
fn a_terminated_run_gives_its_rate_back_at_once_and_its_in_flight_after_the_sink_timeout() {
    let mut l = Ledger::new(config(100.0, 10, Policy::Demand, 2));
    let a = l.refresh(0, &req_from("a", Share::ZERO, "0a"));
    l.refresh(0, &req_from("b", Share::ZERO, "0b"));
    assert!(a.rate > 0.0 && a.in_flight > 0);
    assert!(
        !l.release_terminated(1, "a", "0b", 500),
        "another run's termination"
    );
    assert!(!l.release_terminated(1, "nobody", "0a", 500));
    assert!(l.release_terminated(1, "a", "0a", 500));
    assert_eq!(l.charge_of("a", 1), None, "no member left");
    assert!(!l.release_terminated(1, "a", "0a", 500), "once");
    // What a may still have in flight at the sink stays charged for the timeout...
    assert_eq!(l.charged(1).in_flight, 10, "b's and a's requests");
    // ...but its rate is free at once: b takes all of it (demand policy, b alone).
    let b = l.refresh(1, &req_from("b", Share::ZERO, "0b"));
    assert_eq!(b.rate, 100.0, "b gets a's rate at once");
    assert_eq!(b.in_flight, 10 - a.in_flight, "not a's in-flight share yet");
    // After the timeout, the in-flight share is free too.
    assert_eq!(
        l.refresh(501, &req_from("b", b.share(), "0b")).in_flight,
        10
    );
}

#[test]
fn a_restarted_run_of_the_member_keeps_its_lease_when_the_old_run_is_reported_terminated() {
    let mut l = Ledger::new(config(100.0, 10, Policy::Equal, 1));
    let first = l.refresh(0, &req_from("a", Share::ZERO, "01"));
    // The container restarted (same pod name) and its new run leased before the
    // kubelet's report of the old one reached the operator.
    let again = l.refresh(5, &req_from("a", Share::ZERO, "02"));
    assert!(!l.release_terminated(6, "a", "01", 500));
    assert!(first.rate > 0.0);
    assert_eq!(l.charge_of("a", 6), Some(again.share()));
    // A member that never said which run it is keeps the lease + fallback path.
    l.refresh(6, &req("old-client", Share::ZERO));
    assert!(!l.release_terminated(6, "old-client", "", 500));
}

#[test]
fn a_grant_whose_answer_was_lost_still_counts() {
    let mut l = Ledger::new(config(100.0, 10, Policy::Equal, 1));
    // a's grant never arrives: a holds nothing, but may have got it.
    assert_eq!(
        l.refresh(0, &req("a", Share::ZERO)).share(),
        Share::new(100.0, 10)
    );
    assert_eq!(l.refresh(10, &req("b", Share::ZERO)).share(), Share::ZERO);
    // a asks again, holding nothing: now the ledger knows the first grant is unused
    // by a, but the new answer (half, as b is live) might be lost as well.
    assert_eq!(
        l.refresh(20, &req("a", Share::ZERO)).share(),
        Share::new(50.0, 5)
    );
    assert_eq!(
        l.refresh(30, &req("b", Share::ZERO)).share(),
        Share::new(50.0, 5)
    );
}

#[test]
fn a_shrunk_member_keeps_counting_its_old_holding_until_it_shows_the_smaller_one() {
    let mut l = Ledger::new(config(100.0, 10, Policy::Equal, 1));
    let g = l.refresh(0, &req("a", Share::ZERO));
    assert_eq!(g.share(), Share::new(100.0, 10));
    // b joins: a still holds everything, so b gets nothing yet.
    let gb = l.refresh(10, &req("b", Share::ZERO));
    assert_eq!(gb.share(), Share::ZERO);
    // a refreshes: shrunk to half, but its old holding still counts...
    let ga = l.refresh(20, &req("a", g.share()));
    assert_eq!(ga.share(), Share::new(50.0, 5));
    assert_eq!(l.refresh(30, &req("b", Share::ZERO)).share(), Share::ZERO);
    // ...until a shows it holds the smaller share.
    l.refresh(40, &req("a", ga.share()));
    assert_eq!(
        l.refresh(50, &req("b", Share::ZERO)).share(),
        Share::new(50.0, 5)
    );
}

#[test]
fn a_member_short_of_its_target_is_told_to_ask_again_sooner_until_it_has_it() {
    let mut l = Ledger::new(config(100.0, 10, Policy::Equal, 1));
    let g = l.refresh(0, &req("a", Share::ZERO));
    assert_eq!(g.refresh_ms, REFRESH_MS, "a has its whole target");
    // b joins while a holds everything: b is short of its half until a shrinks, so it
    // asks again after a quarter interval rather than a whole one.
    let gb = l.refresh(10, &req("b", Share::ZERO));
    assert_eq!(gb.share(), Share::ZERO);
    assert_eq!(gb.refresh_ms, REFRESH_MS / 4);
    let ga = l.refresh(20, &req("a", g.share()));
    assert_eq!(ga.refresh_ms, REFRESH_MS, "a is at (above) its target");
    l.refresh(20, &req("a", ga.share()));
    let gb = l.refresh(10 + REFRESH_MS / 4, &req("b", Share::ZERO));
    assert_eq!(gb.share(), Share::new(50.0, 5));
    assert_eq!(
        gb.refresh_ms, REFRESH_MS,
        "b has its target: the usual interval"
    );
    // While learning after a restart the room is held until learning ends: no sooner.
    let mut r = Ledger::restarted(config(100.0, 10, Policy::Equal, 2), 0);
    r.refresh(0, &req("old", Share::new(30.0, 3)));
    let short = r.refresh(0, &req("new", Share::ZERO));
    assert_eq!(short.share(), Share::ZERO);
    assert_eq!(short.refresh_ms, REFRESH_MS);
}

#[test]
fn a_restarted_coordinator_grants_only_what_reported_members_held() {
    let cfg = config(100.0, 10, Policy::Equal, 2);
    let mut l = Ledger::restarted(cfg, 0);
    // Nothing is known to be free: the old incarnation may have granted the other 70
    // to members that have not reported yet.
    assert_eq!(
        l.refresh(0, &req("old", Share::new(30.0, 3))).share(),
        Share::new(30.0, 3)
    );
    assert_eq!(l.refresh(0, &req("new", Share::ZERO)).share(), Share::ZERO);
    assert!(l.is_learning(LEASE_MS + FALLBACK_MS - 1));
    assert!(!l.is_learning(LEASE_MS + FALLBACK_MS));
    let after = LEASE_MS + FALLBACK_MS;
    assert_eq!(
        l.refresh(after, &req("new", Share::ZERO)).share(),
        Share::new(50.0, 5)
    );
}

#[test]
fn while_learning_what_one_member_gives_back_another_may_take() {
    let cfg = config(100.0, 10, Policy::Demand, 2);
    let mut l = Ledger::restarted(cfg, 0);
    let idle = Share::new(1.0, 1);
    let busy = Share::new(1_000.0, 10);
    // Both held 50 from the old incarnation; one has drained its partitions.
    let held = Share::new(50.0, 5);
    let r = |member: &str, demand: Share, holding: Share| LeaseRequest {
        demand,
        ..req(member, holding)
    };
    assert_eq!(
        l.refresh(0, &r("busy", busy, held)).share(),
        held,
        "not more yet"
    );
    let shrunk = l.refresh(0, &r("idle", idle, held)).share();
    assert!(shrunk.rate < held.rate, "the idle one shrinks: {shrunk:?}");
    // ...and says so; then the busy one takes what it gave back, within the pool.
    l.refresh(10, &r("idle", idle, shrunk));
    let grown = l.refresh(20, &r("busy", busy, held)).share();
    assert!(grown.rate > held.rate, "{grown:?}");
    assert!(grown.rate + shrunk.rate <= 100.0 + 1e-9);
    // A member that never reported adds nothing to the pool: a new one gets nothing
    // while the others hold it all.
    assert_eq!(
        l.refresh(30, &r("new", busy, Share::ZERO)).share().rate,
        0.0
    );
    assert!(l.is_learning(30));
}

#[test]
fn a_released_member_frees_its_share_at_once_and_a_crashed_one_after_its_windows() {
    let mut l = Ledger::new(config(100.0, 10, Policy::Equal, 1));
    l.refresh(0, &req("a", Share::ZERO));
    assert!(l.release("a"));
    assert_eq!(l.charged(1), Share::ZERO);
    l.refresh(0, &req("c", Share::ZERO));
    // c crashes: its grant counts for the lease, its fallback for the window after.
    assert_eq!(l.charged(LEASE_MS - 1), Share::new(100.0, 10));
    assert_eq!(l.charged(LEASE_MS), Share::new(100.0, 10)); // fallback of a lone member
    assert_eq!(l.charged(LEASE_MS + FALLBACK_MS), Share::ZERO);
    l.expire(LEASE_MS + FALLBACK_MS);
    assert_eq!(l.live_members(LEASE_MS + FALLBACK_MS), 0);
}
