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
{{- end }}
