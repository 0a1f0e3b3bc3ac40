#!/usr/bin/env bash
# Build the node's Kubernetes binaries and its pause image from Go modules, and print the directory.
#
# Why: the test bed's node (testbed/chaperone_testbed/node.py, issue 14) is a real kubelet with
# containerd and runc, plus the scheduler, the controller manager and kube-proxy that a
# Deployment, a Service and a pod need. No prebuilt release binary or image reaches this machine,
# so - exactly like hack/build-control-plane.sh builds kube-apiserver - we compile them from the
# k8s.io/kubernetes module, cached outside the repository and keyed by version.
#
# The directory holds kubelet, kube-scheduler, kube-controller-manager, kube-proxy, `pause` (a
# tiny static program: the sandbox container's only process, it sleeps until signalled and reaps
# nothing - the pod's processes are never its children under containerd) and pause.oci.tar, an
# OCI image archive of it that the node imports into containerd as its sandbox image.
#
# Usage: hack/build-node.sh            # prints the directory on stdout
# Env:   CHAPERONE_NODE_ASSETS  if it already holds everything, nothing is built
#        CHAPERONE_CACHE        cache root (default ~/.cache/chaperone)
#        K8S_VERSION            must match hack/build-control-plane.sh's (kubelet/apiserver skew)
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.33.13}"
PAUSE_VERSION="3.10-chaperone1"
BINARIES=(kubelet kube-scheduler kube-controller-manager kube-proxy)

complete() {
  local d="$1" b
  for b in "${BINARIES[@]}" pause; do [[ -x "$d/$b" ]] || return 1; done
  [[ -s "$d/pause.oci.tar" ]]
}

if [[ -n "${CHAPERONE_NODE_ASSETS:-}" ]] && complete "$CHAPERONE_NODE_ASSETS"; then
  echo "$CHAPERONE_NODE_ASSETS"
  exit 0
fi

cache="${CHAPERONE_CACHE:-$HOME/.cache/chaperone}"
assets="$cache/kube-node/k8s-${K8S_VERSION}-pause-${PAUSE_VERSION}"
if complete "$assets"; then
  echo "$assets"
  exit 0
fi
command -v go >/dev/null || { echo "build-node: no Go toolchain on PATH" >&2; exit 1; }
mkdir -p "$assets"
work="$cache/kube-node/src"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "build-node: $*" >&2; }

# --- kubelet, kube-scheduler, kube-controller-manager, kube-proxy ---------------------------
# Same module trick as build-control-plane.sh: k8s.io/kubernetes requires its staging modules at
# v0.0.0, so each is replaced by the published v0.x.y of the same release. One `go build` for
# the four commands shares the compilation of their common packages (and the Go build cache
# shares it with kube-apiserver's).
build_components() {
  local dir="$work/components-$K8S_VERSION" staging="v0.${K8S_VERSION#v1.}" minor
  minor=$(echo "${K8S_VERSION#v1.}" | cut -d. -f1)
  mkdir -p "$dir"
  cd "$dir"
  log "resolving k8s.io/kubernetes@$K8S_VERSION staging modules"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module chaperone.dev/testbed/node"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  {
    echo "//go:build tools"
    echo
    echo "package tools"
    echo
    for b in "${BINARIES[@]}"; do echo "import _ \"k8s.io/kubernetes/cmd/$b\""; done
  } > tools.go
  go mod tidy -e >/dev/null 2>&1 || true
  local pkgs=() b
  for b in "${BINARIES[@]}"; do [[ -x "$assets/$b" ]] || pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  ((${#pkgs[@]})) || return 0
  log "building ${pkgs[*]##*/} $K8S_VERSION (cold: 10+ minutes)"
  rm -rf "$assets/.out" && mkdir -p "$assets/.out"
  go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
    -o "$assets/.out/" "${pkgs[@]}"
  mv "$assets"/.out/* "$assets"/ && rmdir "$assets/.out"
}

# --- pause ----------------------------------------------------------------------------------
# The sandbox image. registry.k8s.io/pause is not reachable; its program is a few lines: block
# until SIGINT/SIGTERM, then exit 0.
build_pause() {
  local dir="$work/pause"
  mkdir -p "$dir"
  cd "$dir"
  cat > go.mod <<'MOD'
module chaperone.dev/testbed/pause

go 1.22
MOD
  cat > main.go <<'GO'
// pause holds a pod's namespaces open: it waits for SIGINT or SIGTERM and exits 0.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM)
	<-c
}
GO
  log "building pause"
  go build -trimpath -ldflags "-s -w" -o "$assets/pause.tmp" .
  mv "$assets/pause.tmp" "$assets/pause"
  # The OCI archive (image layout in a tar) is written by the test bed's own writer, so the
  # format has one implementation: chaperone_testbed.oci.
  python3 "$repo_dir/testbed/chaperone_testbed/oci.py" single-binary \
    --binary "$assets/pause" --path /pause --name "chaperone.local/pause:$PAUSE_VERSION" \
    --out "$assets/pause.oci.tar.tmp" >&2
  mv "$assets/pause.oci.tar.tmp" "$assets/pause.oci.tar"
}

[[ -x "$assets/pause" && -s "$assets/pause.oci.tar" ]] || build_pause
complete "$assets" || build_components
echo "$assets"
