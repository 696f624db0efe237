#!/usr/bin/env bash
# Builds the Coraza WAF engine (libquicproxy-coraza.so) next to this script.
# Needs Go >= 1.25 and the Go module proxy (or a filled module cache).
# Usage: bash quicproxy/waf/coraza/build.sh [output path]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/libquicproxy-coraza.so}"
cd "$here"
CGO_ENABLED=1 go build -trimpath -buildmode=c-shared -ldflags=-s -o "$out" .
rm -f "${out%.so}.h"
echo "built $out"
