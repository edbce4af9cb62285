//! The ThrottledConsumer CRD on a real kube-apiserver: the schema is accepted, every
//! bound and every CEL rule is enforced by the server, and the server and the
//! operator's own validation agree on every case.
//!
//! The bound cases are generated from the CRD's schema itself (each `minimum`,
//! `maximum`, `minLength`, `maxLength`, `pattern`, `enum`, `minItems` and `maxItems`
//! under `spec`, once just inside and once just outside), so a bound added later is
//! exercised without anyone writing its test; CEL rules need a hand-made violation each,
//! and a rule without one fails the test.

use std::collections::BTreeSet;
use std::path::PathBuf;

use pacer_tests::k8s::{repo_root, ControlPlane};
use serde_json::{json, Value};

fn crd_path() -> PathBuf {
    repo_root().join("crds/throttledconsumers.pacer.dev.yaml")
}

fn yaml(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn examples() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(repo_root().join("crds/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                yaml(&p),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The example with every optional field set, the base that cases change one field of.
fn full_example() -> Value {
    let mut v = yaml(&repo_root().join("crds/examples/orders-sync.yaml"));
    v["metadata"] = json!({"name": "case"});
    v
}

/// The operator's verdict on a spec: `None` accepted, `Some(why)` refused.
fn operator_verdict(spec: &Value) -> Option<String> {
    let parsed: pacer_operator::crd::ThrottledConsumerSpec =
        match serde_json::from_value(spec.clone()) {
            Ok(s) => s,
            Err(e) => return Some(format!("parse: {e}")),
        };
    pacer_operator::validate::validate(&parsed)
        .err()
        .map(|e| e.to_string())
}

/// The server's verdict on an object (server-side dry run of a create).
fn server_verdict(cp: &ControlPlane, ns: &str, obj: &Value) -> Option<String> {
    let out = cp.kubectl_stdin(
        &["create", "--dry-run=server", "-n", ns, "-f", "-"],
        &obj.to_string(),
    );
    if out.status.success() {
        None
    } else {
        Some(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One generated or hand-made case: `path` set to `value` in the full example.
#[derive(Debug, Clone)]
struct Case {
    what: String,
    path: Vec<String>,
    value: Value,
    /// Whether the schema promises to refuse it. `false`: a value just inside a bound,
    /// which another rule may still refuse (a lease of 1 s is too short for the default
    /// refresh): the server and the operator must then agree, nothing more.
    refused: bool,
    /// What the server's message must contain when it refuses (the field's path, or the
    /// CEL rule's own message).
    expect: String,
}

impl Case {
    fn object(&self) -> Value {
        let mut v = full_example();
        // The full example's sink is HTTP; a Kafka sink's field replaces it, so the case
        // does not also break "exactly one sink".
        if self
            .path
            .starts_with(&["spec".into(), "sink".into(), "kafka".into()])
        {
            v["spec"]["sink"] = json!({"kafka": {"topic": "out"}});
        }
        set(&mut v, &self.path, self.value.clone());
        v
    }
}

/// Sets `path` (object keys; `0` indexes an array) in `v`, creating objects on the way.
fn set(v: &mut Value, path: &[String], value: Value) {
    let mut cur = v;
    for key in path {
        cur = match cur {
            Value::Array(items) => {
                let i: usize = key.parse().unwrap();
                &mut items[i]
            }
            _ => {
                if !cur.is_object() {
                    *cur = json!({});
                }
                cur.as_object_mut()
                    .unwrap()
                    .entry(key.clone())
                    .or_insert(Value::Null)
            }
        };
    }
    *cur = value;
}

fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, key| match cur {
        Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => cur.get(key),
    })
}

/// `spec.budget.burst`, `spec.kafka.secretConfig[0].key`: the server's spelling.
fn dotted(path: &[String]) -> String {
    let mut s = String::new();
    for key in path {
        if key.parse::<usize>().is_ok() {
            s.push_str(&format!("[{key}]"));
        } else {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(key);
        }
    }
    s
}

/// The cases each bound of `schema` (at `path`) makes, plus those of its children. The
/// pod template's schema is Kubernetes' own and is left out.
fn bound_cases(schema: &Value, path: &[String], base: &Value, out: &mut Vec<Case>) {
    let field = dotted(path);
    let mut case = |what: String, value: Value, refused: bool| {
        out.push(Case {
            what: format!("{field}: {what}"),
            path: path.to_vec(),
            value,
            refused,
            expect: field.clone(),
        })
    };
    let integer = schema["type"] == "integer";
    let num = |x: f64| {
        if integer {
            json!(x as i64)
        } else {
            json!(x)
        }
    };
    let step = if integer { 1.0 } else { 0.001 };
    if let Some(min) = schema["minimum"].as_f64() {
        let exclusive = schema["exclusiveMinimum"] == true;
        let (inside, outside) = if exclusive {
            (min + step, min)
        } else {
            (min, min - step)
        };
        case(format!("minimum {min}, {outside}"), num(outside), true);
        case(format!("minimum {min}, {inside}"), num(inside), false);
    }
    if let Some(max) = schema["maximum"].as_f64() {
        let exclusive = schema["exclusiveMaximum"] == true;
        let (inside, outside) = if exclusive {
            (max - step, max)
        } else {
            (max, max + step)
        };
        case(format!("maximum {max}, {outside}"), num(outside), true);
        case(format!("maximum {max}, {inside}"), num(inside), false);
    }
    if let Some(n) = schema["minLength"].as_u64().filter(|n| *n > 0) {
        case(
            format!("minLength {n}"),
            json!("a".repeat(n as usize - 1)),
            true,
        );
    }
    if let Some(n) = schema["maxLength"].as_u64() {
        case(
            format!("maxLength {n}"),
            json!("a".repeat(n as usize + 1)),
            true,
        );
        // A string of `n` letters is inside the bound only where no pattern refuses it.
        if schema["pattern"].is_null() {
            case(
                format!("maxLength {n}, at it"),
                json!("a".repeat(n as usize)),
                false,
            );
        }
    }
    if let Some(p) = schema["pattern"].as_str() {
        case(format!("pattern {p}"), json!("has space!"), true);
    }
    if schema["enum"].is_array() {
        case("enum".into(), json!("not-one-of-them"), true);
    }
    if let Some(n) = schema["minItems"].as_u64().filter(|n| *n > 0) {
        case(format!("minItems {n}"), json!([]), true);
    }
    if let Some(n) = schema["maxItems"].as_u64() {
        if let Some(item) = get(base, path).and_then(|a| a.get(0)).cloned() {
            case(
                format!("maxItems {n}"),
                Value::Array(vec![item; n as usize + 1]),
                true,
            );
        }
    }
    for (key, child) in schema["properties"].as_object().into_iter().flatten() {
        if path.len() == 1 && key == "template" {
            continue;
        }
        let mut p = path.to_vec();
        p.push(key.clone());
        bound_cases(child, &p, base, out);
    }
    if schema["items"].is_object() && get(base, path).is_some_and(|a| a.get(0).is_some()) {
        let mut p = path.to_vec();
        p.push("0".into());
        bound_cases(&schema["items"], &p, base, out);
    }
}

/// A violation of each CEL rule, by the rule's message.
fn cel_cases() -> Vec<(&'static str, Vec<&'static str>, Value)> {
    vec![
        (
            "budget.messagesPerSecond must be greater than 0",
            vec!["spec", "budget", "messagesPerSecond"],
            json!(0),
        ),
        (
            "budget.maxInFlight must be at least 1",
            vec!["spec", "budget", "maxInFlight"],
            json!(0),
        ),
        (
            "budget.leaseSeconds * 1000 must be greater than 2 * budget.refreshMillis",
            vec!["spec", "budget"],
            json!({"messagesPerSecond": 10, "maxInFlight": 2, "leaseSeconds": 2, "refreshMillis": 1000}),
        ),
        (
            "delivery.retry.initialDelay must not be longer than delivery.retry.maxDelay",
            vec!["spec", "delivery", "retry"],
            json!({"maxAttempts": 5, "initialDelay": "10s", "maxDelay": "1s"}),
        ),
        (
            "kafka.config keys may not contain ',' or '='",
            vec!["spec", "kafka", "config"],
            json!({"a,b": "1"}),
        ),
        (
            "kafka.config keys may not contain ',' or '='",
            vec!["spec", "kafka", "config"],
            json!({"client.id": "x,y"}),
        ),
        (
            "exactly one of sink.http or sink.kafka must be set",
            vec!["spec", "sink"],
            json!({"http": {"url": "http://127.0.0.1:1/x"}, "kafka": {"topic": "t"}}),
        ),
        (
            "exactly one of sink.http or sink.kafka must be set",
            vec!["spec", "sink"],
            json!({}),
        ),
    ]
}

/// Every CEL rule's message in the CRD.
fn cel_messages(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(rules) = m.get("x-kubernetes-validations").and_then(Value::as_array) {
                for r in rules {
                    out.insert(r["message"].as_str().unwrap_or_default().to_string());
                }
            }
            m.values().for_each(|c| cel_messages(c, out));
        }
        Value::Array(items) => items.iter().for_each(|c| cel_messages(c, out)),
        _ => {}
    }
}

#[test]
fn the_crd_is_served_and_the_server_and_the_operator_agree_on_every_rule() {
    let cp = ControlPlane::start();
    eprintln!(
        "control plane ready in {:.1} s",
        cp.started_in.as_secs_f64()
    );
    let crd = crd_path();
    cp.install_crd();
    let ns = cp.namespace("crd");

    // Every example is accepted by both.
    for (name, mut obj) in examples() {
        obj["metadata"]["namespace"] = json!(ns);
        assert_eq!(server_verdict(&cp, &ns, &obj), None, "{name} refused");
        assert_eq!(operator_verdict(&obj["spec"]), None, "{name} refused");
    }

    // Bounds from the schema, each just inside and just outside.
    let crd_doc = yaml(&crd);
    let schema = &crd_doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut cases = Vec::new();
    bound_cases(schema, &["spec".to_string()], &full_example(), &mut cases);
    // CEL rules, each violated once.
    let mut covered = BTreeSet::new();
    for (message, path, value) in cel_cases() {
        covered.insert(message);
        cases.push(Case {
            what: format!("CEL: {message}"),
            path: path.iter().map(|s| s.to_string()).collect(),
            value,
            refused: true,
            expect: message.to_string(),
        });
    }
    let mut rules = BTreeSet::new();
    cel_messages(&crd_doc, &mut rules);
    let untested: Vec<&String> = rules
        .iter()
        .filter(|r| !covered.iter().any(|c| r.starts_with(c)))
        .collect();
    assert!(
        untested.is_empty(),
        "CEL rules without a case: {untested:?}"
    );

    let mut problems = Vec::new();
    let mut refused = 0;
    for case in &cases {
        let obj = case.object();
        let server = server_verdict(&cp, &ns, &obj);
        let operator = operator_verdict(&obj["spec"]);
        match (&server, case.refused) {
            (None, true) => problems.push(format!("{}: the server accepted it", case.what)),
            (Some(m), true) if !m.contains(&case.expect) => problems.push(format!(
                "{}: the server's message does not name {:?}: {m}",
                case.what, case.expect
            )),
            // Inside its own bound, a value may still break a rule across fields (a
            // lease of 1 s with the example's refresh interval); anything else is a
            // bound the server enforces differently from the schema it publishes.
            (Some(m), false) if !rules.iter().any(|r| m.contains(r.as_str())) => {
                problems.push(format!(
                    "{}: the server refused a value inside the bound: {m}",
                    case.what
                ))
            }
            _ => {}
        }
        // A rule that fails to evaluate (a CEL type error, say) is a broken rule, even
        // when the object is rightly refused for another reason.
        if let Some(m) = server.as_deref().filter(|m| m.contains("evaluating rule")) {
            problems.push(format!("{}: a CEL rule failed to evaluate: {m}", case.what));
        }
        if server.is_some() != operator.is_some() {
            problems.push(format!(
                "{}: server {} but operator {}",
                case.what,
                server.as_deref().unwrap_or("accepted"),
                operator.as_deref().unwrap_or("accepted")
            ));
        }
        if let Some(m) = &server {
            refused += 1;
            eprintln!("refused  {}\n         {}", case.what, last_line(m));
        } else {
            eprintln!("accepted {}", case.what);
        }
    }
    eprintln!("{} cases, {refused} refused by the server", cases.len());
    assert!(cases.len() >= 60, "only {} cases generated", cases.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn last_line(m: &str) -> &str {
    m.lines().last().unwrap_or(m)
}

#[test]
fn kubectl_gets_scales_and_explains_a_throttled_consumer() {
    let cp = ControlPlane::start();
    cp.install_crd();
    let ns = cp.namespace("kubectl");
    let minimal = repo_root().join("crds/examples/minimal.yaml");
    cp.kubectl_ok(&["apply", "-n", &ns, "-f", minimal.to_str().unwrap()]);

    let table = cp.kubectl_ok(&["get", "tc", "-n", &ns]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "REPLICAS", "BUDGET", "GRANTED", "OBSERVED", "READY", "AGE"],
        "{table}"
    );
    assert!(table.contains("audit-export"), "{table}");

    cp.kubectl_ok(&["scale", "-n", &ns, "tc/audit-export", "--replicas=5"]);
    let replicas = cp.kubectl_ok(&[
        "get",
        "tc/audit-export",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas.trim(), "5");
    // The scale subresource's own view (what an HPA reads).
    let scale = cp.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/apis/pacer.dev/v1alpha1/namespaces/{ns}/throttledconsumers/audit-export/scale"),
    ]);
    let scale: Value = serde_json::from_str(&scale).unwrap();
    assert_eq!(scale["spec"]["replicas"], 5, "{scale}");

    let explain = cp.kubectl_ok(&["explain", "tc.spec.budget"]);
    for field in [
        "messagesPerSecond",
        "maxInFlight",
        "burst",
        "policy",
        "leaseSeconds",
        "refreshMillis",
    ] {
        assert!(explain.contains(field), "{field} missing from:\n{explain}");
    }
    assert!(
        explain.lines().filter(|l| !l.trim().is_empty()).count() > 12,
        "no field docs:\n{explain}"
    );

    // A patch to an invalid budget is refused by the server.
    let out = cp.kubectl(&[
        "patch",
        "-n",
        &ns,
        "tc/audit-export",
        "--type=merge",
        "-p",
        r#"{"spec":{"budget":{"messagesPerSecond":0}}}"#,
    ]);
    assert!(!out.status.success(), "an invalid budget was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("messagesPerSecond"), "{err}");
}
