#!/usr/bin/env bash
# Schema checks of everything Kubernetes will read from this repository:
#   1. helm lint of charts/pacer (default values and every optional feature on);
#   2. helm template, each rendered manifest validated with kubernetes-validate against
#      the Kubernetes version's OpenAPI schemas;
#   3. the generated CRD validated as apiextensions.k8s.io/v1, plus structural-schema
#      checks the API server would make;
#   4. every crds/examples/*.yaml validated against the CRD's openAPIV3Schema;
#   5. the children the operator builds for each example (`pacer-operator render`)
#      validated with kubernetes-validate.
# CEL rules (x-kubernetes-validations) need an API server and are not evaluated here;
# their twins in operator/src/validate.rs are unit-tested instead.
#
# Tools go to .tools/ (gitignored): kubernetes-validate, jsonschema and PyYAML (in a
# venv, or a --target directory where python3-venv is missing), and helm/kubectl from
# scripts/kube-tools.sh. A second run reuses them and takes a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/venv"
CHART="$ROOT/charts/pacer"
CRD="$ROOT/crds/throttledconsumers.pacer.dev.yaml"
K8S_VERSION="${K8S_VERSION:-1.32}"
PY_PKGS=("kubernetes-validate==1.37.0" "jsonschema>=4,<5" "PyYAML>=6,<7")

log() { printf '==> %s\n' "$*"; }

# --- tools ---------------------------------------------------------------------
# A venv when the system Python can make one; otherwise (Debian without python3-venv)
# a --target directory on PYTHONPATH, which PEP 668 allows.
PYLIB="$TOOLS/pylib"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  PY="$VENV/bin/python"
elif [[ -d "$PYLIB/kubernetes_validate" ]]; then
  PY=python3
  export PYTHONPATH="$PYLIB"
else
  log "installing ${PY_PKGS[*]}"
  rm -rf "$VENV"
  if python3 -m venv "$VENV" 2>/dev/null && [[ -x "$VENV/bin/pip" ]]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
    PY="$VENV/bin/python"
  else
    rm -rf "$VENV"
    python3 -m pip install --quiet --disable-pip-version-check --target "$PYLIB" "${PY_PKGS[@]}"
    PY=python3
    export PYTHONPATH="$PYLIB"
  fi
fi
KV=("$PY" -m kubernetes_validate)

BIN="$("$ROOT/scripts/kube-tools.sh")"
HELM="$BIN/helm"
KUBECTL="$BIN/kubectl"
log "$("$HELM" version --short), kubectl $("$KUBECTL" version --client -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"

# --- 1. helm lint --------------------------------------------------------------
ALL_ON=(--set serviceMonitor.enabled=true --set networkPolicy.enabled=true --set watchNamespace=shop --set rbac.namespaced=true
        --set prometheusRule.enabled=true --set dashboard.enabled=true)
log "helm lint (defaults)"
"$HELM" lint --strict "$CHART"
log "helm lint (every optional feature on)"
"$HELM" lint --strict "$CHART" "${ALL_ON[@]}"

# --- 2. helm template + kubernetes-validate --------------------------------------
rendered="$TOOLS/rendered"
rm -rf "$rendered"
mkdir -p "$rendered"
"$HELM" template pacer "$CHART" --namespace pacer-system --include-crds \
  > "$rendered/default.yaml"
"$HELM" template pacer "$CHART" --namespace pacer-system "${ALL_ON[@]}" \
  > "$rendered/all-on.yaml"
# kubernetes-validate knows built-in kinds only; the ServiceMonitor, PodMonitor and
# PrometheusRule (prometheus-operator CRDs) are checked for their shape below instead.
"$PY" - "$rendered" <<'PY'
import pathlib, sys, yaml
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.yaml")):
    docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
    for i, d in enumerate(docs):
        kind = d["kind"]
        third = kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
        dest = out / ("thirdparty" if third else "builtin")
        dest.mkdir(exist_ok=True)
        (dest / f"{f.stem}-{i:02d}-{kind}.yaml").write_text(yaml.safe_dump(d))
    print(f"    {f.name}: {', '.join(sorted(d['kind'] for d in docs))}")
PY
log "kubernetes-validate (Kubernetes $K8S_VERSION, strict) on every rendered manifest"
"${KV[@]}" --quiet --strict -k "$K8S_VERSION" "$rendered"/builtin/*.yaml
"$PY" - "$rendered" <<'PY'
import pathlib, sys, yaml
import json
for f in sorted((pathlib.Path(sys.argv[1]) / "thirdparty").glob("*.yaml")):
    m = yaml.safe_load(f.read_text())
    assert m["apiVersion"] == "monitoring.coreos.com/v1", f
    if m["kind"] == "ServiceMonitor":
        ep = m["spec"]["endpoints"]
        assert ep and all(e["port"] == "admin" and e["path"] == "/metrics" for e in ep), f
        assert m["spec"]["selector"]["matchLabels"], f
    elif m["kind"] == "PodMonitor":
        ep = m["spec"]["podMetricsEndpoints"]
        assert ep and all(e["port"] == "admin" and e["path"] == "/metrics" for e in ep), f
        assert m["spec"]["selector"]["matchExpressions"], f
    else:
        rules = [r for g in m["spec"]["groups"] for r in g["rules"]]
        assert rules and all(r["alert"] and r["expr"] and r["annotations"]["summary"] for r in rules), f
    print(f"    {f.name}: ok")
# No wildcard in any rule the chart grants (verbs, resources, API groups).
for f in sorted((pathlib.Path(sys.argv[1]) / "builtin").glob("*-*Role.yaml")):
    role = yaml.safe_load(f.read_text())
    for rule in role.get("rules", []):
        for field in ("verbs", "resources", "apiGroups", "resourceNames"):
            assert "*" not in rule.get(field, []), f"{f.name}: wildcard in {field}: {rule}"
    print(f"    {f.name}: no wildcard")
# The dashboard is JSON inside a ConfigMap: it must parse, with a query per panel.
for f in sorted((pathlib.Path(sys.argv[1]) / "builtin").glob("*-ConfigMap.yaml")):
    cm = yaml.safe_load(f.read_text())
    for key, text in cm.get("data", {}).items():
        if key.endswith(".json"):
            d = json.loads(text)
            assert d["panels"] and all(p["targets"] for p in d["panels"]), f
            print(f"    {f.name} {key}: {len(d['panels'])} panels, ok")
PY

# --- 3. the CRD ------------------------------------------------------------------
log "kubernetes-validate on the CRD"
"${KV[@]}" --quiet --strict -k "$K8S_VERSION" "$CRD" "$CHART/crds/"*.yaml
cmp -s "$CRD" "$CHART"/crds/throttledconsumers.pacer.dev.yaml || {
  echo "charts/pacer/crds/ differs from crds/; regenerate with:" >&2
  echo "  cargo run -q -p pacer-operator -- crd > crds/throttledconsumers.pacer.dev.yaml && cp crds/throttledconsumers.pacer.dev.yaml charts/pacer/crds/" >&2
  exit 1
}

# --- 3b + 4. structural schema, examples against the schema -------------------------
log "structural schema and crds/examples/*.yaml against the CRD's openAPIV3Schema"
"$PY" - "$CRD" "$ROOT"/crds/examples/*.yaml <<'PY'
import copy, sys, yaml, jsonschema

crd_path, examples = sys.argv[1], sys.argv[2:]
crd = next(d for d in yaml.safe_load_all(open(crd_path)) if d)
version = crd["spec"]["versions"][0]
schema = version["schema"]["openAPIV3Schema"]

# The API server requires a structural schema: every node typed, unless it preserves
# unknown fields or is int-or-string.
problems = []
def structural(node, path):
    if not isinstance(node, dict):
        return
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    for banned in ("$ref", "oneOf", "anyOf", "allOf", "not"):
        if banned in node and path.count(".") < 2:
            problems.append(f"{path}: {banned} at a structural position")
    for k, v in node.get("properties", {}).items():
        structural(v, f"{path}.{k}")
    if isinstance(node.get("items"), dict):
        structural(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        structural(node["additionalProperties"], f"{path}{{}}")
structural(schema, "openAPIV3Schema")
if problems:
    sys.exit("CRD schema is not structural:\n  " + "\n  ".join(problems))

def to_json_schema(node):
    """OpenAPI v3 (Kubernetes dialect) -> JSON Schema draft 4/7: nullable becomes a type
    union; x-kubernetes-* keys are annotations jsonschema ignores."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out

js = to_json_schema(copy.deepcopy(schema))
validator = jsonschema.Draft7Validator(js, format_checker=jsonschema.FormatChecker())
failed = False
for path in examples:
    for doc in (d for d in yaml.safe_load_all(open(path)) if d):
        assert doc["apiVersion"] == f'{crd["spec"]["group"]}/{version["name"]}', path
        assert doc["kind"] == crd["spec"]["names"]["kind"], path
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        for e in errors:
            failed = True
            print(f"    {path}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
        if not errors:
            print(f"    {path.rsplit('/', 1)[-1]}: ok")

# The schema must refuse what it promises to refuse.
bad = yaml.safe_load(open(examples[0]))
bad["spec"]["budget"]["policy"] = "fair"
bad["spec"]["replicas"] = -1
if validator.is_valid(bad):
    failed = True
    print("    the schema accepted policy=fair and replicas=-1")
sys.exit(1 if failed else 0)
PY
# --- 5. what the operator applies -------------------------------------------------------
log "kubernetes-validate on the children the operator builds for each example"
OPERATOR="${PACER_OPERATOR_BIN:-}"
if [[ -z "$OPERATOR" ]]; then
  (cd "$ROOT" && cargo build -q -p pacer-operator --bin pacer-operator)
  OPERATOR="$ROOT/target/debug/pacer-operator"
fi
children="$rendered/children"
mkdir -p "$children"
for example in "$ROOT"/crds/examples/*.yaml; do
  base="$(basename "$example" .yaml)"
  "$OPERATOR" render "$example" > "$children/$base.yaml"
  "$PY" - "$children/$base.yaml" <<'PY'
import pathlib, sys, yaml
src = pathlib.Path(sys.argv[1])
for i, d in enumerate(d for d in yaml.safe_load_all(src.read_text()) if d):
    (src.parent / f"{src.stem}-{i:02d}-{d['kind']}.yaml").write_text(yaml.safe_dump(d))
src.unlink()
PY
done
"${KV[@]}" --quiet --strict -k "$K8S_VERSION" "$children"/*.yaml
for f in "$children"/*.yaml; do echo "    ${f##*/}: ok"; done

log "all manifests valid"
