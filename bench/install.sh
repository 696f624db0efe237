#!/usr/bin/env bash
# One-time install of what `python -m bench` needs beyond the project itself:
#   bash bench/install.sh
# - oha (pinned, HTTP/3 build) from crates.io: compiles for ~10 minutes on 2 cores
# - Caddy from Debian (the peer), if missing; Go must be there already (builds the backend)
# - matplotlib and py-spy from PyPI into the current Python
set -euo pipefail
OHA_VERSION=1.16.0
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"

if ! command -v caddy >/dev/null; then
  apt-get update -qq && apt-get install -y -qq caddy
fi
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || {
  echo "Go toolchain not found (needed to build bench/backend)" >&2; exit 1; }

oha_bin="$(command -v oha || echo "$HOME/.cargo/bin/oha")"
if ! "$oha_bin" --version 2>/dev/null | grep -q " $OHA_VERSION"; then
  cargo install --locked --features http3 oha --version "$OHA_VERSION"
fi

"$py" -m pip install -q -r "$here/requirements.txt"
echo "bench install done: $("$oha_bin" --version), $(caddy version | cut -d' ' -f1)"
