#!/usr/bin/env bash
# Build kube-apiserver and etcd from Go modules with the machine's Go toolchain.
#
# Why: this project's test bed needs a *real* control plane, and the machines it runs on have
# no Docker and may download nothing but registry packages. The Go module proxy serves
# k8s.io/kubernetes, so we compile the two binaries ourselves and cache them outside the repo,
# keyed by version. The result follows the envtest convention: a directory with `kube-apiserver`
# and `etcd` that KUBEBUILDER_ASSETS points at.
#
# Usage: hack/build-control-plane.sh            # prints the assets directory on stdout
# Env:   KUBEBUILDER_ASSETS   if it already holds both binaries, nothing is built
#        CHAPERONE_CACHE      cache root (default ~/.cache/chaperone)
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.33.13}"
ETCD_VERSION="${ETCD_VERSION:-v3.5.21}"

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]]; then
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

command -v go >/dev/null || { echo "build-control-plane: no Go toolchain on PATH" >&2; exit 1; }

cache="${CHAPERONE_CACHE:-$HOME/.cache/chaperone}"
assets="$cache/control-plane/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"
if [[ -x "$assets/kube-apiserver" && -x "$assets/etcd" ]]; then
  echo "$assets"
  exit 0
fi
mkdir -p "$assets"
work="$cache/control-plane/src"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { echo "build-control-plane: $*" >&2; }

# --- kube-apiserver -------------------------------------------------------------------------
# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging/...
# A module that depends on it must map each of those to the published v0.x.y of the same release.
build_apiserver() {
  local dir="$work/apiserver-$K8S_VERSION" staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$dir"
  cd "$dir"
  log "resolving k8s.io/kubernetes@$K8S_VERSION staging modules"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module chaperone.dev/testbed/apiserver"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  log "building kube-apiserver $K8S_VERSION (cold: several minutes)"
  go mod tidy -e >/dev/null 2>&1 || true
  go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "${K8S_VERSION#v1.}" | cut -d. -f1)" \
    -o "$assets/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$assets/kube-apiserver.tmp" "$assets/kube-apiserver"
}

# --- etcd -----------------------------------------------------------------------------------
build_etcd() {
  local dir="$work/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  cd "$dir"
  cat > go.mod <<MOD
module chaperone.dev/testbed/etcd

go 1.23

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  log "building etcd $ETCD_VERSION"
  go mod tidy -e >/dev/null 2>&1 || true
  go build -trimpath -ldflags "-s -w" -o "$assets/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$assets/etcd.tmp" "$assets/etcd"
}

[[ -x "$assets/etcd" ]] || build_etcd
[[ -x "$assets/kube-apiserver" ]] || build_apiserver
echo "$assets"
