#!/usr/bin/env bash
# Build (or reuse from cache) the binaries the "local" provider needs:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, kubeadm
#   (k8s.io/kubernetes @ K8S_VERSION; kubeadm is for the kind node image)
#   coredns (github.com/coredns/coredns)
#   etcd (go.etcd.io/etcd/server/v3), kwok (sigs.k8s.io/kwok), helm (helm.sh/helm/v3)
# Output: $QUICPROXY_CACHE/bin/<name>-<version> plus a symlink <name>.
# Cache: the Go build/module caches (GOCACHE/GOMODCACHE) and the finished binaries, so a
# warm run does nothing.  Needs only `go` (>= 1.24) and the Go module proxy.
set -euo pipefail
K8S_VERSION="${K8S_VERSION:-v1.34.4}"      # last minor whose kubelet still runs on cgroup v1 by default
ETCD_VERSION="${ETCD_VERSION:-v3.6.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.1}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
HELM_VERSION="${HELM_VERSION:-v3.16.3}"
CACHE="${QUICPROXY_CACHE:-/var/cache/quicproxy-conformance}"
BIN="$CACHE/bin"
mkdir -p "$BIN"
rm -rf "$CACHE"/tmp.* 2>/dev/null || true   # scratch output dirs of interrupted builds
export CGO_ENABLED="${CGO_ENABLED:-0}" GOFLAGS="${GOFLAGS:--buildvcs=false}"
log() { printf '[build-bins %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# `go build -v` names each package it compiles (cached ones are silent): report every 100th,
# so a cold build shows progress, and pass compiler errors through.
progress_filter() {
  awk -v label="$1" '/^#|:[0-9]+:[0-9]+: |^go: |error/ {print; fflush(); next}
    {n++; if (n % 100 == 0) {printf "[build-bins] %s: %d packages compiled (%s)\n", label, n, $0; fflush()}}' >&2
}

have() { [ -x "$BIN/$1-$2" ] && ln -sfn "$1-$2" "$BIN/$1"; }

build_k8s() {
  local missing=()
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl kubeadm; do
    have "$b" "$K8S_VERSION" || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] && { log "kubernetes $K8S_VERSION binaries cached"; return; }
  local mod="$CACHE/src/k8s-$K8S_VERSION"
  mkdir -p "$mod"
  local minor="v0.${K8S_VERSION#v1.}"    # staging modules are tagged v0.<minor>.<patch>
  if [ ! -f "$mod/go.sum" ]; then
    log "preparing scratch module for k8s.io/kubernetes $K8S_VERSION"
    local upstream
    upstream="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    {
      echo "module quicproxy.local/k8sbuild"
      echo
      sed -n 's/^go \(.*\)/go \1/p' "$upstream"
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      # k8s.io/kubernetes replaces its staging repos with ./staging paths; point them at tags
      grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging/' "$upstream" \
        | awk -v v="$minor" '{print "replace " $1 " => " $1 " " v}'
    } > "$mod/go.mod"
    printf 'package tools\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver"\n\t_ "k8s.io/kubernetes/cmd/kube-controller-manager"\n\t_ "k8s.io/kubernetes/cmd/kube-scheduler"\n\t_ "k8s.io/kubernetes/cmd/kubelet"\n\t_ "k8s.io/kubernetes/cmd/kube-proxy"\n\t_ "k8s.io/kubernetes/cmd/kubectl"\n\t_ "k8s.io/kubernetes/cmd/kubeadm"\n)\n' > "$mod/tools.go"
    sed -i '1i //go:build tools\n' "$mod/tools.go"
    (cd "$mod" && GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true; GOFLAGS=-mod=mod go mod download)
  fi
  log "building ${missing[*]} @ $K8S_VERSION (cold build takes ~15-25 min on 2 cores)"
  local pkgs=()
  for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  local out; out="$(mktemp -d "$CACHE/tmp.XXXX")"
  (cd "$mod" && GOFLAGS=-mod=mod go build -v -trimpath -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
      -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) \
      -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" -o "$out/" "${pkgs[@]}" 2>&1) \
    | progress_filter "kubernetes $K8S_VERSION"
  for b in "${missing[@]}"; do mv "$out/$b" "$BIN/$b-$K8S_VERSION"; have "$b" "$K8S_VERSION"; done
  rmdir "$out"
}

go_install() { # name version pkg@version extra-ldflags
  # Built in a scratch module that requires the package's module, so modules whose go.mod
  # has replace directives (etcd's server) build like the others.
  local name="$1" ver="$2" pkg="${3%@*}" ldx="${4:-}"
  have "$name" "$ver" && { log "$name $ver cached"; return; }
  local mod="$CACHE/src/$name-$ver"
  mkdir -p "$mod"
  if [ ! -f "$mod/go.sum" ]; then
    printf 'module quicproxy.local/build-%s\n\ngo 1.24\n' "$name" >"$mod/go.mod"
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" >"$mod/tools.go"
    (cd "$mod" && GOFLAGS=-mod=mod go get "$pkg@$ver" >/dev/null 2>&1 || true
     GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || GOFLAGS=-mod=mod go get "$pkg@$ver")
  fi
  log "building $name $ver ($pkg)"
  local out; out="$(mktemp -d "$CACHE/tmp.XXXX")"
  (cd "$mod" && GOFLAGS=-mod=mod go build -v -trimpath -ldflags "-s -w $ldx" -o "$out/$name" "$pkg" 2>&1) \
    | progress_filter "$name $ver"
  mv "$out/$name" "$BIN/$name-$ver"; rmdir "$out"
  have "$name" "$ver"
}

t0=$SECONDS
build_k8s
go_install etcd "$ETCD_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" ""
go_install coredns "$COREDNS_VERSION" "github.com/coredns/coredns@$COREDNS_VERSION" ""
go_install kwok "$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" ""
go_install helm "$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
log "binaries ready in $BIN ($((SECONDS - t0))s)"
