{{/* The Ray container's env, volumes and security, shared by the head and the worker groups. */}}
{{- define "ndif.rayEnv" -}}
- name: NDIF_LOG_FORMAT
  value: {{ .Values.operator.logFormat | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: OMP_NUM_THREADS
  value: "1"
{{- end }}

{{- define "ndif.rayEnvFrom" -}}
envFrom:
  # The object store's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...): referenced, never inlined.
  - secretRef:
      name: {{ .Values.gateway.objectStore.credentialsSecret }}
{{- end }}

{{- define "ndif.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
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
