{{/* Common labels for every object of the release. */}}
{{- define "chaperone.labels" -}}
app.kubernetes.io/name: chaperone
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels selecting the operator pods (stable across upgrades: never add version here). */}}
{{- define "chaperone.selectorLabels" -}}
app.kubernetes.io/name: chaperone
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Name of the operator's Deployment, Service and ServiceAccount. */}}
{{- define "chaperone.operatorName" -}}
{{- default "chaperone-operator" .Values.operator.serviceAccountName -}}
{{- end -}}

{{/* The Secret holding the webhook serving certificate (tls.crt, tls.key). */}}
{{- define "chaperone.webhookSecret" -}}
{{- default "chaperone-webhook-tls" .Values.webhook.certSecret -}}
{{- end -}}

{{/* An image reference from {repository, tag}; the tag defaults to the chart's appVersion. */}}
{{- define "chaperone.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/*
clientConfig of one webhook: the in-cluster Service, or webhook.url for an operator running
outside the cluster (development, the test bed). The path is the kopf handler id.
*/}}
{{- define "chaperone.clientConfig" -}}
{{- if .root.Values.webhook.url }}
url: {{ printf "%s/%s" (trimSuffix "/" .root.Values.webhook.url) .path | quote }}
{{- else }}
service:
  name: {{ include "chaperone.operatorName" .root }}
  namespace: {{ .root.Release.Namespace }}
  path: {{ printf "/%s" .path | quote }}
  port: 443
{{- end }}
caBundle: {{ .caBundle }}
{{- end -}}

{{/* Labels selecting the chart's Redis pod. */}}
{{- define "chaperone.redisSelectorLabels" -}}
app.kubernetes.io/name: chaperone
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{/*
The Redis URL the operator hands to every sidecar (without the password): the chart's Redis
(redis:// or, with TLS, rediss://) or redis.url. Empty: no Redis.
*/}}
{{- define "chaperone.redisURL" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s://chaperone-redis.%s.svc:6379/0" (ternary "rediss" "redis" .Values.redis.tls.enabled) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The Secret (release namespace) and key holding the Redis password; empty when none. */}}
{{- define "chaperone.redisPasswordSecret" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if .Values.redis.enabled -}}
chaperone-redis
{{- end -}}
{{- end -}}
{{- define "chaperone.redisPasswordKey" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- else -}}
password
{{- end -}}
{{- end -}}
