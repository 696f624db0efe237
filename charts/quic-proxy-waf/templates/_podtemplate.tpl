{{/*
The proxy pod, shared by deployment.yaml and daemonset.yaml: they differ only
in the workload fields around it (replicas/strategy vs updateStrategy).
*/}}
{{- define "quic-proxy-waf.proxy.podTemplate" -}}
{{- $hostNetwork := include "quic-proxy-waf.proxy.hostNetwork" . }}
{{- $surge := include "quic-proxy-waf.proxy.surge" . }}
{{- $ports := .Values.proxy.ports }}
{{- $tls := .Values.proxy.tls -}}
metadata:
  labels:
    {{- include "quic-proxy-waf.proxy.labels" . | nindent 4 }}
    {{- with .Values.proxy.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /* only settings that need a restart roll the pods: the rest is reloaded live */}}
  {{- $checksums := dict "checksum/config" (include "quic-proxy-waf.proxy.restartChecksum" .) }}
  {{- if and (eq (include "quic-proxy-waf.proxy.wafMode" .) "inline") .Values.waf.plugins.files }}
  {{- $_ := set $checksums "checksum/waf-plugins" (include (print $.Template.BasePath "/waf-plugins-configmap.yaml") . | sha256sum) }}
  {{- end }}
  {{- $podAnnotations := merge $checksums (deepCopy .Values.proxy.podAnnotations) }}
  {{- with include "quic-proxy-waf.annotations" (dict "root" . "extra" $podAnnotations) }}{{ . | nindent 2 }}{{ end }}
spec:
  serviceAccountName: {{ include "quic-proxy-waf.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- if $hostNetwork }}
  hostNetwork: true
  dnsPolicy: {{ .Values.daemonset.dnsPolicy }}
  {{- end }}
  {{- with .Values.global.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.proxy.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ add (int .Values.proxy.shutdownGrace) 5 }}
  {{- with .Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: proxy
      image: {{ include "quic-proxy-waf.image" (dict "root" . "image" .Values.proxy.image) }}
      imagePullPolicy: {{ .Values.global.imagePullPolicy }}
      command: ["quicproxy"]
      args:
        - serve
        - --config
        - /etc/quicproxy/config/config.yaml
        {{- range .Values.proxy.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        # the image sets HTTP_PORT/HTTPS_PORT, which win over the config file
        - name: HTTP_PORT
          value: {{ include "quic-proxy-waf.proxy.containerHttp" . | quote }}
        - name: HTTPS_PORT
          value: {{ include "quic-proxy-waf.proxy.containerHttps" . | quote }}
        - name: HOME
          value: /tmp
        {{- with .Values.proxy.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.proxy.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if not $surge }}
      ports:
        - name: http
          containerPort: {{ include "quic-proxy-waf.proxy.containerHttp" . }}
          protocol: TCP
          {{- if $ports.useHostPorts }}
          hostPort: {{ $ports.http }}
          {{- end }}
        - name: https
          containerPort: {{ include "quic-proxy-waf.proxy.containerHttps" . }}
          protocol: TCP
          {{- if $ports.useHostPorts }}
          hostPort: {{ $ports.https }}
          {{- end }}
        - name: http3
          containerPort: {{ include "quic-proxy-waf.proxy.containerHttps" . }}
          protocol: UDP
          {{- if $ports.useHostPorts }}
          hostPort: {{ $ports.https }}
          {{- end }}
        # /metrics: scraped through the metrics Service, not a host port (with
        # host networking every port is on the node: Kubernetes sets hostPort)
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
          protocol: TCP
          {{- if $hostNetwork }}
          hostPort: {{ .Values.metrics.port }}
          {{- end }}
      {{- end }}
      livenessProbe:
        httpGet:
          path: /_gwhealthz
          port: {{ if $surge }}{{ include "quic-proxy-waf.proxy.containerHttp" . }}{{ else }}http{{ end }}
        {{- toYaml .Values.proxy.livenessProbe | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /_gwhealthz
          port: {{ if $surge }}{{ include "quic-proxy-waf.proxy.containerHttp" . }}{{ else }}http{{ end }}
        {{- toYaml .Values.proxy.readinessProbe | nindent 8 }}
      {{- with .Values.proxy.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "quic-proxy-waf.proxy.securityContext" . | nindent 8 }}
      volumeMounts:
        # a folder, never subPath: the kubelet's updates reach the pod, quicproxy reloads
        - name: config
          mountPath: /etc/quicproxy/config
          readOnly: true
        {{- if and (eq (include "quic-proxy-waf.proxy.wafMode" .) "inline") (include "quic-proxy-waf.wafPlugins" .) }}
        {{- include "quic-proxy-waf.wafPluginsMount" . | nindent 8 }}
        {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- if $tls.secretName }}
        - name: tls-cert
          mountPath: {{ dir $tls.certFile }}
          readOnly: true
        {{- if ne (dir $tls.certFile) (dir $tls.keyFile) }}
        - name: tls-key
          mountPath: {{ dir $tls.keyFile }}
          readOnly: true
        {{- end }}
        {{- else }}
        - name: tls-self-signed
          mountPath: /var/run/quicproxy/tls
        {{- end }}
        {{- range $i, $sni := $tls.secrets }}
        - name: tls-sni-{{ $i }}
          mountPath: /etc/quicproxy/tls-sni/{{ $sni.secretName }}
          readOnly: true
        {{- end }}
        {{- if .Values.proxy.upstreamTls.secretName }}
        - name: upstream-tls
          mountPath: /etc/quicproxy/upstream-tls
          readOnly: true
        {{- end }}
        {{- if .Values.proxy.quic.sharedSecret.enabled }}
        - name: quic-secret
          mountPath: /etc/quicproxy/quic
          readOnly: true
        {{- end }}
        {{- if $surge }}
        - name: quic-handover
          mountPath: /run/quicproxy
        {{- end }}
  volumes:
    {{- if $surge }}
    - name: quic-handover
      hostPath:
        path: {{ .Values.daemonset.handoverPath }}
        type: DirectoryOrCreate
    {{- end }}
    - name: config
      configMap:
        name: {{ include "quic-proxy-waf.proxy.fullname" . }}-config
    {{- if and (eq (include "quic-proxy-waf.proxy.wafMode" .) "inline") (include "quic-proxy-waf.wafPlugins" .) }}
    {{- include "quic-proxy-waf.wafPluginsVolume" . | nindent 4 }}
    {{- end }}
    - name: tmp
      emptyDir: {}
    {{- if $tls.secretName }}
    {{- if eq (dir $tls.certFile) (dir $tls.keyFile) }}
    - name: tls-cert
      secret:
        secretName: {{ $tls.secretName }}
        items:
          - key: tls.crt
            path: {{ base $tls.certFile }}
          - key: tls.key
            path: {{ base $tls.keyFile }}
    {{- else }}
    - name: tls-cert
      secret:
        secretName: {{ $tls.secretName }}
        items:
          - key: tls.crt
            path: {{ base $tls.certFile }}
    - name: tls-key
      secret:
        secretName: {{ $tls.secretName }}
        items:
          - key: tls.key
            path: {{ base $tls.keyFile }}
    {{- end }}
    {{- else }}
    - name: tls-self-signed
      emptyDir: {}
    {{- end }}
    {{- range $i, $sni := $tls.secrets }}
    - name: tls-sni-{{ $i }}
      secret:
        secretName: {{ $sni.secretName }}
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- with .Values.proxy.upstreamTls.secretName }}
    - name: upstream-tls
      secret:
        secretName: {{ . }}
    {{- end }}
    {{- if .Values.proxy.quic.sharedSecret.enabled }}
    - name: quic-secret
      secret:
        secretName: {{ include "quic-proxy-waf.proxy.quicSecret" . }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
