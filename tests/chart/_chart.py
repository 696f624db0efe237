"""Helpers of the chart tests: find helm, run `helm template`, query what it rendered."""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "quic-proxy-waf"
EXAMPLES = ROOT / "examples" / "values"
HELM_INSTALL = "go install helm.sh/helm/v3/cmd/helm@v3.16.3"
# A helm built by `go install` believes the cluster is Kubernetes 1.20; render
# as a supported version instead (Chart.yaml asks for >=1.26).
KUBE_VERSION = "1.31.0"
RELEASE = "edge"
NAMESPACE = "edge-ns"

# Every values profile: the chart's own files and the examples, each applied
# on top of the chart's values.yaml.
PROFILES: dict[str, list[Path]] = {
    "default": [],
    "daemonset": [CHART / "values-daemonset.yaml"],
    **{f"examples/{p.stem}": [p] for p in sorted(EXAMPLES.glob("*.yaml"))},
}


def find_helm() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    gopath = None
    if shutil.which("go"):
        out = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True)
        gopath = out.stdout.strip() or None
    for base in filter(None, [gopath, os.path.expanduser("~/go")]):
        candidate = Path(base.split(os.pathsep)[0]) / "bin" / "helm"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def random_made(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Take the values the chart makes at random (the QUIC secret) out of ``docs``, so two
    renders compare equal; returns them by Secret name."""
    made = {}
    for doc in docs:
        name = doc.get("metadata", {}).get("name", "")
        if doc.get("kind") == "Secret" and name.endswith("-quic") and "secret" in doc["data"]:
            made[name] = doc["data"]["secret"]
            doc["data"]["secret"] = "<random>"
    return made


def stand_in_quic_secret(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A rendered config.yaml whose quic.shared_secret_file (a Secret mounted in the
    pod) points at a stand-in file, so quicproxy loads it here."""
    if data.get("quic", {}).get("shared_secret_file"):
        stand_in = folder / "quic-secret"
        stand_in.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
        data["quic"]["shared_secret_file"] = str(stand_in)
    return data


@dataclass
class Manifests:
    """The objects of one `helm template` run."""

    docs: list[dict[str, Any]]
    made: dict[str, str] = field(default_factory=dict)
    "Secret name -> the random value the chart made for it (``random_made``)."

    def made_secret_text(self) -> str:
        """The QUIC secret file's text as the chart made it (one made at random here;
        a stand-in line when the user names an existing Secret)."""
        for value in self.made.values():
            return base64.b64decode(value).decode()
        return base64.b64encode(bytes(range(32))).decode() + "\n"

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def find(self, kind: str, suffix: str = "") -> dict[str, Any] | None:
        hits = [d for d in self.all(kind) if d["metadata"]["name"].endswith(suffix)]
        assert len(hits) <= 1, f"several {kind} ending in {suffix!r}"
        return hits[0] if hits else None

    def get(self, kind: str, suffix: str = "") -> dict[str, Any]:
        obj = self.find(kind, suffix)
        assert obj is not None, f"no {kind} ending in {suffix!r}; have {self.names()}"
        return obj

    def names(self) -> list[str]:
        return [f"{d['kind']}/{d['metadata']['name']}" for d in self.docs]

    # --- shortcuts
    def proxy_workload(self) -> dict[str, Any]:
        found = [
            d
            for d in self.docs
            if d["kind"] in ("Deployment", "DaemonSet") and d["metadata"]["name"].endswith("-proxy")
        ]
        assert len(found) == 1, self.names()
        return found[0]

    def proxy_pod(self) -> dict[str, Any]:
        return self.proxy_workload()["spec"]["template"]

    def proxy_container(self) -> dict[str, Any]:
        return container(self.proxy_pod(), "proxy")

    def proxy_config(self) -> dict[str, Any]:
        cm = self.get("ConfigMap", "-proxy-config")
        return yaml.safe_load(cm["data"]["config.yaml"])

    def proxy_service(self) -> dict[str, Any] | None:
        return self.find("Service", "-proxy")


def container(pod_template: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod_template["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r}")


def ports_by_name(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in c.get("ports", [])}


class HelmError(Exception):
    pass


@lru_cache(maxsize=256)
def _run(helm: str, args: tuple[str, ...], values_json: str) -> subprocess.CompletedProcess:
    cmd = [helm, *args]
    with tempfile.TemporaryDirectory() as tmp:
        values = json.loads(values_json)
        if values is not None:
            extra = Path(tmp) / "extra-values.yaml"
            extra.write_text(yaml.safe_dump(values))
            cmd += ["-f", str(extra)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _value_args(files: Iterable[Path | str]) -> tuple[str, ...]:
    out: list[str] = []
    for f in files:
        out += ["-f", str(f)]
    return tuple(out)


def helm_template(
    helm: str, files: Iterable[Path | str] = (), values: dict[str, Any] | None = None
) -> subprocess.CompletedProcess:
    args = (
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *_value_args(files),
    )
    return _run(helm, args, json.dumps(values, sort_keys=True))


@lru_cache(maxsize=1)
def _notes_chart() -> Path:
    """A copy of the chart whose NOTES.txt is rendered into a ConfigMap, since
    `helm template` skips NOTES.txt and `helm install --dry-run` needs a cluster."""
    tmp = Path(tempfile.mkdtemp(prefix="notes-chart-"))
    atexit.register(shutil.rmtree, tmp, True)
    copy = tmp / CHART.name
    shutil.copytree(CHART, copy)
    notes = copy / "templates" / "NOTES.txt"
    text = notes.read_text()
    notes.unlink()
    (copy / "templates" / "_notes_for_test.tpl").write_text(
        '{{- define "test.notes" -}}\n' + text + "{{- end }}\n"
    )
    (copy / "templates" / "notes-for-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ include "test.notes" . | toJson }}\n'
    )
    return copy


def helm_notes(
    helm: str, files: Iterable[Path | str] = (), values: dict[str, Any] | None = None
) -> str:
    """The text `helm install` would print from NOTES.txt."""
    args = (
        "template",
        RELEASE,
        str(_notes_chart()),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        "--show-only",
        "templates/notes-for-test.yaml",
        *_value_args(files),
    )
    out = _run(helm, args, json.dumps(values, sort_keys=True))
    if out.returncode != 0:
        raise HelmError(out.stderr.strip())
    return yaml.safe_load(out.stdout)["data"]["notes"]
