"""Wheel tag: the package is pure Python, but a wheel that carries the built Coraza engine
(quicproxy/waf/coraza/libquicproxy-coraza.so, a Linux shared library) is tagged for the
platform it was built on (py3-none-<platform>), so pip never installs it elsewhere.
Everything else is in pyproject.toml."""

import os

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = os.path.join(HERE, "quicproxy", "waf", "coraza", "libquicproxy-coraza.so")


class EngineDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return os.path.isfile(ENGINE)  # platform files: installed to platlib, wheel not pure


class PlatformWheel(bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        python, abi, plat = super().get_tag()
        return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


setup(distclass=EngineDistribution, cmdclass={"bdist_wheel": PlatformWheel})
