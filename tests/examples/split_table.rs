//! Prints the comparison of Pacer's ledger with the peers' ways of splitting one budget,
//! as the Markdown table in BENCHMARKS.md ("Splitting one budget"). Deterministic: the
//! same table on every run.
//!
//! ```sh
//! cargo run -p pacer-tests --example split_table
//! ```

use pacer_tests::sim::{markdown_table, Params};

fn main() {
    let p = Params::default();
    println!(
        "budget {} msg/s, {} partitions, replica capacity {} msg/s, lease {} s, refresh {} ms, \
         fallback {} s, stale-member TTL {} s, session timeout {} s, pod start {} s, \
         {} s per scenario, events at 60 s (and 120 s)\n",
        p.budget,
        p.partitions,
        p.replica_capacity,
        p.lease_ms / 1000,
        p.refresh_ms,
        p.fallback_ms / 1000,
        p.stale_member_ttl_ms / 1000,
        p.session_timeout_ms / 1000,
        p.pod_start_ms / 1000,
        p.duration_ms / 1000,
    );
    print!("{}", markdown_table(&p));
}
