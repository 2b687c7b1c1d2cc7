{{/* Names. */}}
{{- define "layerkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "layerkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "layerkv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "layerkv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: layerkv
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "worker"). */}}
{{- define "layerkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "layerkv.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "layerkv.image" -}}
{{- printf "%s/%s:%s" .ctx.Values.image.repository .image (default .ctx.Chart.AppVersion .ctx.Values.image.tag) }}
{{- end }}

{{- define "layerkv.workerName" -}}
{{- printf "%s-worker" (include "layerkv.fullname" .) }}
{{- end }}

{{- define "layerkv.redisSecretName" -}}
{{- default (printf "%s-redis" (include "layerkv.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* Container securityContext shared by every container. */}}
{{- define "layerkv.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end }}

{{/* Env vars giving LAYERKV_REDIS_URL (internal Redis with auth, or external). */}}
{{- define "layerkv.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: LAYERKV_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "layerkv.redisSecretName" . }}
      key: redis-password
- name: LAYERKV_REDIS_URL
  value: {{ printf "redis://:$(LAYERKV_REDIS_PASSWORD)@%s-redis:6379/0" (include "layerkv.fullname" .) | quote }}
{{- else if .Values.redis.external.urlSecret.name }}
- name: LAYERKV_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.urlSecret.name }}
      key: {{ .Values.redis.external.urlSecret.key }}
{{- else }}
- name: LAYERKV_REDIS_URL
  value: {{ required "redis.external.url (or redis.external.urlSecret.name) is required when redis.enabled is false" .Values.redis.external.url | quote }}
{{- end }}
{{- end }}
