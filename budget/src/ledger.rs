//! The lease ledger of one budget: pure, with time passed in as milliseconds.
//!
//! No I/O and no clock here, so the invariant can be property-tested over any history.
//!
//! # The invariant
//!
//! At every instant, the sum over members of what each member *may currently be using*
//! is at most the capacity, for rate and for in-flight. For each member the ledger
//! keeps two [`Charge`]s:
//!
//! ```text
//!   prev: what the member reported holding in its last request   (share until `until`,
//!   cur : the grant sent in answer to that request                then fallback until
//!                                                                 `until + fallback_ms`)
//! ```
//!
//! An honest member uses `prev` (if the answer was lost) or `cur` (if it arrived), and
//! when the lease behind either expires it runs at that lease's fallback for at most
//! `fallback_ms`, then stops. A member's charge is the larger of the two, so a lost
//! answer still counts, and the old holding stops counting only when a later request
//! shows the member holds less (decrease before increase). A grant comes only out of
//! capacity that no charge holds. Charges only fall as time passes, so checking room at
//! the instant of a grant is enough for every later instant.
//!
//! After a restart the ledger knows nothing, not even how many members hold leases
//! from the previous incarnation. Until every such lease *and its fallback window* has
//! run out (a lease plus `fallback_ms`, "learning"), the ledger grants only out of the
//! *pool*: the sum of what each member reported holding in its first request since the
//! restart. Members unknown to the ledger hold at most the capacity minus that sum (the
//! old incarnation's charges summed to at most the capacity, and no charge grows once
//! its coordinator is gone), so grants that together stay within the pool keep the old
//! bound. Within it the split works as usual, decrease before increase: a member with
//! backlog takes what an idle one gave back, and a new member gets a share once others
//! have shrunk (an earlier rule, "nobody gets more than it holds", froze the split for
//! the whole window). This is longer than the single lease length of the first design
//! sketch: one lease is enough only if no member can be running at its fallback unseen,
//! which nothing guarantees.

use crate::policy::{targets, Policy};
use crate::protocol::{Grant, LeaseRequest, MemberSnapshot, MemberState, Share, Snapshot};
use std::collections::BTreeMap;

/// A member short of its target asks again after this fraction of the refresh interval
/// (see `Ledger::refresh_for`).
const SHORT_REFRESH_DIVISOR: u64 = 4;

/// A budget's settings, as the operator or the budgets file gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    pub capacity: Share,
    pub policy: Policy,
    /// Desired replicas: the equal policy and the fallback share divide by
    /// `max(live, expected)`.
    pub expected_members: u32,
    pub lease_ms: u64,
    pub refresh_ms: u64,
    /// How long a member may run at its fallback share after its lease expired.
    pub fallback_ms: u64,
}

impl BudgetConfig {
    /// Defaults a production fleet can live with: 10 s leases refreshed every second,
    /// fallback for three lease lengths (a coordinator restart takes a few seconds; a
    /// longer outage stops consumption rather than overshooting).
    pub fn new(capacity: Share, policy: Policy, expected_members: u32) -> Self {
        Self {
            capacity,
            policy,
            expected_members,
            lease_ms: 10_000,
            refresh_ms: 1_000,
            fallback_ms: 30_000,
        }
    }
}

/// What a member may be using because of one lease: `share` until `until`, then
/// `fallback` for the `fallback_ms` its grant carried. The window is the grant's, not
/// the budget's current one: a replica told "30 s" runs on its fallback that long even if
/// `fallbackSeconds` was lowered since, so its charge must last as long.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Charge {
    share: Share,
    fallback: Share,
    until: u64,
    fallback_ms: u64,
}

impl Charge {
    fn at(&self, now: u64) -> Share {
        if now < self.until {
            self.share.max(self.fallback)
        } else if now < self.ends() {
            self.fallback
        } else {
            Share::ZERO
        }
    }

    fn ends(&self) -> u64 {
        self.until.saturating_add(self.fallback_ms)
    }

    /// The next instant after `now` at which [`Self::at`] changes.
    fn next_step(&self, now: u64) -> u64 {
        if now < self.until {
            self.until
        } else if now < self.ends() {
            self.ends()
        } else {
            u64::MAX
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    demand: Share,
    holding: Share,
    observed_rate: Option<f64>,
    prev: Charge,
    cur: Charge,
    /// The run of the member's process that refreshed last (see
    /// [`Ledger::release_terminated`]).
    incarnation: Option<String>,
}

impl Member {
    fn charge(&self, now: u64) -> Share {
        self.prev.at(now).max(self.cur.at(now))
    }

    fn is_live(&self, now: u64) -> bool {
        now < self.cur.until
    }

    fn next_step(&self, now: u64) -> u64 {
        self.prev.next_step(now).min(self.cur.next_step(now))
    }
}

/// The sum of all members' charges, kept up to date on every refresh and release, and
/// recomputed from scratch once some charge steps down with time.
#[derive(Debug, Clone, Copy)]
struct Total {
    rate: f64,
    in_flight: u64,
    /// The earliest instant at which some member's charge changes on its own.
    valid_until: u64,
}

#[derive(Debug, Clone)]
struct Learning {
    /// Until then, grants come only out of `pool`.
    until: u64,
    /// What the members that reported since the restart held at their first report.
    pool: Share,
    /// Those members.
    reported: std::collections::BTreeSet<String>,
    /// The fallback window configured at the restart: members of the old incarnation
    /// may run on it even if it was lowered since.
    fallback_ms: u64,
}

/// The ledger of one budget.
#[derive(Debug, Clone)]
pub struct Ledger {
    config: BudgetConfig,
    epoch: u64,
    members: BTreeMap<String, Member>,
    learning: Option<Learning>,
    /// The policy's split, cached: computing it is O(n log n) and a large fleet
    /// refreshes thousands of times a second with mostly unchanged demands.
    targets: Option<Split>,
    /// Cached sum of charges, so a refresh need not walk every member.
    total: Option<Total>,
    /// Members whose charges all ran out are dropped at most once per refresh interval.
    next_gc: u64,
    /// The in-flight share of runs reported terminated ([`Ledger::release_terminated`]),
    /// each until the requests they had sent may have ended.
    ended: Vec<Charge>,
}

#[derive(Debug, Clone)]
struct Split {
    targets: BTreeMap<String, Share>,
    expected: u32,
    /// The earliest lease expiry among the live members: the live set may change then.
    valid_until: u64,
}

/// Whether a reported demand differs enough from the last one to recompute the split.
fn material_change(old: Share, new: Share) -> bool {
    old.in_flight != new.in_flight || (new.rate - old.rate).abs() > 0.01 * old.rate.max(new.rate)
}

impl Ledger {
    /// A ledger for a budget nobody has leases on (a new budget).
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            epoch: 1,
            members: BTreeMap::new(),
            learning: None,
            targets: None,
            total: None,
            next_gc: 0,
            ended: Vec::new(),
        }
    }

    /// A ledger created by a coordinator that (re)started at `started`: members may hold
    /// leases from a previous incarnation, so it starts in learning mode.
    pub fn restarted(config: BudgetConfig, started: u64) -> Self {
        let until = started
            .saturating_add(config.lease_ms)
            .saturating_add(config.fallback_ms);
        Self {
            learning: Some(Learning {
                until,
                pool: Share::ZERO,
                reported: Default::default(),
                fallback_ms: config.fallback_ms,
            }),
            ..Self::new(config)
        }
    }

    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Changes capacity, policy, expected members or timings. Leases already granted
    /// keep counting; the new split takes effect as members refresh (decrease before
    /// increase).
    pub fn set_config(&mut self, config: BudgetConfig) {
        if config != self.config {
            self.config = config;
            self.epoch += 1;
            self.targets = None;
            self.total = None;
        }
    }

    /// Sets the number of members expected (desired replicas).
    pub fn set_expected_members(&mut self, expected: u32) {
        let config = BudgetConfig {
            expected_members: expected,
            ..self.config.clone()
        };
        self.set_config(config);
    }

    pub fn is_learning(&self, now: u64) -> bool {
        self.learning.as_ref().is_some_and(|l| now < l.until)
    }

    /// Members expected: `max(live, desired)`, at least 1.
    fn expected(&self, now: u64) -> u32 {
        let live = self.members.values().filter(|m| m.is_live(now)).count() as u32;
        live.max(self.config.expected_members).max(1)
    }

    /// The share each member runs at once its lease has expired: an equal split over
    /// the expected members, never more than the member's own grant.
    fn fallback_share(&self, expected: u32) -> Share {
        Share::new(
            self.config.capacity.rate / f64::from(expected),
            self.config.capacity.in_flight / expected,
        )
    }

    /// Drops members whose every charge has run out.
    pub fn expire(&mut self, now: u64) {
        self.next_gc = now.saturating_add(self.config.refresh_ms);
        self.members
            .retain(|_, m| now < m.prev.ends() || now < m.cur.ends());
        self.ended.retain(|c| now < c.ends());
        if self.learning.as_ref().is_some_and(|l| now >= l.until) {
            self.learning = None;
        }
    }

    /// What every member together may be using now, as counted (walks every member;
    /// refreshes use the cached [`Total`]).
    pub fn charged(&self, now: u64) -> Share {
        let mut sum = Share::ZERO;
        for c in self.charges(now) {
            sum.rate += c.rate;
            sum.in_flight = sum.in_flight.saturating_add(c.in_flight);
        }
        sum
    }

    /// Every charge at `now`: each member's, and what ended runs may still have in flight.
    fn charges(&self, now: u64) -> impl Iterator<Item = Share> + '_ {
        (self.members.values().map(move |m| m.charge(now)))
            .chain(self.ended.iter().map(move |c| c.at(now)))
    }

    /// The cached sum of every member's charge at `now`.
    fn total(&mut self, now: u64) -> Total {
        match self.total {
            Some(t) if now < t.valid_until => t,
            _ => {
                let mut t = Total {
                    rate: 0.0,
                    in_flight: 0,
                    valid_until: u64::MAX,
                };
                for c in self.charges(now) {
                    t.rate += c.rate;
                    t.in_flight += u64::from(c.in_flight);
                }
                t.valid_until = (self.members.values().map(|m| m.next_step(now)))
                    .chain(self.ended.iter().map(|c| c.next_step(now)))
                    .min()
                    .unwrap_or(u64::MAX);
                self.total = Some(t);
                t
            }
        }
    }

    /// Joins or renews `req.member` at `now` and returns its grant. The request must
    /// have been validated ([`LeaseRequest::validate`]).
    pub fn refresh(&mut self, now: u64, req: &LeaseRequest) -> Grant {
        if now >= self.next_gc {
            self.expire(now);
        }
        // A new run of a known member (its container restarted under the same pod name):
        // the old run is gone, but requests it sent may still be running at the sink.
        let restarted = self.members.get(&req.member).is_some_and(
            |m| matches!((&m.incarnation, &req.incarnation), (Some(old), Some(new)) if old != new),
        );
        if restarted {
            self.end_run(now, &req.member, None);
        }
        let holding = req.holding.unwrap_or(Share::ZERO);
        if let Some(l) = self.learning.as_mut().filter(|l| now < l.until) {
            if l.reported.insert(req.member.clone()) {
                l.pool.rate += holding.rate;
                l.pool.in_flight = l.pool.in_flight.saturating_add(holding.in_flight);
            }
        }
        let holding_fallback = req.holding_fallback.unwrap_or(holding).min(holding);
        let lease_ms = self.config.lease_ms;
        let known = self.members.get(&req.member).cloned();
        // What everyone else may be using, before this member's entry changes.
        let total = self.total(now);
        let old = known.as_ref().map_or(Share::ZERO, |m| m.charge(now));
        let others = Share::new(
            (total.rate - old.rate).max(0.0),
            total.in_flight.saturating_sub(u64::from(old.in_flight)) as u32,
        );

        // What the member holds now, and until when it may use it.
        let prev = match &known {
            Some(m) => Charge {
                share: holding,
                // The fallback of the lease it holds is never more than the lease.
                fallback: holding_fallback,
                until: if self.learning.is_some() {
                    m.cur.until.max(now.saturating_add(lease_ms))
                } else {
                    m.cur.until
                },
                // The window of the grant it says it holds; without that, the longest
                // it may hold (a lost answer can leave it on an older, longer one).
                fallback_ms: req
                    .holding_fallback_ms
                    .unwrap_or(m.cur.fallback_ms.max(m.prev.fallback_ms)),
            },
            // Unknown member claiming a holding: trust it (a restart, or a ledger that
            // forgot it), counted for a full lease.
            None => Charge {
                share: holding,
                fallback: holding_fallback,
                until: now.saturating_add(lease_ms),
                // Without its window, the budget's (a restarted coordinator knows no
                // other), or the one at the restart if that was longer.
                fallback_ms: req.holding_fallback_ms.unwrap_or(
                    (self.learning.as_ref().map(|l| l.fallback_ms))
                        .unwrap_or(0)
                        .max(self.config.fallback_ms),
                ),
            },
        };

        // A demand change under 1 % is ignored, so members reporting jittery arrival
        // rates don't make every refresh recompute the whole split.
        let demand = match &known {
            Some(m) if !material_change(m.demand, req.demand) => m.demand,
            _ => req.demand,
        };
        let was_live = known.as_ref().is_some_and(|m| m.is_live(now));
        if !was_live || known.as_ref().is_some_and(|m| m.demand != demand) {
            self.targets = None;
        }
        // Provisionally live (its real lease is set below), so the split includes it.
        let provisional = Charge {
            until: now.saturating_add(lease_ms),
            ..known.as_ref().map(|m| m.cur).unwrap_or_default()
        };
        self.members.insert(
            req.member.clone(),
            Member {
                demand,
                holding,
                observed_rate: req.observed_rate,
                prev,
                cur: provisional,
                incarnation: req.incarnation.clone(),
            },
        );
        let (target, expected) = self.target_of(&req.member, now);

        // Only capacity nobody else may be using can be granted.
        let cap = self.config.capacity;
        let room = Share::new(
            (cap.rate - others.rate).max(0.0),
            cap.in_flight.saturating_sub(others.in_flight),
        );
        let mut grant = target.min(room);
        if let Some(l) = self.learning.as_ref().filter(|l| now < l.until) {
            // Only what reported members gave back since the restart (see the module
            // docs): the pool minus what the others may be using.
            grant = grant.min(Share::new(
                (l.pool.rate - others.rate).max(0.0),
                l.pool.in_flight.saturating_sub(others.in_flight),
            ));
        }
        let fallback = grant.min(self.fallback_share(expected));

        if let Some(m) = self.members.get_mut(&req.member) {
            m.cur = Charge {
                share: grant,
                fallback,
                until: now.saturating_add(lease_ms),
                fallback_ms: self.config.fallback_ms,
            };
            let new = m.charge(now);
            self.total = Some(Total {
                rate: others.rate + new.rate,
                in_flight: u64::from(others.in_flight) + u64::from(new.in_flight),
                valid_until: total.valid_until.min(m.next_step(now)),
            });
        }
        debug_assert!(
            {
                let exact = self.charged(now);
                let cached = self.total.expect("just set");
                (exact.rate - cached.rate).abs() <= 1e-6 * exact.rate.max(1.0)
                    && u64::from(exact.in_flight) == cached.in_flight
            },
            "cached sum of charges drifted from the exact sum"
        );
        let refresh_ms = self.refresh_for(grant, target, now);
        Grant {
            rate: grant.rate,
            in_flight: grant.in_flight,
            lease_ms,
            refresh_ms,
            fallback,
            fallback_ms: self.config.fallback_ms,
            epoch: self.epoch,
        }
    }

    /// How soon a member should ask again: the budget's refresh interval, or a quarter
    /// of it while its grant is short of its target because others still hold the room
    /// (they give it back at their next refresh, or when a silent member's lease and
    /// fallback window run out). Asking again sooner takes the room within a quarter
    /// interval of its being freed instead of up to a whole one: a fleet whose split
    /// changes (a member joins, demand moves) was seen at 0.5 x its budget for most of a
    /// refresh interval (BENCHMARKS.md, the adherence grid). Not while learning: the
    /// room stays held until learning ends.
    fn refresh_for(&self, grant: Share, target: Share, now: u64) -> u64 {
        let short = grant.rate < target.rate * (1.0 - 1e-9) || grant.in_flight < target.in_flight;
        if short && !self.is_learning(now) {
            (self.config.refresh_ms / SHORT_REFRESH_DIVISOR).max(1)
        } else {
            self.config.refresh_ms
        }
    }

    /// A member that shut down cleanly gives everything back at once. Returns whether
    /// the member was known.
    pub fn release(&mut self, member: &str) -> bool {
        let removed = self.members.remove(member).is_some();
        if removed {
            self.targets = None;
            // The member's charge leaves the sum; recomputed on the next refresh.
            self.total = None;
        }
        removed
    }

    /// `member`'s run `incarnation` shut down cleanly ([`Ledger::release`]). When the
    /// ledger knows another run of it (its container restarted, and the old run was never
    /// reported terminated), that run ended unclean: what it may have in flight stays
    /// charged for as long as its leases counted. Returns whether the member was known.
    pub fn release_run(&mut self, now: u64, member: &str, incarnation: Option<&str>) -> bool {
        let other_run = self.members.get(member).is_some_and(
            |m| matches!((m.incarnation.as_deref(), incarnation), (Some(a), Some(b)) if a != b),
        );
        if other_run {
            self.end_run(now, member, None);
            true
        } else {
            self.release(member)
        }
    }

    /// The kubelet reports the container of `member`'s run `incarnation` terminated at
    /// or before `now`: a process that no longer exists starts nothing, so its rate
    /// share, lease and fallback are given back at once. Its in-flight share is not: a
    /// request it sent before it died may still be running at the sink, so what it may
    /// have had in flight stays charged for `in_flight_ms` more (the sink call timeout,
    /// the longest such a request runs as the replica counts it).
    ///
    /// Only if that run is the one that refreshed last: a restarted container (same pod
    /// name, a new run) keeps what it was granted, and a member that never said which
    /// run it is (an older client) keeps the lease + fallback path. Returns whether
    /// anything was released.
    pub fn release_terminated(
        &mut self,
        now: u64,
        member: &str,
        incarnation: &str,
        in_flight_ms: u64,
    ) -> bool {
        let ours = self
            .members
            .get(member)
            .is_some_and(|m| m.incarnation.as_deref() == Some(incarnation));
        if ours {
            self.end_run(now, member, Some(in_flight_ms));
        }
        ours
    }

    /// Removes `member`, whose process has ended, keeping what it may have in flight
    /// charged for `in_flight_ms`, or without that, for as long as its leases counted.
    fn end_run(&mut self, now: u64, member: &str, in_flight_ms: Option<u64>) {
        let Some(m) = self.members.get(member) else {
            return;
        };
        let in_flight = m.charge(now).in_flight;
        let ms =
            in_flight_ms.unwrap_or_else(|| m.prev.ends().max(m.cur.ends()).saturating_sub(now));
        self.release(member);
        if in_flight > 0 && ms > 0 {
            self.ended.push(Charge {
                share: Share::ZERO,
                fallback: Share::new(0.0, in_flight),
                until: now,
                fallback_ms: ms,
            });
        }
    }

    /// The policy target of a live `member` and the expected member count, from the
    /// cached split, recomputed when membership, demand or configuration changed or a
    /// member's lease ran out.
    fn target_of(&mut self, member: &str, now: u64) -> (Share, u32) {
        if self.targets.as_ref().is_none_or(|t| now >= t.valid_until) {
            self.targets = Some(self.split(now));
        }
        let t = self.targets.as_ref().expect("just computed");
        (
            t.targets.get(member).copied().unwrap_or_default(),
            t.expected,
        )
    }

    fn split(&self, now: u64) -> Split {
        let live: Vec<(&String, &Member)> = self
            .members
            .iter()
            .filter(|(_, m)| m.is_live(now))
            .collect();
        let expected = self.expected(now);
        let demands: Vec<Share> = live.iter().map(|(_, m)| m.demand).collect();
        let shares = targets(self.config.policy, self.config.capacity, expected, &demands);
        Split {
            valid_until: live
                .iter()
                .map(|(_, m)| m.cur.until)
                .min()
                .unwrap_or(u64::MAX),
            expected,
            targets: live
                .iter()
                .map(|(name, _)| (*name).clone())
                .zip(shares)
                .collect(),
        }
    }

    /// Number of members with an unexpired lease.
    pub fn live_members(&self, now: u64) -> usize {
        self.members.values().filter(|m| m.is_live(now)).count()
    }

    /// What `member` may be using now, as counted.
    pub fn charge_of(&self, member: &str, now: u64) -> Option<Share> {
        self.members.get(member).map(|m| m.charge(now))
    }

    pub fn snapshot(&self, namespace: &str, name: &str, now: u64) -> Snapshot {
        let mut granted = Share::ZERO;
        let mut observed = 0.0;
        let members = self
            .members
            .iter()
            .map(|(member, m)| {
                let live = m.is_live(now);
                if live {
                    granted.rate += m.cur.share.rate;
                    granted.in_flight += m.cur.share.in_flight;
                    observed += m.observed_rate.unwrap_or(0.0);
                }
                MemberSnapshot {
                    member: member.clone(),
                    rate: m.cur.share.rate,
                    in_flight: m.cur.share.in_flight,
                    demand: m.demand,
                    holding: m.holding,
                    charged: m.charge(now),
                    observed_rate: m.observed_rate,
                    expires_in_ms: m.cur.until.saturating_sub(now),
                    state: if live {
                        MemberState::Live
                    } else {
                        MemberState::Expired
                    },
                }
            })
            .collect();
        Snapshot {
            namespace: namespace.to_string(),
            name: name.to_string(),
            capacity: self.config.capacity,
            policy: self.config.policy,
            expected_members: self.config.expected_members,
            epoch: self.epoch,
            learning: self.is_learning(now),
            granted,
            charged: self.charged(now),
            observed_rate: observed,
            members,
        }
    }
}
