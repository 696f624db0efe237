"""The cluster through the official `kubernetes` Python client; helm stays a CLI call.

Objects are plain camelCase dicts (DynamicClient `to_dict()` / watch `raw_object`), as
`kubectl get -o json` prints them.  Waits are watch-based: `watch_until` streams the events of
the kinds it is told about into a local cache and re-evaluates its condition on every event,
so it sees every pod transition; it fails fast, with the object's events in the message, when
a pod is broken (CrashLoopBackOff, ImagePullBackOff, ErrImagePull, a config error, or
unschedulable for longer than UNSCHEDULABLE_GRACE seconds) instead of waiting out a timeout.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.resource import ResourceList
from kubernetes.stream import stream

from ._cluster import CACHE, Progress, Provider

KINDS = {
    "pods": ("v1", "Pod"),
    "nodes": ("v1", "Node"),
    "services": ("v1", "Service"),
    "namespaces": ("v1", "Namespace"),
    "events": ("v1", "Event"),
    "deployments": ("apps/v1", "Deployment"),
    "daemonsets": ("apps/v1", "DaemonSet"),
    "poddisruptionbudgets": ("policy/v1", "PodDisruptionBudget"),
    "servicemonitors": ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
BROKEN_REASONS = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
UNSCHEDULABLE_GRACE = 20.0
FIELD_MANAGER = "quicproxy-conformance"


class BrokenObject(AssertionError):
    """A wait saw an object that will not recover by waiting."""


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


def _resend_on_dead_connection(rest: Any, attempts: int = 3) -> None:
    """Send a request again on a fresh connection when the pooled one died under it.

    niquests brings urllib3-future, which takes the ``urllib3`` name and speaks HTTP/2 to
    the API server; a multiplexed connection the server dropped while idle (a long wait
    for a namespace to go) fails with ResponseNotReady, which urllib3's Retry does not
    cover (seen once on `kind`: every test of a profile errored in its set-up). What this
    client sends is safe to send twice: reads, applies and patches are idempotent, a
    second delete gets 404 (ignored) and a second namespace create 409 (taken as made)."""
    send = rest.request
    dead = tuple(
        e
        for e in (
            getattr(urllib3.exceptions, "ResponseNotReady", None),
            urllib3.exceptions.ProtocolError,
        )
        if e is not None
    )

    def request(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(attempts):
            try:
                return send(*args, **kwargs)
            except dead:
                if attempt == attempts - 1:
                    raise
                rest.pool_manager.clear()  # no second try on a connection of the dead pool
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    rest.request = request


class Kube:
    def __init__(self, provider: Provider, progress: Progress) -> None:
        self.provider = provider
        self.progress = progress
        settings = client.Configuration()
        # The API server drops idle keep-alive connections (long image builds and waits
        # between calls); a request sent on one is reset before the server reads it, so
        # it is safe to send again on a fresh connection, whatever the method (seen on
        # `local` and `kind`, on the first and on later calls of a profile).
        settings.retries = urllib3.Retry(
            total=4, connect=4, read=2, status=0, allowed_methods=None, backoff_factor=0.5
        )
        self.api = config.new_client_from_config(
            config_file=provider.kubeconfig, client_configuration=settings
        )
        _resend_on_dead_connection(self.api.rest_client)
        self.dyn = DynamicClient(self.api)
        self.core = client.CoreV1Api(self.api)
        self.env = provider.tools_env()
        self.helm_bin = _tool("helm")
        helm_home = CACHE / "helm"
        for sub in ("cache", "config", "data"):
            (helm_home / sub).mkdir(parents=True, exist_ok=True)
        self.env.setdefault("HELM_CACHE_HOME", str(helm_home / "cache"))
        self.env.setdefault("HELM_CONFIG_HOME", str(helm_home / "config"))
        self.env.setdefault("HELM_DATA_HOME", str(helm_home / "data"))

    # ------------------------------------------------------------------ helm (CLI)
    def helm(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.helm_bin, "--kubeconfig", self.provider.kubeconfig, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    # ------------------------------------------------------------------ objects
    def resource(self, kind: str, api_version: str | None = None) -> Any:
        if api_version is None:
            api_version, kind = KINDS[kind]
        return self.dyn.resources.get(api_version=api_version, kind=kind)

    def items(
        self,
        kind: str,
        namespace: str | None = None,
        selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        res = self.resource(kind).get(
            namespace=namespace, label_selector=selector, field_selector=field_selector
        )
        return list(res.to_dict().get("items") or [])

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return dict(self.resource(kind).get(name=name, namespace=namespace).to_dict())

    def apply(self, manifest: str, namespace: str | None = None) -> None:
        """Server-side apply of every document in a YAML/JSON manifest."""
        for doc in yaml.safe_load_all(manifest):
            if not doc:
                continue
            res = self.resource(doc["kind"], doc["apiVersion"])
            res.server_side_apply(
                body=doc,
                name=doc["metadata"]["name"],
                namespace=namespace if res.namespaced else None,
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )

    def patch(
        self, kind: str, name: str, body: dict[str, Any], namespace: str | None = None
    ) -> None:
        self.resource(kind).patch(
            name=name, namespace=namespace, body=body, content_type="application/merge-patch+json"
        )

    def label(self, kind: str, name: str, labels: dict[str, str]) -> None:
        self.patch(kind, name, {"metadata": {"labels": labels}})

    def delete(
        self, kind: str, name: str, namespace: str | None = None, grace: int | None = None
    ) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {"gracePeriodSeconds": grace} if grace is not None else None
        try:
            self.resource(kind).delete(name=name, namespace=namespace, body=body)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def recreate_namespace(self, ns: str, timeout: float = 300) -> None:
        self.delete("namespaces", ns)
        self.watch_until(
            f"namespace {ns} gone",
            lambda c: not c["namespaces"],
            [("namespaces", None, f"metadata.name={ns}")],
            timeout=timeout,
            check_pods=False,
        )
        from kubernetes.client.exceptions import ApiException

        try:
            self.resource("namespaces").create(body={"metadata": {"name": ns}})
        except ApiException as exc:
            if exc.status != 409:  # 409: a resent create found the one just made
                raise

    def restart(self, kind: str, name: str, namespace: str) -> None:
        """What `kubectl rollout restart` does: a new pod-template annotation."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ann = {"kubectl.kubernetes.io/restartedAt": now}
        self.patch(
            kind, name, {"spec": {"template": {"metadata": {"annotations": ann}}}}, namespace
        )

    def exec(self, namespace: str, pod: str, command: list[str], timeout: float = 180) -> str:
        """Run command in the pod's first container; its stdout (stderr in the error)."""
        ws = stream(
            self.core.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            command=command,
            stdin=False,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
        )
        out, err = [], []
        deadline = time.monotonic() + timeout
        while ws.is_open():
            ws.update(timeout=1)
            out.append(ws.read_stdout(timeout=0))
            err.append(ws.read_stderr(timeout=0))
            if time.monotonic() > deadline:
                ws.close()
                raise TimeoutError(f"exec {command[:2]} in {pod} took over {timeout:.0f}s")
        out.append(ws.read_stdout(timeout=0))
        err.append(ws.read_stderr(timeout=0))
        status = ws.read_channel(3, timeout=0)  # the error channel: a v1.Status
        ws.close()
        if status and json.loads(status).get("status") != "Success":
            raise RuntimeError(f"exec in {pod} failed: {status}\n{''.join(err)[-3000:]}")
        return "".join(out)

    def labelled_objects(self, selector: str) -> list[str]:
        """Kind/namespace/name of every listable object carrying the label selector.  Only an
        unavailable aggregated API (503) is passed over; any other error fails the caller."""
        from kubernetes.client.exceptions import ApiException

        skip = {"events", "componentstatuses", "bindings"}
        found, listed_kinds = [], 0
        for res in self.dyn.resources.search():
            name = getattr(res, "name", None) or ""
            if (
                isinstance(res, ResourceList)  # the *List kinds discovery also reports
                or not name
                or name in skip
                or "/" in name
                or "list" not in (getattr(res, "verbs", None) or [])
                or getattr(res, "preferred", True) is False
            ):
                continue
            try:
                items = res.get(label_selector=selector).to_dict().get("items") or []
            except ApiException as exc:
                if exc.status == 503:
                    continue
                raise
            listed_kinds += 1
            for o in items:
                m = o["metadata"]
                found.append(f"{res.kind}/{m.get('namespace', '')}/{m['name']}")
        assert listed_kinds >= 20, f"only {listed_kinds} kinds listed: discovery is broken"
        return sorted(set(found))

    # ------------------------------------------------------------------ waiting
    def watch_until(
        self,
        what: str,
        cond: Callable[[dict[str, dict[str, dict[str, Any]]]], Any],
        sources: Iterable[tuple[str, str | None, str | None]],
        timeout: float = 180,
        report_every: float = 15,
        check_pods: bool = True,
        then: Callable[[], None] | None = None,
    ) -> Any:
        """Stream the (kind, namespace, field_selector) sources into a cache and return the
        first truthy cond(cache), where cache[kind] maps namespace/name to the object dict.
        With check_pods (needs a "pods" source) a broken pod fails the wait at once.  then()
        runs once every source is listed and watched, so no event it causes is missed."""
        sources = list(sources)
        events: queue.Queue[tuple[str, str, dict[str, Any]] | BaseException] = queue.Queue()
        stop = threading.Event()
        cache: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind, _, _ in sources}
        listed = threading.Semaphore(0)
        threads = [
            threading.Thread(target=self._pump, args=(src, events, stop, listed), daemon=True)
            for src in sources
        ]
        for t in threads:
            t.start()
        # the condition sees a complete first snapshot of every source, never a partial list
        for _ in sources:
            if not listed.acquire(timeout=60):
                stop.set()
                raise TimeoutError(f"could not list {sources} for {what}")
        if then is not None:
            then()
        start = last = time.monotonic()
        unschedulable: dict[str, float] = {}
        try:
            while True:
                try:
                    ev = events.get(timeout=1.0)
                    batch = [ev]
                    while not events.empty():
                        batch.append(events.get_nowait())
                except queue.Empty:
                    batch = []
                for ev in batch:
                    if isinstance(ev, BaseException):
                        raise ev
                    kind, etype, obj = ev
                    m = obj["metadata"]
                    key = f"{m.get('namespace', '')}/{m['name']}"
                    if etype == "DELETED":
                        cache[kind].pop(key, None)
                    else:
                        cache[kind][key] = obj
                if check_pods and "pods" in cache:
                    self._fail_if_broken(what, cache["pods"], unschedulable)
                res = cond(cache)
                if res:
                    return res
                now = time.monotonic()
                if now - start > timeout:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
                if now - last >= report_every:
                    self.progress(f"  ... still waiting for {what} ({now - start:.0f}s)")
                    last = now
        finally:
            stop.set()

    def _pump(
        self,
        src: tuple[str, str | None, str | None],
        events: queue.Queue[Any],
        stop: threading.Event,
        listed: threading.Semaphore,
    ) -> None:
        """Watch one kind (list + watch, re-watch on expiry) until stop is set; release
        `listed` once after the first list."""
        kind, namespace, field_selector = src
        res = self.resource(kind)
        first = True
        while not stop.is_set():
            try:
                items = res.get(namespace=namespace, field_selector=field_selector).to_dict()
                for o in items.get("items") or []:
                    events.put((kind, "ADDED", o))
                rv = items["metadata"]["resourceVersion"]
                if first:
                    listed.release()
                    first = False
                w = watch.Watch()
                for e in w.stream(
                    self._list_fn(kind, namespace),
                    resource_version=rv,
                    field_selector=field_selector or "",
                    timeout_seconds=30,
                ):
                    events.put((kind, e["type"], e["raw_object"]))
                    if stop.is_set():
                        w.stop()
                        break
            except Exception as exc:  # noqa: BLE001 - 410 Gone etc.: list again
                if stop.is_set():
                    return
                if getattr(exc, "status", None) not in (410, None):
                    events.put(exc)
                    if first:
                        listed.release()  # the waiter takes the exception from the queue
                    return
                time.sleep(0.5)

    def _list_fn(self, kind: str, namespace: str | None) -> Callable[..., Any]:
        apps = client.AppsV1Api(self.api)
        policy = client.PolicyV1Api(self.api)
        fns: dict[str, tuple[Any, Any]] = {
            "pods": (self.core.list_namespaced_pod, self.core.list_pod_for_all_namespaces),
            "nodes": (None, self.core.list_node),
            "namespaces": (None, self.core.list_namespace),
            "services": (
                self.core.list_namespaced_service,
                self.core.list_service_for_all_namespaces,
            ),
            "deployments": (
                apps.list_namespaced_deployment,
                apps.list_deployment_for_all_namespaces,
            ),
            "daemonsets": (
                apps.list_namespaced_daemon_set,
                apps.list_daemon_set_for_all_namespaces,
            ),
            "poddisruptionbudgets": (
                policy.list_namespaced_pod_disruption_budget,
                policy.list_pod_disruption_budget_for_all_namespaces,
            ),
        }
        ns_fn, all_fn = fns[kind]
        if namespace and ns_fn is not None:
            return lambda **kw: ns_fn(namespace, **kw)
        return all_fn  # type: ignore[no-any-return]

    def _fail_if_broken(
        self, what: str, pods: dict[str, dict[str, Any]], unschedulable: dict[str, float]
    ) -> None:
        for key, pod in pods.items():
            why = pod_broken(pod)
            if why is None and _unschedulable(pod):
                first = unschedulable.setdefault(key, time.monotonic())
                if time.monotonic() - first > UNSCHEDULABLE_GRACE:
                    why = f"unschedulable for {UNSCHEDULABLE_GRACE:.0f}s"
            if why:
                ns, name = key.split("/", 1)
                raise BrokenObject(
                    f"while waiting for {what}: pod {key} is broken: {why}\n"
                    f"events of pod {name}:\n{self.events(ns, name)}"
                )

    def events(self, namespace: str, name: str | None = None) -> str:
        sel = f"involvedObject.name={name}" if name else None
        evs = self.items("events", namespace, field_selector=sel)
        evs.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return "\n".join(
            f"  {e.get('type', '')} {e.get('reason', '')} "
            f"{e['involvedObject'].get('kind', '')}/{e['involvedObject'].get('name', '')}: "
            f"{(e.get('message') or '').strip()}"
            for e in evs[-40:]
        )

    def wait_rollout(self, namespace: str, timeout: float = 300) -> None:
        """Every Deployment and DaemonSet in namespace rolled out for its current generation
        (rolled_out()), and no pod of the namespace broken on the way."""

        def done(c: dict[str, dict[str, dict[str, Any]]]) -> bool:
            deps, dss = c["deployments"].values(), c["daemonsets"].values()
            return bool(deps or dss) and all(
                [rolled_out(w, "Deployment") for w in deps]
                + [rolled_out(w, "DaemonSet") for w in dss]
            )

        self.watch_until(
            f"rollout in {namespace}",
            done,
            [
                ("deployments", namespace, None),
                ("daemonsets", namespace, None),
                ("pods", namespace, None),
            ],
            timeout=timeout,
        )

    def logs(self, namespace: str, pod: dict[str, Any], tail: int = 40) -> str:
        parts = []
        for c in pod["spec"].get("containers", []):
            try:
                parts.append(
                    self.core.read_namespaced_pod_log(
                        pod["metadata"]["name"], namespace, container=c["name"], tail_lines=tail
                    )
                )
            except Exception as exc:  # noqa: BLE001 - diagnostics only
                parts.append(f"(no logs of {c['name']}: {exc})")
        return "\n".join(parts)

    def describe_failure(self, namespace: str) -> str:
        """Workloads, pods, events and recent logs of not-ready pods, for a failure message."""
        lines = []
        for kind in ("deployments", "daemonsets"):
            for w in self.items(kind, namespace):
                lines.append(f"{kind} {w['metadata']['name']}: status {w.get('status', {})}")
        pods = self.items("pods", namespace)
        for p in pods:
            lines.append(
                f"pod {p['metadata']['name']} on {p['spec'].get('nodeName')}: "
                f"{p.get('status', {}).get('phase')} ready={pod_ready(p)} {pod_broken(p) or ''}"
            )
        lines.append("events:\n" + self.events(namespace))
        for p in pods:
            if not pod_ready(p) and not str(p["spec"].get("nodeName", "")).startswith("kwok-"):
                lines.append(f"--- logs {p['metadata']['name']}\n" + self.logs(namespace, p))
        return "\n".join(lines)


def poll_until(what: str, cond: Callable[[], Any], timeout: float = 60) -> Any:
    """For conditions outside the API (a port answering): poll cond() every second."""
    start = time.monotonic()
    while True:
        res = cond()
        if res:
            return res
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1)


def rolled_out(w: dict[str, Any], kind: str) -> bool:
    """The workload's controller has seen its current generation and every pod of it is
    updated and ready.  DaemonSet: updatedNumberScheduled == numberReady ==
    desiredNumberScheduled (and none unavailable); Deployment: updated == ready == available
    == replicas == spec.replicas."""
    st = w.get("status") or {}
    if st.get("observedGeneration", 0) < w["metadata"].get("generation", 0):
        return False
    if kind == "DaemonSet":
        want = st.get("desiredNumberScheduled", 0)
        return (
            st.get("updatedNumberScheduled", 0) == want
            and st.get("numberReady", 0) == want
            and not st.get("numberUnavailable", 0)
        )
    want = w["spec"].get("replicas", 1)
    return all(
        st.get(k, 0) == want
        for k in ("updatedReplicas", "readyReplicas", "availableReplicas", "replicas")
    )


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return bool(c["status"] == "True")
    return False


def pod_broken(pod: dict[str, Any]) -> str | None:
    """Why the pod will not become ready by waiting, or None."""
    st = pod.get("status") or {}
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BROKEN_REASONS:
            return f"container {cs['name']}: {waiting['reason']}: {waiting.get('message', '')}"
    return None


def _unschedulable(pod: dict[str, Any]) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c["type"] == "PodScheduled" and c["status"] == "False":
            return c.get("reason") == "Unschedulable"
    return False


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
    node: dict[str, Any], node_selector: dict[str, str], tolerations: list[dict[str, Any]]
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


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
