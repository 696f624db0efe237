#!/usr/bin/env bash
# One-time install of what `python -m bench` needs beyond the project itself:
#   bash bench/install.sh
# - oha (pinned, HTTP/3 build) from crates.io: compiles for ~10 minutes on 2 cores
# - Caddy (the peer), pinned release built from its Go module with `go install` into
#   bench/.tools/bin (gitignored); Go must be there already (it also builds the backend)
# - matplotlib and py-spy from PyPI into the current Python
set -euo pipefail
OHA_VERSION=1.16.0
# Newest v2.11.x the Go module proxy served when pinned:
#   go list -m -versions github.com/caddyserver/caddy/v2
# Keep in step with CADDY_VERSION in bench/targets.py (the results print the version found in
# the binary's Go build info: `caddy version` says "unknown" for a go install build).
CADDY_VERSION=v2.11.9
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"

go="$(command -v go || echo /usr/local/go/bin/go)"
[ -x "$go" ] || { echo "Go toolchain not found (needed for Caddy and bench/backend)" >&2; exit 1; }

caddy_bin="$here/.tools/bin/caddy"
if ! "$go" version -m "$caddy_bin" 2>/dev/null |
    grep -Eq "^[[:space:]]+mod[[:space:]]+github.com/caddyserver/caddy/v2[[:space:]]+$CADDY_VERSION[[:space:]]"; then
  mkdir -p "$here/.tools/bin"
  GOBIN="$here/.tools/bin" "$go" install "github.com/caddyserver/caddy/v2/cmd/caddy@$CADDY_VERSION"
fi

oha_bin="$(command -v oha || echo "$HOME/.cargo/bin/oha")"
if ! "$oha_bin" --version 2>/dev/null | grep -q " $OHA_VERSION"; then
  cargo install --locked --features http3 oha --version "$OHA_VERSION"
fi

"$py" -m pip install -q -r "$here/requirements.txt"
echo "bench install done: $("$oha_bin" --version), Caddy $CADDY_VERSION ($caddy_bin)"
