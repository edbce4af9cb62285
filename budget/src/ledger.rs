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
//! run out (a lease plus `fallback_ms`, "learning"), nobody gets more than it reports
//! holding and new members get nothing, so nobody's usage grows and the old
//! incarnation's bound still holds. This is longer than the single lease length of the
//! first design sketch: one lease is enough only if no member can be running at its
//! fallback unseen, which nothing guarantees.

use crate::policy::{targets, Policy};
use crate::protocol::{Grant, LeaseRequest, MemberSnapshot, MemberState, Share, Snapshot};
use std::collections::BTreeMap;

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
/// `fallback` until `until + fallback_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Charge {
    share: Share,
    fallback: Share,
    until: u64,
}

impl Charge {
    fn at(&self, now: u64, fallback_ms: u64) -> Share {
        if now < self.until {
            self.share.max(self.fallback)
        } else if now < self.until.saturating_add(fallback_ms) {
            self.fallback
        } else {
            Share::ZERO
        }
    }

    fn ends(&self, fallback_ms: u64) -> u64 {
        self.until.saturating_add(fallback_ms)
    }
}

#[derive(Debug, Clone)]
struct Member {
    demand: Share,
    holding: Share,
    observed_rate: Option<f64>,
    prev: Charge,
    cur: Charge,
}

impl Member {
    fn charge(&self, now: u64, fallback_ms: u64) -> Share {
        self.prev
            .at(now, fallback_ms)
            .max(self.cur.at(now, fallback_ms))
    }

    fn is_live(&self, now: u64) -> bool {
        now < self.cur.until
    }
}

#[derive(Debug, Clone, Copy)]
struct Learning {
    /// Until then, grants never exceed what a member reports holding.
    until: u64,
}

/// The ledger of one budget.
#[derive(Debug, Clone)]
pub struct Ledger {
    config: BudgetConfig,
    epoch: u64,
    members: BTreeMap<String, Member>,
    learning: Option<Learning>,
}

impl Ledger {
    /// A ledger for a budget nobody has leases on (a new budget).
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            epoch: 1,
            members: BTreeMap::new(),
            learning: None,
        }
    }

    /// A ledger created by a coordinator that (re)started at `started`: members may hold
    /// leases from a previous incarnation, so it starts in learning mode.
    pub fn restarted(config: BudgetConfig, started: u64) -> Self {
        let until = started
            .saturating_add(config.lease_ms)
            .saturating_add(config.fallback_ms);
        Self {
            learning: Some(Learning { until }),
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
    fn expected(&self, now: u64, extra_live: bool) -> u32 {
        let live =
            self.members.values().filter(|m| m.is_live(now)).count() as u32 + u32::from(extra_live);
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
        let fb = self.config.fallback_ms;
        self.members
            .retain(|_, m| now < m.prev.ends(fb) || now < m.cur.ends(fb));
        if self.learning.is_some_and(|l| now >= l.until) {
            self.learning = None;
        }
    }

    /// What every member together may be using now, as counted.
    pub fn charged(&self, now: u64) -> Share {
        self.charged_except(now, None)
    }

    fn charged_except(&self, now: u64, except: Option<&str>) -> Share {
        let fb = self.config.fallback_ms;
        let mut sum = Share::ZERO;
        for (name, m) in &self.members {
            if Some(name.as_str()) == except {
                continue;
            }
            let c = m.charge(now, fb);
            sum.rate += c.rate;
            sum.in_flight = sum.in_flight.saturating_add(c.in_flight);
        }
        sum
    }

    /// Joins or renews `req.member` at `now` and returns its grant. The request must
    /// have been validated ([`LeaseRequest::validate`]).
    pub fn refresh(&mut self, now: u64, req: &LeaseRequest) -> Grant {
        self.expire(now);
        let holding = req.holding.unwrap_or(Share::ZERO);
        let lease_ms = self.config.lease_ms;
        let known = self.members.get(&req.member).cloned();

        // What the member holds now, and until when it may use it.
        let prev = match &known {
            Some(m) => Charge {
                share: holding,
                // The fallback of the lease it holds is never more than the lease.
                fallback: if holding == m.cur.share {
                    m.cur.fallback.min(holding)
                } else {
                    holding
                },
                until: if self.learning.is_some() {
                    m.cur.until.max(now.saturating_add(lease_ms))
                } else {
                    m.cur.until
                },
            },
            // Unknown member claiming a holding: trust it (a restart, or a ledger that
            // forgot it), counted for a full lease.
            None => Charge {
                share: holding,
                fallback: holding,
                until: now.saturating_add(lease_ms),
            },
        };

        // Policy targets over the live members, this one included.
        let is_live = known.as_ref().is_some_and(|m| m.is_live(now));
        let expected = self.expected(now, !is_live);
        let mut entries: Vec<(&str, Share)> = self
            .members
            .iter()
            .filter(|(name, m)| name.as_str() != req.member && m.is_live(now))
            .map(|(name, m)| (name.as_str(), m.demand))
            .collect();
        entries.push((&req.member, req.demand));
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let idx = entries
            .iter()
            .position(|(n, _)| *n == req.member)
            .unwrap_or_default();
        let demands: Vec<Share> = entries.iter().map(|(_, d)| *d).collect();
        let target = targets(self.config.policy, self.config.capacity, expected, &demands)[idx];

        // Only capacity nobody else may be using can be granted.
        let others = self.charged_except(now, Some(&req.member));
        let cap = self.config.capacity;
        let room = Share::new(
            (cap.rate - others.rate).max(0.0),
            cap.in_flight.saturating_sub(others.in_flight),
        );
        let mut grant = target.min(room);
        if self.is_learning(now) {
            grant = grant.min(holding);
        }
        let fallback = grant.min(self.fallback_share(expected));

        let cur = Charge {
            share: grant,
            fallback,
            until: now.saturating_add(lease_ms),
        };
        self.members.insert(
            req.member.clone(),
            Member {
                demand: req.demand,
                holding,
                observed_rate: req.observed_rate,
                prev,
                cur,
            },
        );
        Grant {
            rate: grant.rate,
            in_flight: grant.in_flight,
            lease_ms,
            refresh_ms: self.config.refresh_ms,
            fallback,
            fallback_ms: self.config.fallback_ms,
            epoch: self.epoch,
        }
    }

    /// A member that shut down cleanly gives everything back at once. Returns whether
    /// the member was known.
    pub fn release(&mut self, member: &str) -> bool {
        self.members.remove(member).is_some()
    }

    /// Number of members with an unexpired lease.
    pub fn live_members(&self, now: u64) -> usize {
        self.members.values().filter(|m| m.is_live(now)).count()
    }

    /// What `member` may be using now, as counted.
    pub fn charge_of(&self, member: &str, now: u64) -> Option<Share> {
        self.members
            .get(member)
            .map(|m| m.charge(now, self.config.fallback_ms))
    }

    pub fn snapshot(&self, namespace: &str, name: &str, now: u64) -> Snapshot {
        let fb = self.config.fallback_ms;
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
                    charged: m.charge(now, fb),
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
