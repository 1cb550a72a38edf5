{{/* The release's name prefix of every object, at most 63 characters. */}}
{{- define "bd3lm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "bd3lm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bd3lm
{{- end -}}

{{/* Selector labels of one component (dict "root" $ "component" "worker"). */}}
{{- define "bd3lm.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selector of every pod of this release (NetworkPolicy peers). */}}
{{- define "bd3lm.releasePods" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image of a component: its own repository/tag when set, else the chart's. */}}
{{- define "bd3lm.image" -}}
{{- $repo := default .root.Values.image.repository .image.repository -}}
{{- $tag := default (default .root.Chart.AppVersion .root.Values.image.tag) .image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "bd3lm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "bd3lm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The workers' headless Service, which the coordinator resolves to every worker. */}}
{{- define "bd3lm.workersHeadless" -}}
{{- printf "%s-worker-headless" (include "bd3lm.fullname" .) -}}
{{- end -}}

{{/* A worker pool's name (dict "root" $ "pool" NAME): the main pool's is "" (the workers
of model.id); each of workers.extraModels has one of its own. */}}
{{- define "bd3lm.poolName" -}}
{{- printf "%s-worker%s" (include "bd3lm.fullname" .root) (ternary "" (printf "-%s" .pool) (eq .pool "")) -}}
{{- end -}}

{{/* A worker pool's component label. */}}
{{- define "bd3lm.poolComponent" -}}
{{- ternary "worker" (printf "worker-%s" .pool) (eq .pool "") -}}
{{- end -}}

{{/* A worker pool's headless Service. */}}
{{- define "bd3lm.poolHeadless" -}}
{{- ternary (include "bd3lm.workersHeadless" .root) (printf "%s-headless" (include "bd3lm.poolName" .)) (eq .pool "") -}}
{{- end -}}

{{/* What the coordinators resolve to find every worker: each pool's headless Service. */}}
{{- define "bd3lm.workersDns" -}}
{{- $root := . -}}
{{- $names := list -}}
{{- range $pool := include "bd3lm.pools" . | fromJsonArray -}}
{{- $headless := include "bd3lm.poolHeadless" (dict "root" $root "pool" $pool) -}}
{{- $names = append $names (printf "%s.%s.svc.cluster.local:50061" $headless $root.Release.Namespace) -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/* The worker pools, as a JSON array of their names ("" first: the main pool). */}}
{{- define "bd3lm.pools" -}}
{{- $pools := list "" -}}
{{- range .Values.workers.extraModels -}}
{{- $pools = append $pools .name -}}
{{- end -}}
{{- toJson $pools -}}
{{- end -}}

{{/* Every worker pod of the release, whatever its pool (NetworkPolicy peers). */}}
{{- define "bd3lm.workerPods" -}}
{{ include "bd3lm.releasePods" . }}
bd3lm.io/worker: "true"
{{- end -}}

{{/* Secret names: given ones, else the chart's own. */}}
{{- define "bd3lm.internalTokenSecret" -}}
{{- default (printf "%s-internal-token" (include "bd3lm.fullname" .)) .Values.security.internalToken.existingSecret -}}
{{- end -}}
{{- define "bd3lm.redisSecret" -}}
{{- default (printf "%s-redis" (include "bd3lm.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* The checkpoint directory inside the containers. */}}
{{- define "bd3lm.modelDir" -}}
{{- if eq .Values.model.source "image" -}}
/opt/bd3lm/models/demo
{{- else -}}
/models
{{- end -}}
{{- end -}}

{{/* Whether the pods share the training volume (trainers, the registry). */}}
{{- define "bd3lm.trainingVolumeUsed" -}}
{{- if or .Values.training.enabled (eq .Values.model.source "registry") .Values.workers.extraModels -}}true{{- end -}}
{{- end -}}

{{/* The training volume's mount (dict "root" $ "readOnly" bool). */}}
{{- define "bd3lm.trainingMount" -}}
{{- if include "bd3lm.trainingVolumeUsed" .root }}
- name: training
  mountPath: /training
  readOnly: {{ .readOnly }}
{{- end }}
{{- end -}}

{{/* The model's volume (none when it is in the container image or the registry). */}}
{{- define "bd3lm.modelVolume" -}}
{{- if include "bd3lm.trainingVolumeUsed" . }}
- name: training
  persistentVolumeClaim:
    claimName: {{ required "training.storage.claimName is required with training.enabled or model.source registry" .Values.training.storage.claimName }}
{{- end }}
{{- if eq .Values.model.source "persistentVolumeClaim" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.persistentVolumeClaim.claimName is required" .Values.model.persistentVolumeClaim.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "imageVolume" }}
- name: model
  image:
    reference: {{ required "model.imageVolume.reference is required" .Values.model.imageVolume.reference }}
    pullPolicy: {{ .Values.model.imageVolume.pullPolicy }}
{{- end }}
{{- end -}}

{{- define "bd3lm.modelMount" -}}
{{- if not (has .Values.model.source (list "image" "registry")) }}
{{- $subPath := ternary .Values.model.persistentVolumeClaim.subPath .Values.model.imageVolume.subPath (eq .Values.model.source "persistentVolumeClaim") }}
- name: model
  mountPath: /models
  readOnly: true
  {{- with $subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Environment shared by the coordinator and the workers: the store, its secrets,
the internal token, logs and traces, the drain. */}}
{{- define "bd3lm.commonEnv" -}}
- name: BD3LM_DRAIN_SECS
  value: {{ .Values.drainSeconds | quote }}
- name: BD3LM_STORE_PREFIX
  value: {{ .Values.store.prefix | quote }}
- name: BD3LM_STORE_TTL_SECS
  value: {{ .Values.store.ttlSeconds | quote }}
- name: BD3LM_INTERNAL_TOKEN_FILE
  value: /etc/bd3lm/internal/token
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- with .Values.telemetry.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.redis.enabled }}
- name: BD3LM_REDIS_URL
  value: {{ printf "redis://%s-redis:6379/0" (include "bd3lm.fullname" .) | quote }}
{{- if .Values.redis.auth.enabled }}
- name: BD3LM_REDIS_PASSWORD_FILE
  value: /etc/bd3lm/redis/password
{{- end }}
{{- else }}
- name: {{ ternary "BD3LM_REDIS_CLUSTER" "BD3LM_REDIS_URL" .Values.redis.external.cluster }}
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.external.existingSecret is required when redis.enabled is false" .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.urlKey }}
{{- if .Values.redis.external.passwordKey }}
- name: BD3LM_REDIS_PASSWORD_FILE
  value: /etc/bd3lm/redis/password
{{- end }}
{{- if .Values.redis.external.caSecret }}
- name: BD3LM_REDIS_CA
  value: /etc/bd3lm/redis-ca/ca.crt
{{- end }}
{{- with .Values.redis.external.syncReplicas }}
- name: BD3LM_REDIS_SYNC_REPLICAS
  value: {{ . | quote }}
- name: BD3LM_REDIS_SYNC_TIMEOUT_MS
  value: {{ $.Values.redis.external.syncTimeoutMs | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of the common environment's files. */}}
{{- define "bd3lm.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: internal-token
  secret:
    secretName: {{ include "bd3lm.internalTokenSecret" . }}
    items:
      - key: {{ .Values.security.internalToken.key }}
        path: token
{{- if and .Values.redis.enabled .Values.redis.auth.enabled }}
- name: redis-password
  secret:
    secretName: {{ include "bd3lm.redisSecret" . }}
    items:
      - key: {{ .Values.redis.auth.passwordKey }}
        path: password
{{- else if and (not .Values.redis.enabled) .Values.redis.external.passwordKey }}
- name: redis-password
  secret:
    secretName: {{ .Values.redis.external.existingSecret }}
    items:
      - key: {{ .Values.redis.external.passwordKey }}
        path: password
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.external.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- include "bd3lm.modelVolume" . }}
{{- end -}}

{{- define "bd3lm.commonMounts" -}}
- name: tmp
  mountPath: /tmp
- name: internal-token
  mountPath: /etc/bd3lm/internal
  readOnly: true
{{- if or (and .Values.redis.enabled .Values.redis.auth.enabled) (and (not .Values.redis.enabled) .Values.redis.external.passwordKey) }}
- name: redis-password
  mountPath: /etc/bd3lm/redis
  readOnly: true
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.caSecret }}
- name: redis-ca
  mountPath: /etc/bd3lm/redis-ca
  readOnly: true
{{- end }}
{{- include "bd3lm.modelMount" . }}
{{- end -}}

{{/* gRPC probes on the plain-text health port (Kubernetes' probes cannot speak TLS):
liveness is SERVING from the start (a worker loading its model is alive), readiness
only while the process can take work. */}}
{{- define "bd3lm.probes" -}}
livenessProbe:
  grpc:
    port: {{ .port }}
    service: liveness
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .readiness }}
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* Egress every pod of the release needs: DNS, Redis (the in-chart one, or the external
peers and ports), the OTLP collector when traces are exported, and the extra rules. */}}
{{- define "bd3lm.commonEgress" -}}
{{- $np := .Values.networkPolicy -}}
# DNS, wherever the cluster runs it (a pod, or a node-local cache).
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- if .Values.redis.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "bd3lm.selector" (dict "root" . "component" "redis") | nindent 10 }}
  ports:
    - port: 6379
{{- else }}
- ports:
    {{- range $np.egress.redisPorts }}
    - port: {{ . }}
    {{- end }}
  {{- with $np.egress.redisTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- if .Values.telemetry.otlpEndpoint }}
- ports:
    {{- range $np.egress.otlpPorts }}
    - port: {{ . }}
    {{- end }}
  {{- with $np.egress.otlpTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- with $np.egress.extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pods restart when a Secret they read changes: the chart's own Secrets as rendered
(kept across upgrades by lookup), and security.secretsRevision, which an operator bumps
when Secrets it provides (existingSecret) change. */}}
{{- define "bd3lm.secretsChecksum" -}}
{{- printf "%s/%s" (include (print $.Template.BasePath "/secrets.yaml") .) .Values.security.secretsRevision | sha256sum -}}
{{- end -}}
