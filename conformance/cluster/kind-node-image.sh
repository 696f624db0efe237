#!/usr/bin/env bash
# Build a kind node image locally, with no image registry:
#   * rootfs: the Debian bookworm base build-base.sh makes with debootstrap (the image tier
#     builds it too), plus systemd, containerd, runc and the CNI plugins from Debian (apt)
#   * kubeadm, kubelet, kubectl and the control-plane images (kube-apiserver,
#     kube-controller-manager, kube-scheduler, kube-proxy, etcd, CoreDNS, pause) from the
#     binaries build-bins.sh compiles from the Kubernetes sources ($K8S_VERSION), under the
#     names kubeadm expects (registry.k8s.io/...), imported into the node's containerd at boot
#   * a bridge CNI (Debian plugins: bridge, host-local, portmap) in /etc/cni/net.d, so kind's
#     default CNI (kindnetd, an image from a registry) is not needed; _cluster.route_pods gives
#     each node of a multi-node cluster its range and routes to the others
#
#   usage: kind-node-image.sh [REF]     prints REF (default quicproxy.local/kind-node:$K8S_VERSION)
#
# What kind expects of a node image (kind v0.33): /kind/version, an entrypoint that prepares
# mounts/cgroups and execs /sbin/init (systemd), and prints "detected cgroup v1" on a cgroup
# v1 host (kind waits for that line, or for systemd's "Reached target ... Multi-User System"),
# kubelet.service + the kubeadm drop-in, containerd with the CRI plugin, kubeadm/kubectl in
# PATH, /kind/manifests/default-{cni,storage}.yaml.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.4}"     # as build-bins.sh
ETCD_TAG="${ETCD_VERSION#v}-0"
CACHE="${QUICPROXY_CACHE:-/var/cache/quicproxy-conformance}"
BIN="$CACHE/bin"
WORK="$CACHE/kind"
SUITE="${DEBIAN_SUITE:-bookworm}"
REF="${1:-quicproxy.local/kind-node:$K8S_VERSION}"
BASE_REF="${QUICPROXY_BASE_IMAGE_REF:-quicproxy-conformance/base:$SUITE}"   # build-base.sh's
ROOTFS_REF="quicproxy.local/kind-node-rootfs:$SUITE"
NODE_PACKAGES="systemd systemd-sysv dbus containerd runc containernetworking-plugins iptables conntrack iproute2 ethtool kmod procps socat curl util-linux mount libseccomp2"
NODE_POD_RANGE=10.244.0.0/24   # the first node's /24 of kind's default podSubnet 10.244.0.0/16
log() { printf '[kind-node-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
mkdir -p "$WORK/images"

rootfs() { # the Debian base the image tier uses (debootstrap), plus systemd and the runtime
  docker image inspect "$ROOTFS_REF" >/dev/null 2>&1 && return
  "$HERE/../image/build-base.sh" "$BASE_REF"
  local ctx; ctx="$(mktemp -d)"
  cat >"$ctx/Dockerfile" <<EOF
FROM $BASE_REF
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $NODE_PACKAGES >/dev/null \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
      /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
      /lib/systemd/system/sockets.target.wants/*initctl* \\
      /lib/systemd/system/sysinit.target.wants/systemd-tmpfiles-setup.service
EOF
  log "docker build $ROOTFS_REF: $BASE_REF + systemd, containerd, runc, CNI plugins (~1 min)"
  DOCKER_BUILDKIT=0 docker build -q -t "$ROOTFS_REF" "$ctx" >/dev/null
  rm -rf "$ctx"
}

component_images() { # docker-archive tars of the control-plane images, named as kubeadm expects
  local list; list="$("$BIN/kubeadm" config images list --kubernetes-version "$K8S_VERSION")"
  # etcd is the version build-bins.sh builds, not kubeadm's default tag: the kind config
  # sets etcd.local.imageTag to the image's quicproxy.etcd-tag label (KindProvider does)
  list="$(echo "$list" | sed "s#/etcd:.*#/etcd:$ETCD_TAG#")"
  log "control-plane images: $(echo $list)"
  local img name tar
  for img in $list; do
    name="${img##*/}"; name="${name%%:*}"
    tar="$WORK/images/$name-${img##*:}.tar"
    [ -s "$tar" ] && continue
    case "$name" in
      kube-apiserver|kube-controller-manager|kube-scheduler)
        python3 "$HERE/../image/ocitar.py" --ref "$img" --out "$tar.tmp" --user 0:0 \
          --entrypoint "/usr/local/bin/$name" "$BIN/$name:/usr/local/bin/$name" ;;
      etcd)
        python3 "$HERE/../image/ocitar.py" --ref "$img" --out "$tar.tmp" --user 0:0 \
          --entrypoint /usr/local/bin/etcd "$BIN/etcd:/usr/local/bin/etcd" ;;
      coredns)  # kubeadm's Deployment gives only args: the entrypoint is the server
        python3 "$HERE/../image/ocitar.py" --ref "$img" --out "$tar.tmp" --user 0:0 \
          --entrypoint /coredns "$BIN/coredns:/coredns" ;;
      pause)
        local d; d="$(mktemp -d)"
        cp "$HERE/pause/main.go" "$d/" && printf 'module pause\n\ngo 1.21\n' >"$d/go.mod"
        (cd "$d" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$d/pause" .)
        python3 "$HERE/../image/ocitar.py" --ref "$img" --out "$tar.tmp" --entrypoint /pause "$d/pause:/pause"
        rm -rf "$d" ;;
      kube-proxy)  # needs iptables and conntrack: the node rootfs plus the binary
        local ctx; ctx="$(mktemp -d)"
        cp "$BIN/kube-proxy" "$ctx/kube-proxy"
        printf 'FROM %s\nCOPY kube-proxy /usr/local/bin/kube-proxy\n' "$ROOTFS_REF" >"$ctx/Dockerfile"
        DOCKER_BUILDKIT=0 docker build -q -t "$img" "$ctx" >/dev/null
        docker save -o "$tar.tmp" "$img"
        rm -rf "$ctx" ;;
      *) log "no recipe for $img"; exit 1 ;;
    esac
    mv "$tar.tmp" "$tar"
    log "image $img ($(du -h "$tar" | cut -f1))"
  done
  echo "$list"
}

write_context() { # ctx images...
  local ctx="$1"; shift
  mkdir -p "$ctx"/{bin,images,files}
  cp "$BIN/kubeadm" "$BIN/kubelet" "$BIN/kubectl" "$ctx/bin/"
  local img name
  for img in "$@"; do
    name="${img##*/}"; name="${name%%:*}"
    cp "$WORK/images/$name-${img##*:}.tar" "$ctx/images/"
  done
  cp "$HERE/kind-node/entrypoint" "$ctx/files/entrypoint"
  local pause; pause="$(printf '%s\n' "$@" | grep /pause:)"
  sed -e "s#@PAUSE@#$pause#" "$HERE/kind-node/containerd.toml" >"$ctx/files/containerd.toml"
  sed -e "s#@RANGE@#$NODE_POD_RANGE#" "$HERE/kind-node/10-bridge.conflist" >"$ctx/files/10-bridge.conflist"
  cp "$HERE"/kind-node/*.service "$HERE/kind-node/10-kubeadm.conf" "$HERE/kind-node/default-storage.yaml" \
     "$HERE/kind-node/default-cni.yaml" "$ctx/files/"
  cat >"$ctx/Dockerfile" <<EOF
FROM $ROOTFS_REF
COPY bin/ /usr/bin/
COPY images/ /kind/images/
COPY files/entrypoint /usr/local/bin/entrypoint
COPY files/containerd.toml /etc/containerd/config.toml
COPY files/10-bridge.conflist /etc/cni/net.d/10-bridge.conflist
COPY files/kubelet.service files/kind-images.service /etc/systemd/system/
COPY files/10-kubeadm.conf /etc/systemd/system/kubelet.service.d/10-kubeadm.conf
COPY files/default-storage.yaml files/default-cni.yaml /kind/manifests/
RUN chmod 0755 /usr/local/bin/entrypoint /usr/bin/kubeadm /usr/bin/kubelet /usr/bin/kubectl \\
 && echo "$K8S_VERSION" > /kind/version \\
 && mkdir -p /etc/kubernetes/manifests /opt/cni \\
 && ln -sfn /usr/lib/cni /opt/cni/bin \\
 && printf 'runtime-endpoint: unix:///run/containerd/containerd.sock\n' > /etc/crictl.yaml \\
 && printf 'net.ipv4.conf.all.route_localnet=1\nnet.ipv4.ip_forward=1\n' > /etc/sysctl.d/10-kind-node.conf \\
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
 && systemctl enable containerd.service kind-images.service kubelet.service \\
 && systemctl mask systemd-binfmt.service getty@tty1.service systemd-udevd.service systemd-modules-load.service
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
EOF
}

t0=$SECONDS
if [ "${1:-}" = rootfs ]; then rootfs; exit 0; fi   # the rootfs alone (needs no Kubernetes build)
for b in kubeadm kubelet kubectl kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd coredns; do
  [ -x "$BIN/$b" ] || { log "$BIN/$b missing: run $HERE/build-bins.sh first"; exit 1; }
done
stamp="$K8S_VERSION $(cat "$HERE"/kind-node/* "$0" "$HERE/../image/ocitar.py" | sha256sum | cut -c1-12) $(sha256sum "$BIN/kubeadm" | cut -c1-12)"
if docker image inspect "$REF" >/dev/null 2>&1 \
   && [ "$(docker image inspect -f '{{ index .Config.Labels "quicproxy.stamp" }}' "$REF")" = "$stamp" ]; then
  log "$REF up to date"; echo "$REF"; exit 0
fi
rootfs
images="$(component_images)"
ctx="$(mktemp -d "$WORK/ctx.XXXX")"
write_context "$ctx" $images
log "docker build $REF"
DOCKER_BUILDKIT=0 docker build -q --label "quicproxy.stamp=$stamp" --label "quicproxy.etcd-tag=$ETCD_TAG" \
  -t "$REF" "$ctx" >/dev/null
rm -rf "$ctx"
log "node image $REF ready in $((SECONDS - t0))s ($(docker image inspect -f '{{.Size}}' "$REF" | awk '{printf "%d MB", $1/1e6}'))"
echo "$REF"
