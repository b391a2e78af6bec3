{{/* Labels every object carries; part-of is what the NetworkPolicies admit. */}}
{{- define "trainyard.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: trainyard
app.kubernetes.io/instance: {{ .root.Release.Name }}
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

{{- define "trainyard.image" -}}
{{ printf "%s:%s" .repository .tag }}
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
minio:9000
{{- else -}}
{{- required "externalS3.endpoint is required when minio.enabled is false" .Values.externalS3.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "trainyard.s3Secure" -}}
{{- if .Values.minio.enabled -}}false{{- else -}}{{ .Values.externalS3.secure }}{{- end -}}
{{- end -}}

{{- define "trainyard.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
http://mlflow:5000
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
