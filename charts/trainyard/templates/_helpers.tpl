{{- define "trainyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* What every object's name starts with, one per release, so that two releases can share a namespace: the release
name when it already holds the chart's name (release "trainyard": trainyard-minio, trainyard-config), else
<release>-trainyard. 40 characters at most, leaving room for the longest suffix within a 63-character DNS label. */}}
{{- define "trainyard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "trainyard.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one of the release's objects: (dict "name" "minio" "root" $) -> <fullname>-minio. Every object and
every reference to one (envFrom, secretKeyRef, DNS names, selectors) goes through it. */}}
{{- define "trainyard.object" -}}
{{- printf "%s-%s" (include "trainyard.fullname" .root) .name -}}
{{- end -}}

{{/* The prefix of the training Jobs' names (<prefix>train-<run id>), at most 10 characters: the fullname, or when
longer than 9 characters its first 4 and a hash of the whole. A 42-character run id then still makes an Indexed Job
whose pod hostnames (<job>-<index>) fit in 63 characters. */}}
{{- define "trainyard.jobPrefix" -}}
{{- $full := include "trainyard.fullname" . -}}
{{- if le (len $full) 9 -}}
{{- printf "%s-" $full -}}
{{- else -}}
{{- printf "%s-%s-" ($full | trunc 4 | trimSuffix "-") ($full | sha256sum | trunc 4) -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries; part-of and instance are what the NetworkPolicies admit. */}}
{{- define "trainyard.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: trainyard
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "trainyard.podLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: trainyard
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "trainyard.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* (dict "image" .Values.x.image "root" $): an empty tag means the chart's appVersion, the release the images
are built from. */}}
{{- define "trainyard.image" -}}
{{ printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end -}}

{{/* Non-root, seccomp'd pod; uid defaults to the 10001 the trainyard images create. */}}
{{- define "trainyard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "trainyard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "trainyard.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{ include "trainyard.object" (dict "name" "minio" "root" .) }}:9000
{{- else -}}
{{- required "externalS3.endpoint is required when minio.enabled is false" .Values.externalS3.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "trainyard.s3Secure" -}}
{{- if .Values.minio.enabled -}}false{{- else -}}{{ .Values.externalS3.secure }}{{- end -}}
{{- end -}}

{{- define "trainyard.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
http://{{ include "trainyard.object" (dict "name" "mlflow" "root" .) }}:5000
{{- else -}}
{{- required "externalMlflow.trackingUri is required when mlflow.enabled is false" .Values.externalMlflow.trackingUri -}}
{{- end -}}
{{- end -}}


{{/* A generated secret value: the one the release's Secret already holds (so upgrades keep it), else a new
random one. lookup finds nothing without a cluster (helm template), so each such render draws anew. */}}
{{- define "trainyard.keptOrRandom" -}}
{{- $existing := get (lookup "v1" "Secret" .root.Release.Namespace .secret | default dict) "data" | default dict -}}
{{- get $existing .key | b64dec | default (randAlphaNum 40) -}}
{{- end -}}
