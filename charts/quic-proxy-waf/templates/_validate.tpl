{{/* Value combinations the schema cannot express; each fails with the fix. */}}
{{- define "quic-proxy-waf.validate" -}}
{{- $p := .Values.proxy }}
{{- if and (not $p.tls.secretName) (not $p.tls.selfSigned) }}
{{- fail "proxy.tls: no certificate. Set proxy.tls.secretName to a kubernetes.io/tls Secret, or proxy.tls.selfSigned=true" }}
{{- end }}
{{- if eq (int $p.ports.http) (int $p.ports.https) }}
{{- fail (printf "proxy.ports: http and https are both %d; give them different ports" (int $p.ports.http)) }}
{{- end }}
{{- if eq (int $p.ports.containerHttp) (int $p.ports.containerHttps) }}
{{- fail (printf "proxy.ports: containerHttp and containerHttps are both %d; give them different ports" (int $p.ports.containerHttp)) }}
{{- end }}
{{- $m := int .Values.metrics.port }}
{{- if or (eq $m (int (include "quic-proxy-waf.proxy.containerHttp" .))) (eq $m (int (include "quic-proxy-waf.proxy.containerHttps" .))) }}
{{- fail (printf "metrics.port: %d is also the proxy's http or https container port; give the metrics listener a port of its own" $m) }}
{{- end }}
{{- if and $p.upstreamTls.clientCertificate (not $p.upstreamTls.secretName) }}
{{- fail "proxy.upstreamTls.clientCertificate: the client certificate comes from a Secret; set proxy.upstreamTls.secretName" }}
{{- end }}
{{- if and $p.tls.secrets (not $p.tls.secretName) }}
{{- fail "proxy.tls.secrets: the default pair (no SNI, other names) is missing; set proxy.tls.secretName" }}
{{- end }}
{{- $seen := dict }}
{{- range $p.tls.secrets }}
{{- if or (hasKey $seen .secretName) (eq .secretName $p.tls.secretName) }}
{{- fail (printf "proxy.tls.secrets: Secret %s is listed twice; list each Secret once" .secretName) }}
{{- end }}
{{- $_ := set $seen .secretName true }}
{{- end }}
{{- if and .Values.daemonset.surge (not (include "quic-proxy-waf.proxy.hostNetwork" .)) }}
{{- fail "daemonset.surge: needs the host network (proxy.kind daemonset, proxy.ports.useHostPorts and daemonset.hostNetwork true): two pods cannot hold one hostPort; set daemonset.surge=false" }}
{{- end }}
{{- if and $p.tls.certManager.enabled (not $p.tls.secretName) }}
{{- fail "proxy.tls.certManager.enabled: cert-manager needs a Secret to write to; set proxy.tls.secretName" }}
{{- end }}
{{- if and $p.tls.certManager.enabled (or (not $p.tls.certManager.issuerRef.name) (not $p.tls.certManager.dnsNames)) }}
{{- fail "proxy.tls.certManager: set issuerRef.name and at least one dnsNames entry" }}
{{- end }}
{{- with .Values.waf.plugins }}
{{- if and .configMap .files }}
{{- fail "waf.plugins: both configMap and files are set; give the plugins one way" }}
{{- end }}
{{- if and (or .configMap .files) (eq $.Values.waf.engine "modsecurity") }}
{{- fail "waf.plugins: CRS plugins need CRS 4 and the image's ModSecurity runs CRS 3; use waf.engine coraza" }}
{{- end }}
{{- end }}
{{- if eq (include "quic-proxy-waf.proxy.wafMode" .) "service" }}
{{- range $i, $route := (default (list) $p.config.routes) }}
{{- range $key, $_ := (default (dict) $route.waf) }}
{{- if ne $key "mode" }}
{{- fail (printf "proxy.config.routes[%d].waf.%s: needs the WAF inline (the WAF service applies its own rules); set waf.enabled=false and proxy.waf.url empty, or keep only mode" $i $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
