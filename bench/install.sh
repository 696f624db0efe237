#!/usr/bin/env bash
# One-time install of what `python -m bench` needs beyond the project itself:
#   bash bench/install.sh
# - oha (pinned, HTTP/3 build) from crates.io: compiles for ~10 minutes on 2 cores
# - Caddy (the peer), pinned release built from its Go module with `go install` into
#   bench/.tools/bin (gitignored); Go must be there already (it also builds the backend)
# - matplotlib and py-spy from PyPI into the current Python
# - bench/.tools/image-python: a venv of the interpreter the container image ships (Debian
#   bookworm's python3, what the Dockerfile's base provides) with this project installed
#   editable; the quicproxy targets run on it (bench/targets.py IMAGE_VENV)
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

image_py=/usr/bin/python3
venv="$here/.tools/image-python"
if ! "$image_py" -c "import ensurepip, venv" 2>/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q python3-venv >/dev/null 2>&1 || true  # no apt lists: see below
  fi
fi
if "$image_py" -c "import ensurepip, venv" 2>/dev/null; then
  [ -x "$venv/bin/python" ] || "$image_py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -e "$here/.."
  image_note="quicproxy on $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])') ($image_py)"
else
  image_note="no $image_py with venv (apt-get install python3-venv): quicproxy runs on $py"
  echo "$image_note" >&2
fi
echo "bench install done: $("$oha_bin" --version), Caddy $CADDY_VERSION ($caddy_bin), $image_note"
