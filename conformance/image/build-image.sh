#!/usr/bin/env bash
# Build the quic-proxy-waf image from the working tree and save it as a docker-archive tar
# that any provider can load (kind load image-archive, k3d image import, ctr images import).
#   usage: build-image.sh [REPO]      prints "<ref> <tar>" on stdout
# BASE_IMAGE: QUICPROXY_BASE_IMAGE, or "debootstrap" (default when no registry is reachable
# is the caller's choice) to build a base with build-base.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$(cd "$HERE/../.." && pwd)"
REPO="${1:-quicproxy.local/quic-proxy-waf}"
CACHE="${QUICPROXY_CACHE:-/var/cache/quicproxy-conformance}"
BASE="${QUICPROXY_BASE_IMAGE:-python:3.11-slim-bookworm}"
log() { printf '[build-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
mkdir -p "$CACHE/images"
if [ "$BASE" = debootstrap ]; then
  BASE=quicproxy-conformance/base:bookworm
  "$HERE/build-base.sh" "$BASE"
fi
# networks that intercept TLS: hand the machine's extra CAs to pip in the build stage only
extra_ca=""
for f in ${QUICPROXY_EXTRA_CA_FILES:-/usr/local/share/ca-certificates/*.crt}; do
  [ -s "$f" ] && extra_ca+="$(cat "$f")"$'\n'
done
# the Dockerfile works with BuildKit and the classic builder; without buildx use the latter
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
# The Coraza WAF engine (Go) is built on the host: the base images carry no Go.
if command -v go >/dev/null 2>&1; then
  log "building the Coraza WAF engine"
  bash "$SRC/quicproxy/waf/coraza/build.sh" >&2
fi
log "docker build (base $BASE) from $SRC"
t0=$SECONDS
docker build --build-arg "BASE_IMAGE=$BASE" --build-arg "EXTRA_CA_PEM=$extra_ca" \
  --build-arg "PIP_INDEX_URL=${PIP_INDEX_URL:-}" -t "$REPO:build" -f "$SRC/Dockerfile" "$SRC" 2>&1 \
  | while IFS= read -r line; do printf '[build-image]   %s\n' "$line" >&2; done
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "docker build failed"; exit 1; }
id="$(docker image inspect -f '{{.Id}}' "$REPO:build")"; id="${id#sha256:}"
ref="$REPO:c-${id:0:12}"
docker tag "$REPO:build" "$ref"
# drop this script's older tags so images do not pile up between runs
for old in $(docker images "$REPO" --format '{{.Tag}}' | grep '^c-' | grep -vx "c-${id:0:12}"); do
  docker rmi "$REPO:$old" >/dev/null 2>&1 || true
done
tar="$CACHE/images/quic-proxy-waf-${id:0:12}.tar"
if [ ! -s "$tar" ]; then
  find "$CACHE/images" -name 'quic-proxy-waf-*.tar' -delete
  docker save -o "$tar.tmp" "$ref" && mv "$tar.tmp" "$tar"
fi
log "built $ref in $((SECONDS - t0))s ($(du -h "$tar" | cut -f1) archive, $(docker image inspect -f '{{.Size}}' "$ref" | awk '{printf "%d MB", $1/1e6}') image)"
echo "$ref $tar"
