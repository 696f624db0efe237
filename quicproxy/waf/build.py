"""Build the Coraza engine library: ``python -m quicproxy.waf.build [OUTPUT]``.

Runs quicproxy/waf/coraza/build.sh (needs Go and its module proxy or cache).
Without OUTPUT the library lands next to the Go sources, where the proxy looks
first; elsewhere, point QUICPROXY_CORAZA_LIB (or waf.library) at it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ._coraza_lib import SOURCE_DIR


def main(argv: list[str]) -> int:
    script = os.path.join(SOURCE_DIR, "build.sh")
    return subprocess.call(["bash", script, *argv[:1]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
