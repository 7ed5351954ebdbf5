{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "esplanade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-wide prefix; short enough that "<prefix>-etcd-headless" and "<prefix>-keyexchange-headless" fit 63. */}}
{{- define "esplanade.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "esplanade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* dict "root" $ "component" "api" -> "<fullname>-api" */}}
{{- define "esplanade.componentName" -}}
{{- printf "%s-%s" (include "esplanade.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The components the chart runs from the Esplanade image, with their gRPC ports (settings.endpoints). */}}
{{- define "esplanade.grpcPorts" -}}
keyexchange: 50061
dataplane: 50062
policy: 50063
{{- end -}}

{{- define "esplanade.apiPort" -}}8080{{- end -}}
{{- define "esplanade.metricsOffset" -}}1000{{- end -}}

{{/* dict "root" $ "component" "policy" -> the gRPC port */}}
{{- define "esplanade.grpcPort" -}}
{{- get (include "esplanade.grpcPorts" .root | fromYaml) .component -}}
{{- end -}}

{{- define "esplanade.metricsPort" -}}
{{- if eq .component "api" -}}
{{- include "esplanade.apiPort" .root -}}
{{- else -}}
{{- add (include "esplanade.grpcPort" .) (include "esplanade.metricsOffset" .root) -}}
{{- end -}}
{{- end -}}

{{/* dict "root" $ "component" "policy" -> "<fullname>-policy.<ns>.svc.<domain>" */}}
{{- define "esplanade.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "esplanade.componentName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------- */}}

{{- define "esplanade.labels" -}}
helm.sh/chart: {{ include "esplanade.chart" . }}
app.kubernetes.io/name: {{ include "esplanade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: esplanade
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* dict "root" $ "component" "api" */}}
{{- define "esplanade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "esplanade.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "esplanade.componentLabels" -}}
{{ include "esplanade.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image ------------------------------------------------------------------------------ */}}

{{- define "esplanade.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Secrets ---------------------------------------------------------------------------- */}}

{{- define "esplanade.kekSecretName" -}}
{{- default (printf "%s-kek" (include "esplanade.fullname" .)) .Values.kek.existingSecret -}}
{{- end -}}

{{- define "esplanade.kekSecretKey" -}}
{{- if .Values.kek.existingSecret -}}{{ .Values.kek.existingSecretKey }}{{- else -}}ring{{- end -}}
{{- end -}}

{{- define "esplanade.bootstrapSecretName" -}}
{{- default (printf "%s-bootstrap-token" (include "esplanade.fullname" .)) .Values.bootstrapToken.existingSecret -}}
{{- end -}}

{{- define "esplanade.bootstrapSecretKey" -}}
{{- if .Values.bootstrapToken.existingSecret -}}{{ .Values.bootstrapToken.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{/* dict "root" $ "component" "api" */}}
{{- define "esplanade.grpcTlsSecretName" -}}
{{- $existing := get .root.Values.tls.grpc.existingSecrets .component -}}
{{- default (printf "%s-grpc-tls" (include "esplanade.componentName" .)) $existing -}}
{{- end -}}

{{/* "true" when the chart makes the gRPC certificates (no existingSecrets given). */}}
{{- define "esplanade.grpcTlsGenerated" -}}
{{- $any := false -}}
{{- range $c, $name := .Values.tls.grpc.existingSecrets -}}{{- if $name -}}{{- $any = true -}}{{- end -}}{{- end -}}
{{- if and .Values.tls.grpc.enabled .Values.tls.grpc.generate (not $any) -}}true{{- end -}}
{{- end -}}

{{- define "esplanade.etcdTlsEnabled" -}}
{{- if .Values.etcd.enabled -}}
{{- if .Values.etcd.tls.enabled -}}true{{- end -}}
{{- else if .Values.externalEtcd.tls.enabled -}}true{{- end -}}
{{- end -}}

{{/* The client certificate Secret the services mount for etcd. */}}
{{- define "esplanade.etcdClientTlsSecretName" -}}
{{- if .Values.etcd.enabled -}}
{{- default (printf "%s-etcd-client-tls" (include "esplanade.fullname" .)) .Values.etcd.tls.clientExistingSecret -}}
{{- else -}}
{{- .Values.externalEtcd.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "esplanade.etcdServerTlsSecretName" -}}
{{- default (printf "%s-etcd-server-tls" (include "esplanade.fullname" .)) .Values.etcd.tls.existingSecret -}}
{{- end -}}

{{/* etcd ------------------------------------------------------------------------------- */}}

{{- define "esplanade.etcdName" -}}{{ include "esplanade.fullname" . }}-etcd{{- end -}}
{{- define "esplanade.etcdHeadlessName" -}}{{ include "esplanade.fullname" . }}-etcd-headless{{- end -}}

{{- define "esplanade.etcdScheme" -}}
{{- if .Values.etcd.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* JSON list of the etcd client endpoints (host:port) the services use. */}}
{{- define "esplanade.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- list (printf "%s.%s.svc.%s:2379" (include "esplanade.etcdName" .) .Release.Namespace .Values.clusterDomain) | toJson -}}
{{- else -}}
{{- .Values.externalEtcd.endpoints | toJson -}}
{{- end -}}
{{- end -}}

{{/* The services' config file ---------------------------------------------------------- */}}

{{- define "esplanade.configFile" -}}
{{- $root := . -}}
{{- $tlsDir := "/etc/esplanade/grpc-tls" -}}
{{- $etcdTlsDir := "/etc/esplanade/etcd-tls" -}}
{{- $etcdTls := dict "enabled" false -}}
{{- if include "esplanade.etcdTlsEnabled" . -}}
{{- $etcdTls = dict "enabled" true "ca_file" (printf "%s/ca.crt" $etcdTlsDir) "cert_file" (printf "%s/tls.crt" $etcdTlsDir) "key_file" (printf "%s/tls.key" $etcdTlsDir) -}}
{{- end -}}
{{- $grpcTls := dict "enabled" false -}}
{{- if .Values.tls.grpc.enabled -}}
{{- $grpcTls = dict "enabled" true "ca_file" (printf "%s/ca.crt" $tlsDir) "cert_file" (printf "%s/tls.crt" $tlsDir) "key_file" (printf "%s/tls.key" $tlsDir) -}}
{{- end -}}
{{- $endpoints := dict "metrics_port_offset" (int (include "esplanade.metricsOffset" .)) -}}
{{- range $c := list "keyexchange" "dataplane" "policy" -}}
{{- $args := dict "root" $root "component" $c -}}
{{- $_ := set $endpoints $c (printf "%s:%s" (include "esplanade.serviceHost" $args) (include "esplanade.grpcPort" $args)) -}}
{{- end -}}
{{- $_ := set $endpoints "api" (printf "%s:%v" (include "esplanade.serviceHost" (dict "root" $root "component" "api")) .Values.api.service.port) -}}
{{- $telemetry := dict "log_format" .Values.telemetry.logFormat "log_level" .Values.telemetry.logLevel "otlp_insecure" .Values.telemetry.otlpInsecure -}}
{{- if .Values.telemetry.otlpEndpoint -}}{{- $_ := set $telemetry "otlp_endpoint" .Values.telemetry.otlpEndpoint -}}{{- end -}}
{{- $owned := dict
    "store" (dict "backend" "etcd" "etcd_endpoints" (include "esplanade.etcdEndpoints" . | fromJsonArray) "etcd_tls" $etcdTls "timeout_seconds" .Values.storeTimeoutSeconds)
    "kek" (dict "file" "/etc/esplanade/kek/ring")
    "grpc" (dict "tls" $grpcTls)
    "endpoints" $endpoints
    "telemetry" $telemetry
    "keyexchange" (dict "transport" "relay")
    "api" (dict "bootstrap_token_file" "/etc/esplanade/bootstrap/token")
-}}
{{- $config := mustMergeOverwrite (deepCopy .Values.settings) $owned -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Pods ------------------------------------------------------------------------------- */}}

{{- define "esplanade.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "esplanade.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* dict "root" $ "component" "api" "values" .Values.api: default anti-affinity unless the user gave one. */}}
{{- define "esplanade.affinity" -}}
{{- if .values.affinity -}}
{{- toYaml .values.affinity -}}
{{- else -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "esplanade.selectorLabels" . | nindent 12 }}
{{- end -}}
{{- end -}}

{{- define "esplanade.topologySpread" -}}
{{- $selector := dict "matchLabels" (include "esplanade.selectorLabels" . | fromYaml) -}}
{{- $out := list -}}
{{- range $c := .values.topologySpreadConstraints -}}
{{- $out = append $out (merge (deepCopy $c) (dict "labelSelector" $selector)) -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Annotations shared by every pod: config checksum (roll on config change) and scraping. */}}
{{- define "esplanade.podAnnotations" -}}
checksum/config: {{ include "esplanade.configFile" .root | sha256sum }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "esplanade.metricsPort" . | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Environment of a service container: its config file and its own listen address. */}}
{{- define "esplanade.env" -}}
- name: ESPLANADE_CONFIG
  value: /etc/esplanade/config/esplanade.yaml
- name: ESPLANADE_ENDPOINTS__{{ upper .component }}
  {{- if eq .component "api" }}
  value: "0.0.0.0:{{ include "esplanade.apiPort" .root }}"
  {{- else }}
  value: "0.0.0.0:{{ include "esplanade.grpcPort" . }}"
  {{- end }}
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- with .values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every service pod has: config, KEK ring, TLS material, scratch space. */}}
{{- define "esplanade.volumes" -}}
- name: config
  configMap:
    name: {{ include "esplanade.fullname" .root }}-config
- name: kek
  secret:
    secretName: {{ include "esplanade.kekSecretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ include "esplanade.kekSecretKey" .root }}
        path: ring
{{- if .root.Values.tls.grpc.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ include "esplanade.grpcTlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- if include "esplanade.etcdTlsEnabled" .root }}
- name: etcd-tls
  secret:
    secretName: {{ include "esplanade.etcdClientTlsSecretName" .root }}
    defaultMode: 0440
{{- end }}
{{- if eq .component "api" }}
- name: bootstrap-token
  secret:
    secretName: {{ include "esplanade.bootstrapSecretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ include "esplanade.bootstrapSecretKey" .root }}
        path: token
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
- name: state
  emptyDir:
    sizeLimit: 512Mi
{{- with .values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "esplanade.volumeMounts" -}}
- name: config
  mountPath: /etc/esplanade/config
  readOnly: true
- name: kek
  mountPath: /etc/esplanade/kek
  readOnly: true
{{- if .root.Values.tls.grpc.enabled }}
- name: grpc-tls
  mountPath: /etc/esplanade/grpc-tls
  readOnly: true
{{- end }}
{{- if include "esplanade.etcdTlsEnabled" .root }}
- name: etcd-tls
  mountPath: /etc/esplanade/etcd-tls
  readOnly: true
{{- end }}
{{- if eq .component "api" }}
- name: bootstrap-token
  mountPath: /etc/esplanade/bootstrap
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
- name: state
  mountPath: /var/lib/esplanade
{{- with .values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* gRPC probes: liveness asks for the "liveness" health name (SERVING while the process runs),
     readiness for "" (SERVING only while the store answers). */}}
{{- define "esplanade.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ include "esplanade.grpcPort" . }}
    service: liveness
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  grpc:
    port: {{ include "esplanade.grpcPort" . }}
    service: liveness
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ include "esplanade.grpcPort" . }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}
