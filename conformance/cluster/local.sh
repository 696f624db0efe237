#!/usr/bin/env bash
# A real single-node Kubernetes made of upstream components, for machines where kind/k3d
# cannot get node images (no image registry):
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
#   (k8s.io/kubernetes $K8S_VERSION, built by build-bins.sh), containerd (Debian) with the
#   CNI bridge + portmap plugins (Debian containernetworking-plugins), CoreDNS as a host
#   process, and kwok for fake nodes (DaemonSet placement checks).
#
#   usage: local.sh up|down|status|env|load IMAGE_TAR
#
# Everything is namespaced so it does not collide with another cluster on the machine:
#   bridge qpbr0 10.250.0.1/24 (node IP, pod subnet), services 10.251.0.0/24,
#   kwok pod/node IPs 10.252.0.0/16 (blackholed: fake pods never receive real traffic),
#   apiserver https://10.250.0.1:16443, etcd 127.0.0.1:22379, containerd socket under $RUN.
# The node IP is an address on a bridge this script creates, so every packet the checks
# send stays on this machine.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${QUICPROXY_CACHE:-/var/cache/quicproxy-conformance}"
BIN="$CACHE/bin"
STATE="$CACHE/cluster"                   # wiped on every `up`
CTRD_ROOT="$CACHE/containerd"            # kept: imported image layers survive between runs
RUN="/run/quicproxy-conformance"
BRIDGE=qpbr0
NODE_IP=10.250.0.1
POD_CIDR=10.250.0.0/24
SVC_CIDR=10.251.0.0/24
FAKE_CIDR=10.252.0.0/16
API_PORT=16443
NODE_NAME="${QUICPROXY_NODE_NAME:-qp-node-0}"
PAUSE_IMAGE=quicproxy.local/pause:3.10
CTRD_SOCK="$RUN/containerd.sock"
KUBECONFIG_OUT="$STATE/admin.kubeconfig"
export PATH="$BIN:$PATH"

log() { printf '[local-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- processes
start() { # name cmd...
  local name="$1"; shift
  mkdir -p "$STATE/logs" "$RUN"
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
stop() { # name [timeout]
  local name="$1" t="${2:-15}" pid
  [ -f "$RUN/$name.pid" ] || return 0
  pid="$(cat "$RUN/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((t * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
}
wait_for() { # description timeout cmd...
  local what="$1" t="$2"; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out after ${t}s waiting for $what (logs: $STATE/logs)"
    sleep 0.5
  done
}
kc() { kubectl --kubeconfig "$KUBECONFIG_OUT" "$@"; }

# ---------------------------------------------------------------- PKI
cert() { # name CN O [san]
  local n="$1" cn="$2" o="$3" san="${4:-}"
  openssl ecparam -name prime256v1 -genkey -noout -out "$P/$n.key" 2>/dev/null
  local subj="/CN=$cn"; [ -n "$o" ] && subj="/O=$o$subj"
  openssl req -new -key "$P/$n.key" -subj "$subj" -out "$P/$n.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } >"$P/$n.ext"
  openssl x509 -req -in "$P/$n.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial \
    -days 30 -extfile "$P/$n.ext" -out "$P/$n.crt" 2>/dev/null
  rm -f "$P/$n.csr" "$P/$n.ext"
}
kubeconfig() { # file cert-name
  local f="$1" n="$2"
  cat >"$f" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: quicproxy-local
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority: $P/ca.crt
users:
- name: $n
  user:
    client-certificate: $P/$n.crt
    client-key: $P/$n.key
contexts:
- name: quicproxy-local
  context: {cluster: quicproxy-local, user: $n}
current-context: quicproxy-local
EOF
}
make_pki() {
  P="$STATE/pki"; mkdir -p "$P"
  openssl ecparam -name prime256v1 -genkey -noout -out "$P/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$P/ca.key" -subj "/CN=quicproxy-conformance-ca" -days 30 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$P/ca.crt" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "IP:$NODE_IP,IP:10.251.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin quicproxy-conformance-admin system:masters
  cert kcm system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kube-proxy system:kube-proxy ""
  cert kubelet "system:node:$NODE_NAME" system:nodes
  openssl genrsa -out "$P/sa.key" 2048 2>/dev/null
  openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
  for n in admin kcm scheduler kube-proxy kubelet; do kubeconfig "$STATE/$n.kubeconfig" "$n"; done
  chmod 600 "$STATE"/*.kubeconfig "$P"/*.key
}

# ---------------------------------------------------------------- host network
net_up() {
  sysctl -qw net.ipv4.ip_forward=1
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || log "warning: br_netfilter unavailable"
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  ip route replace blackhole "$FAKE_CIDR"
  # With br_netfilter, traffic between pods on the bridge crosses the FORWARD chain, whose
  # policy Docker sets to DROP: accept everything to/from our bridge.
  local dir
  for dir in -i -o; do
    iptables -C FORWARD "$dir" "$BRIDGE" -m comment --comment quicproxy-conformance -j ACCEPT 2>/dev/null \
      || iptables -I FORWARD 1 "$dir" "$BRIDGE" -m comment --comment quicproxy-conformance -j ACCEPT
  done
}
reap_orphans() { # what a killed (not torn down) cluster leaves running: containers, then their shims
  local id
  if [ -d "$RUN/runc/k8s.io" ] && command -v runc >/dev/null; then
    for id in $(runc --root "$RUN/runc/k8s.io" list -q 2>/dev/null); do
      runc --root "$RUN/runc/k8s.io" kill -a "$id" KILL >/dev/null 2>&1 || true
      runc --root "$RUN/runc/k8s.io" delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  pkill -KILL -f -- "-address $CTRD_SOCK" 2>/dev/null || true
}
unmount_under() { # lazily unmount every mount point at or below $1, deepest first
  awk -v r="$1" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}

net_down() {
  ip route del blackhole "$FAKE_CIDR" 2>/dev/null || true
  local dir
  for dir in -i -o; do
    while iptables -D FORWARD "$dir" "$BRIDGE" -m comment --comment quicproxy-conformance -j ACCEPT 2>/dev/null; do :; done
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  # kubelet (KUBE-FIREWALL, canaries), kube-proxy and portmap leave chains behind; drop them
  # unless another kubelet/kube-proxy on this host's network namespace still uses them.
  if pgrep -x kubelet >/dev/null || pgrep -x kube-proxy >/dev/null; then
    log "another kubelet/kube-proxy runs here: leaving KUBE-*/CNI-HOSTPORT-* chains"; return 0
  fi
  local ipt table chain rule
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for table in filter nat mangle; do
      local chains
      chains="$($ipt -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE-|CNI-HOSTPORT-|CNI-DN-)/ {print $2}')"
      [ -n "$chains" ] || continue
      for chain in $chains; do
        $ipt -t "$table" -S 2>/dev/null | grep -E -- "-j $chain( |\$)" | grep -v "^-A $chain " \
          | sed 's/^-A /-D /' | while read -r rule; do eval "$ipt -t $table $rule" 2>/dev/null || true; done \
          || true
      done
      for chain in $chains; do $ipt -t "$table" -F "$chain" 2>/dev/null || true; done
      for chain in $chains; do $ipt -t "$table" -X "$chain" 2>/dev/null || true; done
    done
  done
}

# ---------------------------------------------------------------- components
write_configs() {
  mkdir -p "$STATE/cni/net.d" "$STATE/cni/ipam" "$RUN/containerd"
  cat >"$STATE/cni/net.d/10-quicproxy.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "quicproxy-conformance",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false,
     "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$STATE/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "10.250.0.10", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
  ]
}
EOF
  cat >"$STATE/containerd.toml" <<EOF
version = 2
root = "$CTRD_ROOT"
state = "$RUN/containerd"
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${CNI_BIN_DIR:-/usr/lib/cni}"
    conf_dir = "$STATE/cni/net.d"
EOF
  printf 'nameserver %s\noptions ndots:5\n' "$NODE_IP" >"$STATE/resolv.conf"
  cat >"$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 20250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 20248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CTRD_SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
resolvConf: $STATE/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
syncFrequency: 10s
fileCheckFrequency: 10s
rotateCertificates: false
serializeImagePulls: false
shutdownGracePeriod: 0s
tlsCertFile: $STATE/pki/kubelet-serving.crt
tlsPrivateKeyFile: $STATE/pki/kubelet-serving.key
EOF
  cat >"$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: 127.0.0.1:20249
nodePortAddresses: ["$NODE_IP/32"]
conntrack: {maxPerCore: 0, min: 0}
iptables: {localhostNodePorts: false, syncPeriod: 10s, minSyncPeriod: 0s}
EOF
  cat >"$STATE/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:20280
    ready 127.0.0.1:20281
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $STATE/admin.kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
}

pause_image() {
  # The sandbox image, built here (there is no registry): a static Go program that sleeps
  # until SIGTERM/SIGINT and reaps children.
  local tar="$CACHE/images/pause.tar"
  if [ ! -s "$tar" ]; then
    log "building pause image"
    local d; d="$(mktemp -d)"
    cp "$HERE/pause/main.go" "$d/" && printf 'module pause\n\ngo 1.21\n' >"$d/go.mod"
    (cd "$d" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$d/pause" .)
    python3 "$HERE/../image/ocitar.py" --entrypoint /pause --ref "$PAUSE_IMAGE" --out "$tar.tmp" "$d/pause:/pause"
    mv "$tar.tmp" "$tar"; rm -rf "$d"
  fi
  ctr -a "$CTRD_SOCK" -n k8s.io images import "$tar" >/dev/null
}

up() {
  local t0=$SECONDS
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl coredns kwok; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing; run $HERE/build-bins.sh first"
  done
  for b in containerd containerd-shim-runc-v2 runc ctr iptables ip openssl kubectl; do
    command -v "$b" >/dev/null || die "$b missing (apt-get install -y containerd containernetworking-plugins iptables iproute2 openssl; kubectl: see README)"
  done
  [ -x "${CNI_BIN_DIR:-/usr/lib/cni}/bridge" ] || die "CNI plugins missing: apt-get install -y containernetworking-plugins"
  if alive kube-apiserver || alive containerd || alive etcd; then log "previous cluster still running; tearing it down"; down; fi
  # a cluster whose processes were killed (not torn down) leaves containers and kubelet's mounts behind
  reap_orphans; unmount_under "$RUN"; unmount_under "$STATE"
  rm -rf "$STATE"; mkdir -p "$STATE/logs" "$RUN" "$CACHE/images"
  make_pki
  # kubelet serving cert (signed by our CA, SAN = node IP)
  P="$STATE/pki"; cert kubelet-serving "$NODE_NAME" "" "IP:$NODE_IP,DNS:$NODE_NAME"
  net_up
  write_configs

  log "starting containerd"
  start containerd containerd --config "$STATE/containerd.toml"
  log "starting etcd"
  start etcd etcd --name qp --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:22379 --advertise-client-urls http://127.0.0.1:22379 \
    --listen-peer-urls http://127.0.0.1:22380 --initial-advertise-peer-urls http://127.0.0.1:22380 \
    --initial-cluster qp=http://127.0.0.1:22380 --listen-metrics-urls http://127.0.0.1:22381 \
    --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn
  wait_for containerd 60 ctr -a "$CTRD_SOCK" version
  # images loaded by earlier runs (kept in $CTRD_ROOT): drop them; pause is re-imported below
  ctr -a "$CTRD_SOCK" -n k8s.io images ls -q | xargs -r ctr -a "$CTRD_SOCK" -n k8s.io images rm >/dev/null 2>&1 || true
  pause_image
  wait_for etcd 60 curl -sf http://127.0.0.1:22379/health

  log "starting kube-apiserver $K8S_VERSION"
  local P="$STATE/pki"
  start kube-apiserver kube-apiserver \
    --advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port="$API_PORT" \
    --etcd-servers=http://127.0.0.1:22379 \
    --service-cluster-ip-range="$SVC_CIDR" \
    --client-ca-file="$P/ca.crt" --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$P/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false --endpoint-reconciler-type=lease
  wait_for kube-apiserver 120 kc get --raw /readyz
  log "apiserver ready ($((SECONDS - t0))s)"

  start kube-controller-manager kube-controller-manager \
    --kubeconfig="$STATE/kcm.kubeconfig" --authentication-kubeconfig="$STATE/kcm.kubeconfig" \
    --authorization-kubeconfig="$STATE/kcm.kubeconfig" --bind-address=127.0.0.1 --secure-port=20257 \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
    --use-service-account-credentials=true --cluster-signing-cert-file="$P/ca.crt" \
    --cluster-signing-key-file="$P/ca.key" --service-cluster-ip-range="$SVC_CIDR" \
    --leader-elect=false --profiling=false
  start kube-scheduler kube-scheduler \
    --kubeconfig="$STATE/scheduler.kubeconfig" --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" --bind-address=127.0.0.1 --secure-port=20259 \
    --leader-elect=false --profiling=false
  log "starting kubelet, kube-proxy, coredns, kwok"
  start kubelet kubelet --config="$STATE/kubelet.yaml" --kubeconfig="$STATE/kubelet.kubeconfig" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir="$STATE/kubelet" \
    --cert-dir="$STATE/kubelet/pki" --v=1
  start kube-proxy kube-proxy --config="$STATE/kube-proxy.yaml"
  start coredns coredns -conf "$STATE/Corefile"
  start kwok kwok --kubeconfig="$STATE/admin.kubeconfig" \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --cidr="$FAKE_CIDR" --node-ip=10.252.255.254 --server-address=127.0.0.1:20247
  wait_for "node $NODE_NAME Ready" 180 kc wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  wait_for "default service account" 60 kc -n default get serviceaccount default
  wait_for coredns 60 curl -sf http://127.0.0.1:20281/ready
  wait_for kube-proxy 60 curl -sf http://127.0.0.1:20256/healthz
  log "cluster up in $((SECONDS - t0))s: KUBECONFIG=$KUBECONFIG_OUT node=$NODE_NAME ($NODE_IP)"
  echo "$KUBECONFIG_OUT"
}

drain_pods() {
  # Delete every workload so the kubelet tears sandboxes down through CNI (veths, portmap rules).
  kc get --raw /readyz >/dev/null 2>&1 && alive kubelet || return 0
  local ns
  for ns in $(kc get ns -o jsonpath='{.items[*].metadata.name}'); do
    case "$ns" in kube-system|kube-public|kube-node-lease) ;; default) ;; *) kc delete ns "$ns" --wait=false >/dev/null 2>&1 || true ;; esac
  done
  kc delete daemonsets,deployments,replicasets,statefulsets,jobs --all -A --wait=false >/dev/null 2>&1 || true
  kc delete pods --all -A --grace-period=1 --timeout=60s >/dev/null 2>&1 || true
}

down() {
  log "tearing down"
  drain_pods
  for c in kwok coredns kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done
  if alive containerd; then
    # anything the kubelet did not clean up
    local ids
    ids="$(ctr -a "$CTRD_SOCK" -n k8s.io tasks ls -q 2>/dev/null || true)"
    for id in $ids; do ctr -a "$CTRD_SOCK" -n k8s.io tasks kill -s KILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $ids; do ctr -a "$CTRD_SOCK" -n k8s.io tasks rm -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr -a "$CTRD_SOCK" -n k8s.io containers ls -q 2>/dev/null); do
      ctr -a "$CTRD_SOCK" -n k8s.io containers rm "$id" >/dev/null 2>&1 || true
    done
  fi
  stop containerd
  reap_orphans
  [ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  # network namespaces our containerd created and could not remove
  if [ -d "$STATE/cni/ipam" ]; then :; fi
  unmount_under "$RUN"; unmount_under "$STATE"
  net_down
  rm -rf "$RUN"
  log "down"
}

status() {
  local c
  for c in containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy coredns kwok; do
    if alive "$c"; then echo "$c: running (pid $(cat "$RUN/$c.pid"))"; else echo "$c: stopped"; fi
  done
  kc get nodes -o wide 2>/dev/null || true
}

load() { # docker-archive or OCI tar
  [ -s "${1:-}" ] || die "usage: local.sh load IMAGE_TAR"
  ctr -a "$CTRD_SOCK" -n k8s.io images import "$1" >/dev/null
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_OUT" ;;
  load) shift; load "$@" ;;
  *) echo "usage: $0 up|down|status|env|load IMAGE_TAR" >&2; exit 2 ;;
esac
