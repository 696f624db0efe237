"""The README's test command is the one CI runs (.ci/run), so users run what CI proves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"run the whole test suite:\n\n```sh\n(.+?)\n```", readme)
    assert block, "README has no quick-start test command"
    assert block.group(1).strip() == ci
    envs = re.search(r"tox -e (\S+)", ci).group(1).split(",")  # type: ignore[union-attr]
    assert envs.index("image") < envs.index("conformance"), "image tests run before conformance"
