{{/* Common labels on every object. */}}
{{- define "tessera.labels" -}}
app.kubernetes.io/part-of: tessera-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tessera.fullname" -}}
{{- if contains "tessera" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-tessera" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Host directory holding the node plugin socket; the registrar tells kubelet this path. */}}
{{- define "tessera.nodeSocketDir" -}}
{{ .Values.node.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{/* The config's values with the backends filled in: those of config.backends and nothing else, or, when it is
empty, the plugin's embedded default (one file backend `local` under <stateDir>/file). values.yaml keeps
config.backends empty because Helm merges maps: a default backend there would join every values file's backends. */}}
{{- define "tessera.configValues" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if not $cfg.backends -}}
{{- $_ := set $cfg "backends" (dict "local" (dict "type" "file" "directory" (printf "%s/file" (trimSuffix "/" $cfg.stateDir)))) -}}
{{- if not $cfg.defaultBackend -}}
{{- $_ := set $cfg "defaultBackend" "local" -}}
{{- end -}}
{{- end -}}
{{- if not $cfg.defaultBackend -}}
{{- $_ := unset $cfg "defaultBackend" -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The names of the configured backends (after the embedded default is filled in), for the StorageClass check. */}}
{{- define "tessera.backendNames" -}}
{{- (include "tessera.configValues" . | fromYaml).backends | keys | sortAlpha | join "," -}}
{{- end -}}

{{- define "tessera.configHash" -}}
{{ include "tessera.configValues" . | sha256sum | trunc 16 }}
{{- end -}}
