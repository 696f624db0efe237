#!/usr/bin/env bash
# Make sure a Docker engine answers; start dockerd in the background if none does.
# Prints "started" when this script started it (pid in $QUICPROXY_CACHE/run/dockerd.pid).
set -euo pipefail
CACHE="${QUICPROXY_CACHE:-/var/cache/quicproxy-conformance}"
log() { printf '[docker %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
if docker info >/dev/null 2>&1; then log "docker engine already running"; exit 0; fi
command -v dockerd >/dev/null || { log "dockerd missing: apt-get install -y docker.io"; exit 1; }
mkdir -p "$CACHE/run"
log "starting dockerd (log $CACHE/run/dockerd.log)"
setsid dockerd --pidfile "$CACHE/run/dockerd.pid" >"$CACHE/run/dockerd.log" 2>&1 < /dev/null &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && { log "dockerd up"; echo started; exit 0; }
  sleep 1
done
tail -20 "$CACHE/run/dockerd.log" >&2; exit 1
