"""The Coraza engine as a build step of the package, and the wheel's tag.

``pip install .`` (and any wheel build) builds the Coraza WAF engine
(quicproxy/waf/coraza/libquicproxy-coraza.so, from the Go sources beside it) when Go is
on PATH and the library is missing or older than its sources, so the wheel carries it.
Without Go the install still succeeds, pure Python, and says in one line how to add the
engine later (``--waf inline`` says the same at start). ``QUICPROXY_BUILD_CORAZA=0``
skips the step; ``=1`` makes a failed or impossible build fail the install.

A wheel that carries the engine (a Linux shared library) is tagged for the platform it
was built on (py3-none-<platform>), so pip never installs it elsewhere. Everything else
is in pyproject.toml."""

import os
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(HERE, "quicproxy", "waf", "coraza")
ENGINE = os.path.join(SOURCES, "libquicproxy-coraza.so")


def _engine_is_fresh() -> bool:
    if not os.path.isfile(ENGINE) or os.path.getsize(ENGINE) == 0:
        return False
    built = os.path.getmtime(ENGINE)
    for name in os.listdir(SOURCES):
        if (name.endswith(".go") or name.startswith("go.")) and os.path.getmtime(
            os.path.join(SOURCES, name)
        ) > built:
            return False
    return True


def build_engine() -> None:
    """Build the Coraza engine next to its sources, once per build, when Go is here."""
    want = os.environ.get("QUICPROXY_BUILD_CORAZA", "auto")
    if want == "0" or _engine_is_fresh() or not os.path.isdir(SOURCES):
        return
    if shutil.which("go") is None:
        if want == "1":
            raise SystemExit("quic-proxy-waf: QUICPROXY_BUILD_CORAZA=1 but Go is not on PATH")
        print(
            "quic-proxy-waf: Go not found, installing without the Coraza WAF engine "
            "(--waf inline needs it: install Go >= 1.25, then python -m quicproxy.waf.build)",
            file=sys.stderr,
        )
        return
    print("quic-proxy-waf: building the Coraza WAF engine with Go", file=sys.stderr)
    done = subprocess.call(["bash", os.path.join(SOURCES, "build.sh")], stdout=sys.stderr)
    if done != 0:
        if want == "1":
            raise SystemExit("quic-proxy-waf: building the Coraza engine failed")
        print(
            "quic-proxy-waf: building the Coraza WAF engine failed (see above): installing "
            "without it; python -m quicproxy.waf.build retries",
            file=sys.stderr,
        )


class EngineDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return os.path.isfile(ENGINE)  # platform files: installed to platlib, wheel not pure


class PlatformWheel(bdist_wheel):
    def finalize_options(self) -> None:
        build_engine()  # before the wheel decides whether it is pure
        super().finalize_options()

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, plat = super().get_tag()
        return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


class BuildPy(build_py):
    def run(self) -> None:
        build_engine()  # editable installs and builds that skip bdist_wheel
        super().run()


setup(
    distclass=EngineDistribution,
    cmdclass={"bdist_wheel": PlatformWheel, "build_py": BuildPy},
)
