{{/*
Render-time checks. values.schema.json catches wrong types, enums and ranges first; these catch
what a schema cannot (combinations), and repeat the range checks for renders that skip the schema.
Every message names the value to change.
*/}}
{{- define "esplanade.validate" -}}
{{- $v := .Values -}}

{{- range $c := list "api" "policy" "keyexchange" "dataplane" -}}
{{- $r := get (get $v $c) "replicas" -}}
{{- if lt (int $r) 0 -}}
{{- fail (printf "%s.replicas must be 0 or more (got %v)" $c $r) -}}
{{- end -}}
{{- end -}}

{{- $dp := $v.dataplane -}}
{{- if not (has $dp.kind (list "Deployment" "DaemonSet")) -}}
{{- fail (printf "dataplane.kind must be Deployment or DaemonSet (got %q)" $dp.kind) -}}
{{- end -}}
{{- if and (eq $dp.kind "DaemonSet") $dp.autoscaling.enabled -}}
{{- fail "dataplane.autoscaling.enabled cannot be true with dataplane.kind=DaemonSet: a DaemonSet runs one pod per node; choose kind Deployment to autoscale" -}}
{{- end -}}
{{- if $dp.autoscaling.enabled -}}
{{- if lt (int $dp.autoscaling.minReplicas) 1 -}}
{{- fail "dataplane.autoscaling.minReplicas must be 1 or more" -}}
{{- end -}}
{{- if gt (int $dp.autoscaling.minReplicas) (int $dp.autoscaling.maxReplicas) -}}
{{- fail (printf "dataplane.autoscaling.maxReplicas (%v) must be at least dataplane.autoscaling.minReplicas (%v)" $dp.autoscaling.maxReplicas $dp.autoscaling.minReplicas) -}}
{{- end -}}
{{- if and (gt (int $dp.autoscaling.targetCPUUtilizationPercentage) 0) (not (dig "requests" "cpu" "" $dp.resources)) -}}
{{- fail "dataplane.resources.requests.cpu is required with dataplane.autoscaling.targetCPUUtilizationPercentage: utilisation is a percentage of the request" -}}
{{- end -}}
{{- if and (gt (int $dp.autoscaling.targetMemoryUtilizationPercentage) 0) (not (dig "requests" "memory" "" $dp.resources)) -}}
{{- fail "dataplane.resources.requests.memory is required with dataplane.autoscaling.targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- if and (le (int $dp.autoscaling.targetCPUUtilizationPercentage) 0) (le (int $dp.autoscaling.targetMemoryUtilizationPercentage) 0) -}}
{{- fail "dataplane.autoscaling needs a target: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- end -}}
{{- if and $dp.hostNetwork $dp.hostPorts.enabled -}}
{{- fail "dataplane.hostPorts.enabled and dataplane.hostNetwork are exclusive: with hostNetwork the pod already owns the node's UDP 500/4500" -}}
{{- end -}}
{{- if not (or $dp.udpService.enabled $dp.hostNetwork $dp.hostPorts.enabled) -}}
{{- fail "dataplane: nothing exposes UDP 500/4500; set dataplane.udpService.enabled, dataplane.hostNetwork or dataplane.hostPorts.enabled" -}}
{{- end -}}
{{- if and $dp.hostNetwork $dp.sysctls -}}
{{- fail "dataplane.sysctls must be [] with dataplane.hostNetwork: Kubernetes refuses net.* pod sysctls in the host network namespace; set them on the node" -}}
{{- end -}}
{{- if and (eq $dp.tun.source "devicePlugin") (not $dp.tun.resourceName) -}}
{{- fail "dataplane.tun.resourceName is required with dataplane.tun.source=devicePlugin" -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled $dp.hostNetwork (not $v.networkPolicy.nodeCIDRs) -}}
{{- fail "networkPolicy.nodeCIDRs is required with dataplane.hostNetwork: a host-network dataplane reaches keyexchange and etcd from node addresses, which pod selectors do not match" -}}
{{- end -}}

{{- if $v.etcd.enabled -}}
{{- if $v.externalEtcd.endpoints -}}
{{- fail "externalEtcd.endpoints is set while etcd.enabled is true: choose the bundled etcd or an external one (set etcd.enabled=false)" -}}
{{- end -}}
{{- if or (lt (int $v.etcd.replicas) 1) (eq (mod (int $v.etcd.replicas) 2) 0) -}}
{{- fail (printf "etcd.replicas must be odd and 1 or more for a quorum (got %v)" $v.etcd.replicas) -}}
{{- end -}}
{{- if $v.etcd.tls.enabled -}}
{{- if and $v.etcd.tls.existingSecret (not $v.etcd.tls.clientExistingSecret) -}}
{{- fail "etcd.tls.clientExistingSecret is required with etcd.tls.existingSecret: the chart cannot sign a client certificate with your CA" -}}
{{- end -}}
{{- if and $v.etcd.tls.clientExistingSecret (not $v.etcd.tls.existingSecret) -}}
{{- fail "etcd.tls.existingSecret is required with etcd.tls.clientExistingSecret: the members need a server certificate from the same CA" -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if not $v.externalEtcd.endpoints -}}
{{- fail "externalEtcd.endpoints is required when etcd.enabled is false (host:port of each etcd client endpoint)" -}}
{{- end -}}
{{- range $e := $v.externalEtcd.endpoints -}}
{{- if not (regexMatch "^[A-Za-z0-9.\\-\\[\\]:]+:[0-9]{1,5}$" $e) -}}
{{- fail (printf "externalEtcd.endpoints: %q is not host:port" $e) -}}
{{- end -}}
{{- end -}}
{{- if and $v.externalEtcd.tls.enabled (not $v.externalEtcd.tls.existingSecret) -}}
{{- fail "externalEtcd.tls.existingSecret is required when externalEtcd.tls.enabled is true (Secret with ca.crt, tls.crt, tls.key)" -}}
{{- end -}}
{{- end -}}

{{- if $v.tls.grpc.enabled -}}
{{- $given := list -}}
{{- $missing := list -}}
{{- range $c := list "api" "policy" "keyexchange" "dataplane" -}}
{{- if get $v.tls.grpc.existingSecrets $c -}}{{- $given = append $given $c -}}{{- else -}}{{- $missing = append $missing $c -}}{{- end -}}
{{- end -}}
{{- if and $given $missing -}}
{{- fail (printf "tls.grpc.existingSecrets.%s is required: give a Secret for every service or for none (all certificates must share one CA)" (first $missing)) -}}
{{- end -}}
{{- if and (not $given) (not $v.tls.grpc.generate) -}}
{{- fail "tls.grpc.enabled is true without material: set tls.grpc.existingSecrets.{api,policy,keyexchange,dataplane} or tls.grpc.generate=true" -}}
{{- end -}}
{{- end -}}

{{- if not (or $v.kek.existingSecret $v.kek.ring $v.kek.generate) -}}
{{- fail "kek: no key-encryption key ring; set kek.existingSecret, kek.ring or kek.generate=true" -}}
{{- end -}}
{{- if and $v.kek.existingSecret $v.kek.ring -}}
{{- fail "kek.ring and kek.existingSecret are exclusive" -}}
{{- end -}}
{{- range $line := splitList "\n" (trim $v.kek.ring) -}}
{{- if and $line (not (regexMatch "^[A-Za-z0-9._-]+:[A-Za-z0-9+/]{43}=$" (trim $line))) -}}
{{- fail "kek.ring must hold lines key-id:base64(32 bytes) (the value is not shown)" -}}
{{- end -}}
{{- end -}}
{{- if not (or $v.bootstrapToken.existingSecret $v.bootstrapToken.value $v.bootstrapToken.generate) -}}
{{- fail "bootstrapToken: no admin token; set bootstrapToken.existingSecret, bootstrapToken.value or bootstrapToken.generate=true" -}}
{{- end -}}
{{- if and $v.bootstrapToken.existingSecret $v.bootstrapToken.value -}}
{{- fail "bootstrapToken.value and bootstrapToken.existingSecret are exclusive" -}}
{{- end -}}

{{- $owned := dict
    "store" "etcd.* / externalEtcd.* / storeTimeoutSeconds"
    "kek" "kek.*"
    "endpoints" "(fixed by the chart)"
    "telemetry" "telemetry.*"
-}}
{{- range $section, $instead := $owned -}}
{{- if hasKey $v.settings $section -}}
{{- fail (printf "settings.%s is set by the chart; use %s" $section $instead) -}}
{{- end -}}
{{- end -}}
{{- $ownedLeaves := dict
    "grpc" (dict "tls" "tls.grpc.*")
    "api" (dict "bootstrap_token_file" "bootstrapToken.*")
    "dataplane" (dict "node" "(set per pod by the chart)" "udp_port" "(4500, fixed by the Services)" "ike_port" "(500, fixed by the Services)")
    "keyexchange" (dict "transport" "(relay: the dataplane owns UDP 500/4500)" "ike_port" "(500, fixed by the Services)")
-}}
{{- range $section, $keys := $ownedLeaves -}}
{{- $given := get $v.settings $section -}}
{{- if kindIs "map" $given -}}
{{- range $key, $instead := $keys -}}
{{- if hasKey $given $key -}}
{{- fail (printf "settings.%s.%s is set by the chart; use %s" $section $key $instead) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
