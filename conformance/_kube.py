"""kubectl / helm helpers for the conformance suite (subprocess, JSON, polling with progress)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._cluster import CACHE, Progress, Provider


def _tool(name: str) -> str:
    """Prefer the binaries built for the local provider (version-matched), else PATH."""
    built = CACHE / "bin" / name
    if built.exists():
        return str(built)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(
            f"{name} not found (install it, or run conformance/cluster/build-bins.sh)"
        )
    return found


class Kube:
    def __init__(self, provider: Provider, progress: Progress) -> None:
        self.provider = provider
        self.progress = progress
        self.env = provider.tools_env()
        self.kubectl_bin = _tool("kubectl")
        self.helm_bin = _tool("helm")
        helm_home = CACHE / "helm"
        for sub in ("cache", "config", "data"):
            (helm_home / sub).mkdir(parents=True, exist_ok=True)
        self.env.setdefault("HELM_CACHE_HOME", str(helm_home / "cache"))
        self.env.setdefault("HELM_CONFIG_HOME", str(helm_home / "config"))
        self.env.setdefault("HELM_DATA_HOME", str(helm_home / "data"))

    # ------------------------------------------------------------------ raw commands
    def run(
        self, args: list[str], *, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            args, capture_output=True, text=True, env=self.env, input=input, timeout=timeout
        )
        if check and proc.returncode:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> str:
        return self.run(
            [self.kubectl_bin, "--kubeconfig", self.provider.kubeconfig, *args],
            check=check,
            input=input,
            timeout=timeout,
        ).stdout

    def helm(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            [self.helm_bin, "--kubeconfig", self.provider.kubeconfig, *args],
            check=check,
            timeout=timeout,
        )

    def get(self, *args: str) -> Any:
        out = self.kubectl("get", *args, "-o", "json")
        return json.loads(out)

    def items(
        self, kind: str, namespace: str | None = None, selector: str | None = None
    ) -> list[Any]:
        args = [kind]
        args += ["-n", namespace] if namespace else ["-A"]
        if selector:
            args += ["-l", selector]
        return list(self.get(*args).get("items", []))

    def apply(self, manifest: str, namespace: str | None = None) -> None:
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.kubectl(*args, input=manifest)

    # ------------------------------------------------------------------ waiting
    def wait_until(
        self,
        what: str,
        cond: Callable[[], Any],
        timeout: float = 180,
        interval: float = 1.0,
        report_every: float = 15,
    ) -> Any:
        """Poll cond() until truthy; print progress every report_every seconds."""
        start = last = time.monotonic()
        err: Exception | None = None
        while True:
            try:
                res = cond()
                if res:
                    return res
                err = None
            except Exception as exc:  # noqa: BLE001 - keep polling, report at the end
                err = exc
            now = time.monotonic()
            if now - start > timeout:
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for {what}"
                    + (f": {err}" if err else "")
                )
            if now - last >= report_every:
                self.progress(f"  ... still waiting for {what} ({now - start:.0f}s)")
                last = now
            time.sleep(interval)

    def pods_ready(self, namespace: str, selector: str) -> list[Any]:
        pods = self.items("pods", namespace, selector)
        return [p for p in pods if _pod_ready(p)]

    def wait_rollout(self, namespace: str, timeout: float = 300) -> None:
        """Every Deployment and DaemonSet in namespace fully rolled out and its pods Ready."""

        def done() -> bool:
            for d in self.items("deployments", namespace):
                st, want = d.get("status", {}), d["spec"].get("replicas", 1)
                if st.get("observedGeneration", 0) < d["metadata"]["generation"]:
                    return False
                if (
                    st.get("updatedReplicas", 0) != want
                    or st.get("readyReplicas", 0) != want
                    or st.get("replicas", 0) != want
                ):
                    return False
            for d in self.items("daemonsets", namespace):
                st = d.get("status", {})
                if st.get("observedGeneration", 0) < d["metadata"]["generation"]:
                    return False
                want = st.get("desiredNumberScheduled", 0)
                if (
                    st.get("updatedNumberScheduled", 0) != want
                    or st.get("numberReady", 0) != want
                    or st.get("numberUnavailable", 0)
                ):
                    return False
            return True

        self.wait_until(f"rollout in {namespace}", done, timeout=timeout, interval=1.5)

    def describe_failure(self, namespace: str) -> str:
        """Pods, events and recent logs of not-ready pods, for an assertion message."""
        parts = [
            self.kubectl("get", "pods,svc,ds,deploy", "-n", namespace, "-o", "wide", check=False)
        ]
        parts.append(
            self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)[
                -4000:
            ]
        )
        for p in self.items("pods", namespace):
            if (
                not _pod_ready(p)
                and p["spec"].get("nodeName", "").startswith(("kwok-", "fake-")) is False
            ):
                name = p["metadata"]["name"]
                parts.append(
                    f"--- logs {name}\n"
                    + self.kubectl(
                        "logs", "-n", namespace, name, "--all-containers", "--tail=40", check=False
                    )
                )
        return "\n".join(parts)


def _pod_ready(pod: Any) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    for c in pod.get("status", {}).get("conditions", []) or []:
        if c["type"] == "Ready":
            return bool(c["status"] == "True")
    return False


pod_ready = _pod_ready


def tolerates(tolerations: Iterable[dict[str, Any]], taint: dict[str, Any]) -> bool:
    """Kubernetes toleration matching (core/v1 Toleration.ToleratesTaint)."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        op = t.get("operator", "Equal")
        if not t.get("key"):
            if op == "Exists":
                return True
            continue
        if t["key"] != taint["key"]:
            continue
        if op == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


# Tolerations the DaemonSet controller adds to every DaemonSet pod.
DAEMONSET_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/network-unavailable", "operator": "Exists", "effect": "NoSchedule"},
]


def node_selected(
    node: Any, node_selector: dict[str, str], tolerations: list[dict[str, Any]]
) -> bool:
    labels = node["metadata"].get("labels", {})
    if any(labels.get(k) != v for k, v in node_selector.items()):
        return False
    for taint in node["spec"].get("taints", []) or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(
            list(tolerations) + DAEMONSET_TOLERATIONS, taint
        ):
            return False
    return True


def write_temp(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
