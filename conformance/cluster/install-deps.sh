#!/usr/bin/env bash
# Install what the "local" provider needs on a fresh Debian/Ubuntu machine (run as root).
# Idempotent: packages already present are left alone, so a warm machine pays only the check.
# Go (>= 1.24) must already be installed (k8s.io/kubernetes v1.34 needs it; Debian's is older).
set -euo pipefail
log() { printf '[install-deps %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
PKGS=(docker.io containerd runc containernetworking-plugins debootstrap iptables iproute2 openssl curl ca-certificates)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "all packages present"
fi
command -v go >/dev/null || { log "Go >= 1.24 is required (https://go.dev/dl) and was not found"; exit 1; }
log "go: $(go version)"
