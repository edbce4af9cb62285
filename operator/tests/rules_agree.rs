//! One rule, one verdict: for the boundary values of every rule that the operator's spec
//! validation, the standalone coordinator's budgets file and `pacer run`'s flags share,
//! every place that has the setting accepts, or every one refuses, and the verdict is the
//! one the rule states (edges in, one step outside out).
//!
//! Each place is driven through its real entry point: the spec is deserialized from JSON
//! as the API server hands it over and passed to `validate`, the budgets file is parsed
//! from YAML, and `pacer run` is parsed by clap and validated. The boundary values come
//! from `pacer_rules`, so a bound that moves moves the test with it; a place that stops
//! using the shared rule makes it fail.

use clap::Parser;
use pacer_operator::crd::ThrottledConsumerSpec;
use pacer_rules::limits::{self, IntRange};
use pacer_runtime::config::{Cli, Command};
use serde_json::{json, Value};

/// How one setting is set in each place; `None` where that place has no such setting.
struct Place {
    name: &'static str,
    /// Sets the value on a ThrottledConsumer spec (JSON).
    crd: Option<fn(&mut Value, &str)>,
    /// Sets the value on one entry of the budgets file (JSON, written out as YAML).
    file: Option<fn(&mut Value, &str)>,
    /// The `pacer run` flag with the value, as `--flag=value` (so `-1` stays a value).
    run: Option<fn(&str) -> String>,
    /// The lease protocol's check, for the member name (the coordinator's side of it).
    lease: Option<fn(&str) -> bool>,
}

impl Place {
    const NONE: Place = Place {
        name: "",
        crd: None,
        file: None,
        run: None,
        lease: None,
    };
}

/// A JSON number written as text.
fn num(v: &str) -> Value {
    serde_json::from_str(v).expect("a number")
}

fn text(v: &str) -> Value {
    Value::String(v.to_string())
}

// --- The settings, as each place spells them. ---

const RATE: Place = Place {
    name: "rate",
    crd: Some(|s, v| s["budget"]["messagesPerSecond"] = num(v)),
    file: Some(|b, v| b["messagesPerSecond"] = num(v)),
    run: Some(|v| format!("--rate={v}")),
    ..Place::NONE
};
const IN_FLIGHT: Place = Place {
    name: "in-flight",
    crd: Some(|s, v| s["budget"]["maxInFlight"] = num(v)),
    file: Some(|b, v| b["maxInFlight"] = num(v)),
    run: Some(|v| format!("--max-in-flight={v}")),
    ..Place::NONE
};
const BURST: Place = Place {
    name: "burst",
    crd: Some(|s, v| s["budget"]["burst"] = num(v)),
    run: Some(|v| format!("--burst={v}")),
    ..Place::NONE
};
const LEASE_SECONDS: Place = Place {
    name: "leaseSeconds",
    crd: Some(|s, v| s["budget"]["leaseSeconds"] = num(v)),
    file: Some(|b, v| b["leaseSeconds"] = num(v)),
    ..Place::NONE
};
const FALLBACK_SECONDS: Place = Place {
    name: "fallbackSeconds",
    crd: Some(|s, v| s["budget"]["fallbackSeconds"] = num(v)),
    file: Some(|b, v| b["fallbackSeconds"] = num(v)),
    ..Place::NONE
};
const REFRESH_MILLIS: Place = Place {
    name: "refreshMillis",
    crd: Some(|s, v| s["budget"]["refreshMillis"] = num(v)),
    file: Some(|b, v| b["refreshMillis"] = num(v)),
    ..Place::NONE
};
const POLICY: Place = Place {
    name: "policy",
    crd: Some(|s, v| s["budget"]["policy"] = text(v)),
    file: Some(|b, v| b["policy"] = text(v)),
    ..Place::NONE
};
const MAX_ATTEMPTS: Place = Place {
    name: "max attempts",
    crd: Some(|s, v| s["delivery"]["retry"]["maxAttempts"] = num(v)),
    run: Some(|v| format!("--max-attempts={v}")),
    ..Place::NONE
};
const TIMEOUT: Place = Place {
    name: "timeout",
    crd: Some(|s, v| s["delivery"]["timeout"] = text(v)),
    run: Some(|v| format!("--timeout={v}")),
    ..Place::NONE
};
const SHUTDOWN_GRACE: Place = Place {
    name: "shutdown grace",
    crd: Some(|s, v| s["delivery"]["shutdownGrace"] = text(v)),
    run: Some(|v| format!("--shutdown-grace={v}")),
    ..Place::NONE
};
const INITIAL_DELAY: Place = Place {
    name: "initial delay",
    crd: Some(|s, v| s["delivery"]["retry"]["initialDelay"] = text(v)),
    run: Some(|v| format!("--retry-initial-delay={v}")),
    ..Place::NONE
};
const MAX_DELAY: Place = Place {
    name: "max delay",
    crd: Some(|s, v| s["delivery"]["retry"]["maxDelay"] = text(v)),
    run: Some(|v| format!("--retry-max-delay={v}")),
    ..Place::NONE
};
const ORDERING: Place = Place {
    name: "ordering",
    crd: Some(|s, v| s["delivery"]["ordering"] = text(v)),
    run: Some(|v| format!("--ordering={v}")),
    ..Place::NONE
};
const TOPIC: Place = Place {
    name: "topic",
    crd: Some(|s, v| s["kafka"]["topics"] = json!([v])),
    run: Some(|v| format!("--topic={v}")),
    ..Place::NONE
};
const DEAD_LETTER_TOPIC: Place = Place {
    name: "dead-letter topic",
    crd: Some(|s, v| s["delivery"]["deadLetterTopic"] = text(v)),
    run: Some(|v| format!("--dead-letter-topic={v}")),
    ..Place::NONE
};
const SINK_TOPIC: Place = Place {
    name: "sink topic",
    crd: Some(|s, v| s["sink"] = json!({"kafka": {"topic": v}})),
    run: Some(|v| format!("--sink=kafka:{v}")),
    ..Place::NONE
};
const SINK_URL: Place = Place {
    name: "sink URL",
    crd: Some(|s, v| s["sink"] = json!({"http": {"url": v}})),
    run: Some(|v| format!("--sink={v}")),
    ..Place::NONE
};
const GROUP_ID: Place = Place {
    name: "group id",
    crd: Some(|s, v| s["kafka"]["groupId"] = text(v)),
    run: Some(|v| format!("--group-id={v}")),
    ..Place::NONE
};
const BOOTSTRAP: Place = Place {
    name: "bootstrap servers",
    crd: Some(|s, v| s["kafka"]["bootstrapServers"] = text(v)),
    run: Some(|v| format!("--bootstrap-servers={v}")),
    ..Place::NONE
};
const GROUP_PROTOCOL: Place = Place {
    name: "group protocol",
    crd: Some(|s, v| s["kafka"]["groupProtocol"] = text(v)),
    run: Some(|v| format!("--group-protocol={v}")),
    ..Place::NONE
};
const CONFIG_KEY: Place = Place {
    name: "kafka config key",
    crd: Some(|s, v| s["kafka"]["config"] = json!({ v: "x" })),
    run: Some(|v| format!("--kafka-config={v}=x")),
    ..Place::NONE
};
const SECRET_CONFIG_KEY: Place = Place {
    name: "kafka secretConfig key",
    crd: Some(|s, v| {
        s["kafka"]["secretConfig"] = json!([{"key": v, "secretKeyRef": {"name": "k", "key": "p"}}])
    }),
    run: Some(|v| format!("--kafka-config={v}=x")),
    ..Place::NONE
};
const BUDGET_NAME: Place = Place {
    name: "budget name",
    file: Some(|b, v| b["name"] = text(v)),
    run: Some(|v| format!("--budget=default/{v}")),
    ..Place::NONE
};
const BUDGET_NAMESPACE: Place = Place {
    name: "budget namespace",
    file: Some(|b, v| b["namespace"] = text(v)),
    run: Some(|v| format!("--budget={v}/orders")),
    ..Place::NONE
};
const MEMBER: Place = Place {
    name: "member",
    run: Some(|v| format!("--member={v}")),
    lease: Some(|v| pacer_budget::protocol::validate_member(v).is_ok()),
    ..Place::NONE
};

// --- Each place's verdict on a set of values. ---

type Assignments<'a> = [(&'a Place, String)];

/// One place's verdict on a set of values; `None` where it lacks one of the settings.
type Verdict = fn(&Assignments) -> Option<bool>;

fn operator_accepts(set: &Assignments) -> Option<bool> {
    let mut spec = json!({
        "kafka": {"bootstrapServers": "kafka:9092", "topics": ["orders"], "groupId": "orders-sync"},
        "budget": {"messagesPerSecond": 5, "maxInFlight": 5},
        "delivery": {"retry": {}},
        "sink": {"http": {"url": "http://127.0.0.1:8080/handle"}},
    });
    for (place, value) in set {
        place.crd?(&mut spec, value);
    }
    // An unknown enum value or a wrong type is refused when the spec is read.
    Some(
        serde_json::from_value::<ThrottledConsumerSpec>(spec)
            .is_ok_and(|spec| pacer_operator::validate::validate(&spec).is_ok()),
    )
}

fn file_accepts(set: &Assignments) -> Option<bool> {
    let mut budget = json!({
        "namespace": "default", "name": "orders", "messagesPerSecond": 5, "maxInFlight": 5,
        "token": "0123456789abcdef",
    });
    for (place, value) in set {
        place.file?(&mut budget, value);
    }
    let yaml = serde_yaml::to_string(&json!({ "budgets": [budget] })).unwrap();
    Some(pacer_budget::file::parse(&yaml).is_ok())
}

fn run_accepts(set: &Assignments) -> Option<bool> {
    let flags: Vec<String> = set
        .iter()
        .map(|(place, value)| place.run.map(|run| run(value)))
        .collect::<Option<_>>()?;
    let flag_of = |arg: &str| arg.split('=').next().unwrap_or_default().to_string();
    let assigned: Vec<String> = flags.iter().map(|f| flag_of(f)).collect();
    let leased = assigned.iter().any(|f| f == "--budget" || f == "--member");
    let token = token_file();
    let mut defaults = vec![
        "--bootstrap-servers=kafka:9092".to_string(),
        "--topic=orders".into(),
        "--group-id=orders-sync".into(),
        "--sink=null".into(),
    ];
    if leased {
        defaults.extend([
            "--coordinator=http://127.0.0.1:9".to_string(),
            "--budget=default/orders".into(),
            format!("--token-file={token}"),
            "--member=m-0".into(),
        ]);
    } else {
        defaults.push("--rate=5".into());
    }
    // A value under test replaces the default of its flag (`--topic` too, though it
    // repeats, so the topic under test is the only one).
    defaults.retain(|d| !assigned.contains(&flag_of(d)));
    let args = ["pacer", "run"]
        .into_iter()
        .map(String::from)
        .chain(defaults)
        .chain(flags);
    Some(match Cli::try_parse_from(args).map(|cli| cli.command) {
        Ok(Command::Run(run)) => run.validate().is_ok(),
        Ok(_) => unreachable!("`pacer run` parses as Run"),
        Err(_) => false,
    })
}

fn lease_accepts(set: &Assignments) -> Option<bool> {
    let mut accepted = true;
    for (place, value) in set {
        accepted &= place.lease?(value);
    }
    Some(accepted)
}

/// A token file for the leased `pacer run` cases (its content is not checked here).
fn token_file() -> String {
    let path = std::env::temp_dir().join(format!("pacer-rules-agree-{}", std::process::id()));
    if !path.exists() {
        std::fs::write(&path, "0123456789abcdef").unwrap();
    }
    path.display().to_string()
}

// --- The cases: boundary values of each shared rule, with the verdict the rule states. ---

struct Case {
    set: Vec<(&'static Place, String)>,
    accepted: bool,
}

fn case(set: &[(&'static Place, &str)], accepted: bool) -> Case {
    Case {
        set: set.iter().map(|(p, v)| (*p, v.to_string())).collect(),
        accepted,
    }
}

/// Both edges of a whole-number range and one step outside each, with `with` set
/// alongside (to keep a cross-field rule out of the way).
fn edges(place: &'static Place, r: IntRange, with: &[(&'static Place, &str)]) -> Vec<Case> {
    [
        (r.min - 1, false),
        (r.min, true),
        (r.max, true),
        (r.max + 1, false),
    ]
    .into_iter()
    .map(|(v, accepted)| {
        let v = v.to_string();
        let mut set: Vec<(&'static Place, &str)> = vec![(place, &v)];
        set.extend_from_slice(with);
        case(&set, accepted)
    })
    .collect()
}

/// One value per case, with its verdict.
fn values(place: &'static Place, cases: &[(&str, bool)]) -> Vec<Case> {
    cases
        .iter()
        .map(|(v, ok)| case(&[(place, v)], *ok))
        .collect()
}

fn numeric_cases() -> Vec<Case> {
    use limits::{
        burst, fallback_seconds, lease_seconds, max_attempts, max_in_flight, rate, refresh_millis,
    };
    let max = rate::MAX.to_string();
    let above_max = (rate::MAX + 0.5).to_string();
    let mut cases = values(
        &RATE,
        &[
            ("-1", false),
            ("0", false),
            ("0.001", true),
            (&max, true),
            (&above_max, false),
        ],
    );
    cases.extend(edges(&IN_FLIGHT, max_in_flight::RANGE, &[]));
    cases.extend(edges(&BURST, burst::RANGE, &[]));
    cases.extend(edges(&MAX_ATTEMPTS, max_attempts::RANGE, &[]));
    cases.extend(edges(&FALLBACK_SECONDS, fallback_seconds::RANGE, &[]));
    // The lease must outlive two refreshes: test each bound with the other at its most
    // forgiving, then the cross-field rule itself.
    let shortest_refresh = refresh_millis::MIN.to_string();
    let longest_lease = lease_seconds::MAX.to_string();
    let refresh_min: &[(&'static Place, &str)] = &[(&REFRESH_MILLIS, &shortest_refresh)];
    let lease_max: &[(&'static Place, &str)] = &[(&LEASE_SECONDS, &longest_lease)];
    cases.extend(edges(&LEASE_SECONDS, lease_seconds::RANGE, refresh_min));
    cases.extend(edges(&REFRESH_MILLIS, refresh_millis::RANGE, lease_max));
    cases.push(case(
        &[(&LEASE_SECONDS, "1"), (&REFRESH_MILLIS, "499")],
        true,
    ));
    cases.push(case(
        &[(&LEASE_SECONDS, "1"), (&REFRESH_MILLIS, "500")],
        false,
    ));
    cases
}

fn duration_cases() -> Vec<Case> {
    // The syntax, on the timeout.
    let mut cases = values(
        &TIMEOUT,
        &[
            ("1ms", true),
            ("5s", true),
            ("2m", true),
            ("1h", true),
            ("5", false),
            ("30", false),
            ("1.5s", false),
            ("5 s", false),
            (" 5s", false),
            ("-1s", false),
            ("1d", false),
            ("5S", false),
            ("1s2ms", false),
            ("1234567890s", false),
            ("", false),
        ],
    );
    // The bounds of each duration setting.
    cases.extend(values(
        &TIMEOUT,
        &[
            ("0s", false),
            ("0ms", false),
            ("24h", true),
            ("1440m", true),
            ("86400000ms", true),
            ("86400001ms", false),
            ("1441m", false),
            ("25h", false),
        ],
    ));
    cases.extend(values(
        &SHUTDOWN_GRACE,
        &[
            ("0s", true),
            ("60m", true),
            ("3600s", true),
            ("3601s", false),
            ("61m", false),
            ("2h", false),
        ],
    ));
    for (initial, ok) in [("0ms", true), ("24h", true), ("86401s", false)] {
        cases.push(case(&[(&INITIAL_DELAY, initial), (&MAX_DELAY, "24h")], ok));
    }
    for (max, ok) in [("0ms", true), ("24h", true), ("1441m", false)] {
        cases.push(case(&[(&INITIAL_DELAY, "0ms"), (&MAX_DELAY, max)], ok));
    }
    // The first retry delay may equal the largest but not exceed it.
    for (initial, ok) in [
        ("1000ms", true),
        ("1s", true),
        ("1001ms", false),
        ("2s", false),
    ] {
        cases.push(case(&[(&INITIAL_DELAY, initial), (&MAX_DELAY, "1s")], ok));
    }
    cases
}

fn name_cases() -> Vec<Case> {
    let topic_max = "t".repeat(pacer_rules::kafka::TOPIC_MAX_LEN);
    let topic_over = "t".repeat(pacer_rules::kafka::TOPIC_MAX_LEN + 1);
    // Not here: values with a comma or surrounding spaces. `--topic` splits at commas and
    // trims each piece (the env var is a list); the operator refuses both in a name, so it
    // never hands the runtime one.
    let topics: &[(&str, bool)] = &[
        ("a", true),
        ("Orders_v1.2-x", true),
        ("...", true),
        (&topic_max, true),
        (&topic_over, false),
        ("", false),
        (".", false),
        ("..", false),
        ("orders v2", false),
        ("orders/dlq", false),
        ("ü", false),
    ];
    let mut cases = Vec::new();
    for place in [&TOPIC, &DEAD_LETTER_TOPIC, &SINK_TOPIC] {
        cases.extend(values(place, topics));
    }
    let group_max = "é".repeat(pacer_rules::kafka::GROUP_ID_MAX_LEN);
    let group_over = "g".repeat(pacer_rules::kafka::GROUP_ID_MAX_LEN + 1);
    cases.extend(values(
        &GROUP_ID,
        &[
            ("g", true),
            (&group_max, true),
            (&group_over, false),
            ("", false),
            (" ", false),
        ],
    ));
    cases.extend(values(
        &BOOTSTRAP,
        &[("kafka:9092", true), ("", false), (" ", false)],
    ));
    // Not here: a key with '=' or ','. `--kafka-config` splits at them, so the runtime
    // reads another key; the operator refuses both, so it never hands one over.
    let keys: &[(&str, bool)] = &[
        ("sasl.password", true),
        ("ssl_key", true),
        ("a-b", true),
        ("Upper.Case", true),
        ("a b", false),
        ("", false),
        ("é", false),
        ("enable.auto.offset.store", false),
        ("group.id", false),
    ];
    cases.extend(values(&CONFIG_KEY, keys));
    cases.extend(values(&SECRET_CONFIG_KEY, keys));
    let budget_max = "a".repeat(pacer_rules::names::NAME_MAX_LEN);
    let budget_over = "a".repeat(pacer_rules::names::NAME_MAX_LEN + 1);
    let budget_names: &[(&str, bool)] = &[
        ("orders", true),
        ("orders-sync.v2", true),
        (&budget_max, true),
        (&budget_over, false),
        ("", false),
        ("Orders", false),
        ("a_b", false),
    ];
    cases.extend(values(&BUDGET_NAME, budget_names));
    cases.extend(values(&BUDGET_NAMESPACE, budget_names));
    let member_max = "m".repeat(pacer_rules::names::NAME_MAX_LEN);
    let member_over = "m".repeat(pacer_rules::names::NAME_MAX_LEN + 1);
    cases.extend(values(
        &MEMBER,
        &[
            ("m-0", true),
            ("Replica_0.a", true),
            (&member_max, true),
            (&member_over, false),
            ("", false),
            ("a b", false),
            ("a/b", false),
        ],
    ));
    cases.extend(values(
        &SINK_URL,
        &[
            ("http://h", true),
            ("http://127.0.0.1:8080/handle", true),
            ("http://h:65535/x", true),
            ("http://h/a,b?x=1,2", true),
            ("http://[::1]:9/", true),
            ("http://h:65536/", false),
            ("http://h:port/", false),
            ("http://", false),
            ("http:///x", false),
            ("https://h/", false),
            ("ftp://h/", false),
            ("http://h x/", false),
        ],
    ));
    cases
}

fn spelling_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let names = |all: &[&'static str]| -> Vec<(&'static str, bool)> {
        all.iter().map(|n| (*n, true)).collect()
    };
    let mut ordering = names(pacer_rules::Ordering::NAMES);
    ordering.extend([("Key", false), ("global", false), ("", false)]);
    cases.extend(values(&ORDERING, &ordering));
    let mut policy = names(pacer_rules::Policy::NAMES);
    policy.extend([("Equal", false), ("fair", false), ("", false)]);
    cases.extend(values(&POLICY, &policy));
    let mut protocol = names(pacer_rules::GroupProtocol::NAMES);
    protocol.extend([("Classic", false), ("eager", false), ("", false)]);
    cases.extend(values(&GROUP_PROTOCOL, &protocol));
    cases
}

#[test]
fn operator_budget_file_and_runtime_accept_and_refuse_the_same_values() {
    let mut cases = vec![case(&[], true)];
    cases.extend(numeric_cases());
    cases.extend(duration_cases());
    cases.extend(name_cases());
    cases.extend(spelling_cases());

    let places: [(&str, Verdict); 4] = [
        ("operator", operator_accepts),
        ("budgets file", file_accepts),
        ("pacer run", run_accepts),
        ("lease protocol", lease_accepts),
    ];
    let mut disagreements = Vec::new();
    for c in &cases {
        let verdicts: Vec<(&str, bool)> = places
            .iter()
            .filter_map(|(name, accepts)| accepts(&c.set).map(|ok| (*name, ok)))
            .collect();
        assert!(
            c.set.is_empty() || verdicts.len() >= 2,
            "a shared rule is checked in at least two places: {}",
            describe(&c.set)
        );
        if verdicts.iter().any(|(_, ok)| *ok != c.accepted) {
            disagreements.push(format!(
                "{}: should be {}, but {}",
                describe(&c.set),
                verdict(c.accepted),
                verdicts
                    .iter()
                    .map(|(name, ok)| format!("{name} {}", verdict(*ok)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let _ = std::fs::remove_file(token_file());
    assert!(
        disagreements.is_empty(),
        "{} of {} cases disagree:\n  {}",
        disagreements.len(),
        cases.len(),
        disagreements.join("\n  ")
    );
}

fn describe(set: &Assignments) -> String {
    if set.is_empty() {
        return "the base spec, file and flags".into();
    }
    let shown = |v: &str| match v.len() {
        0..=40 => format!("{v:?}"),
        n => format!("{:?}... ({n} bytes)", &v[..12]),
    };
    set.iter()
        .map(|(place, value)| format!("{} = {}", place.name, shown(value)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(accepted: bool) -> &'static str {
    if accepted {
        "accepted"
    } else {
        "refused"
    }
}
