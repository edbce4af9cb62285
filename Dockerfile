# syntax=docker/dockerfile:1
#
# Images of Pacer: `operator` (pacer-operator) and `pacer` (the replica runtime, `pacer
# run`), from one build stage. No container engine runs on the machines this project is
# developed and tested on, so this file has never been built there: it is kept correct by
# reading (and by scripts/kind-e2e.sh, which builds it on a machine with Docker and kind).
#
#   docker build --target operator -t ghcr.io/pacer-dev/pacer-operator:0.1.0 .
#   docker build --target pacer    -t ghcr.io/pacer-dev/pacer:0.1.0 .
#   kind load docker-image ghcr.io/pacer-dev/pacer-operator:0.1.0 ghcr.io/pacer-dev/pacer:0.1.0
#   docker push ghcr.io/pacer-dev/pacer-operator:0.1.0 && docker push ghcr.io/pacer-dev/pacer:0.1.0
#
# The tag is the chart's appVersion (charts/pacer/Chart.yaml), which the chart's image
# tags default to; VERSION below should say the same.
#
# Choices:
# - The build stage compiles librdkafka from source (rdkafka's cmake build), as the
#   tests do, so the image's Kafka client is the one the tests ran against.
# - The runtime stage is Debian slim, not distroless `cc`: both binaries link libssl 3,
#   libcrypto and zlib dynamically (librdkafka's TLS and compression; `ldd
#   target/debug/pacer`), which distroless `cc` does not ship.
# - User 65532:65532: the operator Pod's `runAsUser`/`runAsGroup`
#   (charts/pacer/templates/deployment.yaml) and distroless's `nonroot`; nothing in the
#   image is writable by it.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pacer-operator --bin pacer-operator \
 && cargo build --release --locked -p pacer-runtime --bin pacer

FROM debian:bookworm-slim AS base
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/pacer-dev/pacer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="Pacer"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/*
USER 65532:65532

FROM base AS operator
LABEL org.opencontainers.image.title="pacer-operator" \
      org.opencontainers.image.description="Pacer's Kubernetes operator and budget coordinator"
COPY --from=build /src/target/release/pacer-operator /usr/local/bin/pacer-operator
ENTRYPOINT ["/usr/local/bin/pacer-operator"]

FROM base AS pacer
LABEL org.opencontainers.image.title="pacer" \
      org.opencontainers.image.description="Pacer's replica runtime: a Kafka consumer under one global budget"
COPY --from=build /src/target/release/pacer /usr/local/bin/pacer
ENTRYPOINT ["/usr/local/bin/pacer"]
