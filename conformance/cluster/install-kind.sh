#!/usr/bin/env bash
# Install kind ($KIND_VERSION, a Go module) into $QUICPROXY_CACHE/bin with `go install`.
# Deliberately not in PATH: with QUICPROXY_CLUSTER=auto only a kind the user installed counts.
set -euo pipefail
KIND_VERSION="${KIND_VERSION:-v0.33.0}"
CACHE="${QUICPROXY_CACHE:-/var/cache/quicproxy-conformance}"
log() { printf '[install-kind %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
mkdir -p "$CACHE/bin"
if "$CACHE/bin/kind" version 2>/dev/null | grep -q "kind $KIND_VERSION "; then
  log "kind $KIND_VERSION present"; exit 0
fi
log "go install sigs.k8s.io/kind@$KIND_VERSION"
t0=$SECONDS
GOBIN="$CACHE/bin" CGO_ENABLED=0 go install "sigs.k8s.io/kind@$KIND_VERSION"
log "kind $KIND_VERSION installed in $((SECONDS - t0))s"
