//! Builders of a `ThrottledConsumer`'s children: pure functions from a validated spec to
//! the objects the reconciler applies. No I/O and no randomness here (the token is an
//! argument), so every byte sent to the API server is unit-tested.
//!
//! ```text
//! ThrottledConsumer ns/x
//!   ├── Secret ns/x-budget-token        bearer token for the budget, created once
//!   ├── Deployment ns/x                 `pacer run` replicas (+ the user's template)
//!   └── PodDisruptionBudget ns/x        only when spec.podDisruptionBudget is set
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{ByteString, DeepMerge};
use kube::{Resource, ResourceExt};

use crate::crd::ThrottledConsumer;
use crate::validate::ValidSpec;

/// The operator's field manager for server-side apply: the one identity under which it
/// owns fields of its children and of the status.
pub const FIELD_MANAGER: &str = "pacer-operator";

/// Label selecting one fleet's pods (value: the `ThrottledConsumer` name).
pub const LABEL_CONSUMER: &str = "pacer.dev/throttled-consumer";
/// Annotation on the Deployment with a hash of what the operator last applied, so an
/// unchanged spec costs a GET and no write.
pub const ANNOTATION_APPLIED_HASH: &str = "pacer.dev/applied-hash";
/// Key of the bearer token in the budget Secret.
pub const TOKEN_KEY: &str = "token";
/// Where the token Secret is mounted in the replica container.
pub const TOKEN_DIR: &str = "/var/run/secrets/pacer";
/// Name of the replica container; a container of this name in `spec.template` is merged
/// into it.
pub const CONTAINER: &str = "pacer";
/// Admin port of a replica (`/livez`, `/readyz`, `/metrics`).
pub const ADMIN_PORT: i32 = 9090;
/// Extra termination grace beyond the replica's own shutdown grace: room for committing
/// offsets and releasing the lease after in-flight work is done.
pub const TERMINATION_MARGIN_SECONDS: i64 = 5;
/// UID/GID the replicas run as when the user's template does not say (distroless
/// `nonroot`).
pub const RUN_AS_USER: i64 = 65532;

/// The environment `pacer run` reads; one const each and [`ALL`](env::ALL) lists them.
pub mod env {
    pub const BOOTSTRAP_SERVERS: &str = "PACER_BOOTSTRAP_SERVERS";
    pub const TOPICS: &str = "PACER_TOPICS";
    pub const GROUP_ID: &str = "PACER_GROUP_ID";
    pub const KAFKA_CONFIG: &str = "PACER_KAFKA_CONFIG";
    pub const GROUP_PROTOCOL: &str = "PACER_GROUP_PROTOCOL";
    pub const COORDINATOR: &str = "PACER_COORDINATOR";
    pub const BUDGET: &str = "PACER_BUDGET";
    pub const TOKEN_FILE: &str = "PACER_TOKEN_FILE";
    pub const MEMBER: &str = "PACER_MEMBER";
    pub const BURST: &str = "PACER_BURST";
    pub const ORDERING: &str = "PACER_ORDERING";
    pub const SINK: &str = "PACER_SINK";
    pub const TIMEOUT: &str = "PACER_TIMEOUT";
    pub const MAX_ATTEMPTS: &str = "PACER_MAX_ATTEMPTS";
    pub const RETRY_INITIAL_DELAY: &str = "PACER_RETRY_INITIAL_DELAY";
    pub const RETRY_MAX_DELAY: &str = "PACER_RETRY_MAX_DELAY";
    pub const DEAD_LETTER_TOPIC: &str = "PACER_DEAD_LETTER_TOPIC";
    pub const SHUTDOWN_GRACE: &str = "PACER_SHUTDOWN_GRACE";
    pub const ADMIN_ADDR: &str = "PACER_ADMIN_ADDR";
    pub const LOG_FORMAT: &str = "PACER_LOG_FORMAT";
    pub const TERMINATION_LOG: &str = "PACER_TERMINATION_LOG";

    /// Every variable `pacer run` reads that the operator sets.
    pub const ALL: [&str; 21] = [
        BOOTSTRAP_SERVERS,
        TOPICS,
        GROUP_ID,
        KAFKA_CONFIG,
        GROUP_PROTOCOL,
        COORDINATOR,
        BUDGET,
        TOKEN_FILE,
        MEMBER,
        BURST,
        ORDERING,
        SINK,
        TIMEOUT,
        MAX_ATTEMPTS,
        RETRY_INITIAL_DELAY,
        RETRY_MAX_DELAY,
        DEAD_LETTER_TOPIC,
        SHUTDOWN_GRACE,
        ADMIN_ADDR,
        LOG_FORMAT,
        TERMINATION_LOG,
    ];

    /// Downward-API pod name; `PACER_MEMBER` expands it.
    pub const POD_NAME: &str = "POD_NAME";
    /// Prefix of the helper variables holding `kafka.secretConfig` values; the API
    /// server expands `$(NAME)` references to them inside `PACER_KAFKA_CONFIG`.
    pub const KAFKA_SECRET_PREFIX: &str = "PACER_KAFKA_SECRET_";
}

/// What the builders need from the operator's own configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSettings {
    /// Default image of the replicas.
    pub image: String,
    /// URL at which replicas reach the operator's embedded coordinator.
    pub coordinator_url: String,
}

/// Names of one fleet's children.
pub fn deployment_name(tc: &ThrottledConsumer) -> String {
    tc.name_any()
}
pub fn secret_name(tc: &ThrottledConsumer) -> String {
    format!("{}-budget-token", tc.name_any())
}
pub fn pdb_name(tc: &ThrottledConsumer) -> String {
    tc.name_any()
}

/// Labels that select one fleet's pods.
pub fn selector_labels(tc: &ThrottledConsumer) -> BTreeMap<String, String> {
    selector_labels_for(&tc.name_any())
}

fn selector_labels_for(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "pacer".to_string()),
        (LABEL_CONSUMER.to_string(), name.to_string()),
    ])
}

/// The selector as a string, for `status.selector` (scale subresource).
pub fn selector_string(tc: &ThrottledConsumer) -> String {
    selector_string_for(&tc.name_any())
}

/// [`selector_string`] from the object's name alone.
pub fn selector_string_for(name: &str) -> String {
    selector_labels_for(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels on every child: the selector plus the `app.kubernetes.io` set.
pub fn labels(tc: &ThrottledConsumer) -> BTreeMap<String, String> {
    let mut l = selector_labels(tc);
    l.insert("app.kubernetes.io/instance".into(), tc.name_any());
    l.insert("app.kubernetes.io/component".into(), "consumer".into());
    l.insert("app.kubernetes.io/part-of".into(), "pacer".into());
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l
}

fn owner_ref(tc: &ThrottledConsumer) -> OwnerReference {
    // A ThrottledConsumer from the API server always has a uid; one without is a bug in
    // the caller (tests build fixtures with a uid).
    tc.controller_owner_ref(&())
        .expect("ThrottledConsumer from the API server has a uid")
}

fn child_meta(tc: &ThrottledConsumer, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: tc.namespace(),
        labels: Some(labels(tc)),
        owner_references: Some(vec![owner_ref(tc)]),
        ..Default::default()
    }
}

/// The budget's Secret with a freshly generated token. Created once; the reconciler never
/// applies it over an existing Secret, so the token is never rotated by accident.
pub fn token_secret(tc: &ThrottledConsumer, token: &str) -> Secret {
    Secret {
        metadata: child_meta(tc, secret_name(tc)),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// The token stored in a budget Secret, if it holds a usable one.
pub fn token_from_secret(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(TOKEN_KEY)?;
    let token = String::from_utf8(bytes.0.clone()).ok()?;
    (!token.trim().is_empty()).then_some(token)
}

/// A new random 256-bit token, hex-encoded.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `namespace/name` of the budget in the coordinator.
pub fn budget_key(tc: &ThrottledConsumer) -> String {
    format!("{}/{}", tc.namespace().unwrap_or_default(), tc.name_any())
}

/// Value of `PACER_SINK`.
pub fn sink_arg(v: &ValidSpec) -> String {
    match (&v.spec.sink.http, &v.spec.sink.kafka) {
        (Some(h), _) => h.url.clone(),
        (None, Some(k)) => format!("kafka:{}", k.topic),
        // validate() refuses a spec without a sink.
        (None, None) => unreachable!("validated spec has a sink"),
    }
}

fn plain(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The replica container's environment, in order: the API server expands `$(VAR)` only
/// for variables defined earlier in the list.
pub fn env_vars(tc: &ThrottledConsumer, v: &ValidSpec, settings: &BuildSettings) -> Vec<EnvVar> {
    let spec = &v.spec;
    let mut out = vec![EnvVar {
        name: env::POD_NAME.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut kafka_config: Vec<String> = spec
        .kafka
        .config
        .iter()
        .map(|(k, val)| format!("{k}={val}"))
        .collect();
    for (i, s) in spec.kafka.secret_config.iter().enumerate() {
        let name = format!("{}{i}", env::KAFKA_SECRET_PREFIX);
        out.push(EnvVar {
            name: name.clone(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: s.secret_key_ref.name.clone(),
                    key: s.secret_key_ref.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        kafka_config.push(format!("{}=$({name})", s.key));
    }
    out.extend([
        plain(env::MEMBER, format!("$({})", env::POD_NAME)),
        plain(env::BOOTSTRAP_SERVERS, spec.kafka.bootstrap_servers.clone()),
        plain(env::TOPICS, spec.kafka.topics.join(",")),
        plain(env::GROUP_ID, spec.kafka.group_id.clone()),
        plain(
            env::GROUP_PROTOCOL,
            pacer_rules::GroupProtocol::from(spec.kafka.group_protocol).as_str(),
        ),
    ]);
    if !kafka_config.is_empty() {
        out.push(plain(env::KAFKA_CONFIG, kafka_config.join(",")));
    }
    out.extend([
        plain(env::COORDINATOR, settings.coordinator_url.clone()),
        plain(env::BUDGET, budget_key(tc)),
        plain(env::TOKEN_FILE, format!("{TOKEN_DIR}/{TOKEN_KEY}")),
        plain(env::BURST, spec.budget.burst.to_string()),
        plain(
            env::ORDERING,
            pacer_rules::Ordering::from(spec.delivery.ordering).as_str(),
        ),
        plain(env::SINK, sink_arg(v)),
        plain(env::TIMEOUT, spec.delivery.timeout.clone()),
        plain(
            env::MAX_ATTEMPTS,
            spec.delivery.retry.max_attempts.to_string(),
        ),
        plain(
            env::RETRY_INITIAL_DELAY,
            spec.delivery.retry.initial_delay.clone(),
        ),
        plain(env::RETRY_MAX_DELAY, spec.delivery.retry.max_delay.clone()),
    ]);
    if let Some(dlq) = &spec.delivery.dead_letter_topic {
        out.push(plain(env::DEAD_LETTER_TOPIC, dlq.clone()));
    }
    out.extend([
        plain(env::SHUTDOWN_GRACE, spec.delivery.shutdown_grace.clone()),
        plain(env::ADMIN_ADDR, format!("0.0.0.0:{ADMIN_PORT}")),
        // Log collectors in a cluster parse JSON.
        plain(env::LOG_FORMAT, "json"),
        // The replica names its run there; the kubelet reports it when the container
        // terminates, however it ended (see crate::reclaim).
        plain(env::TERMINATION_LOG, TERMINATION_MESSAGE_PATH),
    ]);
    out
}

/// The replica container's termination message file: Kubernetes' default path and
/// `File` policy, set explicitly so the rendered manifest says where the replica names
/// its run (a `template` that changes them must change `PACER_TERMINATION_LOG` too).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// The restricted container security context (Pod Security Standard `restricted`).
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod template before the user's `template` is merged in.
fn base_pod_template(
    tc: &ThrottledConsumer,
    v: &ValidSpec,
    settings: &BuildSettings,
) -> PodTemplateSpec {
    let image = v
        .spec
        .image
        .clone()
        .unwrap_or_else(|| settings.image.clone());
    let container = Container {
        name: CONTAINER.into(),
        image: Some(image),
        args: Some(vec!["run".into()]),
        env: Some(env_vars(tc, v, settings)),
        ports: Some(vec![ContainerPort {
            name: Some("admin".into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Liveness is generous: a replica waiting on a slow sink is alive.
        liveness_probe: Some(http_probe("/livez", 10, 6)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        security_context: Some(restricted_container_security()),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("File".into()),
        volume_mounts: Some(vec![VolumeMount {
            name: "budget-token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let grace = i64::try_from(v.shutdown_grace.as_secs()).unwrap_or(3600);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(tc)),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            // The replicas talk to Kafka, the sink and the coordinator, never to the API.
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(grace + TERMINATION_MARGIN_SECONDS),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volumes: Some(vec![Volume {
                name: "budget-token".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret_name(tc)),
                    // Owner and group read only; fsGroup makes the group the replica's.
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// The replicas' Deployment, with the user's `template` merged over the operator's pod
/// template (containers, env and volumes merge by name; the user wins on conflicts,
/// except for the selector labels, which the operator must own).
pub fn deployment(tc: &ThrottledConsumer, v: &ValidSpec, settings: &BuildSettings) -> Deployment {
    let mut template = base_pod_template(tc, v, settings);
    if let Some(user) = v.spec.template.clone() {
        template.merge_from(user);
    }
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .extend(selector_labels(tc));

    let mut d = Deployment {
        metadata: child_meta(tc, deployment_name(tc)),
        spec: Some(DeploymentSpec {
            replicas: Some(v.desired_replicas()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(tc)),
                ..Default::default()
            },
            // Never run fewer than desired during a rollout; the coordinator keeps the
            // sum of leases within budget while old and new pods overlap.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template,
            ..Default::default()
        }),
        ..Default::default()
    };
    let hash = content_hash(&d);
    d.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
    d
}

/// The replicas' PodDisruptionBudget, when the spec asks for one.
pub fn pod_disruption_budget(tc: &ThrottledConsumer, v: &ValidSpec) -> Option<PodDisruptionBudget> {
    let pdb = v.spec.pod_disruption_budget.as_ref()?;
    let mut out = PodDisruptionBudget {
        metadata: child_meta(tc, pdb_name(tc)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(pdb.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(tc)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let hash = content_hash(&out);
    out.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
    Some(out)
}

/// Whether a live object already carries what the operator would apply.
pub fn is_up_to_date(live: &ObjectMeta, desired: &ObjectMeta) -> bool {
    let hash = |m: &ObjectMeta| {
        m.annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
            .cloned()
    };
    hash(live).is_some() && hash(live) == hash(desired)
}

/// Whether the live Deployment needs no apply: same applied-hash, and nobody scaled it
/// behind the operator's back (`kubectl scale deploy/...` keeps the annotation but must
/// still be undone: the replica count follows `spec.replicas`).
pub fn deployment_is_up_to_date(live: &Deployment, desired: &Deployment) -> bool {
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    is_up_to_date(&live.metadata, &desired.metadata) && replicas(live) == replicas(desired)
}

/// FNV-1a (64-bit) of the object's JSON: stable across builds and Rust versions, unlike
/// `DefaultHasher`, so an operator restart does not re-apply every child.
fn content_hash(obj: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(obj).expect("k8s objects serialize");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{settings, tc_from_yaml, MINIMAL, ORDERS_SYNC};
    use crate::validate::validate;

    fn built(yaml: &str) -> (ThrottledConsumer, ValidSpec, Deployment) {
        let tc = tc_from_yaml(yaml);
        let v = validate(&tc.spec).unwrap();
        let d = deployment(&tc, &v, &settings());
        (tc, v, d)
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn container<'a>(d: &'a Deployment, name: &str) -> &'a Container {
        pod(d).containers.iter().find(|c| c.name == name).unwrap()
    }

    fn env_map(c: &Container) -> BTreeMap<String, String> {
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    #[test]
    fn deployment_runs_pacer_with_the_spec_as_environment() {
        let (_, _, d) = built(ORDERS_SYNC);
        let c = container(&d, CONTAINER);
        assert_eq!(c.image.as_deref(), Some("ghcr.io/pacer-dev/pacer:0.1.0"));
        assert_eq!(c.args, Some(vec!["run".to_string()]));
        let env = env_map(c);
        let expect = [
            ("PACER_MEMBER", "$(POD_NAME)"),
            ("PACER_BOOTSTRAP_SERVERS", "kafka-bootstrap.kafka:9092"),
            ("PACER_TOPICS", "orders"),
            ("PACER_GROUP_ID", "orders-sync"),
            ("PACER_GROUP_PROTOCOL", "classic"),
            (
                "PACER_KAFKA_CONFIG",
                "sasl.mechanism=PLAIN,sasl.username=orders-sync,security.protocol=SASL_SSL,sasl.password=$(PACER_KAFKA_SECRET_0)",
            ),
            ("PACER_COORDINATOR", "http://pacer-operator.pacer-system.svc:8080"),
            ("PACER_BUDGET", "shop/orders-sync"),
            ("PACER_TOKEN_FILE", "/var/run/secrets/pacer/token"),
            ("PACER_BURST", "1"),
            ("PACER_ORDERING", "key"),
            ("PACER_SINK", "http://127.0.0.1:8080/handle"),
            ("PACER_TIMEOUT", "5s"),
            ("PACER_MAX_ATTEMPTS", "5"),
            ("PACER_RETRY_INITIAL_DELAY", "200ms"),
            ("PACER_RETRY_MAX_DELAY", "30s"),
            ("PACER_LOG_FORMAT", "json"),
            ("PACER_DEAD_LETTER_TOPIC", "orders-dlq"),
            ("PACER_SHUTDOWN_GRACE", "30s"),
            ("PACER_ADMIN_ADDR", "0.0.0.0:9090"),
            ("PACER_TERMINATION_LOG", "/dev/termination-log"),
        ];
        for (k, v) in expect {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        // Every variable the runtime reads is set when the spec uses every feature.
        for name in env::ALL {
            assert!(env.contains_key(name), "{name} missing");
        }
    }

    #[test]
    fn member_name_and_secret_values_come_from_the_downward_api_and_secrets_before_use() {
        let (_, _, d) = built(ORDERS_SYNC);
        let vars = container(&d, CONTAINER).env.clone().unwrap();
        let pos = |n: &str| vars.iter().position(|e| e.name == n).unwrap();
        let pod_name = &vars[pos(env::POD_NAME)];
        assert_eq!(
            pod_name
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.name"
        );
        let secret = &vars[pos("PACER_KAFKA_SECRET_0")];
        let r = secret
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (r.name.as_str(), r.key.as_str()),
            ("kafka-orders-sync", "password")
        );
        // $(VAR) expands only for variables defined earlier.
        assert!(pos(env::POD_NAME) < pos(env::MEMBER));
        assert!(pos("PACER_KAFKA_SECRET_0") < pos(env::KAFKA_CONFIG));
    }

    #[test]
    fn optional_variables_are_left_out_when_the_spec_does_not_use_them() {
        let (_, _, d) = built(MINIMAL);
        let env = env_map(container(&d, CONTAINER));
        assert!(!env.contains_key(env::DEAD_LETTER_TOPIC));
        assert!(!env.contains_key(env::KAFKA_CONFIG));
        assert_eq!(env[env::SINK], "kafka:audit-export");
        assert_eq!(env[env::BUDGET], "default/audit-export");
    }

    #[test]
    fn token_secret_is_mounted_read_only_as_a_file() {
        let (tc, _, d) = built(MINIMAL);
        let c = container(&d, CONTAINER);
        let mount = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (TOKEN_DIR, Some(true))
        );
        let vol = pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap();
        let secret = vol.secret.as_ref().unwrap();
        assert_eq!(
            secret.secret_name.as_deref(),
            Some("audit-export-budget-token")
        );
        assert_eq!(secret.secret_name, Some(secret_name(&tc)));
        assert_eq!(secret.default_mode, Some(0o440));
    }

    #[test]
    fn pods_run_restricted_with_probes_on_the_admin_port() {
        let (_, _, d) = built(MINIMAL);
        let p = pod(&d);
        let psc = p.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(p.automount_service_account_token, Some(false));
        let c = container(&d, CONTAINER);
        assert_eq!(c.security_context, Some(restricted_container_security()));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(
            (
                sc.run_as_non_root,
                sc.read_only_root_filesystem,
                sc.allow_privilege_escalation
            ),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .clone()
                .unwrap()
        };
        assert_eq!(path(&c.liveness_probe), "/livez");
        assert_eq!(path(&c.readiness_probe), "/readyz");
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, ADMIN_PORT);
    }

    #[test]
    fn termination_grace_is_the_shutdown_grace_plus_a_margin() {
        let (_, _, d) = built(ORDERS_SYNC);
        assert_eq!(pod(&d).termination_grace_period_seconds, Some(35));
    }

    #[test]
    fn user_template_is_merged_with_sidecar_resources_node_selector_and_annotations() {
        let (_, _, d) = built(ORDERS_SYNC);
        let names: Vec<&str> = pod(&d).containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["pacer", "handler"]);
        let pacer = container(&d, CONTAINER);
        let requests = pacer.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "100m");
        // Merged, not replaced: the operator's settings are still there.
        assert!(pacer.env.is_some() && pacer.liveness_probe.is_some());
        assert_eq!(
            pod(&d).node_selector.as_ref().unwrap()["kubernetes.io/os"],
            "linux"
        );
        let meta = d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        assert_eq!(
            meta.annotations.as_ref().unwrap()["prometheus.io/scrape"],
            "true"
        );
    }

    #[test]
    fn user_template_cannot_take_over_the_selector_labels() {
        let mut tc = tc_from_yaml(MINIMAL);
        tc.spec.template = Some(
            serde_json::from_value(serde_json::json!({
                "metadata": {"labels": {LABEL_CONSUMER: "someone-else", "team": "payments"}}
            }))
            .unwrap(),
        );
        let v = validate(&tc.spec).unwrap();
        let d = deployment(&tc, &v, &settings());
        let labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels[LABEL_CONSUMER], "audit-export");
        assert_eq!(labels["team"], "payments");
    }

    #[test]
    fn deployment_follows_replicas_is_scaled_to_zero_when_paused_and_owned_by_the_consumer() {
        let (tc, v, d) = built(ORDERS_SYNC);
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ThrottledConsumer", crate::fixtures::UID, Some(true))
        );
        assert_eq!(
            d.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            FIELD_MANAGER
        );
        assert_eq!(
            d.spec.as_ref().unwrap().selector.match_labels,
            Some(selector_labels(&tc))
        );

        let mut paused = v.clone();
        paused.spec.paused = true;
        assert_eq!(
            deployment(&tc, &paused, &settings()).spec.unwrap().replicas,
            Some(0)
        );
    }

    #[test]
    fn image_in_the_spec_overrides_the_operators_default() {
        let mut tc = tc_from_yaml(MINIMAL);
        tc.spec.image = Some("registry.local/pacer:dev".into());
        let v = validate(&tc.spec).unwrap();
        let d = deployment(&tc, &v, &settings());
        assert_eq!(
            container(&d, CONTAINER).image.as_deref(),
            Some("registry.local/pacer:dev")
        );
    }

    #[test]
    fn applied_hash_changes_with_the_spec_and_only_with_it() {
        let (tc, v, d) = built(ORDERS_SYNC);
        assert!(is_up_to_date(
            &d.metadata,
            &deployment(&tc, &v, &settings()).metadata
        ));
        let mut scaled = v.clone();
        scaled.spec.replicas = 5;
        assert!(!is_up_to_date(
            &d.metadata,
            &deployment(&tc, &scaled, &settings()).metadata
        ));
        // A live object without the annotation is never up to date.
        assert!(!is_up_to_date(&ObjectMeta::default(), &d.metadata));
    }

    #[test]
    fn deployment_scaled_behind_the_operators_back_is_not_up_to_date() {
        let (_, _, d) = built(ORDERS_SYNC);
        assert!(deployment_is_up_to_date(&d, &d));
        let mut scaled = d.clone();
        scaled.spec.as_mut().unwrap().replicas = Some(7);
        assert!(!deployment_is_up_to_date(&scaled, &d));
    }

    #[test]
    fn token_is_256_random_bits_in_hex_and_round_trips_through_the_secret() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        let tc = tc_from_yaml(MINIMAL);
        let s = token_secret(&tc, &a);
        assert_eq!(
            s.metadata.name.as_deref(),
            Some("audit-export-budget-token")
        );
        assert_eq!(token_from_secret(&s), Some(a));
        assert_eq!(token_from_secret(&Secret::default()), None);
    }

    #[test]
    fn pod_disruption_budget_is_built_only_when_asked_for() {
        let (tc, v, _) = built(ORDERS_SYNC);
        let pdb = pod_disruption_budget(&tc, &v).unwrap();
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels,
            Some(selector_labels(&tc))
        );
        let (tc, v, _) = built(MINIMAL);
        assert!(pod_disruption_budget(&tc, &v).is_none());
    }
}

/// Why [`render`] could not build the children of a file.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("not a ThrottledConsumer: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("invalid spec: {0}")]
    Invalid(#[from] crate::validate::InvalidSpec),
}

/// The children the operator would apply for a ThrottledConsumer manifest, as a YAML
/// stream (`pacer-operator render`): a dry run without a cluster, also used to
/// schema-check what the builders produce. The object gets a placeholder uid and the
/// namespace `default` when it has none; the token is a placeholder.
pub fn render(yaml: &str, settings: &BuildSettings) -> Result<String, RenderError> {
    let mut tc: ThrottledConsumer = serde_yaml::from_str(yaml)?;
    tc.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    tc.metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    let v = crate::validate::validate(&tc.spec)?;
    let mut out = String::new();
    let mut push = |obj: serde_yaml::Result<String>| {
        out.push_str("---\n");
        out.push_str(&obj.expect("k8s objects serialize"));
    };
    push(serde_yaml::to_string(&token_secret(
        &tc,
        "<generated once by the operator>",
    )));
    push(serde_yaml::to_string(&deployment(&tc, &v, settings)));
    if let Some(pdb) = pod_disruption_budget(&tc, &v) {
        push(serde_yaml::to_string(&pdb));
    }
    Ok(out)
}

#[cfg(test)]
mod render_tests {
    use super::*;
    use crate::fixtures::{settings, MINIMAL, ORDERS_SYNC};
    use serde::Deserialize;

    #[test]
    fn render_prints_secret_deployment_and_pdb_of_an_example() {
        let kinds = |yaml: &str| -> Vec<String> {
            let out = render(yaml, &settings()).unwrap();
            serde_yaml::Deserializer::from_str(&out)
                .map(|d| {
                    let v = serde_yaml::Value::deserialize(d).unwrap();
                    v["kind"].as_str().unwrap().to_string()
                })
                .collect()
        };
        assert_eq!(
            kinds(ORDERS_SYNC),
            ["Secret", "Deployment", "PodDisruptionBudget"]
        );
        assert_eq!(kinds(MINIMAL), ["Secret", "Deployment"]);
    }

    #[test]
    fn render_refuses_an_invalid_spec_with_the_field_message() {
        let bad = MINIMAL.replace("maxInFlight: 10", "maxInFlight: 0");
        assert_eq!(
            render(&bad, &settings()).unwrap_err().to_string(),
            "invalid spec: spec.budget.maxInFlight: 0 is out of range, must be 1 to 100000"
        );
    }
}
