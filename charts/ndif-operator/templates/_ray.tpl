{{/* The Ray container's env, volumes and security, shared by the head and the worker groups. */}}
{{- define "ndif.rayEnv" -}}
- name: NDIF_LOG_FORMAT
  value: {{ .Values.operator.logFormat | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: OMP_NUM_THREADS
  value: "1"
{{- if .Values.gateway.objectStore.credentialsSecret }}
# The object store's credentials are files, never environment variables (a variable would be in
# every Ray process's environment); the runtime reads them (model_runtime/credentials.py).
- name: NDIF_CREDENTIALS_DIR
  value: {{ include "ndif.credentialsDir" . | quote }}
{{- end }}
{{- end }}

{{- define "ndif.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.gateway.objectStore.credentialsSecret }}
- name: object-store-credentials
  mountPath: {{ include "ndif.credentialsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.gateway.apiKeys.secret }}
- name: api-keys
  mountPath: {{ include "ndif.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "ndif.rayVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
{{- if .Values.gateway.objectStore.credentialsSecret }}
- name: object-store-credentials
  secret:
    secretName: {{ .Values.gateway.objectStore.credentialsSecret }}
    defaultMode: 0440
{{- end }}
{{- if .Values.gateway.apiKeys.secret }}
- name: api-keys
  # A mounted Secret (not env, not subPath): kubelet refreshes the files, the gateway re-reads them.
  secret:
    secretName: {{ .Values.gateway.apiKeys.secret }}
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
