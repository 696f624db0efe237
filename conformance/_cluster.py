"""Cluster providers for the conformance suite.

Select one with ``--cluster=NAME`` or ``QUICPROXY_CLUSTER=NAME``:

* ``local``    a real single-node Kubernetes of upstream components started on this machine
               (conformance/cluster/local.sh; root, Linux, Go, containerd), plus kwok fake nodes
* ``kind``     a kind cluster with host port mappings 80/443 TCP and 443 UDP
* ``k3d``      the k3d equivalent
* ``existing`` whatever KUBECONFIG points at (image must be loadable or pullable there)
* ``auto``     (default) existing if KUBECONFIG answers, else kind, k3d, local - the first usable
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLUSTER_DIR = HERE / "cluster"
IMAGE_DIR = HERE / "image"
CACHE = Path(os.environ.get("QUICPROXY_CACHE", "/var/cache/quicproxy-conformance"))

Progress = Callable[[str], None]

INSTALL_HINT = (
    "no usable cluster for the conformance suite: install kind or k3d (with Docker), "
    "or point KUBECONFIG at a cluster, or run as root on Linux with Go, containerd, "
    "containernetworking-plugins and docker.io for QUICPROXY_CLUSTER=local"
)


def run_streamed(
    cmd: list[str], progress: Progress, env: dict[str, str] | None = None, prefix: str = ""
) -> str:
    """Run cmd, forwarding stderr lines to progress as they come; return stdout."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env, text=True)
        assert proc.stderr is not None
        tail: list[str] = []
        for line in proc.stderr:
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            progress(prefix + line)
        rc = proc.wait()
        out.seek(0)
        stdout = out.read().decode()
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n" + "\n".join(tail))
    return stdout


@dataclass
class Provider:
    name: str = "?"
    kubeconfig: str = ""
    supports_fake_nodes: bool = False
    registry_less: bool = False  # True: images must be loaded, base image built locally
    started_here: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def usable(self) -> str | None:
        """None when usable, else why not."""
        raise NotImplementedError

    def up(self, progress: Progress) -> None:
        raise NotImplementedError

    def down(self, progress: Progress) -> None:
        pass

    def load_image(self, ref: str, tar: str, progress: Progress) -> None:
        raise NotImplementedError

    def host_port_address(self, node_ip: str) -> str:
        """Address from which the test process reaches a node's host ports."""
        return node_ip

    def tools_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["KUBECONFIG"] = self.kubeconfig
        return env


def _ok(cmd: list[str], timeout: float = 20) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class LocalProvider(Provider):
    """Upstream components on this machine (see conformance/cluster/local.sh)."""

    def __init__(self) -> None:
        super().__init__(name="local", supports_fake_nodes=True, registry_less=True)
        self.kubeconfig = str(CACHE / "cluster" / "admin.kubeconfig")
        bin_dir = CACHE / "bin"
        self.env = {
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "QUICPROXY_CACHE": str(CACHE),
        }

    def usable(self) -> str | None:
        if os.uname().sysname != "Linux":
            return "the local provider needs Linux"
        if os.geteuid() != 0:
            return "the local provider needs root (it runs containerd, kubelet and kube-proxy)"
        if not shutil.which("go"):
            return "the local provider needs Go >= 1.24 (it builds Kubernetes from source)"
        tools = ("containerd", "runc", "iptables", "ip", "openssl", "dockerd", "debootstrap")
        missing = [t for t in tools if not shutil.which(t)]
        if not Path("/usr/lib/cni/bridge").exists():
            missing.append("containernetworking-plugins")
        if missing and not shutil.which("apt-get"):
            return "local provider: missing " + ", ".join(missing)
        return None

    def up(self, progress: Progress) -> None:
        env = self.tools_env()
        run_streamed(["bash", str(CLUSTER_DIR / "install-deps.sh")], progress, env)
        run_streamed(["bash", str(CLUSTER_DIR / "build-bins.sh")], progress, env)
        self.started_here = True  # from here on, down() cleans up even a half-started cluster
        run_streamed(["bash", str(CLUSTER_DIR / "local.sh"), "up"], progress, env)
        settle(self.kubeconfig, progress)

    def down(self, progress: Progress) -> None:
        if self.started_here and not os.environ.get("QUICPROXY_KEEP_CLUSTER"):
            run_streamed(
                ["bash", str(CLUSTER_DIR / "local.sh"), "down"], progress, self.tools_env()
            )

    def load_image(self, ref: str, tar: str, progress: Progress) -> None:
        run_streamed(
            ["bash", str(CLUSTER_DIR / "local.sh"), "load", tar], progress, self.tools_env()
        )


# Host ports the profiles use: 80/443 (seed, edge example) and 8080/8443 (custom-ports),
# published on 127.0.0.1 only.  The edge label (node-role.kubernetes.io/edge) is set by the
# suite with admin rights: a kubelet may not label itself with node-role.kubernetes.io/*.
HOST_PORTS = [(80, "TCP"), (443, "TCP"), (443, "UDP"), (8080, "TCP"), (8443, "TCP"), (8443, "UDP")]
KIND_VERSION = "v0.33.0"


def _docker_tool_missing(tool: str, path: str | None = None) -> str | None:
    """Why a Docker-based cluster tool (kind, k3d) cannot run here, or None."""
    if not (path or shutil.which(tool)):
        return f"{tool} not installed"
    if not _ok(["docker", "info"]):
        return f"{tool} needs a running Docker engine"
    return None


def privileged_fails() -> bool:
    """True when this root lacks a capability Docker's --privileged grants (sandboxes that
    drop CAP_SYS_RESOURCE): `docker run --privileged` then fails ("unable to apply caps")
    and kind needs cluster/kind-docker-shim."""
    try:
        status = Path("/proc/self/status").read_text()
        last = min(int(Path("/proc/sys/kernel/cap_last_cap").read_text()), 40)
    except OSError:
        return False
    bnd = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapBnd")), 16)
    want = (1 << (last + 1)) - 1
    return bnd & want != want


def kind_config(etcd_tag: str = "", nodes: int = 1) -> str:
    """kind cluster config: a control plane with every host port the profiles use mapped on
    127.0.0.1 (TCP and UDP, so host-port HTTP/3 is checked through kind's port mapping), and
    ``nodes - 1`` workers (their host ports are reached on their own addresses); etcd_tag:
    the etcd image tag a locally built node image carries (kubeadm would ask for its own)."""
    lines = [
        "kind: Cluster",
        "apiVersion: kind.x-k8s.io/v1alpha4",
        "nodes:",
        "- role: control-plane",
        "  extraPortMappings:",
    ]
    for port, proto in HOST_PORTS:
        lines.append(
            f"  - {{containerPort: {port}, hostPort: {port}, protocol: {proto}, "
            'listenAddress: "127.0.0.1"}'
        )
    lines += ["- role: worker"] * (nodes - 1)
    if etcd_tag:
        lines += [
            "kubeadmConfigPatches:",
            "- |",
            "  kind: ClusterConfiguration",
            "  etcd:",
            "    local:",
            f'      imageTag: "{etcd_tag}"',
        ]
    return "\n".join(lines) + "\n"


class KindProvider(Provider):
    """kind cluster; host ports reach the node through extraPortMappings on 127.0.0.1.

    Node image: QUICPROXY_KIND_NODE_IMAGE: "build" (the default: this machine may reach no
    image registry, and the README's test command must pass on it, with or without CI=true)
    builds one locally with cluster/kind-node-image.sh from the binaries build-bins.sh
    compiles; "default" takes kind's own (kindest/node, from Docker Hub); any other value is
    an image reference.  kind itself: PATH, else $QUICPROXY_CACHE/bin/kind
    (cluster/install-kind.sh puts it there)."""

    cluster = os.environ.get("QUICPROXY_KIND_CLUSTER", "quicproxy-conformance")

    def __init__(self) -> None:
        super().__init__(name="kind")
        self.kubeconfig = str(Path(tempfile.gettempdir()) / f"{self.cluster}.kubeconfig")
        node_image = os.environ.get("QUICPROXY_KIND_NODE_IMAGE") or "build"
        self.registry_less = node_image == "build"
        self.node_image = "" if node_image in ("build", "default") else node_image
        self.nodes = int(os.environ.get("QUICPROXY_KIND_NODES") or "3")
        self.control_plane_ip = ""
        self.kind = shutil.which("kind") or str(CACHE / "bin" / "kind")
        shim = f"{CLUSTER_DIR / 'kind-docker-shim'}:" if privileged_fails() else ""
        self.env = {"PATH": f"{shim}{CACHE / 'bin'}:{os.environ.get('PATH', '')}"}

    def usable(self) -> str | None:
        if self.registry_less:  # up() installs kind (go install), Docker and the node image
            return None if shutil.which("go") else "building a kind node image needs Go"
        return _docker_tool_missing("kind", self.kind if Path(self.kind).exists() else None)

    def create_cmd(self, config_path: str, image: str = "") -> list[str]:
        cmd = [self.kind, "create", "cluster", "--name", self.cluster, "--config", config_path]
        return cmd + (["--image", image] if image else []) + ["--wait", "180s"]

    def delete_cmd(self) -> list[str]:
        return [self.kind, "delete", "cluster", "--name", self.cluster]

    def load_cmd(self, ref: str) -> list[str]:
        """The chart README's step: kind load docker-image REF."""
        return [self.kind, "load", "docker-image", ref, "--name", self.cluster]

    def up(self, progress: Progress) -> None:
        env = self.tools_env()
        image, etcd_tag = self.node_image, ""
        if self.registry_less:
            for script in ("install-deps.sh", "build-bins.sh", "install-kind.sh"):
                run_streamed(["bash", str(CLUSTER_DIR / script)], progress, env)
            run_streamed(["bash", str(CLUSTER_DIR / "ensure-docker.sh")], progress, env)
            image = run_streamed(
                ["bash", str(CLUSTER_DIR / "kind-node-image.sh")], progress, env
            ).split()[-1]
            etcd_tag = subprocess.run(
                [
                    "docker",
                    "image",
                    "inspect",
                    "-f",
                    '{{index .Config.Labels "quicproxy.etcd-tag"}}',
                    image,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        listing = subprocess.run(
            [self.kind, "get", "clusters"], capture_output=True, text=True, env=env
        ).stdout
        if self.cluster not in listing.split():
            cfg = Path(tempfile.mkdtemp()) / "kind.yaml"
            cfg.write_text(kind_config(etcd_tag, self.nodes))
            self.started_here = True
            run_streamed(self.create_cmd(str(cfg), image), progress, env)
        Path(self.kubeconfig).write_text(
            subprocess.run(
                [self.kind, "get", "kubeconfig", "--name", self.cluster],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
        )
        settle(self.kubeconfig, progress)
        if self.registry_less:
            route_pods(self.kubeconfig, progress)
        self.control_plane_ip = _docker_ip(f"{self.cluster}-control-plane")

    def down(self, progress: Progress) -> None:
        if self.started_here and not os.environ.get("QUICPROXY_KEEP_CLUSTER"):
            run_streamed(self.delete_cmd(), progress, self.tools_env())

    def load_image(self, ref: str, tar: str, progress: Progress) -> None:
        run_streamed(self.load_cmd(ref), progress, self.tools_env())

    def host_port_address(self, node_ip: str) -> str:
        """The control plane through the README's extraPortMappings (127.0.0.1); a worker on
        its own address (the Docker network's, reachable from this host)."""
        return "127.0.0.1" if node_ip in ("", self.control_plane_ip) else node_ip


def _docker_ip(container: str) -> str:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"]
        + [container],
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0] if out else ""


def route_pods(kubeconfig: str, progress: Progress) -> None:
    """Pod networking between the nodes of a kind cluster whose node image brings the bridge
    CNI (cluster/kind-node-image.sh; kindnetd would need a registry): each node's bridge gets
    the pod range the controller manager gave that node (spec.podCIDR), and a route to each
    other node's range through that node's address (host-gw routing, as kindnetd and
    flannel's host-gw do on one L2 network). Pods that started on a worker before its range
    was set (CoreDNS, the storage provisioner) are deleted so their controllers recreate them
    with an address of the right range. The control plane loses its NoSchedule taint (as in
    a one-node kind cluster): the README's host ports on 127.0.0.1 lead to it."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    ranges: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + 120
    while True:
        nodes = api.list_node().items
        for n in nodes:
            ip = next((a.address for a in n.status.addresses if a.type == "InternalIP"), "")
            if n.spec.pod_cidr and ip:
                ranges[n.metadata.name] = (n.spec.pod_cidr, ip)
        if len(nodes) < 2:
            return
        if len(ranges) == len(nodes):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes without a pod range: {len(nodes) - len(ranges)}")
        time.sleep(2)
    for name, (cidr, _) in ranges.items():
        script = [
            f'sed -i \'s#"subnet": "[^"]*"#"subnet": "{cidr}"#\' /etc/cni/net.d/10-bridge.conflist'
        ]
        script += [
            f"ip route replace {other} via {ip}"
            for peer, (other, ip) in ranges.items()
            if peer != name
        ]
        subprocess.run(["docker", "exec", name, "sh", "-ec", "; ".join(script)], check=True)
        progress(f"pod range {cidr} on {name}, routes to the other {len(ranges) - 1}")
    for n in nodes:
        taints = n.spec.taints or []
        kept = [t for t in taints if t.key != "node-role.kubernetes.io/control-plane"]
        if len(kept) != len(taints):
            body = {
                "spec": {
                    "taints": [{"key": t.key, "value": t.value, "effect": t.effect} for t in kept]
                }
            }
            api.patch_node(n.metadata.name, body)
    for p in api.list_pod_for_all_namespaces().items:
        node, ip = p.spec.node_name, p.status.pod_ip
        if p.spec.host_network or not ip or node not in ranges:
            continue
        if ipaddress.ip_address(ip) not in ipaddress.ip_network(ranges[node][0]):
            progress(f"pod {p.metadata.name} on {node} has {ip}: recreated in its range")
            api.delete_namespaced_pod(p.metadata.name, p.metadata.namespace)


class K3dProvider(Provider):
    """k3d cluster (servicelb/traefik disabled); host ports mapped like kind.  Not verified
    in CI (no k3s image without a registry): its commands are unit-tested."""

    cluster = os.environ.get("QUICPROXY_K3D_CLUSTER", "quicproxy-conformance")

    def __init__(self) -> None:
        super().__init__(name="k3d")
        self.kubeconfig = str(Path(tempfile.gettempdir()) / f"k3d-{self.cluster}.kubeconfig")

    def usable(self) -> str | None:
        return _docker_tool_missing("k3d")

    def create_cmd(self) -> list[str]:
        ports = [
            a
            for p, proto in HOST_PORTS
            for a in ("-p", f"127.0.0.1:{p}:{p}/{proto.lower()}@server:0")
        ]
        return [
            "k3d",
            "cluster",
            "create",
            self.cluster,
            "--wait",
            "--timeout",
            "180s",
            "--k3s-arg",
            "--disable=traefik@server:0",
            "--k3s-arg",
            "--disable=servicelb@server:0",
            *ports,
        ]

    def delete_cmd(self) -> list[str]:
        return ["k3d", "cluster", "delete", self.cluster]

    def load_cmd(self, tar: str) -> list[str]:
        return ["k3d", "image", "import", tar, "-c", self.cluster]

    def up(self, progress: Progress) -> None:
        listing = subprocess.run(
            ["k3d", "cluster", "list", "-o", "json"], capture_output=True, text=True
        )
        names = [c.get("name") for c in json.loads(listing.stdout or "[]")]
        if self.cluster not in names:
            self.started_here = True
            run_streamed(self.create_cmd(), progress)
        Path(self.kubeconfig).write_text(
            subprocess.run(
                ["k3d", "kubeconfig", "get", self.cluster],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )

    def down(self, progress: Progress) -> None:
        if self.started_here and not os.environ.get("QUICPROXY_KEEP_CLUSTER"):
            run_streamed(self.delete_cmd(), progress)

    def load_image(self, ref: str, tar: str, progress: Progress) -> None:
        run_streamed(self.load_cmd(tar), progress)

    def host_port_address(self, node_ip: str) -> str:
        return "127.0.0.1"


class ExistingProvider(Provider):
    """Any cluster from KUBECONFIG.  Set QUICPROXY_IMAGE to an image its nodes can pull, or
    QUICPROXY_IMAGE_LOAD to a command that loads "{tar}" onto its nodes; QUICPROXY_NODE_ADDRESS
    overrides the address used to reach host ports."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        super().__init__(name="existing")
        self.kubeconfig = kubeconfig or os.environ.get(
            "KUBECONFIG", str(Path.home() / ".kube" / "config")
        )

    def usable(self) -> str | None:
        if not Path(self.kubeconfig).exists():
            return f"no kubeconfig at {self.kubeconfig} (--kube-config or KUBECONFIG)"
        return readyz(self.kubeconfig)

    def up(self, progress: Progress) -> None:
        progress(f"using the cluster from {self.kubeconfig}")

    def load_image(self, ref: str, tar: str, progress: Progress) -> None:
        cmd = os.environ.get("QUICPROXY_IMAGE_LOAD")
        if cmd:
            run_streamed(["sh", "-c", cmd.format(tar=tar, ref=ref)], progress)
        else:
            progress(f"existing cluster: assuming nodes can get {ref} (set QUICPROXY_IMAGE_LOAD)")

    def host_port_address(self, node_ip: str) -> str:
        return os.environ.get("QUICPROXY_NODE_ADDRESS", node_ip)


PROVIDERS: dict[str, type[Provider]] = {
    "local": LocalProvider,
    "kind": KindProvider,
    "k3d": K3dProvider,
    "existing": ExistingProvider,
}


def readyz(kubeconfig: str) -> str | None:
    """None when the API server of kubeconfig answers (its /version), else why not."""
    from kubernetes import client, config

    try:
        api = config.new_client_from_config(config_file=kubeconfig)
        client.VersionApi(api).get_code(_request_timeout=10)  # served once ready
        return None
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return f"cluster from {kubeconfig} does not answer: {str(exc)[:200]}"


def settle(kubeconfig: str, progress: Progress, in_a_row: int = 10, timeout: float = 180) -> None:
    """Wait until the API server has answered ``in_a_row`` times a second apart: right after
    `kind create` the control plane may still restart a component (seen: the first
    request after the image load reset by the API server)."""
    deadline = time.monotonic() + timeout
    good = 0
    why: str | None = None
    while good < in_a_row:
        if time.monotonic() > deadline:
            raise RuntimeError(f"API server not steady after {timeout:.0f}s: {why}")
        why = readyz(kubeconfig)
        good = good + 1 if why is None else 0
        time.sleep(1.0)
    progress(f"API server steady ({in_a_row} answers in a row)")


def select(name: str, kubeconfig: str | None = None) -> tuple[Provider | None, str]:
    """(provider, reason).  For an explicit name the provider is returned even when unusable,
    with the reason; "auto" returns the first usable one or None with the install hint."""
    if name != "auto":
        if name not in PROVIDERS:
            return None, f"unknown cluster provider {name!r}; one of {', '.join(PROVIDERS)}, auto"
        p = ExistingProvider(kubeconfig) if name == "existing" else PROVIDERS[name]()
        return p, p.usable() or ""
    reasons = []
    order = (
        ["existing", "kind", "k3d", "local"]
        if os.environ.get("KUBECONFIG")
        else ["kind", "k3d", "local"]
    )
    for n in order:
        if n == "kind" and not shutil.which("kind"):  # auto: only a kind the user installed
            reasons.append("kind not installed")
            continue
        p = PROVIDERS[n]()
        why = p.usable()
        if why is None:
            return p, ""
        reasons.append(why)
    return None, INSTALL_HINT


def describe() -> str:
    return textwrap.dedent(__doc__ or "")
