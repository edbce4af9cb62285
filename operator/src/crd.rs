//! The `ThrottledConsumer` custom resource: the Rust types are the single source of the
//! CRD. `pacer-operator crd` prints [`crd_yaml`]; `crds/` and the chart's copy are
//! generated from it and a test fails when they drift.
//!
//! `///` comments on the spec and status types are user-facing: they become the field
//! descriptions in the CRD and in `kubectl explain`. Implementation notes go in `//`.
//!
//! Every cross-field rule has a CEL twin in [`crate::validate`], so the API server refuses
//! what it can and the operator refuses the rest with the same words. Bounds, patterns and
//! the numbers in CEL rules come from `pacer_rules`, which the budgets file and `pacer run`
//! use too.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Rule;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::gen::SchemaGenerator;
use schemars::schema::{InstanceType, Schema, SchemaObject};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// API group of every Pacer resource.
pub const GROUP: &str = "pacer.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Name of the CRD object (`<plural>.<group>`), also the name of the committed YAML file.
pub const CRD_NAME: &str = "throttledconsumers.pacer.dev";

/// A fleet of Kafka consumer replicas that share one global rate and in-flight budget.
/// The operator runs the replicas as a Deployment and leases each replica its share of
/// the budget, rebalancing on every scale event.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pacer.dev",
    version = "v1alpha1",
    kind = "ThrottledConsumer",
    plural = "throttledconsumers",
    shortname = "tc",
    category = "pacer",
    namespaced,
    doc = "A fleet of Kafka consumer replicas sharing one global rate and in-flight budget.",
    status = "ThrottledConsumerStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Replicas","type":"integer","description":"Desired replicas","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Budget","type":"number","description":"Global budget in messages per second","jsonPath":".spec.budget.messagesPerSecond"}"#,
    printcolumn = r#"{"name":"Granted","type":"number","description":"Sum of the rates currently leased to replicas","jsonPath":".status.grantedRate"}"#,
    printcolumn = r#"{"name":"Observed","type":"number","description":"Sum of the rates the replicas report processing","jsonPath":".status.observedRate"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"Whether the fleet is ready","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ThrottledConsumerSpec {
    /// Number of replicas (pods). The global budget is split across them, so scaling out
    /// never multiplies the load on what the handlers call. Driven by `kubectl scale`,
    /// an HPA or a KEDA ScaledObject through the scale subresource.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = "crate::validate::MAX_REPLICAS"))]
    pub replicas: i32,

    /// The Kafka topics and consumer group to read.
    pub kafka: KafkaSpec,

    /// The global budget shared by all replicas.
    pub budget: BudgetSpec,

    /// How messages are delivered to the sink: ordering, timeout, retries, dead letters.
    #[serde(default)]
    pub delivery: DeliverySpec,

    /// Where each message goes. Exactly one of `http` or `kafka`.
    pub sink: SinkSpec,

    /// Container image of the replicas. Defaults to the image the operator was installed
    /// with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = "IMAGE_MAX_LEN"))]
    pub image: Option<String>,

    /// Pod template merged into the replicas' pods: a handler sidecar, resources, node
    /// selectors, tolerations, labels, annotations. A container named `pacer` in it is
    /// merged into the replica container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub template: Option<PodTemplateSpec>,

    /// Create a PodDisruptionBudget for the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<PodDisruptionBudgetSpec>,

    /// Stop consuming: the replicas are scaled to zero and release their leases. The
    /// budget and the consumer group's committed offsets are kept.
    #[serde(default)]
    pub paused: bool,
}

fn default_replicas() -> i32 {
    1
}

// Bounds only the operator and its CRD know (the replicas never see these fields), each
// defined once: the schema above states them and `validate` checks them, so a spec the
// API server stores is never one the operator then refuses, or the other way round (a
// test on a real API server compares the two verdicts on every bound).

/// Longest `spec.image`.
pub const IMAGE_MAX_LEN: usize = 512;
/// Longest `spec.kafka.bootstrapServers`.
pub const BOOTSTRAP_SERVERS_MAX_LEN: usize = 2048;
/// Most `spec.kafka.topics`.
pub const TOPICS_MAX: usize = 64;
/// Most `spec.kafka.secretConfig` entries.
pub const SECRET_CONFIG_MAX: usize = 16;

/// The Kafka side of the fleet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Comma-separated `host:port` list of bootstrap brokers.
    #[schemars(length(min = 1, max = "BOOTSTRAP_SERVERS_MAX_LEN"))]
    pub bootstrap_servers: String,

    /// Topics to consume.
    #[schemars(
        length(min = 1, max = "TOPICS_MAX"),
        inner(length(min = 1, max = "pacer_rules::kafka::TOPIC_MAX_LEN"))
    )]
    pub topics: Vec<String>,

    /// Consumer group id shared by all replicas.
    #[schemars(length(min = 1, max = "pacer_rules::kafka::GROUP_ID_MAX_LEN"))]
    pub group_id: String,

    /// librdkafka properties, e.g. `security.protocol: SASL_SSL`. Keys may not contain
    /// `,` or `=`; values may not contain `,`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "kafka_config_schema")]
    #[x_kube(validation = (
        "self.all(k, !k.contains(',') && !k.contains('=') && !self[k].contains(','))",
        "kafka.config keys may not contain ',' or '=' and values may not contain ','"
    ))]
    pub config: BTreeMap<String, String>,

    /// librdkafka properties whose values come from Secrets in the same namespace, e.g.
    /// `sasl.password`. The values may not contain `,` (they travel in a comma-separated
    /// list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = "SECRET_CONFIG_MAX"))]
    pub secret_config: Vec<SecretConfig>,

    /// Consumer-group protocol: `classic` (any Kafka; cooperative-sticky assignor) or
    /// `consumer` (KIP-848, Kafka 4.0 and later: the broker assigns partitions and sets
    /// the session and heartbeat times, so `session.timeout.ms`,
    /// `heartbeat.interval.ms` and `partition.assignment.strategy` are refused in
    /// `config`).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
}

/// The consumer-group protocol (see `pacer_rules::GroupProtocol`, whose spellings a test
/// checks against these).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// JoinGroup/SyncGroup with incremental (cooperative-sticky) rebalances.
    #[default]
    Classic,
    /// KIP-848: broker-side assignment.
    Consumer,
}

impl From<GroupProtocol> for pacer_rules::GroupProtocol {
    fn from(p: GroupProtocol) -> Self {
        match p {
            GroupProtocol::Classic => pacer_rules::GroupProtocol::Classic,
            GroupProtocol::Consumer => pacer_rules::GroupProtocol::Consumer,
        }
    }
}

/// A librdkafka property read from a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretConfig {
    /// The librdkafka property name, e.g. `sasl.password`.
    #[schemars(
        length(min = 1, max = "pacer_rules::names::NAME_MAX_LEN"),
        regex(path = "pacer_rules::kafka::PROPERTY_NAME_PATTERN")
    )]
    pub key: String,
    /// The Secret and key holding the value.
    pub secret_key_ref: SecretKeyRef,
}

/// A key in a Secret of the same namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = "pacer_rules::names::NAME_MAX_LEN"))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = "pacer_rules::names::NAME_MAX_LEN"))]
    pub key: String,
}

/// The global budget. At every instant the rates and in-flight counts the replicas may be
/// using sum to at most these numbers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rate_above_rule())]
#[x_kube(validation = in_flight_min_rule())]
#[x_kube(validation = lease_outlives_refreshes_rule())]
pub struct BudgetSpec {
    /// Global rate in messages per second, summed over all replicas. Greater than 0.
    #[schemars(range(
        min = "pacer_rules::limits::rate::ABOVE",
        max = "pacer_rules::limits::rate::MAX"
    ))]
    pub messages_per_second: f64,

    /// Global number of messages in flight (handler calls in progress), summed over all
    /// replicas. At least 1.
    #[schemars(range(
        min = "pacer_rules::limits::max_in_flight::MIN",
        max = "pacer_rules::limits::max_in_flight::MAX"
    ))]
    pub max_in_flight: i32,

    /// Per-replica token-bucket burst, in messages.
    #[serde(default = "default_burst")]
    #[schemars(range(
        min = "pacer_rules::limits::burst::MIN",
        max = "pacer_rules::limits::burst::MAX"
    ))]
    pub burst: i32,

    /// How the budget is split: `equal` shares, or `demand` (max-min fair on what each
    /// replica can use, so an idle replica's share flows to busy ones).
    #[serde(default)]
    pub policy: BudgetPolicy,

    /// How long a lease is valid without a refresh. A replica that loses the operator
    /// keeps its share this long, then falls back to budget / replicas.
    #[serde(default = "default_lease_seconds")]
    #[schemars(range(
        min = "pacer_rules::limits::lease_seconds::MIN",
        max = "pacer_rules::limits::lease_seconds::MAX"
    ))]
    pub lease_seconds: i32,

    /// How often replicas refresh their lease and report demand. Budget edits reach the
    /// replicas within one refresh.
    #[serde(default = "default_refresh_millis")]
    #[schemars(range(
        min = "pacer_rules::limits::refresh_millis::MIN",
        max = "pacer_rules::limits::refresh_millis::MAX"
    ))]
    pub refresh_millis: i32,

    /// How long a replica whose lease expired without a refresh may keep running on its
    /// fallback share (budget / replicas, never more than its last grant), and so how
    /// long the operator waits after a replica falls silent before giving its share to
    /// the others: it cannot tell a crashed replica from one cut off from it. Default
    /// 3 x leaseSeconds (30 s). 0 reclaims a silent replica's share one lease after its
    /// last refresh, and a replica cut off from the operator stops taking messages as
    /// soon as its lease expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "pacer_rules::limits::fallback_seconds::MIN",
        max = "pacer_rules::limits::fallback_seconds::MAX"
    ))]
    pub fallback_seconds: Option<i32>,
}

// The budget's CEL rules, written from the shared bounds. The schema's `minimum` is
// inclusive, so "greater than 0" needs a rule of its own.
fn rate_above_rule() -> Rule {
    use pacer_rules::limits::rate::ABOVE;
    Rule::new(format!("self.messagesPerSecond > {ABOVE:?}"))
        .message(format!("budget.messagesPerSecond must be greater than {ABOVE}").as_str())
}

fn in_flight_min_rule() -> Rule {
    use pacer_rules::limits::max_in_flight::MIN;
    Rule::new(format!("self.maxInFlight >= {MIN}"))
        .message(format!("budget.maxInFlight must be at least {MIN}").as_str())
}

fn lease_outlives_refreshes_rule() -> Rule {
    use pacer_rules::limits::REFRESHES_PER_LEASE as N;
    Rule::new(format!("self.leaseSeconds * 1000 > {N} * self.refreshMillis")).message(
        format!("budget.leaseSeconds * 1000 must be greater than {N} * budget.refreshMillis so a lease survives a missed refresh").as_str(),
    )
}

fn default_burst() -> i32 {
    1
}
fn default_lease_seconds() -> i32 {
    10
}
fn default_refresh_millis() -> i32 {
    1000
}

impl From<BudgetPolicy> for pacer_rules::Policy {
    fn from(p: BudgetPolicy) -> Self {
        match p {
            BudgetPolicy::Equal => pacer_rules::Policy::Equal,
            BudgetPolicy::Demand => pacer_rules::Policy::Demand,
        }
    }
}

/// How the budget is split between replicas.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPolicy {
    /// Every replica gets budget / replicas.
    Equal,
    /// Max-min fair on reported demand; unused capacity is spread evenly.
    #[default]
    Demand,
}

/// How messages are delivered to the sink.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// `key`: messages with the same key are handled one at a time, in order;
    /// `partition`: one at a time per partition; `none`: no ordering.
    #[serde(default)]
    pub ordering: Ordering,

    /// Timeout of one sink call, e.g. `5s` or `500ms`.
    #[serde(default = "default_timeout")]
    #[schemars(regex(path = "pacer_rules::duration::PATTERN"), length(max = 11))]
    pub timeout: String,

    /// Retries of failed sink calls.
    #[serde(default)]
    pub retry: RetrySpec,

    /// Topic that receives messages the sink refused permanently (or that exhausted
    /// their attempts). Absent: retry forever, never skip a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = "pacer_rules::kafka::TOPIC_MAX_LEN"))]
    pub dead_letter_topic: Option<String>,

    /// Time a replica has on shutdown to finish in-flight work, commit and release its
    /// lease, e.g. `30s`. The pods' termination grace period is this plus 5 seconds.
    #[serde(default = "default_shutdown_grace")]
    #[schemars(regex(path = "pacer_rules::duration::PATTERN"), length(max = 11))]
    pub shutdown_grace: String,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            ordering: Ordering::default(),
            timeout: default_timeout(),
            retry: RetrySpec::default(),
            dead_letter_topic: None,
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

fn default_timeout() -> String {
    "5s".into()
}
fn default_shutdown_grace() -> String {
    "30s".into()
}

/// Message ordering guarantee.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// No ordering: any message may be handled at any time.
    None,
    /// Messages with the same key are handled one at a time, in offset order.
    #[default]
    Key,
    /// Messages of the same partition are handled one at a time, in offset order.
    Partition,
}

impl From<Ordering> for pacer_rules::Ordering {
    fn from(o: Ordering) -> Self {
        match o {
            Ordering::None => pacer_rules::Ordering::None,
            Ordering::Key => pacer_rules::Ordering::Key,
            Ordering::Partition => pacer_rules::Ordering::Partition,
        }
    }
}

/// Retries of failed sink calls, with exponential backoff.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// Guarded by the pattern (pacer_rules::duration::PATTERN, checked in validate.rs'
// tests): without it a malformed duration failed this rule too, with CEL's "type
// conversion error from 'string' to 'google.protobuf.Duration'" beside the pattern's
// message.
#[x_kube(validation = (
    "!self.initialDelay.matches('^[0-9]{1,9}(ms|s|m|h)$') || !self.maxDelay.matches('^[0-9]{1,9}(ms|s|m|h)$') || duration(self.initialDelay) <= duration(self.maxDelay)",
    "delivery.retry.initialDelay must not be longer than delivery.retry.maxDelay"
))]
pub struct RetrySpec {
    /// Attempts per message before it goes to the dead-letter topic. Without a
    /// dead-letter topic, messages are retried forever.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(
        min = "pacer_rules::limits::max_attempts::MIN",
        max = "pacer_rules::limits::max_attempts::MAX"
    ))]
    pub max_attempts: i32,
    /// Delay before the first retry, e.g. `100ms`; doubled per attempt.
    #[serde(default = "default_initial_delay")]
    #[schemars(regex(path = "pacer_rules::duration::PATTERN"), length(max = 11))]
    pub initial_delay: String,
    /// Longest delay between retries, e.g. `10s`.
    #[serde(default = "default_max_delay")]
    #[schemars(regex(path = "pacer_rules::duration::PATTERN"), length(max = 11))]
    pub max_delay: String,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_delay: default_initial_delay(),
            max_delay: default_max_delay(),
        }
    }
}

fn default_initial_delay() -> String {
    "100ms".into()
}
fn default_max_delay() -> String {
    "10s".into()
}

fn default_max_attempts() -> i32 {
    5
}

/// Where each message goes. Exactly one of `http` or `kafka`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = (
    "has(self.http) != has(self.kafka)",
    "exactly one of sink.http or sink.kafka must be set"
))]
pub struct SinkSpec {
    /// POST each message to this plain-HTTP URL (the handler, typically a sidecar in
    /// `template`; terminate TLS in the sidecar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
    /// Produce each message to this Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
}

/// An HTTP handler.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSink {
    /// `http://` URL, e.g. `http://127.0.0.1:8080/handle`.
    #[schemars(
        length(min = 8, max = 2048),
        regex(path = "pacer_rules::names::HTTP_URL_PATTERN")
    )]
    pub url: String,
}

/// A Kafka topic as sink.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSink {
    /// Topic to produce to.
    #[schemars(length(min = 1, max = "pacer_rules::kafka::TOPIC_MAX_LEN"))]
    pub topic: String,
}

/// The replicas' PodDisruptionBudget.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Replicas that may be unavailable at once during voluntary disruptions.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 0, max = "crate::validate::MAX_REPLICAS"))]
    pub max_unavailable: i32,
}

fn default_max_unavailable() -> i32 {
    1
}

/// Observed state of the fleet, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ThrottledConsumerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas that exist (from the Deployment).
    #[serde(default)]
    pub replicas: i32,
    /// Replicas that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the replicas' pods, for the scale subresource.
    #[serde(default)]
    pub selector: String,
    /// `Ready`, `Balanced` (leases converged to the policy), `Degraded` (replicas whose
    /// lease expired) and `InvalidSpec` (with a message naming the field).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The current share of each replica.
    #[serde(default)]
    pub allocations: Vec<Allocation>,
    /// Sum of the rates currently allocated to replicas, in messages per second.
    #[serde(default)]
    pub granted_rate: f64,
    /// Sum of the in-flight slots currently allocated to replicas.
    #[serde(default)]
    pub granted_in_flight: i32,
    /// Sum of the rates the replicas report processing, in messages per second.
    #[serde(default)]
    pub observed_rate: f64,
}

/// One replica's share of the budget.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// The replica (pod name).
    pub member: String,
    /// Rate allocated to it, in messages per second.
    pub rate: f64,
    /// In-flight slots allocated to it.
    pub in_flight: i32,
    /// What it reported it could use.
    pub demand: ShareStatus,
    /// When its current lease expires unless refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// `Live`, or `Expired` when it stopped refreshing.
    pub state: String,
}

/// A rate and an in-flight count.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShareStatus {
    /// Messages per second.
    pub rate: f64,
    /// Messages in flight.
    pub in_flight: i32,
}

/// `template` is a whole pod template; embedding its schema would make the CRD huge and
/// pin it to one Kubernetes version, so the API server keeps it as given and the operator
/// parses it.
fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    serde_json::from_value(json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "nullable": true,
    }))
    .expect("static schema is valid")
}

fn kafka_config_schema(_: &mut SchemaGenerator) -> Schema {
    let mut schema = SchemaObject {
        instance_type: Some(InstanceType::Object.into()),
        ..Default::default()
    };
    let object = schema.object();
    // 64 properties x 1 KiB keeps the CEL rule's estimated cost within the API server's
    // budget; librdkafka has no use for more.
    object.max_properties = Some(64);
    object.additional_properties = Some(Box::new(
        serde_json::from_value(json!({"type": "string", "maxLength": 1024}))
            .expect("static schema is valid"),
    ));
    schema.into()
}

/// The CRD as YAML, exactly as committed under `crds/` and `charts/pacer/crds/`.
pub fn crd_yaml() -> String {
    let crd = ThrottledConsumer::crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "# Generated by `pacer-operator crd` from operator/src/crd.rs. Do not edit.\n---\n{body}"
    )
}
