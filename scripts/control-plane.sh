#!/usr/bin/env bash
# Builds a Kubernetes control plane without a kubelet (etcd, kube-apiserver and
# kube-controller-manager) from Go modules into a git-ignored cache folder and prints the
# folder holding the three binaries. Logs go to stderr, the folder alone to stdout.
#
# Kubernetes is pinned here and only here. Its go.mod replaces every staging module
# (k8s.io/api, k8s.io/client-go, ...) with a ./staging path, so `go install` refuses it;
# a small wrapper module generated under .tools/k8s-<version>/src requires
# k8s.io/kubernetes and replaces each `k8s.io/X v0.0.0` that Kubernetes' go.mod requires
# with k8s.io/X at the matching v0.<minor>.<patch>. etcd is built from the package
# go.etcd.io/etcd/server/v3 (its main) inside the same module, at the version Kubernetes'
# go.mod pins. All three are read from that go.mod, never kept by hand.
#
# The first run downloads a few hundred MB of modules and compiles for many minutes on
# two cores; Go's default module and build caches keep both for the next build. A second
# run finds the stamp file (written last) and only prints the folder. If
# kube-controller-manager cannot be built the script still succeeds with etcd and
# kube-apiserver and warns (on every run; delete the folder to retry).
set -euo pipefail

KUBE_VERSION="v1.34.4"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.tools/k8s-$KUBE_VERSION"
BIN="$DIR/bin"
SRC="$DIR/src"
MARK="$BIN/.complete"

log() { printf 'control-plane: %s\n' "$*" >&2; }

finish() {
  if grep -q '^kube-controller-manager FAILED' "$MARK"; then
    log "WARNING: $(grep '^kube-controller-manager FAILED' "$MARK") (log: $DIR/kube-controller-manager.log)"
  fi
  echo "$BIN"
  exit 0
}

if [[ -f "$MARK" && -x "$BIN/etcd" && -x "$BIN/kube-apiserver" ]]; then
  finish
fi

if ! command -v go >/dev/null; then
  log "'go' is missing (building Kubernetes $KUBE_VERSION needs the Go toolchain)"
  exit 1
fi

mkdir -p "$DIR"
# Two runs at once (parallel tests) build once: the second waits and finds the stamp.
if command -v flock >/dev/null; then
  exec 9>"$DIR/.lock"
  flock 9
  if [[ -f "$MARK" && -x "$BIN/etcd" && -x "$BIN/kube-apiserver" ]]; then
    finish
  fi
fi

export GOWORK=off CGO_ENABLED=0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Prints "path@version: error" for every module in `go ... -json` output that failed.
json_errors() {
  awk '
    /^\t"Path": /    { p = $2; gsub(/[",]/, "", p) }
    /^\t"Version": / { v = $2; gsub(/[",]/, "", v) }
    /"Err(or)?": "/  {
      e = $0; sub(/^[^:]*: "/, "", e); sub(/",?$/, "", e); gsub(/\\n\\t|\\n/, " ", e)
      if (index(e, p "@" v ":") != 1) e = p "@" v ": " e
      print "  " e
    }
  ' "$1"
}

download_dir="$(go env GOMODCACHE)/cache/download"
kib_before="$(du -sk "$download_dir" 2>/dev/null | cut -f1 || echo 0)"

# --- versions, all read from Kubernetes' go.mod ------------------------------------
log "reading the go.mod of k8s.io/kubernetes@$KUBE_VERSION"
if ! (cd "$work" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION") >"$work/kube.json" 2>"$work/kube.err"; then
  log "ERROR: module k8s.io/kubernetes@$KUBE_VERSION cannot be downloaded:"
  { json_errors "$work/kube.json"; cat "$work/kube.err"; } >&2
  exit 1
fi
field() { sed -n "s/^\t\"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" "$work/kube.json"; }
KUBE_GOMOD="$(field GoMod)"
KUBE_INFO="$(field Info)"

STAGING_VERSION="v0.${KUBE_VERSION#v1.}" # v1.34.4 -> v0.34.4
minor="${KUBE_VERSION#v1.}"
minor="${minor%%.*}"

# `require` lines in block or single-line form: "<path> <version> [// indirect]".
requires() {
  awk '
    $1 == "require" && $2 == "(" { inblock = 1; next }
    inblock && $1 == ")"         { inblock = 0; next }
    inblock                      { print $1, $2; next }
    $1 == "require"              { print $2, $3 }
  ' "$KUBE_GOMOD"
}
mapfile -t STAGING < <(requires | awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }')
ETCD_VERSION="$(requires | awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }')"
GO_LINE="$(grep -m1 '^go ' "$KUBE_GOMOD" || true)"
GODEBUG_LINES="$(grep '^godebug [^(]' "$KUBE_GOMOD" || true)"
if [[ ${#STAGING[@]} -eq 0 || -z "$ETCD_VERSION" ]]; then
  log "ERROR: found no staging modules or no go.etcd.io/etcd/server/v3 in $KUBE_GOMOD"
  exit 1
fi
log "Kubernetes $KUBE_VERSION: ${#STAGING[@]} staging modules at $STAGING_VERSION, etcd $ETCD_VERSION"

# Every pinned module must be on the proxy; name the ones that are not.
pins=("go.etcd.io/etcd/server/v3@$ETCD_VERSION")
for m in "${STAGING[@]}"; do pins+=("$m@$STAGING_VERSION"); done
(cd "$work" && go list -m -e -json "${pins[@]}") >"$work/pins.json" 2>"$work/pins.err" || true
if [[ -s "$work/pins.err" ]] || grep -q '"Err' "$work/pins.json"; then
  log "ERROR: modules missing from the module proxy ($(go env GOPROXY)):"
  { json_errors "$work/pins.json"; cat "$work/pins.err"; } >&2
  exit 1
fi

# --- the wrapper module -------------------------------------------------------------
rm -rf "$SRC" "$BIN" "$DIR"/*.log
mkdir -p "$SRC" "$BIN"
{
  echo "// Generated by scripts/control-plane.sh; do not edit."
  echo "module pacer.local/k8s-control-plane"
  echo
  echo "${GO_LINE:-go 1.24.0}"
  if [[ -n "$GODEBUG_LINES" ]]; then printf '\n%s\n' "$GODEBUG_LINES"; fi
  echo
  echo "require ("
  printf '\tgo.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION"
  printf '\tk8s.io/kubernetes %s\n' "$KUBE_VERSION"
  echo ")"
  echo
  echo "replace ("
  for m in "${STAGING[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$STAGING_VERSION"; done
  echo ")"
} >"$SRC/go.mod"

APISERVER=k8s.io/kubernetes/cmd/kube-apiserver
KCM=k8s.io/kubernetes/cmd/kube-controller-manager
ETCD=go.etcd.io/etcd/server/v3
write_tools() {
  {
    echo "//go:build tools"
    echo
    echo "// Generated by scripts/control-plane.sh; do not edit."
    echo "// Package tools names the main packages this module builds, so that"
    echo "// \`go mod tidy\` resolves everything they import."
    echo "package tools"
    echo
    echo "import ("
    for p in "$@"; do printf '\t_ "%s"\n' "$p"; done
    echo ")"
  } >"$SRC/tools.go"
}

# Names the modules a failed go command could not fetch, then shows its output's tail.
go_failed() {
  local what="$1" out="$2" missing
  missing="$(grep -oE '[^ :]+@v[^ :]+: (reading|verifying|unknown revision|invalid version|module .* not (found|available)).*' "$out" | sort -u || true)"
  if [[ -n "$missing" ]]; then
    log "ERROR: $what: modules the proxy ($(go env GOPROXY)) did not serve:"
    printf '  %s\n' "$missing" >&2
  else
    log "ERROR: $what failed; last lines of its output:"
    tail -n 20 "$out" >&2
  fi
}

KCM_FAILED=""
log "resolving dependencies (go mod tidy)"
start=$SECONDS
write_tools "$ETCD" "$APISERVER" "$KCM"
if ! (cd "$SRC" && go mod tidy) >"$work/tidy.log" 2>&1; then
  cp "$work/tidy.log" "$DIR/kube-controller-manager.log"
  write_tools "$ETCD" "$APISERVER"
  if ! (cd "$SRC" && go mod tidy) >"$work/tidy.log" 2>&1; then
    go_failed "go mod tidy" "$work/tidy.log"
    exit 1
  fi
  KCM_FAILED="go mod tidy could not resolve $KCM: $(grep -v '^[[:space:]]*$' "$DIR/kube-controller-manager.log" | tail -n1 | sed 's/^[[:space:]]*//')"
fi
for pin in "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "k8s.io/kubernetes $KUBE_VERSION"; do
  got="$(cd "$SRC" && go list -m -f '{{.Path}} {{.Version}}' "${pin% *}")"
  if [[ "$got" != "$pin" ]]; then
    log "ERROR: the wrapper module selected $got, not $pin"
    exit 1
  fi
done
kib_after="$(du -sk "$download_dir" 2>/dev/null | cut -f1 || echo 0)"
log "resolved in $((SECONDS - start)) s; module downloads grew by $(((kib_after - kib_before) / 1024)) MB"

# --- build ----------------------------------------------------------------------------
# The same version stamps Kubernetes' hack/lib/version.sh sets, so /version tells the
# truth; buildDate is the release's time from the proxy, so relinks are reproducible.
build_date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$KUBE_INFO")"
kube_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  if [[ -n "$build_date" ]]; then kube_ldflags+=" -X $pkg.buildDate=$build_date"; fi
done

build() { # name package ldflags
  local start=$SECONDS
  log "building $1 ($2)"
  if (cd "$SRC" && go build -trimpath -buildvcs=false -ldflags "$3" -o "$BIN/$1" "$2") >"$work/$1.log" 2>&1; then
    log "built $1 in $((SECONDS - start)) s ($(du -m "$BIN/$1" | cut -f1) MB)"
  else
    cp "$work/$1.log" "$DIR/$1.log"
    return 1
  fi
}

build etcd "$ETCD" "-s -w" || { go_failed "building etcd" "$DIR/etcd.log"; exit 1; }
build kube-apiserver "$APISERVER" "$kube_ldflags" || { go_failed "building kube-apiserver" "$DIR/kube-apiserver.log"; exit 1; }
if [[ -z "$KCM_FAILED" ]]; then
  build kube-controller-manager "$KCM" "$kube_ldflags" ||
    KCM_FAILED="go build $KCM failed: $(grep -m1 -vE '^#' "$DIR/kube-controller-manager.log" || true)"
fi

{
  echo "kube-apiserver $KUBE_VERSION"
  echo "etcd $ETCD_VERSION"
  if [[ -n "$KCM_FAILED" ]]; then
    echo "kube-controller-manager FAILED: $KCM_FAILED"
  else
    echo "kube-controller-manager $KUBE_VERSION"
  fi
} >"$MARK"
finish
