#!/usr/bin/env bash
# Build helm from Go modules (no prebuilt downloads reach this machine) and print its path.
# Cached outside the repo, keyed by version. Used by the chart tests (`helm template` output
# applied with `kubectl apply --dry-run=server` against the test bed's apiserver).
set -euo pipefail
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
if [[ -n "${HELM_BIN:-}" && -x "$HELM_BIN" ]]; then echo "$HELM_BIN"; exit 0; fi
cache="${CHAPERONE_CACHE:-$HOME/.cache/chaperone}"
dir="$cache/tools/helm-$HELM_VERSION"
if [[ ! -x "$dir/helm" ]]; then
  command -v go >/dev/null || { echo "build-helm: no Go toolchain on PATH" >&2; exit 1; }
  echo "build-helm: building helm $HELM_VERSION" >&2
  mkdir -p "$dir"
  GOFLAGS="-buildvcs=false" CGO_ENABLED=0 GOBIN="$dir" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
fi
echo "$dir/helm"
