{{/*
Names, labels and the pieces every Pledge container shares: the image, the security context,
the TLS and auth mounts and flags, the probes. Every flag written here is one the binaries
accept (integration-tests/tests/helm.rs checks each against `<binary> --help`).
*/}}

{{- define "pledge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; components append -coordinator, -kafka-adapter, ... */}}
{{- define "pledge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pledge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "root" $ "component" "coordinator"). */}}
{{- define "pledge.labels" -}}
helm.sh/chart: {{ include "pledge.chart" .root }}
{{ include "pledge.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: pledge
{{- end }}

{{- define "pledge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pledge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pledge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pledge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
A component's image: [image.registry/]<component>.image.repository:<tag>, the tag being the
component's, else image.tag, else the chart's appVersion. deploy/Dockerfile builds one image per
component (each with `pledge` beside its binary). Call with (dict "root" $ "c" <component values>).
*/}}
{{- define "pledge.image" -}}
{{- $g := .root.Values.image }}
{{- $tag := .c.image.tag | default $g.tag | default .root.Chart.AppVersion }}
{{- if $g.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" $g.registry) .c.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .c.image.repository $tag }}
{{- end }}
{{- end }}

{{/* http:// or https://: every endpoint one Pledge process gives another. */}}
{{- define "pledge.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* The in-cluster DNS suffix of a Service: <ns>.svc.<cluster domain>. */}}
{{- define "pledge.svcSuffix" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* host:port a server listens on. Call with (dict "root" $ "port" 7600). */}}
{{- define "pledge.listen" -}}
{{- if contains ":" .root.Values.listenHost }}
{{- printf "[%s]:%d" .root.Values.listenHost (int .port) }}
{{- else }}
{{- printf "%s:%d" .root.Values.listenHost (int .port) }}
{{- end }}
{{- end }}

{{/*
Where a component's data volume is mounted; the data directory is a folder inside it, so that a
file system's own entries at its root (lost+found) are never in the journal's directory.
*/}}
{{- define "pledge.dataMount" -}}/var/lib/pledge{{- end }}
{{- define "pledge.dataDir" -}}/var/lib/pledge/data{{- end }}

{{/* Mount points of the TLS and auth Secrets (read-only, whole Secrets so updates reach the pod). */}}
{{- define "pledge.tlsServerDir" -}}/etc/pledge/tls/server{{- end }}
{{- define "pledge.tlsClientDir" -}}/etc/pledge/tls/client{{- end }}
{{- define "pledge.tlsCaDir" -}}/etc/pledge/tls/ca{{- end }}
{{- define "pledge.authDir" -}}/etc/pledge/auth{{- end }}

{{/*
Checks shared by every component, failing the render with what to set. Call with
(dict "root" $ "component" "coordinator" "key" "coordinator" "tls" .Values.coordinator.tls);
"key" is the component's values key, named in the messages.
*/}}
{{- define "pledge.validateCommon" -}}
{{- $v := .root.Values }}
{{- if $v.tls.enabled }}
{{- if not .tls.secretName }}
{{- fail (printf "tls.enabled is true but %s.tls.secretName is empty: name the Secret (tls.crt, tls.key) of the %s's server certificate" .key .component) }}
{{- end }}
{{- if not $v.tls.caSecret }}
{{- fail "tls.enabled is true but tls.caSecret is empty: name the Secret holding the CA certificate (PEM) that signed the servers' and clients' certificates" }}
{{- end }}
{{- if and $v.probes.enabled (not $v.metrics.enabled) }}
{{- fail "tls.enabled with probes.enabled needs metrics.enabled: kubelet gRPC probes cannot speak TLS, so the probes read the plaintext metrics port (GET /metrics) instead; enable metrics or disable probes" }}
{{- end }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) }}
{{- fail "auth.enabled is true but auth.existingSecret is empty: name the Secret holding the principals file (TOML, see the README's TLS and authentication section)" }}
{{- end }}
{{- end }}

{{/*
Flags every server takes: TLS (--tls-cert/--tls-key, and --tls-client-ca for mutual TLS),
--auth-file, --metrics-listen. One list item per line, indented by the caller.
*/}}
{{- define "pledge.serverArgs" -}}
{{- $v := .Values }}
{{- if $v.metrics.enabled }}
- --metrics-listen={{ include "pledge.listen" (dict "root" . "port" $v.metrics.port) }}
{{- end }}
{{- if $v.tls.enabled }}
- --tls-cert={{ include "pledge.tlsServerDir" . }}/{{ $v.tls.certKey }}
- --tls-key={{ include "pledge.tlsServerDir" . }}/{{ $v.tls.keyKey }}
{{- if $v.tls.mutual }}
- --tls-client-ca={{ include "pledge.tlsCaDir" . }}/{{ $v.tls.caKey }}
{{- end }}
{{- end }}
{{- if $v.auth.enabled }}
- --auth-file={{ include "pledge.authDir" . }}/{{ $v.auth.key }}
{{- end }}
{{- end }}

{{/* volumeMounts for the TLS and auth Secrets. Call with (dict "root" $ "client" bool). */}}
{{- define "pledge.secretMounts" -}}
{{- $v := .root.Values }}
{{- if $v.tls.enabled }}
- name: tls-server
  mountPath: {{ include "pledge.tlsServerDir" . }}
  readOnly: true
- name: tls-ca
  mountPath: {{ include "pledge.tlsCaDir" . }}
  readOnly: true
{{- if .client }}
- name: tls-client
  mountPath: {{ include "pledge.tlsClientDir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- if $v.auth.enabled }}
- name: auth
  mountPath: {{ include "pledge.authDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
volumes for the TLS and auth Secrets. Call with (dict "root" $ "tls" <component tls values>
"client" bool). Mode 0440: the key is readable by the pod's fsGroup, which owns Secret files.
*/}}
{{- define "pledge.secretVolumes" -}}
{{- $v := .root.Values }}
{{- if $v.tls.enabled }}
- name: tls-server
  secret:
    secretName: {{ .tls.secretName }}
    defaultMode: 0440
- name: tls-ca
  secret:
    secretName: {{ $v.tls.caSecret }}
    defaultMode: 0440
{{- if .client }}
- name: tls-client
  secret:
    secretName: {{ default .tls.secretName .tls.clientSecretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if $v.auth.enabled }}
- name: auth
  secret:
    secretName: {{ $v.auth.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
Liveness, readiness and startup probes. Without TLS: kubelet's gRPC probe of the standard health
service (grpc.health.v1.Health, which needs no credentials even with --auth-file), asking for
the component's own service for readiness. With TLS: kubelet's gRPC probe cannot do TLS and no
binary serves health in plaintext beside its TLS port, so the probes GET /metrics on the
plaintext metrics port: that proves the process is up and answering, not that its gRPC port
is (see the chart's README). Call with (dict "root" $ "port" 7600 "service" "pledge.v1.Coordinator").
*/}}
{{- define "pledge.probes" -}}
{{- $v := .root.Values }}
{{- if $v.probes.enabled }}
{{- $probe := dict }}
{{- $ready := dict }}
{{- if $v.tls.enabled }}
{{- $probe = dict "httpGet" (dict "path" "/metrics" "port" "metrics") }}
{{- $ready = $probe }}
{{- else }}
{{- $probe = dict "grpc" (dict "port" (int .port)) }}
{{- $ready = dict "grpc" (dict "port" (int .port) "service" .service) }}
{{- end }}
startupProbe:
  {{- toYaml (merge (dict) $probe $v.probes.startup) | nindent 2 }}
livenessProbe:
  {{- toYaml (merge (dict) $probe $v.probes.liveness) | nindent 2 }}
readinessProbe:
  {{- toYaml (merge (dict) $ready $v.probes.readiness) | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container ports. Call with (dict "root" $ "port" 7600). */}}
{{- define "pledge.containerPorts" -}}
- name: grpc
  containerPort: {{ .port }}
  protocol: TCP
{{- if .root.Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .root.Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* Service ports. Call with (dict "root" $ "port" 7600). */}}
{{- define "pledge.servicePorts" -}}
- name: grpc
  port: {{ .port }}
  targetPort: grpc
  protocol: TCP
  appProtocol: {{ ternary "grpc-tls" "grpc" .root.Values.tls.enabled }}
{{- if .root.Values.metrics.enabled }}
- name: metrics
  port: {{ .root.Values.metrics.port }}
  targetPort: metrics
  protocol: TCP
  appProtocol: http
{{- end }}
{{- end }}

{{/* The pod-level settings every component shares. Call with (dict "root" $ "c" <component values>). */}}
{{- define "pledge.podCommon" -}}
{{- $v := .root.Values }}
serviceAccountName: {{ include "pledge.serviceAccountName" .root }}
automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .c.terminationGracePeriodSeconds }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod template metadata. Call with (dict "root" $ "c" <component values> "component" "..."
"annotations" <dict, optional: the chart's own, e.g. a checksum of a ConfigMap>).
*/}}
{{- define "pledge.podMetadata" -}}
labels:
  {{- include "pledge.labels" . | nindent 2 }}
  {{- with .c.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with merge (dict) (default (dict) .annotations) .c.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A PersistentVolumeClaim's spec from a component's persistence values. */}}
{{- define "pledge.pvcSpec" -}}
accessModes:
  {{- toYaml .accessModes | nindent 2 }}
{{- if .storageClass }}
{{- if eq "-" .storageClass }}
storageClassName: ""
{{- else }}
storageClassName: {{ .storageClass | quote }}
{{- end }}
{{- end }}
resources:
  requests:
    storage: {{ .size | quote }}
{{- end }}

{{/*
The coordinator's --participant list: every enabled adapter's resources at its Service (the
Kafka adapter's at its pods' own names: a branch's work and its prepare must reach the same
process), then coordinator.participants. One "RESOURCE=ENDPOINT" a line.
*/}}
{{- define "pledge.participants" -}}
{{- $v := .Values }}
{{- $full := include "pledge.fullname" . }}
{{- $scheme := include "pledge.scheme" . }}
{{- $suffix := include "pledge.svcSuffix" . }}
{{- if $v.postgresAdapter.enabled }}
{{- range $v.postgresAdapter.databases }}
{{ .id }}={{ $scheme }}://{{ $full }}-postgres-adapter.{{ $suffix }}:{{ $v.postgresAdapter.port }}
{{- end }}
{{- end }}
{{- if $v.mysqlAdapter.enabled }}
{{- range $v.mysqlAdapter.databases }}
{{ .id }}={{ $scheme }}://{{ $full }}-mysql-adapter.{{ $suffix }}:{{ $v.mysqlAdapter.port }}
{{- end }}
{{- end }}
{{- if $v.kafkaAdapter.enabled }}
{{- $k := $v.kafkaAdapter }}
{{- range $i := until (int $k.replicas) }}
{{ include "pledge.kafkaResourceId" (dict "k" $k "index" $i) }}={{ $scheme }}://{{ $full }}-kafka-adapter-{{ $i }}.{{ $full }}-kafka-adapter.{{ $suffix }}:{{ $k.port }}
{{- end }}
{{- end }}
{{- range $id, $endpoint := $v.coordinator.participants }}
{{ $id }}={{ $endpoint }}
{{- end }}
{{- end }}

{{/* The Kafka adapter pod number `index`'s resource id. */}}
{{- define "pledge.kafkaResourceId" -}}
{{- if .k.resourceIdPerPod }}{{ printf "%s-%d" .k.resourceId (int .index) }}{{ else }}{{ .k.resourceId }}{{ end }}
{{- end }}

{{/*
Database URLs as env vars (from a Secret, or literal), then the adapter's own resources variable
(PLEDGE_POSTGRES_RESOURCES, PLEDGE_MYSQL_RESOURCES) as RESOURCE=$(DATABASE_URL_N),... which
Kubernetes expands from the variables above it. A URL (often with a password) thus never
appears in the pod spec or on the process's command line, which every user of the node can
read. Call with (dict "databases" <list> "key" "postgresAdapter" "env" "PLEDGE_POSTGRES_RESOURCES").
*/}}
{{- define "pledge.databaseEnv" -}}
{{- $pairs := list }}
{{- range $i, $db := .databases }}
{{- if and $db.existingSecret $db.url }}
{{- fail (printf "%s.databases[%d] (%s): set url or existingSecret, not both" $.key $i $db.id) }}
{{- end }}
- name: DATABASE_URL_{{ $i }}
{{- if $db.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $db.existingSecret }}
      key: {{ default "url" $db.secretKey }}
{{- else if $db.url }}
  value: {{ $db.url | quote }}
{{- else }}
{{- fail (printf "%s.databases[%d] (%s): set url (postgres://... or mysql://...) or existingSecret (a Secret whose key %q holds the URL)" $.key $i $db.id (default "url" $db.secretKey)) }}
{{- end }}
{{- $pairs = append $pairs (printf "%s=$(DATABASE_URL_%d)" $db.id $i) }}
{{- end }}
- name: {{ .env }}
  value: {{ join "," $pairs | quote }}
{{- end }}
