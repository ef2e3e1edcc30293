{{- define "tensor-wasm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tensor-wasm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tensor-wasm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tensor-wasm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tensor-wasm.labels" -}}
{{ include "tensor-wasm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret holding TENSOR_WASM_API_TOKENS. */}}
{{- define "tensor-wasm.tokensSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-tokens" (include "tensor-wasm.fullname" .)) -}}
{{- end -}}

{{/* The shard count: explicit, else from the CPU limit (rounded up), else 0 (every allowed CPU). */}}
{{- define "tensor-wasm.shards" -}}
{{- if gt (int .Values.shards) 0 -}}
{{- .Values.shards -}}
{{- else if .Values.cpuPinning.enabled -}}
0
{{- else if and .Values.resources .Values.resources.limits .Values.resources.limits.cpu -}}
{{- $cpu := toString .Values.resources.limits.cpu -}}
{{- if hasSuffix "m" $cpu -}}
{{- max 1 (div (add (trimSuffix "m" $cpu | int) 999) 1000) -}}
{{- else -}}
{{- max 1 (ceil (float64 $cpu) | int) -}}
{{- end -}}
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/* Container resources: cpuPinning's Guaranteed shape, else .Values.resources; plus the GPUs. */}}
{{- define "tensor-wasm.resources" -}}
{{- $r := dict -}}
{{- if .Values.cpuPinning.enabled -}}
{{- $fixed := dict "cpu" (toString (int .Values.cpuPinning.cpus)) "memory" .Values.cpuPinning.memory -}}
{{- $r = dict "requests" $fixed "limits" (deepCopy $fixed) -}}
{{- else -}}
{{- $r = deepCopy (.Values.resources | default dict) -}}
{{- end -}}
{{- if .Values.gpu.enabled -}}
{{- $limits := get $r "limits" | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpu.count) -}}
{{- $_ := set $r "limits" $limits -}}
{{- if .Values.cpuPinning.enabled -}}
{{- $_ := set (get $r "requests") "nvidia.com/gpu" (int .Values.gpu.count) -}}
{{- end -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* "true" when replicas share a registry (registry.nats.url): a fleet, run as a StatefulSet. */}}
{{- define "tensor-wasm.fleet" -}}
{{- if .Values.registry.nats.url -}}true{{- end -}}
{{- end -}}

{{/* The StatefulSet's headless Service. */}}
{{- define "tensor-wasm.headlessService" -}}
{{- printf "%s-headless" (include "tensor-wasm.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}
