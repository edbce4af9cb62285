#!/usr/bin/env bash
# The ONE command that checks everything: formatting, lints, the CRD and chart checks,
# then every test of the workspace. `.ci/run` calls exactly this. It installs what it
# needs on a fresh machine (Debian, Rust toolchain with cargo-nextest, Python 3 + pip).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Prerequisites"
# rdkafka builds librdkafka from source: a C compiler, make, perl, pkg-config, and the
# zlib and OpenSSL headers (TLS and SASL_SSL to Kafka).
missing=()
for cmd in cc make perl pkg-config python3; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ] || ! [ -e /usr/include/zlib.h ] || ! [ -e /usr/include/openssl/ssl.h ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential perl pkg-config zlib1g-dev libssl-dev python3 python3-pip >/dev/null
  else
    echo "missing: ${missing[*]} (and/or zlib or OpenSSL headers); install them and rerun" >&2
    exit 1
  fi
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

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

step "Tests (unit, property, mocked API, real processes on an embedded broker)"
# The CRD drift check is one of these tests (pacer-operator).
cargo nextest run --workspace --no-fail-fast
