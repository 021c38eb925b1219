{{/* Names and labels. */}}
{{- define "dreamomni2.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dreamomni2.fullname" -}}
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

{{- define "dreamomni2.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "dreamomni2.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dreamomni2
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "gateway"). */}}
{{- define "dreamomni2.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dreamomni2.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dreamomni2.componentLabels" -}}
{{ include "dreamomni2.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dreamomni2.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Object names. */}}
{{- define "dreamomni2.gateway.fullname" -}}{{ include "dreamomni2.fullname" . }}-gateway{{- end }}
{{- define "dreamomni2.worker.fullname" -}}{{ include "dreamomni2.fullname" . }}-worker{{- end }}
{{- define "dreamomni2.webhooks.fullname" -}}{{ include "dreamomni2.fullname" . }}-webhooks{{- end }}
{{- define "dreamomni2.redis.fullname" -}}{{ include "dreamomni2.fullname" . }}-redis{{- end }}
{{- define "dreamomni2.config.fullname" -}}{{ include "dreamomni2.fullname" . }}-config{{- end }}
{{- define "dreamomni2.weights.fullname" -}}{{ include "dreamomni2.fullname" . }}-weights{{- end }}

{{/* Workers run the published weights (GPU, weights volume) unless they run the tiny preset. */}}
{{- define "dreamomni2.weights.enabled" -}}
{{- if eq .Values.worker.preset "dreamomni2" }}true{{ end }}
{{- end }}

{{- define "dreamomni2.weights.claimName" -}}
{{- default (include "dreamomni2.weights.fullname" .) .Values.weights.persistence.existingClaim }}
{{- end }}

{{/*
The download's identity: a hash of what is fetched. A new repo, revision or pattern list gives a new
folder on the volume and a new Job, so rolling out new weights never overwrites the ones in use.
*/}}
{{- define "dreamomni2.weights.spec" -}}
{{- dict "base" .Values.weights.baseModel "adapters" .Values.weights.adapters | toJson }}
{{- end }}

{{- define "dreamomni2.weights.id" -}}
{{- include "dreamomni2.weights.spec" . | sha256sum | trunc 12 }}
{{- end }}

{{/* Where the workers find the base model and the adapters, inside the weights volume (/models). */}}
{{- define "dreamomni2.weights.baseModelPath" -}}
{{- if eq .Values.weights.source "download" }}
{{- printf "/models/sets/%s/base" (include "dreamomni2.weights.id" .) }}
{{- else }}
{{- printf "/models/%s" .Values.weights.existing.baseModelPath }}
{{- end }}
{{- end }}

{{- define "dreamomni2.weights.adaptersPath" -}}
{{- if eq .Values.weights.source "download" }}
{{- printf "/models/sets/%s/adapters" (include "dreamomni2.weights.id" .) }}
{{- else }}
{{- printf "/models/%s" .Values.weights.existing.adaptersPath }}
{{- end }}
{{- end }}

{{- define "dreamomni2.weights.marker" -}}
{{- printf "/models/sets/%s/.complete" (include "dreamomni2.weights.id" .) }}
{{- end }}

{{- define "dreamomni2.hfToken.secretName" -}}
{{- default (printf "%s-hf-token" (include "dreamomni2.fullname" .)) .Values.weights.download.existingSecret }}
{{- end }}

{{- define "dreamomni2.apiKeys.secretName" -}}
{{- default (printf "%s-api-keys" (include "dreamomni2.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "dreamomni2.apiKeys.enabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiKeys }}true{{ end }}
{{- end }}

{{/* Webhook signing secrets: the chart's Secret, or one of the operator's (either key may be absent). */}}
{{- define "dreamomni2.webhooks.secretName" -}}
{{- default (include "dreamomni2.webhooks.fullname" .) .Values.webhooks.existingSecret }}
{{- end }}

{{/*
DREAMOMNI2_WEBHOOK_SECRET / _SECRETS env entries, the same in the gateway, GPU worker and webhook pods.
An existing Secret's keys are optional: it may hold the deployment's secret, per-key ones, or both.
*/}}
{{- define "dreamomni2.webhooks.secretEnv" -}}
{{- $w := .Values.webhooks }}
{{- $name := include "dreamomni2.webhooks.secretName" . }}
{{- $env := list }}
{{- if or $w.existingSecret $w.secret }}
{{- $ref := dict "name" $name "key" $w.existingSecretKey }}
{{- if $w.existingSecret }}{{ $_ := set $ref "optional" true }}{{ end }}
{{- $env = append $env (dict "name" "DREAMOMNI2_WEBHOOK_SECRET" "valueFrom" (dict "secretKeyRef" $ref)) }}
{{- end }}
{{- if or $w.existingSecret $w.perKeySecrets }}
{{- $ref := dict "name" $name "key" $w.existingSecretPerKeyKey }}
{{- if $w.existingSecret }}{{ $_ := set $ref "optional" true }}{{ end }}
{{- $env = append $env (dict "name" "DREAMOMNI2_WEBHOOK_SECRETS" "valueFrom" (dict "secretKeyRef" $ref)) }}
{{- end }}
{{- if $env }}{{ toYaml $env }}{{ end }}
{{- end }}

{{- define "dreamomni2.webhooks.secretConfigured" -}}
{{- if or .Values.webhooks.existingSecret .Values.webhooks.secret .Values.webhooks.perKeySecrets }}true{{ end }}
{{- end }}

{{/* Changes whenever the webhook secrets' source changes: pods that read them restart together. */}}
{{- define "dreamomni2.webhooks.secretChecksum" -}}
{{- pick .Values.webhooks "secret" "perKeySecrets" "existingSecret" "existingSecretKey" "existingSecretPerKeyKey" | toJson | sha256sum }}
{{- end }}

{{/* Signed result links: the key's Secret (the chart's, generated once, or yours) and the links' base. */}}
{{- define "dreamomni2.resultUrls.secretName" -}}
{{- default (printf "%s-result-urls" (include "dreamomni2.fullname" .)) .Values.resultUrls.existingSecret }}
{{- end }}

{{/* DREAMOMNI2_RESULT_URL_SECRET, the same in the gateway and GPU worker pods (the workers sign webhook links). */}}
{{- define "dreamomni2.resultUrls.secretEnv" -}}
- name: DREAMOMNI2_RESULT_URL_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "dreamomni2.resultUrls.secretName" . }}
      key: {{ .Values.resultUrls.existingSecretKey }}
{{- end }}

{{/* DREAMOMNI2_PUBLIC_URL: resultUrls.publicUrl, else the first ingress host (https with tls), else empty. */}}
{{- define "dreamomni2.publicUrl" -}}
{{- $ingress := .Values.gateway.ingress }}
{{- if .Values.resultUrls.publicUrl }}
{{- .Values.resultUrls.publicUrl | trimSuffix "/" }}
{{- else if and $ingress.enabled $ingress.hosts }}
{{- $host := (first $ingress.hosts).host }}
{{- $tls := false }}
{{- range $ingress.tls }}{{ if has $host (.hosts | default list) }}{{ $tls = true }}{{ end }}{{ end }}
{{- printf "%s://%s" (ternary "https" "http" $tls) $host }}
{{- end }}
{{- end }}

{{/* Redis: in-chart or external, one shape for the URL, KEDA and the password Secret. */}}
{{/* Whether the external Redis is found through its sentinels (externalRedis.sentinel.hosts). */}}
{{- define "dreamomni2.redis.sentinel" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.sentinel.hosts }}true{{ end }}
{{- end }}

{{/* The ports a client of the external Redis connects to: the data nodes', and the sentinels'. */}}
{{- define "dreamomni2.redis.externalPorts" -}}
{{- $ports := list (int .Values.externalRedis.port) }}
{{- if include "dreamomni2.redis.sentinel" . }}
{{- range .Values.externalRedis.sentinel.hosts }}
{{- $ports = append $ports (int (regexReplaceAll "^.*:" . "")) }}
{{- end }}
{{- end }}
{{- toJson (uniq $ports) }}
{{- end }}

{{- define "dreamomni2.redis.host" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s.%s.svc" (include "dreamomni2.redis.fullname" .) .Release.Namespace }}
{{- else }}
{{- required "externalRedis.host is required when redis.enabled=false" .Values.externalRedis.host }}
{{- end }}
{{- end }}

{{- define "dreamomni2.redis.port" -}}
{{- if .Values.redis.enabled }}6379{{ else }}{{ .Values.externalRedis.port }}{{ end }}
{{- end }}

{{- define "dreamomni2.redis.database" -}}
{{- if .Values.redis.enabled }}0{{ else }}{{ .Values.externalRedis.database }}{{ end }}
{{- end }}

{{- define "dreamomni2.redis.tls" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls }}true{{ end }}
{{- end }}

{{- define "dreamomni2.redis.username" -}}
{{- if not .Values.redis.enabled }}{{ .Values.externalRedis.username }}{{ end }}
{{- end }}

{{/* Whether Redis asks for a password: always in-chart; external when one is configured. */}}
{{- define "dreamomni2.redis.hasPassword" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.existingSecret .Values.externalRedis.password }}true{{ end }}
{{- end }}

{{- define "dreamomni2.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- default (include "dreamomni2.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- else }}
{{- default (include "dreamomni2.redis.fullname" .) .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "dreamomni2.redis.secretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}{{ .Values.externalRedis.existingSecretPasswordKey }}{{ end }}
{{- end }}

{{/*
DREAMOMNI2_REDIS_URL, built by Kubernetes from REDIS_PASSWORD (declared just before it), so the
password stays in its Secret. A password set by hand must be URL-safe. With sentinels, the URL has no
host (the sentinels name the primary): DREAMOMNI2_REDIS_SENTINELS and _SENTINEL_MASTER follow it.
*/}}
{{- define "dreamomni2.redis.env" -}}
{{- $env := list }}
{{- $auth := "" }}
{{- if include "dreamomni2.redis.hasPassword" . }}
{{- $ref := dict "name" (include "dreamomni2.redis.secretName" .) "key" (include "dreamomni2.redis.secretKey" .) }}
{{- $env = append $env (dict "name" "REDIS_PASSWORD" "valueFrom" (dict "secretKeyRef" $ref)) }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" (include "dreamomni2.redis.username" .) }}
{{- end }}
{{- $tls := eq (include "dreamomni2.redis.tls" .) "true" }}
{{- if include "dreamomni2.redis.sentinel" . }}
{{- $sentinel := .Values.externalRedis.sentinel }}
{{- $url := printf "redis://%s/%s" $auth (include "dreamomni2.redis.database" .) }}
{{- $env = append $env (dict "name" "DREAMOMNI2_REDIS_URL" "value" $url) }}
{{- $env = append $env (dict "name" "DREAMOMNI2_REDIS_SENTINELS" "value" (join "," $sentinel.hosts)) }}
{{- $env = append $env (dict "name" "DREAMOMNI2_REDIS_SENTINEL_MASTER" "value" $sentinel.masterName) }}
{{- if $sentinel.usePassword }}
{{- if not $auth }}{{ fail "externalRedis.sentinel.usePassword needs externalRedis.password or existingSecret" }}{{ end }}
{{- $env = append $env (dict "name" "DREAMOMNI2_REDIS_SENTINEL_PASSWORD" "value" "$(REDIS_PASSWORD)") }}
{{- end }}
{{- else }}
{{- $url := printf "%s://%s%s:%s/%s%s" (ternary "rediss" "redis" $tls) $auth (include "dreamomni2.redis.host" .) (include "dreamomni2.redis.port" .) (include "dreamomni2.redis.database" .) (ternary "?ssl_cert_reqs=required" "" $tls) }}
{{- $env = append $env (dict "name" "DREAMOMNI2_REDIS_URL" "value" $url) }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/* DREAMOMNI2_* entries of a map, sorted, as env entries. */}}
{{- define "dreamomni2.envMap" -}}
{{- range $key, $value := . }}
- name: {{ $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{- define "dreamomni2.workerGracePeriod" -}}
{{- add .Values.config.jobTimeoutS .Values.worker.shutdownMarginSeconds }}
{{- end }}
