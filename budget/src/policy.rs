//! Allocation policies: how a budget's capacity *should* be split among members.
//!
//! Pure functions, no time and no I/O. The ledger decides how much of a target can be
//! granted right now (it may be less while other members still hold more than theirs).

use crate::protocol::Share;
pub use pacer_rules::Policy;

/// Serde for a [`Policy`] field, by the names in `pacer_rules` (the budgets file and the
/// snapshot JSON). `#[serde(with = "crate::policy::by_name")]`.
pub mod by_name {
    use super::Policy;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(policy: &Policy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(policy.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        let name = String::deserialize(d)?;
        name.parse()
            .map_err(|_| D::Error::unknown_variant(&name, Policy::NAMES))
    }
}

/// Targets for `demands` (one entry per live member, in a stable order), given the
/// capacity and the number of members expected (desired replicas).
///
/// The sum of the targets never exceeds `capacity`, for rate and for in-flight.
pub fn targets(policy: Policy, capacity: Share, expected: u32, demands: &[Share]) -> Vec<Share> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    match policy {
        Policy::Equal => {
            let slots = (expected as usize).max(n);
            let rate = capacity.rate / slots as f64;
            let base = capacity.in_flight / slots as u32;
            let rem = (capacity.in_flight % slots as u32) as usize;
            (0..n)
                .map(|i| Share::new(rate, base + u32::from(i < rem)))
                .collect()
        }
        Policy::Demand => {
            let rates = fill_then_spread(
                &demands.iter().map(|d| d.rate).collect::<Vec<_>>(),
                capacity.rate,
            );
            let flights = fill_then_spread(
                &demands
                    .iter()
                    .map(|d| f64::from(d.in_flight))
                    .collect::<Vec<_>>(),
                f64::from(capacity.in_flight),
            );
            let flights = apportion(&flights, capacity.in_flight);
            rates
                .into_iter()
                .zip(flights)
                .map(|(r, f)| Share::new(r, f))
                .collect()
        }
    }
}

/// Water-filling on `demands`, then whatever is left spread evenly over everyone.
fn fill_then_spread(demands: &[f64], capacity: f64) -> Vec<f64> {
    let mut alloc = waterfill(demands, capacity);
    let used: f64 = alloc.iter().sum();
    let rest = (capacity - used).max(0.0) / alloc.len() as f64;
    for a in &mut alloc {
        *a += rest;
    }
    alloc
}

/// Max-min fair allocation: nobody gets more than it asks for, and no member can get
/// more without taking from one that has less.
pub fn waterfill(demands: &[f64], capacity: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| demands[a].total_cmp(&demands[b]));
    let mut alloc = vec![0.0; demands.len()];
    let mut left = capacity.max(0.0);
    for (k, &i) in order.iter().enumerate() {
        let fair = left / (order.len() - k) as f64;
        let give = demands[i].max(0.0).min(fair);
        alloc[i] = give;
        left -= give;
    }
    alloc
}

/// Whole numbers summing to at most `total` (exactly `total` when the fractions sum to
/// it), by the largest-remainder method; ties go to the earlier entry.
pub fn apportion(fractions: &[f64], total: u32) -> Vec<u32> {
    let mut out: Vec<u32> = fractions
        .iter()
        .map(|f| f.max(0.0).floor() as u32)
        .collect();
    let floor_sum: u64 = out.iter().map(|&v| u64::from(v)).sum();
    let wanted = (fractions.iter().sum::<f64>().round() as u64).min(u64::from(total));
    if floor_sum > wanted {
        // Only reachable through floating-point noise; never hand out more than `total`.
        let mut excess = floor_sum - wanted;
        for v in out.iter_mut().rev() {
            let take = u64::from(*v).min(excess);
            *v -= take as u32;
            excess -= take;
        }
        return out;
    }
    let mut order: Vec<usize> = (0..fractions.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = fractions[a] - fractions[a].floor();
        let rb = fractions[b] - fractions[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().take((wanted - floor_sum) as usize) {
        out[i] += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_policy_counts_expected_members_not_yet_running() {
        let t = targets(Policy::Equal, Share::new(12.0, 5), 4, &[Share::ZERO; 2]);
        assert_eq!(t, vec![Share::new(3.0, 2), Share::new(3.0, 1)]);
    }

    #[test]
    fn demand_policy_gives_idle_share_to_busy_members() {
        let d = [
            Share::new(0.0, 0),
            Share::new(100.0, 10),
            Share::new(2.0, 1),
        ];
        let t = targets(Policy::Demand, Share::new(30.0, 6), 3, &d);
        assert_eq!(t[2].rate, 2.0);
        assert_eq!(t[0].rate, 0.0);
        assert_eq!(t[1].rate, 28.0);
        assert_eq!(t.iter().map(|s| s.in_flight).sum::<u32>(), 6);
        assert_eq!(t[1].in_flight, 5);
    }

    #[test]
    fn demand_policy_spreads_leftover_evenly_when_demand_is_low() {
        let d = [Share::new(1.0, 1), Share::new(1.0, 1)];
        let t = targets(Policy::Demand, Share::new(10.0, 4), 2, &d);
        assert_eq!(t, vec![Share::new(5.0, 2), Share::new(5.0, 2)]);
    }

    #[test]
    fn waterfill_is_max_min_fair() {
        assert_eq!(waterfill(&[1.0, 10.0, 10.0], 9.0), vec![1.0, 4.0, 4.0]);
    }

    #[test]
    fn apportion_by_largest_remainder_sums_to_total() {
        assert_eq!(apportion(&[1.5, 1.5, 2.0], 5), vec![2, 1, 2]);
        assert_eq!(apportion(&[5.0 / 3.0; 3], 5), vec![2, 2, 1]);
        assert_eq!(apportion(&[], 5), Vec::<u32>::new());
    }
}
