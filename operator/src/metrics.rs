//! Prometheus metrics of the operator, served on the admin port's `/metrics`.
//!
//! Labels are fixed strings (an error's `category()`, a child kind), never `{:?}`
//! output, so series stay few and stable.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use pacer_budget::service::BudgetId;
use pacer_budget::{MemberState, Snapshot};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Prefix of every metric name.
pub const METRIC_PREFIX: &str = "pacer_operator";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `deployment`, `secret`, `pdb`, `status`, `event`.
    pub kind: &'static str,
    /// `apply`, `create`, `delete`, `skip` (up to date).
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub namespace: String,
    pub name: String,
}

impl From<&BudgetId> for BudgetLabels {
    fn from(id: &BudgetId) -> Self {
        Self {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
        }
    }
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<CategoryLabels, Counter>,
    pub invalid_specs: Counter,
    pub reconcile_duration: Histogram,
    pub writes: Family<WriteLabels, Counter>,
    pub budgets: Gauge,
    pub members: Family<BudgetLabels, Gauge>,
    pub granted_rate: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    pub granted_in_flight: Family<BudgetLabels, Gauge>,
    pub observed_rate: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// Leases released because the kubelet reported the replica's container terminated.
    pub reclaims: Counter,
    /// The budget's rate (capacity), for alerts and dashboards to compare with.
    pub budget_rate: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// Sum of the rates the live members ask for.
    pub demand_rate: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// 1 while the budget's ledger re-learns after a coordinator start.
    pub learning: Family<BudgetLabels, Gauge>,
    /// 1 while this process reconciles and serves the lease protocol. Today always, once
    /// it runs: the operator runs as one replica (leader election is not built yet).
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(METRIC_PREFIX);
        let reconciles = Counter::default();
        let failures = Family::<CategoryLabels, Counter>::default();
        let invalid_specs = Counter::default();
        // 1 ms .. ~16 s: a reconcile is a handful of API round trips.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let writes = Family::<WriteLabels, Counter>::default();
        let budgets = Gauge::default();
        let members = Family::<BudgetLabels, Gauge>::default();
        let granted_rate = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        let granted_in_flight = Family::<BudgetLabels, Gauge>::default();
        let observed_rate = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        let reclaims = Counter::default();
        let budget_rate = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        let demand_rate = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        let learning = Family::<BudgetLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process reconciles and serves the lease protocol",
            leader.clone(),
        );
        registry.register(
            "budget_rate",
            "The budget: messages per second for the whole fleet",
            budget_rate.clone(),
        );
        registry.register(
            "budget_demand_rate",
            "Sum of the rates live members ask for, messages per second",
            demand_rate.clone(),
        );
        registry.register(
            "budget_learning",
            "1 while the budget's ledger re-learns after a coordinator start",
            learning.clone(),
        );
        registry.register(
            "reclaims",
            "Leases released at once because the replica's container was reported terminated",
            reclaims.clone(),
        );
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error category",
            failures.clone(),
        );
        registry.register(
            "invalid_specs",
            "Reconciles that found an invalid spec",
            invalid_specs.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_duration.clone(),
        );
        registry.register(
            "writes",
            "API writes (or skipped writes) by child kind and action",
            writes.clone(),
        );
        registry.register(
            "budgets",
            "Budgets served by the embedded coordinator",
            budgets.clone(),
        );
        registry.register(
            "budget_members",
            "Members holding or having held a lease",
            members.clone(),
        );
        registry.register(
            "budget_granted_rate",
            "Sum of the rates granted to live members, messages per second",
            granted_rate.clone(),
        );
        registry.register(
            "budget_granted_in_flight",
            "Sum of the in-flight slots granted to live members",
            granted_in_flight.clone(),
        );
        registry.register(
            "budget_observed_rate",
            "Sum of the rates members report processing, messages per second",
            observed_rate.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            invalid_specs,
            reconcile_duration,
            writes,
            budgets,
            members,
            granted_rate,
            granted_in_flight,
            observed_rate,
            reclaims,
            budget_rate,
            demand_rate,
            learning,
            leader,
        }
    }

    pub fn write(&self, kind: &'static str, action: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { kind, action })
            .inc();
    }

    pub fn observe_duration(&self, d: Duration) {
        self.reconcile_duration.observe(d.as_secs_f64());
    }

    pub fn record_budget(&self, id: &BudgetId, s: &Snapshot) {
        let l = BudgetLabels::from(id);
        self.members.get_or_create(&l).set(s.members.len() as i64);
        self.granted_rate.get_or_create(&l).set(s.granted.rate);
        self.granted_in_flight
            .get_or_create(&l)
            .set(i64::from(s.granted.in_flight));
        self.observed_rate.get_or_create(&l).set(s.observed_rate);
        self.budget_rate.get_or_create(&l).set(s.capacity.rate);
        let demand: f64 = (s.members.iter())
            .filter(|m| m.state == MemberState::Live)
            .map(|m| m.demand.rate)
            .sum();
        self.demand_rate.get_or_create(&l).set(demand);
        self.learning.get_or_create(&l).set(i64::from(s.learning));
    }

    pub fn forget_budget(&self, id: &BudgetId) {
        let l = BudgetLabels::from(id);
        self.members.remove(&l);
        self.granted_rate.remove(&l);
        self.granted_in_flight.remove(&l);
        self.observed_rate.remove(&l);
        self.budget_rate.remove(&l);
        self.demand_rate.remove(&l);
        self.learning.remove(&l);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
