//! The `pacer-operator` binary's subcommands, run as a user would.

use std::process::Command;

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pacer-operator"))
}

#[test]
fn crd_subcommand_prints_the_generated_crd() {
    let out = operator().arg("crd").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        pacer_operator::crd::crd_yaml()
    );
}

#[test]
fn render_subcommand_prints_the_children_of_an_example() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/examples/orders-sync.yaml"
    );
    let out = operator()
        .args([
            "render",
            example,
            "--replica-image",
            "registry.local/pacer:1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("kind: Deployment"));
    assert!(stdout.contains("image: registry.local/pacer:1"));
    assert!(stdout.contains("kind: PodDisruptionBudget"));
}

#[test]
fn run_refuses_a_coordinator_url_that_is_not_http_before_touching_the_cluster() {
    let out = operator()
        .args([
            "run",
            "--coordinator-url",
            "pacer:8080",
            "--replica-image",
            "pacer:1",
        ])
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(r#"--coordinator-url: "pacer:8080" is not an http://HOST[:PORT][/PATH] URL (the coordinator speaks plain HTTP)"#),
        "{stderr}"
    );
}

#[test]
fn run_reads_its_settings_from_the_environment_the_chart_sets() {
    let out = operator()
        .arg("run")
        .env(
            "PACER_OPERATOR_COORDINATOR_URL",
            "http://pacer.pacer-system.svc:8080",
        )
        .env("PACER_OPERATOR_REPLICA_IMAGE", "pacer:1")
        .env("PACER_OPERATOR_RESYNC_SECONDS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("--resync-seconds 0 is out of range, must be 1 to 3600"),
        "{stderr}"
    );
}

#[test]
fn chart_sets_only_environment_variables_the_operator_reads() {
    let help = operator().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/pacer/templates/deployment.yaml"
    ))
    .unwrap();
    let set: Vec<&str> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|n| n.starts_with("PACER_OPERATOR_"))
        .collect();
    assert!(set.len() >= 6, "{set:?}");
    for name in set {
        assert!(
            help.contains(&format!("[env: {name}=")),
            "{name} is set by the chart but not read by `pacer-operator run`"
        );
    }
}
