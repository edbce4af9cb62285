#!/usr/bin/env bash
# Checks the contract between the operator and `pacer run`: for every example in
# crds/examples/, takes the environment of the replica container the operator builds
# (`pacer-operator render`), expands $(VAR) references the way the kubelet does, and
# starts the real `pacer run` with it against unreachable Kafka and coordinator
# addresses. A replica still running after a few seconds has accepted every variable;
# an exit means the operator sets something the runtime refuses.
#
#   scripts/check-env-contract.sh      # builds both binaries (debug) if needed
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build -q -p pacer-operator --bin pacer-operator
cargo build -q -p pacer-runtime --bin pacer
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf '%064d' 0 > "$work/token"
# scripts/check-manifests.sh installs PyYAML in .tools/venv or .tools/pylib.
PY=python3
if [[ -x "$ROOT/.tools/venv/bin/python3" ]]; then
  PY="$ROOT/.tools/venv/bin/python3"
elif [[ -d "$ROOT/.tools/pylib" ]]; then
  export PYTHONPATH="$ROOT/.tools/pylib"
fi

for example in crds/examples/*.yaml; do
  target/debug/pacer-operator render "$example" --coordinator-url http://127.0.0.1:9 > "$work/children.yaml"
  "$PY" - "$work" "$example" <<'PY'
import json, os, re, subprocess, sys
work, example = sys.argv[1], sys.argv[2]
try:
    import yaml
except ImportError:
    sys.exit("PyYAML is required: run scripts/check-manifests.sh once (it creates .tools/venv)")
docs = [d for d in yaml.safe_load_all(open(f"{work}/children.yaml")) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
pacer = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "pacer")
env = {}
for e in pacer["env"]:
    if "value" in e:
        value = e["value"]
    elif "fieldRef" in e.get("valueFrom", {}):
        value = "replica-7d9f-x2"          # what the downward API gives: a pod name
    else:
        value = "secret-value"             # a secretKeyRef
    # The kubelet expands $(VAR) from variables defined earlier in the list.
    env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
env["PACER_TOKEN_FILE"] = f"{work}/token"     # the Secret volume
env["PACER_ADMIN_ADDR"] = "127.0.0.1:0"       # no fixed port on a shared machine
if "PACER_TERMINATION_LOG" not in env:
    sys.exit(f"{example}: the operator no longer sets PACER_TERMINATION_LOG (instant reclaim)")
env["PACER_TERMINATION_LOG"] = f"{work}/termination-log"   # /dev/termination-log in a container
full = {k: v for k, v in os.environ.items() if not k.startswith("PACER_")}
full.update(env)
try:
    p = subprocess.run(["target/debug/pacer", "run"], env=full, capture_output=True, text=True, timeout=3)
except subprocess.TimeoutExpired:
    message = open(f"{work}/termination-log").read() if os.path.exists(f"{work}/termination-log") else ""
    if not re.fullmatch(r"pacer-incarnation=[0-9a-f]{16}\n", message):
        sys.exit(f"{example}: pacer run wrote {message!r} to its termination log")
    os.remove(f"{work}/termination-log")
    print(f"    {example}: pacer run accepted {len(env)} variables and named its run in the termination log")
    sys.exit(0)
sys.exit(f"{example}: pacer run exited {p.returncode}:\n{p.stderr[-2000:]}")
PY
done
