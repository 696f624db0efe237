# quic-proxy-waf: one image, two entrypoints
#   proxy:        quicproxy serve            (HTTP :8080, HTTPS TCP + QUIC/HTTP/3 UDP :8443)
#   WAF service:  quicproxy waf serve --port 9000
# WAF engines inside: Coraza + OWASP CRS 4 (default; quicproxy/waf/coraza/libquicproxy-coraza.so)
# and ModSecurity (libmodsecurity3) + Debian's CRS 3 (--waf-engine modsecurity).
#
# The Coraza library is Go; the base images carry no Go, so it is built on the host first
# (conformance/image/build-image.sh does this):
#   bash quicproxy/waf/coraza/build.sh && docker build ...
# A base image that has Go builds it here instead.
#
# BASE_IMAGE must be a Debian bookworm image with python3 (3.11+) and the venv module.
# The default is the public python:3.11-slim-bookworm; machines without a registry pass a
# debootstrap-built base instead (conformance/image/build-base.sh):
#   docker build --build-arg BASE_IMAGE=quicproxy-conformance/base:bookworm -t quic-proxy-waf .
# Works with BuildKit and with the classic builder (no syntax directive, no cache mounts).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Build-stage only (never in the final image): extra CA certificates (PEM text) for networks
# that intercept TLS to the package index, and an alternative index URL.
ARG EXTRA_CA_PEM=""
ARG PIP_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/quicproxy \
 && if [ -n "$EXTRA_CA_PEM" ]; then \
      cat /etc/ssl/certs/ca-certificates.crt > /opt/build-ca.pem \
      && printf '%s\n' "$EXTRA_CA_PEM" >> /opt/build-ca.pem \
      && /opt/quicproxy/bin/pip config --site set global.cert /opt/build-ca.pem; fi \
 && if [ -n "$PIP_INDEX_URL" ]; then /opt/quicproxy/bin/pip config --site set global.index-url "$PIP_INDEX_URL"; fi
# dependencies first, from pyproject.toml alone, so source edits keep this layer cached
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/quicproxy/bin/pip install --only-binary=:all: -r /tmp/requirements.txt
COPY . /src
RUN lib=/src/quicproxy/waf/coraza/libquicproxy-coraza.so \
 && if [ ! -s "$lib" ]; then \
      if command -v go >/dev/null 2>&1; then bash /src/quicproxy/waf/coraza/build.sh; \
      else echo "Coraza WAF engine not built: run 'bash quicproxy/waf/coraza/build.sh' before docker build" >&2; exit 1; fi; fi \
 && touch /src/README.md \
 && /opt/quicproxy/bin/pip install --no-deps /src \
 && /opt/quicproxy/bin/python -m compileall -q /opt/quicproxy/lib \
 && /opt/quicproxy/bin/quicproxy --help >/dev/null \
 && /opt/quicproxy/bin/quicproxy waf info \
 && rm -f /opt/quicproxy/pip.conf /opt/build-ca.pem

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmodsecurity3 modsecurity-crs \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && (getent group 10001 >/dev/null || groupadd --system --gid 10001 quicproxy) \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin quicproxy \
 && printf '%s\n' \
      '#!/opt/quicproxy/bin/python' \
      '"""Docker HEALTHCHECK: /_gwhealthz on the proxy, /health on the WAF service."""' \
      'import os, sys, urllib.request' \
      'argv = open("/proc/1/cmdline", "rb").read().split(b"\0")' \
      'if b"waf" in argv and b"serve" in argv and argv.index(b"waf") < argv.index(b"serve"):' \
      '    port = os.environ.get("WAF_PORT", "9000")' \
      '    for i, a in enumerate(argv):' \
      '        if a == b"--port" and i + 1 < len(argv): port = argv[i + 1].decode()' \
      '    url = "http://127.0.0.1:%s/health" % port' \
      'else:' \
      '    url = "http://127.0.0.1:%s/_gwhealthz" % os.environ.get("HTTP_PORT", "8080")' \
      'try:' \
      '    sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)' \
      'except Exception as exc:' \
      '    print(url, exc); sys.exit(1)' \
      > /usr/local/bin/quicproxy-healthcheck \
 && chmod 0755 /usr/local/bin/quicproxy-healthcheck
COPY --from=build /opt/quicproxy /opt/quicproxy
RUN /opt/quicproxy/bin/quicproxy waf info && /opt/quicproxy/bin/quicproxy waf info --waf-engine modsecurity
ENV PATH=/opt/quicproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 XDG_CACHE_HOME=/tmp/.cache \
    HTTP_PORT=8080 HTTPS_PORT=8443 WAF_PORT=9000 \
    QUICPROXY_CRS_DIR=/usr/share/modsecurity-crs
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080/tcp 8443/tcp 8443/udp 9000/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/usr/local/bin/quicproxy-healthcheck"]
ENTRYPOINT ["quicproxy"]
CMD ["serve"]
