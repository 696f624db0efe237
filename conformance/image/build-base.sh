#!/usr/bin/env bash
# Build a Debian bookworm base image with debootstrap and `docker import` it, for machines
# that cannot pull from an image registry.  It stands in for python:3.11-slim-bookworm:
# python3 + venv + pip + ca-certificates.  Cached: the rootfs tarball lives in
# $QUICPROXY_CACHE/base/, the image is only re-imported when missing from the engine.
#   usage: build-base.sh [IMAGE_REF]   (default quicproxy-conformance/base:bookworm)
set -euo pipefail
REF="${1:-${QUICPROXY_BASE_IMAGE_REF:-quicproxy-conformance/base:bookworm}}"
CACHE="${QUICPROXY_CACHE:-/var/cache/quicproxy-conformance}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${DEBIAN_SUITE:-bookworm}"
TAR="$CACHE/base/$SUITE-python3.tar"
log() { printf '[build-base %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if docker image inspect "$REF" >/dev/null 2>&1; then log "$REF present"; exit 0; fi
if [ ! -s "$TAR" ]; then
  command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install -y debootstrap"; exit 1; }
  mkdir -p "$CACHE/base"
  root="$(mktemp -d "$CACHE/base/rootfs.XXXX")"
  cleanup() {  # debootstrap mounts proc/sys inside the target; never rm -rf through a mount
    awk -v r="$root" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l || true
    rm -rf --one-file-system "$root"
  }
  trap cleanup EXIT
  log "debootstrap $SUITE from $MIRROR (takes ~2-4 min)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      "$SUITE" "$root" "$MIRROR" >"$CACHE/base/debootstrap.log" 2>&1 &
  pid=$! t0=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do   # keep the caller informed: the step takes minutes
    sleep 20
    kill -0 "$pid" 2>/dev/null && log "debootstrap running ($((SECONDS - t0))s): $(tail -1 "$CACHE/base/debootstrap.log")"
  done
  wait "$pid" || { tail -20 "$CACHE/base/debootstrap.log" >&2; exit 1; }
  # same apt sources a debian:bookworm image has; slim it like the official images do
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
      "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" > "$root/etc/apt/sources.list"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
      > "$root/etc/dpkg/dpkg.cfg.d/01-slim"
  awk -v r="$root" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  tar --numeric-owner --one-file-system -C "$root" -cf "$TAR.tmp" . && mv "$TAR.tmp" "$TAR"
  log "rootfs tarball $(du -h "$TAR" | cut -f1)"
fi
log "docker import -> $REF"
docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' "$TAR" "$REF" >/dev/null
log "$REF imported"
