"""Every values profile of the chart, installed on a real cluster and checked from outside.

For each profile (module-scoped fixture `release`, one profile installed at a time because
host ports are exclusive): helm install, rollout with probes on /_gwhealthz, objects the
mode dictates (workload kind, Service, PDB), host ports from outside the pod (HTTP, HTTPS,
QUIC/HTTP/3 with Alt-Svc), HTTP/3 through the Service, the WAF blocking an SQL injection and
passing a benign request to a backend, DaemonSet placement on labelled/tainted (kwok) nodes,
the DaemonSet rolling update honouring maxUnavailable, helm test, and helm uninstall leaving
nothing behind.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import _probe, conftest
from ._cluster import CACHE, Provider, select
from ._kube import BrokenObject, Kube, node_selected, pod_ready, poll_until, rolled_out
from .conftest import ROOT, progress

CHART = ROOT / "charts" / "quic-proxy-waf"

if conftest._config is not None and conftest._config.getoption("--cluster") == "auto":
    _auto, _why = select("auto")
    if _auto is None:  # one line saying what to install, instead of one per test
        pytest.skip(_why, allow_module_level=True)
PROBE_SRC = (Path(__file__).parent / "_probe.py").read_text()
SERVICEMONITOR_CRD = """
# The Prometheus Operator's ServiceMonitor kind, without its schema: enough for the
# chart's ServiceMonitor to be stored and read back (no operator runs here).
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors,
          singular: servicemonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""


@dataclass
class Profile:
    name: str
    files: list[str]
    kind: str  # Deployment | DaemonSet
    service: bool  # proxy Service rendered
    pdb: bool  # proxy PodDisruptionBudget rendered
    waf: bool  # WAF service deployed and used
    host_ports: tuple[int, int] | None = None  # (http, https) on the node
    service_ports: tuple[int, int] = (80, 443)
    set_values: dict[str, Any] = field(default_factory=dict)
    metrics: bool = False  # ServiceMonitor + metrics Service on (a minimal CRD is applied)


PROFILES = [
    Profile("default", [], "Deployment", service=True, pdb=True, waf=True, metrics=True),
    Profile(
        "daemonset",
        ["charts/quic-proxy-waf/values-daemonset.yaml"],
        "DaemonSet",
        service=False,
        pdb=False,
        waf=True,
        host_ports=(80, 443),
        metrics=True,
    ),
    Profile(
        "daemonset-no-hostports",
        ["examples/values/daemonset-no-hostports.yaml"],
        "DaemonSet",
        service=True,
        pdb=False,
        waf=True,
    ),
    Profile(
        "daemonset-edge-complete",
        ["examples/values/daemonset-edge-complete.yaml"],
        "DaemonSet",
        service=False,
        pdb=False,
        waf=True,
        host_ports=(80, 443),
    ),
    Profile(
        "daemonset-surge",  # the edge example rolled with a surge (host network)
        ["examples/values/daemonset-edge-complete.yaml"],
        "DaemonSet",
        service=False,
        pdb=False,
        waf=True,
        host_ports=(80, 443),
        set_values={"daemonset": {"surge": True}},
    ),
    Profile(
        "custom-ports",
        ["examples/values/custom-ports.yaml"],
        "DaemonSet",
        service=False,
        pdb=False,
        waf=True,
        host_ports=(8080, 8443),
    ),
    Profile(
        "waf-disabled",
        ["examples/values/waf-disabled.yaml"],
        "Deployment",
        service=True,
        pdb=True,
        waf=False,
    ),
]

SQLI_PATH = "/search?id=1%27%20OR%20%271%27%3D%271%27%20UNION%20SELECT%20password%20FROM%20users--"
BENIGN_PATH = "/hello?name=conformance"
BACKEND_MARK = "quicproxy-conformance-backend"

BACKEND = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: backend, labels: {app: conformance-backend}}
spec:
  replicas: 1
  selector: {matchLabels: {app: conformance-backend}}
  template:
    metadata: {labels: {app: conformance-backend}}
    spec:
      terminationGracePeriodSeconds: 1
      automountServiceAccountToken: false
      containers:
      - name: backend
        image: IMAGE
        imagePullPolicy: PULL
        command: ["python3", "-c"]
        args:
        - |
          import http.server, json
          class H(http.server.BaseHTTPRequestHandler):
              def reply(self):
                  n = int(self.headers.get("content-length") or 0)
                  if n: self.rfile.read(n)
                  body = json.dumps({"mark": "MARK", "method": self.command,
                                     "path": self.path}).encode()
                  self.send_response(200)
                  self.send_header("content-type", "application/json")
                  self.send_header("content-length", str(len(body)))
                  self.end_headers()
                  self.wfile.write(body)
              do_GET = do_POST = do_HEAD = reply
              def log_message(self, *a): pass
          http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
        ports: [{containerPort: 8080, name: http}]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 2}
---
apiVersion: v1
kind: Service
metadata: {name: backend}
spec:
  selector: {app: conformance-backend}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: conformance-client}}
spec:
  terminationGracePeriodSeconds: 1
  automountServiceAccountToken: false
  containers:
  - name: client
    image: IMAGE
    imagePullPolicy: PULL
    command: ["python3", "-c", "import time; time.sleep(10**9)"]
"""

FAKE_NODES = [
    # name, labels, taints; all cordoned so only DaemonSet pods land there, and kwok-managed
    ("kwok-edge-a", {"node-role.kubernetes.io/edge": "true"}, []),
    (
        "kwok-edge-tainted-tolerated",
        {"node-role.kubernetes.io/edge": "true"},
        [{"key": "edge-taint", "value": "true", "effect": "NoSchedule"}],
    ),
    ("kwok-plain", {}, []),
    (
        "kwok-untolerated",
        {"node-role.kubernetes.io/edge": "true"},
        [{"key": "quicproxy.io/untolerated", "value": "true", "effect": "NoSchedule"}],
    ),
]


def selected_profiles(config: pytest.Config) -> list[Profile]:
    wanted = [p.strip() for p in str(config.getoption("--profile") or "").split(",") if p.strip()]
    unknown = set(wanted) - {p.name for p in PROFILES}
    if unknown:
        raise pytest.UsageError(
            f"unknown profile(s) {sorted(unknown)}; known: " + ", ".join(p.name for p in PROFILES)
        )
    return [p for p in PROFILES if not wanted or p.name in wanted]


def applies(cond: Callable[[Profile], bool]) -> Callable[[Any], Any]:
    """Generate the check only for the profiles cond() accepts (no test that only skips)."""

    def mark(fn: Any) -> Any:
        fn.applies = cond
        return fn

    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "profile" in metafunc.fixturenames:
        cond = getattr(metafunc.function, "applies", lambda p: True)
        profs = [p for p in selected_profiles(metafunc.config) if cond(p)]
        metafunc.parametrize("profile", profs, ids=[p.name for p in profs], scope="module")


class Release:
    def __init__(self, kube: Kube, provider: Provider, profile: Profile, image: str) -> None:
        self.kube, self.provider, self.profile, self.image = kube, provider, profile, image
        self.ns = f"qpc-{profile.name}"[:63]
        self.name = "qp"
        self.installed = False
        self.fake_nodes: list[str] = []
        registry, _, rest = image.rpartition("/")
        self.repository, _, self.tag = rest.partition(":")
        self.registry = registry
        # existing: whatever the cluster can get; kind: the README steps (kind load, IfNotPresent)
        self.pull = "IfNotPresent" if provider.name in ("existing", "kind") else "Never"
        self.values: dict[str, Any] = {}
        self._selector: dict[str, str] = {}
        self.broken = ""  # set when the install did not roll out: later checks fail fast

    def need_rollout(self) -> None:
        if self.broken:
            pytest.fail(f"not checked: {self.broken}", pytrace=False)

    # ---------------------------------------------------------------- helpers
    def label(self) -> str:
        return f"app.kubernetes.io/instance={self.name}"

    def overrides(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "global": {"registry": self.registry, "tag": self.tag, "imagePullPolicy": self.pull},
            "proxy": {
                "image": {"repository": self.repository},
                "backend": {"host": f"backend.{self.ns}.svc.cluster.local", "port": 8080},
            },
            "waf": {"image": {"repository": self.repository}},
        }
        if self.profile.metrics:
            values["metrics"] = {"serviceMonitor": {"enabled": True}}
        for key, value in self.profile.set_values.items():  # the profile's own, on top
            values[key] = {**values.get(key, {}), **value}
        return values

    def merged_values(self) -> dict[str, Any]:
        """The profile's values as helm computes them (for expectations)."""
        out = self.kube.helm(
            "get", "values", self.name, "-n", self.ns, "--all", "-o", "json"
        ).stdout
        return dict(json.loads(out))

    def workload(self) -> dict[str, Any]:
        kind = "daemonsets" if self.profile.kind == "DaemonSet" else "deployments"
        items = [
            w
            for w in self.kube.items(kind, self.ns, self.label())
            if w["metadata"]["labels"].get("app.kubernetes.io/component") != "waf"
        ]
        assert len(items) == 1, (
            f"expected one proxy {self.profile.kind}, got {[i['metadata']['name'] for i in items]}"
        )
        return items[0]

    def selector(self) -> dict[str, str]:
        if not self._selector:
            self._selector = dict(self.workload()["spec"]["selector"]["matchLabels"])
        return self._selector

    def proxy_pods(self) -> list[dict[str, Any]]:
        sel = self.workload()["spec"]["selector"]["matchLabels"]
        return self.kube.items("pods", self.ns, ",".join(f"{k}={v}" for k, v in sel.items()))

    def wait_waf_service(self) -> None:
        """The proxies reach the WAF through its Service; kube-proxy programs a new Service
        a moment after its pods are Ready, and until then the proxy fails closed (503)."""
        svc = next(
            s
            for s in self.kube.items("services", self.ns, self.label())
            if s["metadata"]["labels"].get("app.kubernetes.io/component") == "waf"
        )
        name = f"{svc['metadata']['name']}.{self.ns}.svc.cluster.local"
        port = svc["spec"]["ports"][0]["port"]
        spec = {"proto": "http", "host": name, "port": port, "path": "/health", "retry": 60}
        res = self.probe_in_cluster([spec])
        if not (res[0]["ok"] and res[0]["status"] == 200):
            raise TimeoutError(f"WAF service {name}:{port} not reachable from a pod: {res[0]}")

    def probe_in_cluster(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = self.kube.exec(self.ns, "client", ["python3", "-c", PROBE_SRC, json.dumps(specs)])
        return list(json.loads(out.strip().splitlines()[-1]))

    def real_nodes(self) -> list[dict[str, Any]]:
        return [
            n
            for n in self.kube.items("nodes")
            if n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") != "fake"
        ]

    def node_ip(self, node: dict[str, Any]) -> str:
        for a in node["status"].get("addresses", []):
            if a["type"] == "InternalIP":
                return str(a["address"])
        raise AssertionError(f"node {node['metadata']['name']} has no InternalIP")

    # ---------------------------------------------------------------- lifecycle
    def prepare(self) -> None:
        k = self.kube
        k.recreate_namespace(self.ns)  # stale pooled connections: the client retries (_kube)
        if self.profile.metrics:
            k.apply(SERVICEMONITOR_CRD)
        k.apply(
            BACKEND.replace("IMAGE", self.image)
            .replace("PULL", self.pull)
            .replace("MARK", BACKEND_MARK),
            self.ns,
        )

    def install(self) -> None:
        ov = CACHE / "conformance" / f"{self.profile.name}-overrides.yaml"
        ov.parent.mkdir(parents=True, exist_ok=True)
        ov.write_text(yaml.safe_dump(self.overrides()))
        args = ["install", self.name, str(CHART), "-n", self.ns]
        for f in self.profile.files:
            args += ["-f", str(ROOT / f)]
        args += ["-f", str(ov), "--timeout", "5m"]
        progress(
            f"[{self.profile.name}] helm install ({', '.join(self.profile.files) or 'values.yaml'})"
        )
        self.kube.helm(*args)
        self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self.kube.helm(
                "uninstall", self.name, "-n", self.ns, "--wait", "--timeout", "5m", check=False
            )
            self.installed = False

    def delete_fake_nodes(self) -> None:
        """Delete the kwok nodes and their pods (no kubelet will ever confirm those pods gone,
        and the pod garbage collector only reaps them after its quarantine)."""
        for n in self.fake_nodes:
            self.kube.delete("nodes", n)
        for n in self.fake_nodes:
            for p in self.kube.items("pods", field_selector=f"spec.nodeName={n}"):
                m = p["metadata"]
                self.kube.delete("pods", m["name"], m["namespace"], grace=0)
        self.fake_nodes = []


@pytest.fixture(scope="module")
def release(profile: Profile, kube: Kube, provider: Provider, image: str) -> Iterator[Release]:
    rel = Release(kube, provider, profile, image)
    t = time.monotonic()
    progress(f"[{profile.name}] preparing namespace {rel.ns} (backend, client pod)")
    rel.prepare()
    try:
        rel.install()
    except RuntimeError as exc:
        progress(f"[{profile.name}] helm install FAILED: {str(exc)[-1500:]}")
    yield rel
    rel.delete_fake_nodes()
    rel.uninstall()
    kube.delete("namespaces", rel.ns)
    progress(f"[{profile.name}] done ({time.monotonic() - t:.0f}s)")


# ====================================================================== checks
def test_install_and_rollout(release: Release, kube_cluster: Any) -> None:
    """helm install succeeded; every workload rolls out and its pods are Ready. The pods
    are seen the same through pytest-helm-charts' ``kube_cluster`` (its pykube client)."""
    t = time.monotonic()
    release.broken = f"profile {release.profile.name} did not roll out"
    if not release.installed:
        pytest.fail("helm install failed", pytrace=False)
    try:
        release.kube.wait_rollout(release.ns, timeout=300)
        release.kube.watch_until(
            "client pod Ready",
            lambda c: pod_ready(c["pods"].get(f"{release.ns}/client", {"metadata": {}})),
            [("pods", release.ns, "metadata.name=client")],
            timeout=120,
        )
        if release.profile.waf:
            release.wait_waf_service()
    except (TimeoutError, BrokenObject) as exc:
        pytest.fail(f"{exc}\n{release.kube.describe_failure(release.ns)}")
    pods = release.proxy_pods()
    assert pods and all(pod_ready(p) for p in pods)
    import pykube

    seen = {
        p.name
        for p in pykube.Pod.objects(kube_cluster.kube_client, namespace=release.ns).filter(
            selector=release.label()
        )
    }
    assert {p["metadata"]["name"] for p in pods} <= seen, seen
    release.broken = ""
    progress(
        f"[{release.profile.name}] rolled out: {len(pods)} proxy pod(s) Ready "
        f"({time.monotonic() - t:.0f}s)"
    )


def test_probes_on_gwhealthz(release: Release) -> None:
    """Liveness and readiness probes GET /_gwhealthz, and they pass (pods Ready, no restarts)."""
    release.need_rollout()
    w = release.workload()
    c = next(c for c in w["spec"]["template"]["spec"]["containers"] if c["name"] == "proxy")
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/_gwhealthz", probe
    for p in release.proxy_pods():
        assert pod_ready(p), p["metadata"]["name"]
        for cs in p["status"].get("containerStatuses", []):
            assert cs["restartCount"] == 0, f"{p['metadata']['name']} restarted: {cs}"


def test_objects_match_mode(release: Release) -> None:
    """Workload kind, proxy Service and PDBs present/absent exactly as the mode dictates."""
    release.need_rollout()
    prof, k = release.profile, release.kube
    release.workload()  # exactly one proxy workload of the profile's kind
    other = "deployments" if prof.kind == "DaemonSet" else "daemonsets"
    assert not [
        w
        for w in k.items(other, release.ns, release.label())
        if w["metadata"]["labels"].get("app.kubernetes.io/component") != "waf"
    ]
    svcs = {s["metadata"]["name"]: s for s in k.items("services", release.ns, release.label())}
    proxy_svcs = [
        s
        for s in svcs.values()
        if s["metadata"]["labels"].get("app.kubernetes.io/component") not in ("waf", "metrics")
        and s["spec"].get("clusterIP") != "None"
    ]
    assert bool(proxy_svcs) == prof.service, f"proxy Service expected={prof.service}: {list(svcs)}"
    if prof.service:
        ports = {(p["port"], p["protocol"]) for p in proxy_svcs[0]["spec"]["ports"]}
        http, https = prof.service_ports
        assert {(http, "TCP"), (https, "TCP"), (https, "UDP")} <= ports, ports
    pdbs = k.items("poddisruptionbudgets", release.ns, release.label())
    proxy_pdbs = [
        p for p in pdbs if p["metadata"]["labels"].get("app.kubernetes.io/component") != "waf"
    ]
    waf_pdbs = [
        p for p in pdbs if p["metadata"]["labels"].get("app.kubernetes.io/component") == "waf"
    ]
    assert bool(proxy_pdbs) == prof.pdb, (
        f"proxy PDB expected={prof.pdb}: {[p['metadata']['name'] for p in pdbs]}"
    )
    assert bool(waf_pdbs) == (prof.waf and prof.kind == "Deployment"), (
        f"WAF PDB: {[p['metadata']['name'] for p in pdbs]}"
    )
    waf_deps = [
        d
        for d in k.items("deployments", release.ns, release.label())
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "waf"
    ]
    assert bool(waf_deps) == prof.waf, "WAF Deployment presence"
    for pdb in proxy_pdbs + waf_pdbs:  # never blocks every eviction
        st = pdb.get("status", {})
        if st.get("expectedPods", 0) > 0:
            name = pdb["metadata"]["name"]
            k.watch_until(
                f"PDB {name} allows a disruption",
                lambda c, key=f"{release.ns}/{name}": (
                    (c["poddisruptionbudgets"].get(key, {}).get("status") or {}).get(
                        "disruptionsAllowed", 0
                    )
                    >= 1
                ),
                [("poddisruptionbudgets", release.ns, f"metadata.name={name}")],
                timeout=60,
            )


@applies(lambda p: p.host_ports is not None)
def test_host_ports(release: Release) -> None:
    """From outside the pod, each node answers on its host ports: HTTP, HTTPS, and QUIC
    (ALPN h3, HTTP/3 GET); Alt-Svc advertises the reachable port; /_gwhealthz is 200 OK."""
    release.need_rollout()
    prof = release.profile
    assert prof.host_ports
    http, https = prof.host_ports
    nodes = [
        n
        for n in release.real_nodes()
        if any(p["spec"].get("nodeName") == n["metadata"]["name"] for p in release.proxy_pods())
    ]
    assert nodes, "no real node runs a proxy pod"
    for node in nodes:
        addr = release.provider.host_port_address(release.node_ip(node))
        progress(
            f"[{prof.name}] host ports on {node['metadata']['name']} ({addr}): "
            f"tcp/{http} tcp/{https} udp/{https}"
        )
        r1 = _probe.request_retry(
            {"proto": "http", "host": addr, "port": http, "path": "/_gwhealthz"}
        )
        assert (r1.status, r1.body.strip()) == (200, b"OK"), (r1.status, r1.body)
        r2 = _probe.request_retry(
            {"proto": "https", "host": addr, "port": https, "path": "/_gwhealthz"}
        )
        assert (r2.status, r2.body.strip()) == (200, b"OK"), (r2.status, r2.body)
        r3 = _probe.request_retry(
            {"proto": "h3", "host": addr, "port": https, "path": "/_gwhealthz"}
        )
        assert r3.alpn == "h3", r3.alpn
        assert (r3.status, r3.body.strip()) == (200, b"OK"), (r3.status, r3.body)
        for r in (r1, r2, r3):
            alt = r.header("alt-svc") or ""
            m = re.search(r'h3="[^"]*:(\d+)"', alt)
            assert m and int(m.group(1)) == https, (
                f"Alt-Svc {alt!r} should advertise h3 on :{https}"
            )
        # the page through the proxy over HTTP/3 reaches the backend
        r4 = _probe.request_retry({"proto": "h3", "host": addr, "port": https, "path": BENIGN_PATH})
        assert r4.status == 200 and BACKEND_MARK.encode() in r4.body, (r4.status, r4.body[:300])


@applies(lambda p: p.service)
def test_service_http3(release: Release) -> None:
    """With a Service, HTTP/3 (and HTTP/1.1, HTTPS) reach the pods through it."""
    release.need_rollout()
    prof = release.profile
    svc = next(
        s
        for s in release.kube.items("services", release.ns, release.label())
        if s["metadata"]["labels"].get("app.kubernetes.io/component") not in ("waf", "metrics")
        and s["spec"].get("clusterIP") != "None"
    )
    name = f"{svc['metadata']['name']}.{release.ns}.svc.cluster.local"
    http, https = prof.service_ports
    progress(
        f"[{prof.name}] HTTP/3 through Service {svc['metadata']['name']} "
        f"({svc['spec']['clusterIP']}) from a pod"
    )
    res = release.probe_in_cluster(
        [
            {"proto": "h3", "host": name, "port": https, "path": "/_gwhealthz", "retry": 30},
            {
                "proto": "h3",
                "host": svc["spec"]["clusterIP"],
                "port": https,
                "path": BENIGN_PATH,
                "retry": 30,
            },
            {"proto": "http", "host": name, "port": http, "path": "/_gwhealthz", "retry": 30},
            {"proto": "https", "host": name, "port": https, "path": "/_gwhealthz", "retry": 30},
        ]
    )
    for r in res:
        assert r["ok"], r
    assert res[0]["alpn"] == "h3" and res[0]["status"] == 200 and res[0]["body"].strip() == "OK", (
        res[0]
    )
    assert res[1]["status"] == 200 and BACKEND_MARK in res[1]["body"], res[1]
    assert res[2]["status"] == 200 and res[3]["status"] == 200, res[2:]
    for r in (res[0], res[3]):  # Alt-Svc advertises the Service's HTTP/3 port
        alt = dict((k.lower(), v) for k, v in r["headers"]).get("alt-svc", "")
        m = re.search(r'h3="[^"]*:(\d+)"', alt)
        assert m and int(m.group(1)) == https, f"Alt-Svc {alt!r} should advertise h3 on :{https}"


def test_waf(release: Release) -> None:
    """waf.enabled: an SQL injection is blocked by the WAF service, a benign request reaches
    the backend.  WAF disabled: both reach the backend and no WAF runs."""
    release.need_rollout()
    prof = release.profile
    specs = []
    if prof.host_ports:
        addr = release.provider.host_port_address(release.node_ip(release.real_nodes()[0]))
        http, https = prof.host_ports
        where = f"node host ports ({addr})"
        run = lambda s: [_probe_local(x) for x in s]  # noqa: E731
    else:
        svc = next(
            s
            for s in release.kube.items("services", release.ns, release.label())
            if s["metadata"]["labels"].get("app.kubernetes.io/component") not in ("waf", "metrics")
            and s["spec"].get("clusterIP") != "None"
        )
        addr = f"{svc['metadata']['name']}.{release.ns}.svc.cluster.local"
        http, https = prof.service_ports
        where = f"Service {addr}"
        run = release.probe_in_cluster
    for proto, port in (("h3", https), ("https", https)):  # plain http redirects to https
        specs.append({"proto": proto, "host": addr, "port": port, "path": SQLI_PATH, "retry": 20})
        specs.append({"proto": proto, "host": addr, "port": port, "path": BENIGN_PATH, "retry": 20})
    progress(f"[{prof.name}] WAF check through {where}")
    before = _waf_counters(release) if prof.waf else {}
    res = run(specs)
    for r in res:
        assert r["ok"], r
    sqli, benign = res[0::2], res[1::2]
    for r in benign:
        assert r["status"] == 200 and BACKEND_MARK in r["body"], r
    if prof.waf:
        for r in sqli:
            assert r["status"] == 403 and BACKEND_MARK not in r["body"], r
        # and it is the deployed WAF service that decided: its own counters moved
        after = _waf_counters(release)
        blocked = after["waf_requests_blocked_total"] - before["waf_requests_blocked_total"]
        evaluated = after["waf_requests_evaluated_total"] - before["waf_requests_evaluated_total"]
        assert blocked >= len(sqli), f"WAF service blocked {blocked}, expected >= {len(sqli)}"
        assert evaluated >= len(res), f"WAF service evaluated {evaluated} of {len(res)} requests"
    else:
        for r in sqli:
            assert r["status"] == 200 and BACKEND_MARK in r["body"], r


WAF_METRICS = (
    "import os, urllib.request; print(urllib.request.urlopen("
    "'http://127.0.0.1:%s/metrics' % os.environ.get('WAF_PORT', '9000'), timeout=10)"
    ".read().decode())"
)


def _waf_counters(release: Release) -> dict[str, float]:
    """Sum of the WAF service's counters over its pods (read inside each pod)."""
    totals = {"waf_requests_blocked_total": 0.0, "waf_requests_evaluated_total": 0.0}
    pods = [
        p
        for p in release.kube.items("pods", release.ns, release.label())
        if p["metadata"]["labels"].get("app.kubernetes.io/component") == "waf"
        and not p["metadata"].get("deletionTimestamp")
    ]
    assert pods, "no WAF service pods"
    port = str(release.merged_values().get("waf", {}).get("containerPort", 9000))
    for p in pods:
        out = release.kube.exec(
            release.ns,
            p["metadata"]["name"],
            ["env", f"WAF_PORT={port}", "python3", "-c", WAF_METRICS],
        )
        for line in out.splitlines():
            name, _, value = line.partition(" ")
            if name in totals:
                totals[name] += float(value)
    return totals


def _probe_local(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        r = _probe.request_retry(spec, float(spec.get("retry", 0)))
        return {
            "ok": True,
            "status": r.status,
            "headers": r.headers,
            "body": r.body.decode("utf-8", "replace"),
            "alpn": r.alpn,
        }
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _fake_node_ready(node: dict[str, Any]) -> bool:
    """Ready, and no longer tainted not-ready (the scheduler and _expected_nodes see the
    taint for a moment after the condition turns)."""
    conditions = (node.get("status") or {}).get("conditions", [])
    taints = (node.get("spec") or {}).get("taints") or []
    return any(x["type"] == "Ready" and x["status"] == "True" for x in conditions) and not any(
        t.get("key") == "node.kubernetes.io/not-ready" for t in taints
    )


def _expected_nodes(release: Release) -> set[str]:
    values = release.merged_values()
    sel = values.get("nodeSelector") or {}
    tol = values.get("tolerations") or []
    return {
        n["metadata"]["name"] for n in release.kube.items("nodes") if node_selected(n, sel, tol)
    }


def _ds_pods_by_node(
    release: Release, pods: Iterable[dict[str, Any]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Proxy pods per node name; from the given pods (a watch cache) or the API."""
    sel = release.selector() if pods is not None else {}
    if pods is None:
        pods = release.proxy_pods()
    out: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        labels = p["metadata"].get("labels") or {}
        if all(labels.get(k) == v for k, v in sel.items()):
            out.setdefault(p["spec"].get("nodeName") or "<unscheduled>", []).append(p)
    return out


@applies(lambda p: p.kind == "DaemonSet")
def test_daemonset_placement(release: Release) -> None:
    """Exactly one proxy pod per selected node; nodes without the selector label or with an
    untolerated taint get none (real node plus kwok fake nodes)."""
    release.need_rollout()
    prof, k = release.profile, release.kube
    if release.provider.supports_fake_nodes:
        for name, labels, taints in FAKE_NODES:
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {
                        "kwok.x-k8s.io/node": "fake",
                        "node.alpha.kubernetes.io/ttl": "0",
                    },
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        **labels,
                    },
                },
                "spec": {"unschedulable": True, "taints": taints},
                "status": {
                    "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                    "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                },
            }
            k.apply(json.dumps(node))
            release.fake_nodes.append(name)
        k.watch_until(  # Ready, and the not-ready taint the node controller set is gone
            "kwok nodes Ready",
            lambda c: all(
                _fake_node_ready(c["nodes"].get(f"/{n}", {})) for n in release.fake_nodes
            ),
            [("nodes", None, None)],
            timeout=60,
        )
    expected = _expected_nodes(release)
    progress(f"[{prof.name}] placement: expecting proxy pods on {sorted(expected)}")

    def placed(c: dict[str, dict[str, dict[str, Any]]]) -> bool:
        by_node = _ds_pods_by_node(release, c["pods"].values())
        return set(by_node) == expected and all(
            len(v) == 1 and pod_ready(v[0]) for v in by_node.values()
        )

    try:
        k.watch_until("DaemonSet placement", placed, [("pods", release.ns, None)], timeout=120)
    except TimeoutError:
        by_node = {
            n: [p["metadata"]["name"] for p in v] for n, v in _ds_pods_by_node(release).items()
        }
        pytest.fail(f"pods per node {by_node}, expected exactly one on each of {sorted(expected)}")
    if release.provider.supports_fake_nodes:
        got = set(_ds_pods_by_node(release))
        assert "kwok-untolerated" not in got
        assert ("kwok-plain" in got) == (not (release.merged_values().get("nodeSelector") or {}))


@applies(lambda p: p.kind == "DaemonSet")
def test_daemonset_rolling_update(release: Release) -> None:
    """A rolling update of the DaemonSet never has more than maxUnavailable nodes without a
    Ready proxy pod, and ends with every selected node on the new revision."""
    release.need_rollout()
    prof, k = release.profile, release.kube
    try:
        ds = release.workload()
        max_unavail = ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
        expected = _expected_nodes(release)
        if isinstance(max_unavail, str) and max_unavail.endswith("%"):
            import math

            max_unavail = max(1, math.floor(len(expected) * int(max_unavail[:-1]) / 100))
        old_gen = ds["metadata"]["generation"]
        progress(
            f"[{prof.name}] rolling update over {len(expected)} node(s), "
            f"maxUnavailable={max_unavail}"
        )
        name = ds["metadata"]["name"]
        worst = 0
        loop = _ClientLoop(release) if prof.host_ports else None

        def step(c: dict[str, dict[str, dict[str, Any]]]) -> bool:
            """Evaluated on every pod and DaemonSet event of the namespace."""
            nonlocal worst
            d = c["daemonsets"].get(f"{release.ns}/{name}")
            if d is None:
                return False
            st = d.get("status") or {}
            by_node = _ds_pods_by_node(release, c["pods"].values())
            ready_nodes = {n for n, ps in by_node.items() if any(pod_ready(p) for p in ps)}
            unavailable = len(expected - ready_nodes)
            worst = max(worst, unavailable, st.get("numberUnavailable", 0))
            assert worst <= max_unavail, (
                f"{worst} nodes without a Ready proxy (maxUnavailable {max_unavail})"
            )
            return (
                d["metadata"]["generation"] > old_gen
                and rolled_out(d, "DaemonSet")
                and st.get("desiredNumberScheduled", 0) == len(expected)
                and unavailable == 0
            )

        try:
            k.watch_until(
                f"rolling update of {name}",
                step,
                [("pods", release.ns, None), ("daemonsets", release.ns, f"metadata.name={name}")],
                timeout=300,
                then=lambda: k.restart("daemonsets", name, release.ns),
            )
        finally:
            counts = loop.stop() if loop else {}
        progress(f"[{prof.name}] rolling update done; worst unavailable {worst}")
        surge = ds["spec"]["updateStrategy"]["rollingUpdate"].get("maxSurge") or 0
        surge = f"maxSurge {surge}" if surge else "no surge"
        for addr, (ok, failed) in sorted(counts.items()):
            progress(
                f"[{prof.name}] client loop on {addr} through the update: {ok} answered, "
                f"{failed} failed (maxUnavailable {max_unavail}, {surge})"
            )
        assert all(ok for ok, _ in counts.values()), counts  # every node answered again
    finally:
        release.delete_fake_nodes()


class _ClientLoop:
    """GET /_gwhealthz on the HTTP host port of every node with a proxy pod, over and over,
    one thread per node, until stopped: answers and failures per node address (what a
    client of the fleet sees while the DaemonSet rolls)."""

    def __init__(self, release: Release) -> None:
        import threading

        assert release.profile.host_ports
        self.port = release.profile.host_ports[0]
        pods = release.proxy_pods()
        self.addrs = [
            release.provider.host_port_address(release.node_ip(n))
            for n in release.real_nodes()
            if any(p["spec"].get("nodeName") == n["metadata"]["name"] for p in pods)
        ]
        self.counts = {a: [0, 0] for a in self.addrs}
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(a,)) for a in self.addrs]
        for t in self.threads:
            t.start()

    def _run(self, addr: str) -> None:
        while not self.done.is_set():
            try:
                r = _probe.http_request(addr, self.port, "/_gwhealthz", timeout=2)
                self.counts[addr][0 if r.status == 200 else 1] += 1
            except (OSError, http.client.HTTPException):
                self.counts[addr][1] += 1
            self.done.wait(0.05)

    def stop(self) -> dict[str, tuple[int, int]]:
        self.done.set()
        for t in self.threads:
            t.join(5)
        return {a: (c[0], c[1]) for a, c in self.counts.items()}


@applies(lambda p: p.metrics)
def test_metrics_through_the_service_monitor(release: Release) -> None:
    """Prometheus' path: the ServiceMonitor selects the metrics Service, whose named port
    serves /metrics from every proxy pod (and the public ports do not)."""
    release.need_rollout()
    prof = release.profile
    monitors = release.kube.items("servicemonitors", release.ns, release.label())
    services = [  # the WAF service's own metrics Service carries the label too
        s
        for s in release.kube.items("services", release.ns, "quic-proxy-waf/metrics=true")
        if s["metadata"]["labels"].get("app.kubernetes.io/component") != "waf"
    ]
    assert monitors and len(services) == 1, (monitors, services)
    svc = services[0]
    labels = svc["metadata"]["labels"]
    port = next(p for p in svc["spec"]["ports"] if p["name"] == "metrics")
    proxy_monitor = next(
        m
        for m in monitors
        if all(labels.get(k) == v for k, v in m["spec"]["selector"]["matchLabels"].items())
    )
    assert any(e.get("port") == "metrics" for e in proxy_monitor["spec"]["endpoints"])
    name = f"{svc['metadata']['name']}.{release.ns}.svc.cluster.local"
    progress(f"[{prof.name}] scraping {name}:{port['port']}/metrics from a pod")
    pods = [p for p in release.proxy_pods() if not p["metadata"].get("deletionTimestamp")]
    targets = [p["status"]["podIP"] for p in pods] + [name]
    res = release.probe_in_cluster(
        [
            {"proto": "http", "host": host, "port": port["port"], "path": "/metrics", "retry": 30}
            for host in targets
        ]
    )
    for r in res:
        assert r["ok"] and r["status"] == 200, r
        assert "# TYPE quicproxy_requests_total counter" in r["body"], r["body"][:500]


def test_helm_test(release: Release) -> None:
    """`helm test` passes (on kind's host-network profiles too: its HTTP/3 GET from a pod to
    the node IP needs answers from the address it wrote to, IP_PKTINFO in the listener)."""
    release.need_rollout()
    progress(f"[{release.profile.name}] helm test")
    k = release.kube
    r = k.helm("test", release.name, "-n", release.ns, "--timeout", "3m", check=False)
    if r.returncode == 0:
        return
    # a failed test pod stays (hook-delete-policy hook-succeeded): keep its logs, remove it so
    # the uninstall check judges the release alone
    logs = []
    for p in k.items("pods", release.ns, "app.kubernetes.io/component=test"):
        logs.append(f"--- {p['metadata']['name']}\n{k.logs(release.ns, p)}")
        k.delete("pods", p["metadata"]["name"], release.ns, grace=0)
    pytest.fail(f"helm test failed:\n{r.stderr[-2000:]}\n" + "\n".join(logs), pytrace=False)


def test_uninstall_leaves_nothing(release: Release) -> None:
    """`helm uninstall` removes every object of the release, namespaced and cluster-wide,
    and frees the host ports."""
    k = release.kube
    release.delete_fake_nodes()
    progress(f"[{release.profile.name}] helm uninstall")
    r = k.helm(
        "uninstall", release.name, "-n", release.ns, "--wait", "--timeout", "5m", check=False
    )
    assert r.returncode == 0, r.stderr
    release.installed = False
    assert release.name not in k.helm("list", "-n", release.ns, "-q").stdout.split()
    k.watch_until(
        "release pods gone",
        lambda c: (
            not [
                p
                for p in c["pods"].values()
                if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/instance")
                == release.name
            ]
        ),
        [("pods", release.ns, None)],
        timeout=120,
        check_pods=False,
    )
    left = k.labelled_objects(release.label())
    assert not left, f"left behind after helm uninstall: {left}"
    if release.profile.host_ports:
        addr = release.provider.host_port_address(release.node_ip(release.real_nodes()[0]))
        for port in release.profile.host_ports:

            def refused(port: int = port) -> bool:
                try:
                    _probe.http_request(addr, port, "/_gwhealthz", timeout=2)
                    return False
                except OSError:
                    return True

            poll_until(f"host port {port} freed", refused, timeout=60)
