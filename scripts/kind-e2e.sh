#!/usr/bin/env bash
# End-to-end test of the operator on a real cluster (kind). Not run in CI here (no
# container runtime on the build machines); run it on a workstation with docker, kind,
# kubectl and helm:
#
#   scripts/kind-e2e.sh            # create cluster, build, install, test, delete cluster
#   KEEP=1 scripts/kind-e2e.sh     # keep the cluster afterwards for poking around
#
# What it checks, in order:
#   1. the chart installs, the operator becomes Ready (its /readyz waits for the watch);
#   2. the API server refuses bad specs through the CRD schema and CEL rules;
#   3. a ThrottledConsumer gets a token Secret, a Deployment of 3 and condition Ready,
#      with 3 allocations whose sum never exceeds the budget;
#   4. `kubectl scale tc/orders --replicas=5` reaches the Deployment and the
#      coordinator (5 allocations), the granted rate stays within the budget while it
#      happens, and the fleet reports Balanced again;
#   5. a live budget edit (`kubectl patch`) reaches the grants;
#   6. the token Secret is not rotated by the reconciles;
#   7. deleting the ThrottledConsumer garbage-collects its children.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${CLUSTER:-pacer-e2e}"
TAG="${TAG:-e2e}"
NS=e2e
OP_NS=pacer-system
BUDGET=10
KEEP="${KEEP:-0}"
# Every wait below is bounded by this many seconds.
WAIT="${WAIT:-240}"

log() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || fail "$1 is required on PATH"; }
for tool in docker kind kubectl helm; do need "$tool"; done

# Polls `$2...` (a command) every 2 s until it succeeds, at most WAIT seconds.
wait_until() {
  local what="$1"; shift
  local deadline=$((SECONDS + WAIT))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      fail "timed out after ${WAIT}s waiting until $what"
    fi
    sleep 2
  done
  echo "    ok: $what"
}

tc_json() { kubectl -n "$NS" get tc orders -o jsonpath="$1"; }

# Fails when the granted rate exceeds the budget (float compare without bc).
granted_within() {
  local limit="$1" granted
  granted="$(tc_json '{.status.grantedRate}')"
  awk -v g="${granted:-0}" -v l="$limit" 'BEGIN { exit !(g <= l + 1e-6) }' \
    || fail "grantedRate $granted exceeds the budget $limit"
}

cleanup() {
  if [[ "$KEEP" == 1 ]]; then
    echo "cluster $CLUSTER kept (KEEP=1); delete with: kind delete cluster --name $CLUSTER"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# --- cluster and images ------------------------------------------------------------
log "cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "building images (release builds inside docker; the first run takes a while)"
# The repository's Dockerfile (its .dockerignore keeps target/ and .tools/ out of the
# build context).
DOCKER_BUILDKIT=1 docker build --target operator -t "pacer-operator:$TAG" "$ROOT"
DOCKER_BUILDKIT=1 docker build --target pacer -t "pacer:$TAG" "$ROOT"
kind load docker-image --name "$CLUSTER" "pacer-operator:$TAG" "pacer:$TAG"

# --- Kafka (single-node KRaft) ---------------------------------------------------------
log "Kafka"
kubectl create namespace kafka --dry-run=client -o yaml | kubectl apply -f -
kubectl -n kafka apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: kafka}
spec:
  replicas: 1
  selector: {matchLabels: {app: kafka}}
  template:
    metadata: {labels: {app: kafka}}
    spec:
      containers:
        - name: kafka
          image: apache/kafka:3.9.0
          ports: [{containerPort: 9092}]
          env:
            - {name: KAFKA_NODE_ID, value: "1"}
            - {name: KAFKA_PROCESS_ROLES, value: "broker,controller"}
            - {name: KAFKA_LISTENERS, value: "PLAINTEXT://:9092,CONTROLLER://:9093"}
            - {name: KAFKA_ADVERTISED_LISTENERS, value: "PLAINTEXT://kafka.kafka.svc:9092"}
            - {name: KAFKA_CONTROLLER_LISTENER_NAMES, value: "CONTROLLER"}
            - {name: KAFKA_LISTENER_SECURITY_PROTOCOL_MAP, value: "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"}
            - {name: KAFKA_CONTROLLER_QUORUM_VOTERS, value: "1@localhost:9093"}
            - {name: KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR, value: "1"}
            - {name: KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR, value: "1"}
            - {name: KAFKA_TRANSACTION_STATE_LOG_MIN_ISR, value: "1"}
            - {name: KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS, value: "0"}
          readinessProbe:
            tcpSocket: {port: 9092}
            periodSeconds: 5
---
apiVersion: v1
kind: Service
metadata: {name: kafka}
spec:
  selector: {app: kafka}
  ports: [{name: kafka, port: 9092}]
YAML
kubectl -n kafka rollout status deploy/kafka --timeout="${WAIT}s"
kafka_exec() { kubectl -n kafka exec deploy/kafka -- "$@"; }
wait_until "the broker answers" kafka_exec /opt/kafka/bin/kafka-topics.sh --bootstrap-server localhost:9092 --list
kafka_exec /opt/kafka/bin/kafka-topics.sh --bootstrap-server localhost:9092 \
  --create --if-not-exists --topic orders --partitions 8 --replication-factor 1
# A backlog far larger than the budget can drain during the test, so the fleet is busy
# (demand > share) the whole time.
kafka_exec bash -c 'seq 1 20000 | /opt/kafka/bin/kafka-console-producer.sh --bootstrap-server localhost:9092 --topic orders'

# --- the operator ---------------------------------------------------------------------
log "helm install"
helm upgrade --install pacer "$ROOT/charts/pacer" --namespace "$OP_NS" --create-namespace \
  --set image.repository=pacer-operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set replicaImage.repository=pacer --set replicaImage.tag="$TAG" \
  --set logFormat=text --wait --timeout "${WAIT}s"
kubectl get crd throttledconsumers.pacer.dev >/dev/null
kubectl -n "$OP_NS" rollout status deploy/pacer --timeout="${WAIT}s"

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -

# --- 2. the API server refuses bad specs ----------------------------------------------------
log "bad specs are refused at apply"
bad_spec() {
  cat <<YAML
apiVersion: pacer.dev/v1alpha1
kind: ThrottledConsumer
metadata: {name: bad, namespace: $NS}
spec:
  kafka: {bootstrapServers: "kafka.kafka.svc:9092", topics: [orders], groupId: bad}
  budget: {messagesPerSecond: 10, maxInFlight: 2, $1}
  sink: $2
YAML
}
expect_refused() {
  local what="$1" out
  if out="$(bad_spec "$2" "$3" | kubectl apply -f - 2>&1)"; then
    kubectl -n "$NS" delete tc bad --ignore-not-found >/dev/null
    fail "API server accepted $what"
  fi
  echo "    refused ($what): ${out##*: }"
}
expect_refused "two sinks" "burst: 1" '{http: {url: "http://127.0.0.1:8080/"}, kafka: {topic: out}}'
expect_refused "lease shorter than two refreshes" "leaseSeconds: 1, refreshMillis: 1000" '{kafka: {topic: out}}'
expect_refused "unknown policy" "policy: fair" '{kafka: {topic: out}}'

# --- 3. a fleet of 3 --------------------------------------------------------------------
log "ThrottledConsumer orders with 3 replicas and a budget of $BUDGET msg/s"
kubectl apply -f - <<YAML
apiVersion: pacer.dev/v1alpha1
kind: ThrottledConsumer
metadata: {name: orders, namespace: $NS}
spec:
  replicas: 3
  kafka: {bootstrapServers: "kafka.kafka.svc:9092", topics: [orders], groupId: orders-e2e}
  budget: {messagesPerSecond: $BUDGET, maxInFlight: 4, policy: equal, leaseSeconds: 5, refreshMillis: 500}
  delivery: {ordering: key, timeout: 2s, shutdownGrace: 10s}
  sink: {http: {url: "http://127.0.0.1:8080/handle"}}
  podDisruptionBudget: {maxUnavailable: 1}
  template:
    spec:
      containers:
        - name: pacer
          imagePullPolicy: Never
        - name: handler
          image: hashicorp/http-echo:1.0
          args: ["-listen=:8080", "-text=ok"]
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
YAML
wait_until "tc/orders is Ready" kubectl -n "$NS" wait tc/orders --for=condition=Ready --timeout=5s
kubectl -n "$NS" get tc orders
[[ "$(kubectl -n "$NS" get deploy orders -o jsonpath='{.spec.replicas}')" == 3 ]] || fail "Deployment is not at 3 replicas"
kubectl -n "$NS" get secret orders-budget-token >/dev/null
kubectl -n "$NS" get pdb orders >/dev/null
token_before="$(kubectl -n "$NS" get secret orders-budget-token -o jsonpath='{.data.token}')"
# Number of members holding a live lease, from status.allocations.
allocations() {
  tc_json '{range .status.allocations[?(@.state=="Live")]}{.member}{"\n"}{end}' | grep -c . || true
}
three_members() { [[ "$(allocations)" == 3 ]]; }
wait_until "3 members hold a lease" three_members
granted_within "$BUDGET"

# --- 4. scale to 5 --------------------------------------------------------------------
log "kubectl scale tc/orders --replicas=5"
kubectl -n "$NS" scale tc/orders --replicas=5
[[ "$(kubectl -n "$NS" get tc orders -o jsonpath='{.spec.replicas}')" == 5 ]] || fail "scale subresource did not set spec.replicas"
# Watch the granted rate throughout the scale-up: every status write must be in budget.
deadline=$((SECONDS + WAIT))
until [[ "$(allocations)" == 5 ]]; do
  ((SECONDS < deadline)) || fail "timed out waiting for 5 allocations"
  granted_within "$BUDGET"
  sleep 1
done
echo "    ok: 5 members hold a lease, granted rate stayed within $BUDGET msg/s"
[[ "$(kubectl -n "$NS" get deploy orders -o jsonpath='{.spec.replicas}')" == 5 ]] || fail "Deployment is not at 5 replicas"
wait_until "tc/orders is Balanced" kubectl -n "$NS" wait tc/orders --for=condition=Balanced --timeout=5s
wait_until "tc/orders is Ready at 5" kubectl -n "$NS" wait tc/orders --for=condition=Ready --timeout=5s
[[ "$(tc_json '{.status.selector}')" == "app.kubernetes.io/name=pacer,pacer.dev/throttled-consumer=orders" ]] \
  || fail "status.selector is wrong"
granted_within "$BUDGET"
observed="$(tc_json '{.status.observedRate}')"
awk -v o="${observed:-0}" -v b="$BUDGET" 'BEGIN { exit !(o <= b * 1.2) }' \
  || fail "observed rate $observed is above the budget $BUDGET (+20% measurement slack)"
echo "    observed rate $observed msg/s"

# --- 5. live budget edit --------------------------------------------------------------------
log "kubectl patch the budget to 20 msg/s"
kubectl -n "$NS" patch tc orders --type=merge -p '{"spec":{"budget":{"messagesPerSecond":20}}}'
granted_is_20() { awk -v g="$(tc_json '{.status.grantedRate}')" 'BEGIN { exit !(g > 19.9 && g <= 20 + 1e-6) }'; }
wait_until "the grants add up to 20 msg/s" granted_is_20

# --- 6. the token was never rotated -----------------------------------------------------
[[ "$(kubectl -n "$NS" get secret orders-budget-token -o jsonpath='{.data.token}')" == "$token_before" ]] \
  || fail "the budget token changed"
echo "    ok: token unchanged"

# --- 7. delete ------------------------------------------------------------------------
log "delete tc/orders"
kubectl -n "$NS" delete tc orders --wait=true --timeout="${WAIT}s"
gone() { ! kubectl -n "$NS" get deploy orders && ! kubectl -n "$NS" get secret orders-budget-token; }
wait_until "the Deployment and Secret are garbage-collected" gone

kubectl -n "$OP_NS" logs deploy/pacer --tail=20 || true
log "kind e2e passed"
