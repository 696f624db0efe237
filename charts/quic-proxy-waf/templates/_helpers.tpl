{{/* Names ------------------------------------------------------------------ */}}

{{- define "quic-proxy-waf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quic-proxy-waf.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "quic-proxy-waf.proxy.fullname" -}}
{{- printf "%s-proxy" (include "quic-proxy-waf.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "quic-proxy-waf.proxy.metricsName" -}}
{{- printf "%s-proxy-metrics" (include "quic-proxy-waf.fullname" . | trunc 49 | trimSuffix "-") }}
{{- end }}

{{- define "quic-proxy-waf.waf.fullname" -}}
{{- printf "%s-waf" (include "quic-proxy-waf.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{- define "quic-proxy-waf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quic-proxy-waf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "quic-proxy-waf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels and annotations ------------------------------------------------- */}}

{{- define "quic-proxy-waf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quic-proxy-waf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object: standard ones, then the user's `labels`. */}}
{{- define "quic-proxy-waf.labels" -}}
helm.sh/chart: {{ include "quic-proxy-waf.chart" . }}
{{ include "quic-proxy-waf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "quic-proxy-waf.proxy.selectorLabels" -}}
{{ include "quic-proxy-waf.selectorLabels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "quic-proxy-waf.proxy.labels" -}}
{{ include "quic-proxy-waf.labels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "quic-proxy-waf.waf.selectorLabels" -}}
{{ include "quic-proxy-waf.selectorLabels" . }}
app.kubernetes.io/component: waf
{{- end }}

{{- define "quic-proxy-waf.waf.labels" -}}
{{ include "quic-proxy-waf.labels" . }}
app.kubernetes.io/component: waf
{{- end }}

{{/*
"annotations:" block for an object's metadata: the user's `annotations`
merged with object-specific ones. Call with (dict "root" $ "extra" map).
Renders nothing when both are empty.
*/}}
{{- define "quic-proxy-waf.annotations" -}}
{{- $all := merge (deepCopy (default dict .extra)) (deepCopy .root.Values.annotations) }}
{{- with $all -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Images ----------------------------------------------------------------- */}}

{{/* <registry>/<repository>:<image.tag or global.tag or appVersion>; call with (dict "root" $ "image" .Values.x.image) */}}
{{- define "quic-proxy-waf.image" -}}
{{- $g := .root.Values.global }}
{{- $tag := .image.tag | default $g.tag | default .root.Chart.AppVersion }}
{{- printf "%s/%s:%s" (trimSuffix "/" $g.registry) .image.repository (toString $tag) }}
{{- end }}

{{/* Proxy topology --------------------------------------------------------- */}}

{{- define "quic-proxy-waf.isDaemonSet" -}}
{{- if eq .Values.proxy.kind "daemonset" }}true{{ end }}
{{- end }}

{{/* Host networking: DaemonSet mode, host ports on, daemonset.hostNetwork on. */}}
{{- define "quic-proxy-waf.proxy.hostNetwork" -}}
{{- if and (include "quic-proxy-waf.isDaemonSet" .) .Values.proxy.ports.useHostPorts .Values.daemonset.hostNetwork }}true{{ end }}
{{- end }}

{{/* Surge updates: daemonset.surge on the host network (see values.yaml). */}}
{{- define "quic-proxy-waf.proxy.surge" -}}
{{- if and .Values.daemonset.surge (include "quic-proxy-waf.proxy.hostNetwork" .) }}true{{ end }}
{{- end }}

{{/* Ports the container binds: the public ones with host networking (a hostPort must then equal the containerPort), unprivileged ones otherwise. */}}
{{- define "quic-proxy-waf.proxy.containerHttp" -}}
{{- if include "quic-proxy-waf.proxy.hostNetwork" . }}{{ .Values.proxy.ports.http }}{{ else }}{{ .Values.proxy.ports.containerHttp }}{{ end }}
{{- end }}

{{- define "quic-proxy-waf.proxy.containerHttps" -}}
{{- if include "quic-proxy-waf.proxy.hostNetwork" . }}{{ .Values.proxy.ports.https }}{{ else }}{{ .Values.proxy.ports.containerHttps }}{{ end }}
{{- end }}

{{/* The proxy Service exists unless disabled or the DaemonSet is reached on host ports. */}}
{{- define "quic-proxy-waf.proxy.serviceEnabled" -}}
{{- if and .Values.service.enabled (not (and (include "quic-proxy-waf.isDaemonSet" .) .Values.proxy.ports.useHostPorts)) }}true{{ end }}
{{- end }}

{{/* Root is needed only when the container itself binds a port below 1024. */}}
{{- define "quic-proxy-waf.proxy.needsRoot" -}}
{{- if or (lt (int (include "quic-proxy-waf.proxy.containerHttp" .)) 1024) (lt (int (include "quic-proxy-waf.proxy.containerHttps" .)) 1024) }}true{{ end }}
{{- end }}

{{/* Container securityContext of the proxy: the chart's safe default, then the user's `securityContext`. */}}
{{- define "quic-proxy-waf.proxy.securityContext" -}}
{{- $sc := dict "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- if include "quic-proxy-waf.proxy.needsRoot" . }}
{{- $_ := set $sc "runAsNonRoot" false }}
{{- $_ := set $sc "runAsUser" 0 }}
{{- $_ := set $sc "capabilities" (dict "drop" (list "ALL") "add" (list "NET_BIND_SERVICE")) }}
{{- else }}
{{- $_ := set $sc "runAsNonRoot" true }}
{{- $_ := set $sc "runAsUser" 10001 }}
{{- $_ := set $sc "runAsGroup" 10001 }}
{{- $_ := set $sc "capabilities" (dict "drop" (list "ALL")) }}
{{- end }}
{{- $sc = mergeOverwrite $sc (deepCopy .Values.securityContext) }}
{{- if eq (toString $sc.runAsUser) "0" }}
{{- $_ := set $sc "runAsNonRoot" false }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* WAF wiring ------------------------------------------------------------- */}}

{{/* off | service | inline, and the URL the proxy calls in service mode. */}}
{{- define "quic-proxy-waf.proxy.wafMode" -}}
{{- if not .Values.proxy.waf.enabled }}off
{{- else if or .Values.waf.enabled .Values.proxy.waf.url }}service
{{- else }}inline
{{- end }}
{{- end }}

{{- define "quic-proxy-waf.proxy.wafUrl" -}}
{{- if .Values.waf.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "quic-proxy-waf.waf.fullname" .) .Release.Namespace (int .Values.waf.service.port) }}
{{- else }}
{{- .Values.proxy.waf.url }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget ----------------------------------------------------- */}}

{{/*
minAvailable that still lets one pod be evicted: a number is capped at
replicas - 1, a percentage of 100% or more becomes replicas - 1.
Call with (dict "min" value "replicas" n).
*/}}
{{- define "quic-proxy-waf.safeMinAvailable" -}}
{{- $max := sub (int .replicas) 1 }}
{{- $min := .min }}
{{- if kindIs "string" $min }}
{{- if and (hasSuffix "%" $min) (lt (int (trimSuffix "%" $min)) 100) }}{{ $min | quote }}{{ else }}{{ min (int (trimSuffix "%" $min)) $max }}{{ end }}
{{- else }}
{{- min (int $min) $max }}
{{- end }}
{{- end }}

{{/* Test ---------------------------------------------------------------- */}}

{{/* Shared fields of the helm-test containers; call with (dict "service" "true"|"") */}}
{{- define "quic-proxy-waf.testContainer" -}}
{{- if not .service }}
env:
  - name: HOST_IP
    valueFrom:
      fieldRef:
        fieldPath: status.hostIP
{{- end }}
resources:
  requests:
    cpu: 10m
    memory: 32Mi
  limits:
    cpu: 200m
    memory: 128Mi
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  capabilities:
    drop: ["ALL"]
{{- end }}

{{/* WAF engine settings as quicproxy's `waf:` config keys (YAML), from waf.engine and waf.crs.
     Extra rule files are mounted next to config.yaml: in /etc/quicproxy (the WAF service),
     or in the folder given as "dir" (the proxy: /etc/quicproxy/config).
     Call with (dict "root" . "dir" FOLDER). */}}
{{- define "quic-proxy-waf.wafEngineConfig" -}}
{{- $dir := .dir | default "/etc/quicproxy" }}
{{- with .root }}
{{- $c := .Values.waf.crs }}
{{- $cfg := dict "engine" .Values.waf.engine "paranoia_level" (int $c.paranoiaLevel) "anomaly_threshold" (int $c.inboundAnomalyThreshold) "outbound_anomaly_threshold" (int $c.outboundAnomalyThreshold) "early_blocking" $c.earlyBlocking "allowed_methods" $c.allowedMethods }}
{{- if $c.detectionParanoiaLevel }}
{{- $_ := set $cfg "detection_paranoia_level" (int $c.detectionParanoiaLevel) }}
{{- end }}
{{- if $c.allowedContentTypes }}
{{- $_ := set $cfg "allowed_content_types" $c.allowedContentTypes }}
{{- end }}
{{- $exclusions := list }}
{{- range $c.exclusions }}
{{- $e := dict "rule_id" (int .ruleId) }}
{{- if .pathPrefix }}{{- $_ := set $e "path_prefix" .pathPrefix }}{{- end }}
{{- $exclusions = append $exclusions $e }}
{{- end }}
{{- if $exclusions }}
{{- $_ := set $cfg "exclusions" $exclusions }}
{{- end }}
{{- $files := list }}
{{- range $name, $_ := $c.extraRules }}
{{- $files = append $files (printf "%s/%s" $dir $name) }}
{{- end }}
{{- if $files }}
{{- $_ := set $cfg "extra_rules" $files }}
{{- end }}
{{- if include "quic-proxy-waf.wafPlugins" . }}
{{- $_ := set $cfg "plugins_dir" "/etc/quicproxy-plugins" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding the CRS plugins (waf.plugins), empty when there are none. */}}
{{- define "quic-proxy-waf.wafPlugins" -}}
{{- if .Values.waf.plugins.configMap }}
{{- .Values.waf.plugins.configMap }}
{{- else if .Values.waf.plugins.files }}
{{- printf "%s-waf-plugins" (include "quic-proxy-waf.fullname" .) }}
{{- end }}
{{- end }}

{{/* The plugins volume (under volumes:) and its mount (under volumeMounts:). */}}
{{- define "quic-proxy-waf.wafPluginsVolume" -}}
- name: waf-plugins
  configMap:
    name: {{ include "quic-proxy-waf.wafPlugins" . }}
{{- end }}
{{- define "quic-proxy-waf.wafPluginsMount" -}}
- name: waf-plugins
  mountPath: /etc/quicproxy-plugins
  readOnly: true
{{- end }}

{{/* The Secret holding the proxies' shared QUIC secret (see quic-secret.yaml). */}}
{{- define "quic-proxy-waf.proxy.quicSecret" -}}
{{- default (printf "%s-quic" (include "quic-proxy-waf.proxy.fullname" .)) .Values.proxy.quic.sharedSecret.existingSecret }}
{{- end }}

{{/* Checksum of the proxy's settings that need a restart (quicproxy reloads the rest of
     its config.yaml live when the mounted ConfigMap changes): listen, tls, quic, metrics,
     workers, upstream, and the extra WAF rule files. */}}
{{- define "quic-proxy-waf.proxy.restartChecksum" -}}
{{- $cm := include (print .Template.BasePath "/configmap.yaml") . | fromYaml }}
{{- $cfg := get $cm.data "config.yaml" | fromYaml }}
{{- $fixed := pick $cfg "listen" "tls" "quic" "metrics" "workers" "upstream" }}
{{- $rules := omit $cm.data "config.yaml" }}
{{- dict "config" $fixed "rules" $rules | toYaml | sha256sum }}
{{- end }}
