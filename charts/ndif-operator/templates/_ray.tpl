{{/* The Ray containers' env, volumes and security. The head runs the gateway (the operator pins it
there) and is the only pod given the gateway's credentials; the workers run model replicas, which
run users' code, and get at most the read-only weights credentials (docs/security.md, layer 6). */}}
{{- define "ndif.rayEnv" -}}
- name: NDIF_LOG_FORMAT
  value: {{ .Values.operator.logFormat | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: OMP_NUM_THREADS
  value: "1"
{{- end }}

{{/* Credentials are files, never environment variables (a variable would be in every Ray process's
environment); the runtime reads them once (model_runtime/credentials.py). */}}
{{- define "ndif.hasGatewayCredentials" -}}
{{- if or .Values.gateway.objectStore.credentialsSecret .Values.gateway.influx.tokenSecret }}true{{ end }}
{{- end }}

{{- define "ndif.rayHeadEnv" -}}
{{ include "ndif.rayEnv" . }}
{{- if include "ndif.hasGatewayCredentials" . }}
- name: NDIF_CREDENTIALS_DIR
  value: {{ include "ndif.gatewayCredentialsDir" . | quote }}
{{- end }}
{{- with .Values.gateway.influx }}
{{- if .url }}
- name: NDIF_INFLUX_URL
  value: {{ .url | quote }}
- name: NDIF_INFLUX_ORG
  value: {{ .org | quote }}
- name: NDIF_INFLUX_BUCKET
  value: {{ .bucket | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ndif.rayWorkerEnv" -}}
{{ include "ndif.rayEnv" . }}
{{- if .Values.rayService.weightsCredentialsSecret }}
- name: NDIF_CREDENTIALS_DIR
  value: {{ include "ndif.weightsCredentialsDir" . | quote }}
{{- end }}
{{- end }}

{{- define "ndif.rayHeadVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if include "ndif.hasGatewayCredentials" . }}
- name: gateway-credentials
  mountPath: {{ include "ndif.gatewayCredentialsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.gateway.apiKeys.secret }}
- name: api-keys
  mountPath: {{ include "ndif.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "ndif.rayWorkerVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.rayService.weightsCredentialsSecret }}
- name: weights-credentials
  mountPath: {{ include "ndif.weightsCredentialsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "ndif.dshmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
{{- end }}

{{- define "ndif.rayHeadVolumes" -}}
{{ include "ndif.dshmVolume" . }}
{{- if include "ndif.hasGatewayCredentials" . }}
# One directory, one file per credential: the results bucket's keys and the InfluxDB token.
- name: gateway-credentials
  projected:
    defaultMode: 0440
    sources:
      {{- with .Values.gateway.objectStore.credentialsSecret }}
      - secret:
          name: {{ . }}
      {{- end }}
      {{- with .Values.gateway.influx.tokenSecret }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ $.Values.gateway.influx.tokenKey }}
              path: NDIF_INFLUX_TOKEN
      {{- end }}
{{- end }}
{{- if .Values.gateway.apiKeys.secret }}
- name: api-keys
  # A mounted Secret (not env, not subPath): kubelet refreshes the files, the gateway re-reads them.
  secret:
    secretName: {{ .Values.gateway.apiKeys.secret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "ndif.rayWorkerVolumes" -}}
{{ include "ndif.dshmVolume" . }}
{{- if .Values.rayService.weightsCredentialsSecret }}
- name: weights-credentials
  secret:
    secretName: {{ .Values.rayService.weightsCredentialsSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "ndif.raySecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{- define "ndif.rayPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}
