{{/*
The pod template, shared by the single-node Deployment and the fleet's StatefulSet. In a fleet
(registry.nats.url set) the catalog is in NATS and the data dir is this pod's cache and audit log:
a volume of its own from the StatefulSet's claim template (persistence.enabled), else an emptyDir.
*/}}
{{- define "tensor-wasm.podTemplate" -}}
{{- $fullname := include "tensor-wasm.fullname" . }}
{{- $functions := .Values.functions.existingConfigMap | default (ternary (printf "%s-functions" $fullname) "" (not (empty .Values.functions.modules))) }}
{{- $shards := include "tensor-wasm.shards" . | int }}
{{- $fleet := include "tensor-wasm.fleet" . }}
{{- $extraEnvNames := list }}
{{- range .Values.extraEnv }}{{ $extraEnvNames = append $extraEnvNames .name }}{{ end -}}
metadata:
  labels:
    {{- include "tensor-wasm.selectorLabels" . | nindent 4 }}
  annotations:
    # A changed token list is picked up without a restart; the chart's own Secret still rolls
    # the pods, so that `helm upgrade` with new tokens is visible at once.
    checksum/tokens: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and .Values.gpu.enabled .Values.gpu.runtimeClassName }}
  runtimeClassName: {{ .Values.gpu.runtimeClassName }}
  {{- end }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  # SIGTERM: /readyz fails at once, connections are taken for drainGraceMs, in-flight requests
  # get drainTimeoutMs.
  terminationGracePeriodSeconds: {{ add (div (add .Values.drainGraceMs .Values.drainTimeoutMs) 1000) 5 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    seccompProfile:
      # The default profile often blocks io_uring; the server then uses epoll by itself.
      type: RuntimeDefault
  {{- if .Values.doctor.enabled }}
  # `tensor-wasm doctor` first: a node that cannot run the server (no GPU where one is asked
  # for, kernels that do not compile for its SM, a data volume without room for the audit
  # reserve) keeps the pod in Init with the reason in the init container's log.
  initContainers:
    - name: doctor
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["doctor"{{ if .Values.gpu.enabled }}, "--require-gpu"{{ end }}]
      env:
        - { name: TENSOR_WASM_DATA_DIR, value: /var/lib/tensor-wasm }
      resources:
        {{- include "tensor-wasm.resources" . | nindent 8 }}
      securityContext:
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        capabilities:
          drop: [ALL]
      volumeMounts:
        - { name: data, mountPath: /var/lib/tensor-wasm }
        - { name: tmp, mountPath: /tmp }
  {{- end }}
  containers:
    - name: tensor-wasm
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve"]
      ports:
        - name: http
          containerPort: 8080
          protocol: TCP
      env:
        - { name: TENSOR_WASM_API_LISTEN_ADDR, value: "0.0.0.0:8080" }
        - { name: TENSOR_WASM_DATA_DIR, value: /var/lib/tensor-wasm }
        - { name: TENSOR_WASM_API_TOKENS_FILE, value: /etc/tensor-wasm/tokens/TENSOR_WASM_API_TOKENS }
        - { name: TENSOR_WASM_LOG, value: {{ .Values.log.level | quote }} }
        - { name: TENSOR_WASM_GPU, value: {{ ternary "cuda" "host" .Values.gpu.enabled | quote }} }
        - { name: TENSOR_WASM_DRAIN_GRACE_MS, value: {{ .Values.drainGraceMs | quote }} }
        - { name: TENSOR_WASM_DRAIN_TIMEOUT_MS, value: {{ .Values.drainTimeoutMs | quote }} }
        {{- if gt $shards 0 }}
        - { name: TENSOR_WASM_SHARDS, value: {{ $shards | quote }} }
        {{- end }}
        {{- if and .Values.cpuPinning.enabled (gt (int .Values.cpuPinning.idleSpinUs) 0) }}
        - { name: TENSOR_WASM_IDLE_SPIN_US, value: {{ .Values.cpuPinning.idleSpinUs | quote }} }
        {{- end }}
        {{- if .Values.auth.requireTenant }}
        - { name: TENSOR_WASM_API_REQUIRE_TENANT, value: "true" }
        {{- end }}
        {{- if .Values.auth.tokenIdKeySecret }}
        - name: TENSOR_WASM_API_TOKEN_ID_KEY
          valueFrom:
            secretKeyRef: { name: {{ .Values.auth.tokenIdKeySecret }}, key: TENSOR_WASM_API_TOKEN_ID_KEY }
        {{- end }}
        {{- if .Values.audit.signingKeySecret }}
        - { name: TENSOR_WASM_AUDIT_SIGNING_KEY, value: /etc/tensor-wasm/audit-key/signing-key }
        - { name: TENSOR_WASM_AUDIT_CHECKPOINT_INTERVAL_MS, value: {{ .Values.audit.checkpointIntervalMs | quote }} }
        {{- end }}
        {{- if gt (int .Values.rateLimit.qps) 0 }}
        - { name: TENSOR_WASM_API_RATE_LIMIT_QPS, value: {{ .Values.rateLimit.qps | quote }} }
        {{- if gt (int .Values.rateLimit.burst) 0 }}
        - { name: TENSOR_WASM_API_RATE_LIMIT_BURST, value: {{ .Values.rateLimit.burst | quote }} }
        {{- end }}
        {{- end }}
        {{- if $functions }}
        - { name: TENSOR_WASM_FUNCTIONS_DIR, value: /etc/tensor-wasm/functions }
        {{- end }}
        {{- if .Values.tls.enabled }}
        - { name: TENSOR_WASM_TLS_CERT, value: /etc/tensor-wasm/tls/tls.crt }
        - { name: TENSOR_WASM_TLS_KEY, value: /etc/tensor-wasm/tls/tls.key }
        {{- if .Values.tls.clientCASecret }}
        - { name: TENSOR_WASM_TLS_CLIENT_CA, value: /etc/tensor-wasm/client-ca/ca.crt }
        {{- end }}
        {{- end }}
        {{- with .Values.tls.trustedProxyCIDRs }}
        - { name: TENSOR_WASM_API_TRUSTED_PROXY_CIDRS, value: {{ . | quote }} }
        {{- end }}
        {{- if $fleet }}
        # The catalog is in NATS JetStream; the data dir is this pod's cache.
        - { name: TENSOR_WASM_REGISTRY, value: {{ .Values.registry.nats.url | quote }} }
        {{- if .Values.registry.nats.credsSecret.name }}
        - { name: TENSOR_WASM_REGISTRY_CREDS, value: /etc/tensor-wasm/registry/nats.creds }
        {{- end }}
        {{- with .Values.registry.nats.timeoutMs }}
        - { name: TENSOR_WASM_REGISTRY_TIMEOUT_MS, value: {{ . | int64 | quote }} }
        {{- end }}
        {{- with .Values.registry.nats.maxObjectMb }}
        - { name: TENSOR_WASM_REGISTRY_MAX_OBJECT_MB, value: {{ . | int64 | quote }} }
        {{- end }}
        {{- with .Values.registry.nats.replicas }}
        - { name: TENSOR_WASM_REGISTRY_REPLICAS, value: {{ . | int64 | quote }} }
        {{- end }}
        # The pod's name (<release>-tensor-wasm-0, -1, ...) names the replica in its audit records.
        - name: TENSOR_WASM_REPLICA_ID
          valueFrom:
            fieldRef: { fieldPath: metadata.name }
        {{- if and (not .Values.persistence.enabled) (not (has "TENSOR_WASM_API_AUDIT_LOG" $extraEnvNames)) }}
        # The emptyDir goes with the pod: the audit log goes to stdout too, for the log shipper.
        - { name: TENSOR_WASM_API_AUDIT_LOG, value: "file:/var/lib/tensor-wasm/audit,stdout" }
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if and .Values.tls.enabled .Values.tls.clientCASecret }}
      # With mTLS every connection needs a client certificate, which the kubelet has not:
      # the probes check that the port accepts.
      readinessProbe:
        tcpSocket: { port: http }
        periodSeconds: 5
      livenessProbe:
        tcpSocket: { port: http }
        periodSeconds: 10
        failureThreshold: 3
      {{- else }}
      readinessProbe:
        httpGet: { path: /readyz, port: http, scheme: {{ ternary "HTTPS" "HTTP" .Values.tls.enabled }} }
        periodSeconds: 5
        failureThreshold: 2
      livenessProbe:
        httpGet: { path: /healthz, port: http, scheme: {{ ternary "HTTPS" "HTTP" .Values.tls.enabled }} }
        periodSeconds: 10
        failureThreshold: 3
      {{- end }}
      startupProbe:
        tcpSocket: { port: http }
        periodSeconds: 2
        failureThreshold: 60
      resources:
        {{- include "tensor-wasm.resources" . | nindent 8 }}
      securityContext:
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        capabilities:
          drop: [ALL]
      volumeMounts:
        - { name: data, mountPath: /var/lib/tensor-wasm }
        - { name: tmp, mountPath: /tmp }
        - { name: tokens, mountPath: /etc/tensor-wasm/tokens, readOnly: true }
        {{- if .Values.audit.signingKeySecret }}
        - { name: audit-key, mountPath: /etc/tensor-wasm/audit-key, readOnly: true }
        {{- end }}
        {{- if $functions }}
        - { name: functions, mountPath: /etc/tensor-wasm/functions, readOnly: true }
        {{- end }}
        {{- if .Values.tls.enabled }}
        - { name: tls, mountPath: /etc/tensor-wasm/tls, readOnly: true }
        {{- if .Values.tls.clientCASecret }}
        - { name: client-ca, mountPath: /etc/tensor-wasm/client-ca, readOnly: true }
        {{- end }}
        {{- end }}
        {{- if and $fleet .Values.registry.nats.credsSecret.name }}
        - { name: registry-creds, mountPath: /etc/tensor-wasm/registry, readOnly: true }
        {{- end }}
  volumes:
    {{- if not (and $fleet .Values.persistence.enabled) }}
    {{- /* A fleet with persistence: `data` is the StatefulSet's claim template, one per pod. */}}
    - name: data
      {{- if .Values.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim | default (printf "%s-data" $fullname) }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    - name: tmp
      emptyDir: {}
    - name: tokens
      secret:
        secretName: {{ include "tensor-wasm.tokensSecret" . }}
        items:
          - { key: TENSOR_WASM_API_TOKENS, path: TENSOR_WASM_API_TOKENS }
    {{- if and $fleet .Values.registry.nats.credsSecret.name }}
    - name: registry-creds
      secret:
        secretName: {{ .Values.registry.nats.credsSecret.name }}
        # The NKey seed: owner read only (the pod's fsGroup adds group read).
        defaultMode: 0400
        items:
          - { key: {{ required "registry.nats.credsSecret.key is required with its name" .Values.registry.nats.credsSecret.key | quote }}, path: nats.creds }
    {{- end }}
    {{- if .Values.audit.signingKeySecret }}
    - name: audit-key
      secret:
        secretName: {{ .Values.audit.signingKeySecret }}
        # Owner read only (the pod's fsGroup adds group read; the server warns, and refuses a
        # key anyone may read).
        defaultMode: 0400
        items:
          - { key: signing-key, path: signing-key }
    {{- end }}
    {{- if $functions }}
    - name: functions
      configMap:
        name: {{ $functions }}
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ required "tls.secretName is required with tls.enabled" .Values.tls.secretName }}
    {{- if .Values.tls.clientCASecret }}
    - name: client-ca
      secret:
        secretName: {{ .Values.tls.clientCASecret }}
    {{- end }}
    {{- end }}
  {{- $nodeSelector := merge (deepCopy (.Values.nodeSelector | default dict)) (ternary (.Values.gpu.nodeSelector | default dict) dict .Values.gpu.enabled) }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := concat (.Values.tolerations | default list) (ternary (.Values.gpu.tolerations | default list) list .Values.gpu.enabled) }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
