//! `pacer demo` end to end: the real binary, its JSON series checked against the budget.

use std::process::Command;

#[test]
fn the_demo_keeps_the_fleet_at_its_budget_while_a_replica_leaves() {
    let dir = std::env::temp_dir().join(format!("pacer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("series.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args([
            "demo",
            "--budget",
            "30",
            "--replicas",
            "2",
            "--duration",
            "6",
            "--json",
        ])
        .arg(&json)
        .env("PACER_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("leaves"),
        "the demo shows a replica leaving: {stdout}"
    );
    let series: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(series.len(), 6, "one entry per second");
    let rates: Vec<f64> = series
        .iter()
        .map(|s| s["sink_rate"].as_f64().unwrap())
        .collect();
    // Each replica may add its burst of one on top of the budget within a second.
    for (t, r) in rates.iter().enumerate() {
        assert!(
            *r <= 30.0 + 2.0,
            "second {}: {r} msg/s over a budget of 30",
            t + 1
        );
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    assert!(
        mean >= 30.0 * 0.7,
        "the budget is used: mean {mean:.1} msg/s, series {rates:?}"
    );
    assert_eq!(series.last().unwrap()["replicas"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}
