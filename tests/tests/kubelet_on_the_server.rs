//! The test kubelet ([`pacer_tests::kubelet`]) on a real control plane, with `/bin/sh`
//! standing in for the image: Pods of Deployments are bound and run, see their
//! downward-API name, their Secret values and their Secret volume, are reported Ready
//! (the Deployment counts them), are restarted when they exit (their termination message
//! reported), and are stopped with SIGTERM, or SIGKILL after their grace period, when
//! deleted.

use std::path::Path;
use std::time::{Duration, Instant};

use pacer_tests::k8s::ControlPlane;
use pacer_tests::kubelet::{Event, Kubelet, KubeletConfig, Record};
use serde_json::{json, Value};

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Deployment of one Pod labelled `app=NAME` whose container `main` runs `sh -c
/// script`.
fn deployment(name: &str, script: &str, grace: i64) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "kubelet-test": "yes"}},
                "spec": {
                    "terminationGracePeriodSeconds": grace,
                    // As the operator's Pods: the test kubelet mounts no token.
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "main",
                        "image": "busybox",
                        "command": ["sh", "-c", script],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "GREETING", "value": "hello $(POD_NAME)"},
                            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                            {"name": "TOKEN_FILE", "value": "/etc/creds/token"},
                            // Rewritten like a mount path (only whole values are).
                            {"name": "MESSAGE_FILE", "value": "/dev/termination-log"},
                        ],
                        "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "readOnly": true}],
                    }],
                    "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
                }
            }
        }
    })
}

fn pod_names(cp: &ControlPlane, ns: &str, app: &str) -> Vec<String> {
    cp.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        &format!("app={app}"),
        "-o",
        "name",
    ])
    .lines()
    .map(|l| l.trim_start_matches("pod/").to_string())
    .collect()
}

fn events_of(records: &[Record], pod: &str) -> Vec<Event> {
    records
        .iter()
        .filter(|r| r.pod == pod)
        .map(|r| r.event.clone())
        .collect()
}

#[test]
fn the_test_kubelet_runs_restarts_and_stops_pods_of_deployments() {
    let cp = ControlPlane::start();
    assert!(cp.controllers, "kube-controller-manager is needed");
    let ns = cp.namespace("kubelet");
    cp.await_default_service_account(&ns);
    cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "-n",
        &ns,
        "--from-literal=password=s3cret",
        "--from-literal=token=t0ken",
    ]);
    let kubelet = Kubelet::start(KubeletConfig::new(
        &cp.kubeconfig,
        &ns,
        "kubelet-test=yes",
        "main",
        Path::new("/bin/sh"),
    ));
    let apply = |d: Value| {
        let out = cp.kubectl_stdin(&["apply", "-n", &ns, "-f", "-"], &d.to_string());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Runs with its environment and Secret volume, Ready for the Deployment; SIGTERM on
    // delete, then the Pod object goes.
    apply(deployment(
        "polite",
        r#"echo "$GREETING $PASSWORD $(cat "$TOKEN_FILE")"; trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done"#,
        30,
    ));
    let pod = wait_for("the polite Pod", Duration::from_secs(60), || {
        pod_names(&cp, &ns, "polite").pop()
    });
    wait_for(
        "the Deployment's ready replica",
        Duration::from_secs(60),
        || {
            let ready = cp.kubectl_ok(&[
                "get",
                "deployment",
                "polite",
                "-n",
                &ns,
                "-o",
                "jsonpath={.status.readyReplicas}",
            ]);
            (ready.trim() == "1").then_some(())
        },
    );
    let out = wait_for("the container's output", Duration::from_secs(10), || {
        let log = kubelet.log(&pod);
        log.contains('\n').then_some(log)
    });
    assert_eq!(
        out.lines().next().unwrap(),
        format!("hello {pod} s3cret t0ken")
    );
    let status: Value =
        serde_json::from_str(&cp.kubectl_ok(&["get", "pod", &pod, "-n", &ns, "-o", "json"]))
            .unwrap();
    assert_eq!(status["spec"]["nodeName"], kubelet.node.as_str());
    assert_eq!(status["status"]["phase"], "Running");
    assert_eq!(status["status"]["containerStatuses"][0]["ready"], true);
    let t = Instant::now();
    cp.kubectl_ok(&["delete", "deployment", "polite", "-n", &ns, "--wait=false"]);
    wait_for("the polite Pod gone", Duration::from_secs(60), || {
        (pod_names(&cp, &ns, "polite").is_empty()
            && events_of(&kubelet.records(), &pod).contains(&Event::Deleted))
        .then_some(())
    });
    let stopped_in = t.elapsed();
    assert_eq!(
        events_of(&kubelet.records(), &pod)
            .into_iter()
            .filter(|e| !matches!(e, Event::Started { .. } | Event::Bound | Event::Ready))
            .collect::<Vec<_>>(),
        [
            Event::Terminating,
            Event::Exited { code: Some(0) },
            Event::Deleted
        ]
    );
    assert!(kubelet.log(&pod).contains("bye"), "{}", kubelet.log(&pod));
    eprintln!("polite: deleted and gone in {stopped_in:?}");

    // Ignores SIGTERM: SIGKILLed after its 1 s grace.
    apply(deployment(
        "stubborn",
        "trap '' TERM; while true; do sleep 0.1; done",
        1,
    ));
    let pod = wait_for("the stubborn Pod running", Duration::from_secs(60), || {
        let pod = pod_names(&cp, &ns, "stubborn").pop()?;
        kubelet.running_pods().contains(&pod).then_some(pod)
    });
    let t = Instant::now();
    cp.kubectl_ok(&["delete", "pod", &pod, "-n", &ns, "--wait=false"]);
    wait_for(
        "the stubborn process killed",
        Duration::from_secs(30),
        || (!kubelet.running_pods().contains(&pod)).then_some(()),
    );
    let killed_in = t.elapsed();
    let events = events_of(&kubelet.records(), &pod);
    assert!(events.contains(&Event::Killed), "{events:?}");
    assert!(
        killed_in >= Duration::from_secs(1) && killed_in < Duration::from_secs(10),
        "SIGKILL {killed_in:?} after the delete"
    );
    eprintln!("stubborn: SIGKILLed {killed_in:?} after the delete");
    cp.kubectl_ok(&[
        "delete",
        "deployment",
        "stubborn",
        "-n",
        &ns,
        "--wait=false",
    ]);

    // Exits on its own: reported terminated (with its termination message) and started
    // again.
    apply(deployment(
        "crashing",
        "echo run; echo last words > \"$MESSAGE_FILE\"; exit 3",
        30,
    ));
    let pod = wait_for("the crashing Pod", Duration::from_secs(60), || {
        pod_names(&cp, &ns, "crashing").pop()
    });
    let status = wait_for("a restart reported", Duration::from_secs(60), || {
        let s: Value =
            serde_json::from_str(&cp.kubectl_ok(&["get", "pod", &pod, "-n", &ns, "-o", "json"]))
                .ok()?;
        let cs = &s["status"]["containerStatuses"][0];
        (cs["restartCount"].as_u64()? >= 2).then(|| cs.clone())
    });
    assert_eq!(status["lastState"]["terminated"]["exitCode"], 3, "{status}");
    assert_eq!(
        status["lastState"]["terminated"]["message"], "last words\n",
        "{status}"
    );
    let starts = events_of(&kubelet.records(), &pod)
        .iter()
        .filter(|e| matches!(e, Event::Started { .. }))
        .count();
    assert!(starts >= 3, "{starts} starts");
    assert!(kubelet.log(&pod).lines().filter(|l| *l == "run").count() >= starts);
    eprintln!("crashing: {starts} starts, status {status}");
    assert!(kubelet.errors().is_empty(), "{:?}", kubelet.errors());
}
