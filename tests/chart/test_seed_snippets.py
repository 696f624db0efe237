"""Every values snippet of the DaemonSet guide renders and does what the guide says.

Snippets are copied verbatim; each is applied on top of the chart's values.yaml
(and, where the guide means it as a change to a DaemonSet install, on top of
values-daemonset.yaml).
"""

from __future__ import annotations

import yaml

from ._chart import CHART, EXAMPLES, ports_by_name

DAEMONSET = CHART / "values-daemonset.yaml"

BASIC = """
proxy:
  kind: daemonset
  ports:
    useHostPorts: true

daemonset:
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
"""

WITH_HOST_PORTS = """
proxy:
  kind: daemonset
  ports:
    http: 80
    https: 443
    useHostPorts: true
"""

WITHOUT_HOST_PORTS = """
proxy:
  kind: daemonset
  ports:
    useHostPorts: false
"""

NODE_SELECTOR = """
nodeSelector:
  node-role.kubernetes.io/edge: "true"
"""

TOLERATIONS = """
tolerations:
- key: "edge"
  operator: "Equal"
  value: "true"
  effect: "NoSchedule"
"""

ANTI_AFFINITY = """
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        labelSelector:
          matchExpressions:
          - key: app.kubernetes.io/name
            operator: In
            values:
            - quic-proxy-waf
        topologyKey: kubernetes.io/hostname
"""

UPDATE_STRATEGY = """
daemonset:
  updateStrategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 1  # Update one node at a time
"""

HOST_NETWORK = """
daemonset:
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
"""

ROOT = """
securityContext:
  runAsNonRoot: false
  runAsUser: 0
"""

CAPABILITIES = """
securityContext:
  capabilities:
    add:
    - NET_BIND_SERVICE
    drop:
    - ALL
"""

COMPLETE = """
# Production edge deployment
global:
  registry: ghcr.io/pmh-only/quic-proxy
  tag: "v1.1.0"

proxy:
  kind: daemonset
  backend:
    host: "api-backend.internal"
    port: 8080
  ports:
    useHostPorts: true

waf:
  enabled: true
  replicaCount: 3

daemonset:
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
  updateStrategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 1

nodeSelector:
  node-role.kubernetes.io/edge: "true"

tolerations:
- key: "edge-taint"
  operator: "Exists"
  effect: "NoSchedule"
"""

PORT_CONFLICT = """
proxy:
  ports:
    http: 8080
    https: 8443
    useHostPorts: true
"""

DNS = """
daemonset:
  dnsPolicy: ClusterFirstWithHostNet
"""


def _v(text):
    return yaml.safe_load(text)


def _host_ports(m):
    """The public ports bound on the node (with host networking the metrics port is
    on the node too, as Kubernetes sets hostPort for every port; see test_metrics)."""
    ports = [p for p in m.proxy_container()["ports"] if p["name"] != "metrics"]
    return {(p["protocol"], p["hostPort"]) for p in ports if "hostPort" in p}


def test_basic_daemonset(render):
    m = render(values=_v(BASIC))
    assert m.proxy_workload()["kind"] == "DaemonSet"
    assert _host_ports(m) == {("TCP", 80), ("TCP", 443), ("UDP", 443)}
    assert m.proxy_pod()["spec"]["hostNetwork"] is True
    assert m.proxy_pod()["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert m.proxy_service() is None


def test_example_values_install_command(render):
    # helm install my-proxy ./helm --values values-daemonset.yaml --set proxy.backend.host=...
    m = render(DAEMONSET, values={"proxy": {"backend": {"host": "my-backend-service"}}})
    assert m.proxy_workload()["kind"] == "DaemonSet"
    assert m.proxy_config()["backend"] == "http://my-backend-service:8080"


def test_values_daemonset_file_is_the_basic_snippet(render):
    assert render(DAEMONSET).docs == render(values=_v(BASIC)).docs


def test_with_host_ports_creates_http_https_and_http3_on_the_node(render):
    m = render(values=_v(WITH_HOST_PORTS))
    ports = ports_by_name(m.proxy_container())
    assert (ports["http"]["protocol"], ports["http"]["hostPort"]) == ("TCP", 80)
    assert (ports["https"]["protocol"], ports["https"]["hostPort"]) == ("TCP", 443)
    assert (ports["http3"]["protocol"], ports["http3"]["hostPort"]) == ("UDP", 443)
    assert m.proxy_service() is None


def test_without_host_ports_creates_a_service(render):
    m = render(values=_v(WITHOUT_HOST_PORTS))
    assert m.proxy_workload()["kind"] == "DaemonSet"
    assert _host_ports(m) == set()
    svc = m.proxy_service()
    assert {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == {
        (80, "TCP"),
        (443, "TCP"),
        (443, "UDP"),
    }


def test_node_selection_and_tolerations(render):
    m = render(DAEMONSET, values={**_v(NODE_SELECTOR), **_v(TOLERATIONS)})
    spec = m.proxy_pod()["spec"]
    assert spec["nodeSelector"] == {"node-role.kubernetes.io/edge": "true"}
    assert spec["tolerations"] == _v(TOLERATIONS)["tolerations"]


def test_anti_affinity_in_deployment_mode(render):
    m = render(values=_v(ANTI_AFFINITY))
    assert m.proxy_workload()["kind"] == "Deployment"
    assert m.proxy_pod()["spec"]["affinity"] == _v(ANTI_AFFINITY)["affinity"]


def test_update_strategy(render):
    ds = render(DAEMONSET, values=_v(UPDATE_STRATEGY)).proxy_workload()
    assert ds["spec"]["updateStrategy"] == _v(UPDATE_STRATEGY)["daemonset"]["updateStrategy"]


def test_host_network(render):
    m = render(values={**_v(WITH_HOST_PORTS), **_v(HOST_NETWORK)})
    spec = m.proxy_pod()["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    # binding 80/443 on the host needs root with NET_BIND_SERVICE
    sc = m.proxy_container()["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"]["add"] == ["NET_BIND_SERVICE"]


def test_required_permissions(render):
    sc = render(values=_v(ROOT)).proxy_container()["securityContext"]
    assert (sc["runAsNonRoot"], sc["runAsUser"]) == (False, 0)
    sc = render(values=_v(CAPABILITIES)).proxy_container()["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}


def test_complete_example_matches_the_shipped_example_file(render):
    m = render(values=_v(COMPLETE))
    assert m.docs == render(EXAMPLES / "daemonset-edge-complete.yaml").docs
    assert m.proxy_workload()["kind"] == "DaemonSet"
    assert m.get("Deployment", "-waf")["spec"]["replicas"] == 3
    assert m.proxy_container()["image"] == "ghcr.io/pmh-only/quic-proxy/quic-proxy-waf:v1.1.0"
    assert m.proxy_config()["backend"] == "http://api-backend.internal:8080"
    assert _host_ports(m) == {("TCP", 80), ("TCP", 443), ("UDP", 443)}
    assert m.proxy_service() is None and m.all("PodDisruptionBudget") == []


def test_port_conflict_fix_on_a_daemonset_install(render):
    m = render(DAEMONSET, values=_v(PORT_CONFLICT))
    assert _host_ports(m) == {("TCP", 8080), ("TCP", 8443), ("UDP", 8443)}
    assert m.proxy_config()["listen"]["alt_svc_port"] == 8443
    # ports >= 1024: no root needed even on the host network
    assert m.proxy_container()["securityContext"]["runAsNonRoot"] is True


def test_dns_resolution(render):
    spec = render(DAEMONSET, values=_v(DNS)).proxy_pod()["spec"]
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_health_check_endpoint(profile):
    for name in ("daemonset", "examples/daemonset-no-hostports"):
        c = profile(name).proxy_container()
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/_gwhealthz", "port": "http"}
