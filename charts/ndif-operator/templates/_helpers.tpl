{{/* Names and labels, as `helm create` does them. */}}
{{- define "ndif.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ndif.fullname" -}}
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

{{- define "ndif.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ndif.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ndif
{{- end }}

{{- define "ndif.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ndif.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ndif.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ndif.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces the operator watches: a list; empty means cluster-wide. */}}
{{- define "ndif.watchNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- join "," .Values.watch.namespaces }}
{{- else if .Values.watch.namespaced }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "ndif.operatorImage" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "ndif.runtimeImage" -}}
{{ .Values.rayService.image.repository }}:{{ default .Chart.AppVersion .Values.rayService.image.tag }}
{{- end }}

{{/* Where the gateway reads its credentials on the Ray head (mounted Secrets, one file per key). */}}
{{- define "ndif.gatewayCredentialsDir" -}}
/etc/ndif/gateway-credentials
{{- end }}

{{/* Where model replicas on the Ray workers read the read-only weights credentials. */}}
{{- define "ndif.weightsCredentialsDir" -}}
/etc/ndif/weights-credentials
{{- end }}

{{/* Where the gateway reads the API-key hashes (a mounted Secret: kubelet refreshes it, no restart). */}}
{{- define "ndif.apiKeysDir" -}}
/etc/ndif/api-keys
{{- end }}
