"""values.yaml documents every key inline (`# --` comments) and the chart
README's values table is generated from those comments.

Print a fresh table with: python -m tests.chart.test_values_reference
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from ._chart import CHART

BEGIN = "<!-- values-reference:begin -->"
END = "<!-- values-reference:end -->"


def documented_keys() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for each key preceded by a `# --` comment."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows: list[tuple[str, Any, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in (CHART / "values.yaml").read_text().splitlines():
        text = line.strip()
        if text.startswith("# --"):
            comment = [text[4:].strip()]
            continue
        if text.startswith("#"):
            body = text[1:].strip()
            # a commented-out example (key: value or list item) ends the description
            if comment is not None and not re.match(r"^([\w.\-/]+:(\s|$)|- )", body):
                comment.append(body)
            elif comment is not None:
                comment = [*comment, "\0"]
            continue
        match = re.match(r"^(\s*)([A-Za-z]\w*):", line)
        if not match:
            comment = None
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = [k for _, k in stack]
        if comment:
            desc = " ".join(comment).split("\0")[0].strip()
            default: Any = values
            for k in path:
                default = default[k]
            rows.append((".".join(path), default, desc))
        comment = None
    return rows


def reference_table() -> str:
    out = ["| Key | Default | Description |", "|-----|---------|-------------|"]
    for key, default, desc in documented_keys():
        shown = json.dumps(default)
        if len(shown) > 50:
            shown = "see values.yaml"
        out.append(f"| `{key}` | `{shown}` | {desc.replace('|', '&#124;')} |")
    return "\n".join(out)


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


def test_every_value_is_documented_inline():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = {key for key, _, _ in documented_keys()}
    undocumented = [
        leaf
        for leaf in _leaves(values)
        if not any(leaf == d or leaf.startswith(d + ".") for d in documented)
    ]
    assert undocumented == [], "add a `# --` comment above: " + ", ".join(undocumented)


def test_descriptions_are_sentences():
    for key, _, desc in documented_keys():
        assert len(desc) >= 10, key


def test_readme_values_table_is_up_to_date():
    readme = (CHART / "README.md").read_text()
    assert BEGIN in readme and END in readme
    current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == reference_table(), "regenerate: python -m tests.chart.test_values_reference"


if __name__ == "__main__":
    print(reference_table())
