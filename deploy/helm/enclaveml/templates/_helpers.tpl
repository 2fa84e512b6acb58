{{/* Names and labels shared by every object of this chart. */}}
{{- define "enclaveml.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "enclaveml.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "enclaveml.brokerUrl" -}}
{{- if .Values.spark.brokerUrl -}}
{{- .Values.spark.brokerUrl -}}
{{- else -}}
{{- printf "https://%s-broker.%s.svc:%v" (include "enclaveml.fullname" .) .Release.Namespace .Values.broker.port -}}
{{- end -}}
{{- end -}}

{{/*
A Spark pod template, the same as `enclaveml submit` renders (analytics/submit.py,
render_pod_template). Call with (dict "root" $ "role" "driver"|"executor").
*/}}
{{- define "enclaveml.sparkPodTemplate" -}}
{{- $v := .root.Values.spark -}}
{{- $size := index $v .role -}}
apiVersion: v1
kind: Pod
metadata:
  labels:
    app.kubernetes.io/part-of: enclaveml
    role: {{ .role }}
spec:
  {{- if eq .role "driver" }}
  serviceAccountName: {{ $v.serviceAccount }}
  {{- end }}
  {{- if eq $v.tee "tdx" }}
  runtimeClassName: {{ $v.tdxRuntimeClass }}
  {{- end }}
  containers:
    - name: spark-{{ .role }}
      image: {{ $v.image }}
      imagePullPolicy: IfNotPresent
      securityContext:
        allowPrivilegeEscalation: false
      env:
        - name: ENCLAVEML_ATTESTATION
          value: {{ $v.attestation | quote }}
        - name: ENCLAVEML_TEE
          value: {{ $v.tee | quote }}
        {{- if $v.attestation }}
        - name: ENCLAVEML_BROKER_URL
          value: {{ include "enclaveml.brokerUrl" .root | quote }}
        - name: ENCLAVEML_POLICY_ID
          value: {{ required "spark.policyId is required with spark.attestation=true" $v.policyId | quote }}
        - name: ENCLAVEML_KEYS
          value: {{ $v.keys | quote }}
        - name: ENCLAVEML_APP_ID
          valueFrom:
            secretKeyRef:
              name: {{ $v.credentialsSecret }}
              key: app_id
        - name: ENCLAVEML_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $v.credentialsSecret }}
              key: api_key
        - name: ENCLAVEML_BROKER_CA
          value: /etc/enclaveml/broker-ca/ca.pem
        {{- end }}
      resources:
        requests:
          cpu: {{ $size.cpu | quote }}
          memory: {{ $size.memory }}
          {{- if eq $v.tee "sgx" }}
          sgx.intel.com/epc: {{ $v.sgxEpc }}
          sgx.intel.com/enclave: 1
          sgx.intel.com/provision: 1
          {{- end }}
        limits:
          cpu: {{ $size.cpu | quote }}
          memory: {{ $size.memory }}
          {{- if eq $v.tee "sgx" }}
          sgx.intel.com/epc: {{ $v.sgxEpc }}
          sgx.intel.com/enclave: 1
          sgx.intel.com/provision: 1
          {{- end }}
      {{- if $v.attestation }}
      volumeMounts:
        - name: broker-ca
          mountPath: /etc/enclaveml/broker-ca
          readOnly: true
  volumes:
    - name: broker-ca
      secret:
        secretName: {{ $v.credentialsSecret }}
        items:
          - key: ca.pem
            path: ca.pem
      {{- end }}
{{- end -}}
