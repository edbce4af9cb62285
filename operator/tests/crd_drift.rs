//! The committed CRD files are generated from the Rust type; this fails when they drift.

use std::path::Path;

const REGENERATE: &str =
    "cargo run -q -p pacer-operator -- crd > crds/throttledconsumers.pacer.dev.yaml \
     && cp crds/throttledconsumers.pacer.dev.yaml charts/pacer/crds/";

fn check(relative: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {relative}: {e}; regenerate with:\n  {REGENERATE}"));
    assert!(
        committed == pacer_operator::crd::crd_yaml(),
        "{relative} is out of date with operator/src/crd.rs; regenerate with:\n  {REGENERATE}"
    );
}

#[test]
fn committed_crd_matches_the_rust_type() {
    check("crds/throttledconsumers.pacer.dev.yaml");
}

#[test]
fn chart_crd_matches_the_rust_type() {
    check("charts/pacer/crds/throttledconsumers.pacer.dev.yaml");
}

#[test]
fn crd_has_the_names_subresources_and_columns_users_rely_on() {
    let crd: serde_json::Value = serde_yaml::from_str(&pacer_operator::crd::crd_yaml()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], pacer_operator::crd::CRD_NAME);
    assert_eq!(spec["group"], "pacer.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["tc"]));
    let v = &spec["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(v["subresources"]["status"], serde_json::json!({}));
    assert_eq!(
        v["subresources"]["scale"],
        serde_json::json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"
        })
    );
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Replicas", "Budget", "Granted", "Observed", "Ready", "Age"]
    );
    let rules: Vec<&str> = ["budget", "sink"]
        .iter()
        .flat_map(|p| {
            v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][p]
                ["x-kubernetes-validations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["rule"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        rules,
        [
            "self.messagesPerSecond > 0.0",
            "self.maxInFlight >= 1",
            "self.leaseSeconds * 1000 > 2 * self.refreshMillis",
            "has(self.http) != has(self.kafka)",
        ]
    );
}
