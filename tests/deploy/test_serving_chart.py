"""The serving part of the Helm chart and the plain manifests: structure, values carried through, no secrets.

No ``helm`` binary here, so each template is rendered *symbolically*: control lines
(``if``/``else``/``end``/``range``/``with``/``fail`` and ``$x :=`` assignments) are dropped,
keeping both branches of every ``if`` (their indentation must be valid YAML together), and
each ``{{ expression }}`` becomes the text ``«expression»``. The parsed YAML then shows which
value lands in which field: ``containerPort: «$s.grpcPort»``. The plain manifests in
``deploy/k8s/serving`` (the chart rendered for its defaults, for ``kubectl apply -k``) are
parsed for real and must agree with the chart on names, ports, probes, env and resources.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "enclaveml"
PLAIN = ROOT / "deploy" / "k8s" / "serving"
TEMPLATES = sorted(p.name for p in (CHART / "templates").glob("serving-*.yaml"))
SGX_RESOURCES = ("sgx.intel.com/epc", "sgx.intel.com/enclave", "sgx.intel.com/provision")
# Variables the serving templates bind to parts of .Values.
ALIASES = {"$s": "serving", "$i": "serving.ingress"}

_CONTROL = re.compile(r"^\s*\{\{-?\s*((if|else|end|fail|range|with|define)\b|/\*|\$\w+\s*:=).*\}\}\s*$")
_EXPRESSION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
_ALONE = re.compile(r"^(\s*)(«[^«»]*»)$")


def symbolic(template: str) -> str:
    """The template with control lines dropped and every expression as ``«expression»``."""
    lines = [line for line in template.splitlines() if not _CONTROL.match(line)]
    marked = [_EXPRESSION.sub(lambda m: "«" + m.group(1).replace("«", "") + "»", line) for line in lines]
    # An expression alone on its line (include ... | nindent, toYaml) renders mapping entries.
    return "\n".join(_ALONE.sub(r"\1rendered: \2", line) for line in marked) + "\n"


def render(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(symbolic((CHART / "templates" / name).read_text())) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in render(name) if d["kind"] == kind]
    return doc


def plain(kind: str) -> dict[str, Any]:
    docs = [d for p in sorted(PLAIN.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _paths(doc: Any, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict):
        return {prefix}
    found = {prefix} if prefix else set()
    for key, value in doc.items():
        found |= _paths(value, f"{prefix}.{key}" if prefix else key)
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (serving,) = deployment["spec"]["template"]["spec"]["containers"]
    return serving


def env_names(c: dict[str, Any]) -> list[str]:
    return [e["name"] for e in c["env"]]


# -- the chart ---------------------------------------------------------------------------------


def test_serving_templates_exist() -> None:
    assert TEMPLATES == ["serving-deployment.yaml", "serving-ingress.yaml", "serving-pdb.yaml", "serving-service.yaml"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_are_structurally_valid_yaml(name: str) -> None:
    documents = render(name)
    assert documents
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        assert doc["metadata"]["name"] == '«include "enclaveml.fullname" .»-serving'
        assert "app.kubernetes.io/component" in doc["metadata"]["labels"]


def test_every_serving_value_a_template_uses_is_defined() -> None:
    defined = _paths(values())
    used: set[str] = set()
    for name in TEMPLATES:
        text = (CHART / "templates" / name).read_text()
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text))
        for alias, base in ALIASES.items():
            used |= {f"{base}.{path}" for path in re.findall(re.escape(alias) + r"\.([A-Za-z0-9_.]+)", text)}
    assert {"serving.grpcPort", "serving.tls.mode", "serving.ingress.host"} <= used
    assert used - defined == set()


def test_the_chart_holds_no_secret_material() -> None:
    texts = [(CHART / "values.yaml").read_text(), *((CHART / "templates" / n).read_text() for n in TEMPLATES)]
    for text in texts:
        assert "BEGIN" not in text  # no PEM
        assert not re.search(r"^kind:\s*Secret\b", text, re.M)
        assert not re.search(r"(api_key|password|passphrase)\s*:\s*\S", text, re.I)


def test_deployment_runs_the_replicas_with_named_ports_and_health_probes() -> None:
    deployment = one("serving-deployment.yaml", "Deployment")
    assert deployment["spec"]["replicas"] == "«$s.replicas»"
    c = container(deployment)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": "«$s.grpcPort»", "rest": "«$s.restPort»"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "rest"
        assert c[probe]["httpGet"]["scheme"] == '«ternary "HTTPS" "HTTP" $tls»'
        assert c[probe]["tcpSocket"] == {"port": "rest"}  # the mtls branch: the kubelet has no client certificate
    assert "--grpc-port=«$s.grpcPort»" in c["args"]
    assert "--rest-port=«$s.restPort»" in c["args"]
    assert "--model=«$name»=«$path»" in c["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_deployment_asks_for_sgx_devices_and_carries_broker_settings_without_secrets() -> None:
    c = container(one("serving-deployment.yaml", "Deployment"))
    for section in ("requests", "limits"):
        assert set(SGX_RESOURCES) <= c["resources"][section].keys()
        assert c["resources"][section]["sgx.intel.com/epc"] == "«$s.sgxEpc»"
    env = {e["name"]: e for e in c["env"]}
    assert env["ENCLAVEML_BROKER_URL"]["value"].startswith("«$s.brokerUrl | default")
    assert "--keys-from=broker=$(ENCLAVEML_BROKER_URL)" in c["args"]  # the kubelet expands $(VAR) in args
    assert "--key=«.»" in c["args"]  # one per name in serving.keys
    assert "--ca=/etc/enclaveml/ca/ca.pem" in c["args"]
    assert env["ENCLAVEML_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "«$s.credentialsSecret»", "key": "api_key"}
    }
    assert env["ENCLAVEML_APP_ID"]["valueFrom"]["secretKeyRef"]["key"] == "app_id"
    assert all("value" not in env[n] for n in ("ENCLAVEML_API_KEY", "ENCLAVEML_APP_ID"))


def test_deployment_gramine_mode_takes_argv_from_the_manifest() -> None:
    template = (CHART / "templates" / "serving-deployment.yaml").read_text()
    gramine = template.split("{{- if $s.gramine }}")[1].split("{{- else }}")[0]
    assert 'command: ["gramine-sgx", {{ $s.gramineManifest | quote }}]' in gramine
    assert "args:" not in gramine
    assert 'fail "serving.gramine=true needs serving.tee=sgx"' in template


def test_service_exposes_grpc_and_rest_by_name() -> None:
    service = one("serving-service.yaml", "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == "«$s.grpcPort»"
    assert ports["grpc"]["targetPort"] == "grpc"
    assert ports["rest"]["port"] == "«$s.restPort»"
    assert ports["rest"]["targetPort"] == "rest"
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "serving"


def test_ingress_speaks_grpc_or_grpcs_by_tls_mode_and_passes_tls_through_by_default() -> None:
    ingress = one("serving-ingress.yaml", "Ingress")
    annotations = ingress["metadata"]["annotations"]
    protocol = annotations["nginx.ingress.kubernetes.io/backend-protocol"]
    assert protocol == '«ternary "GRPC" "GRPCS" (eq $s.tls.mode "none") | quote»'
    assert annotations["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert "non_idempotent" in annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert ingress["spec"]["ingressClassName"] == "«$i.className»"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "«$i.host»"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": '«include "enclaveml.fullname" .»-serving', "port": {"name": "grpc"}}
    assert values()["serving"]["ingress"]["passthrough"] is True
    template = (CHART / "templates" / "serving-ingress.yaml").read_text()
    assert "ra-tls needs serving.ingress.passthrough=true" in template


def test_disruption_budget_keeps_one_replica() -> None:
    pdb = one("serving-pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "serving"


# -- the plain manifests agree with the chart -------------------------------------------------


def test_plain_manifests_parse_and_kustomize_lists_each_once() -> None:
    kinds = sorted(d["kind"] for p in PLAIN.glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d)
    assert kinds == ["Deployment", "Ingress", "Kustomization", "PodDisruptionBudget", "Service"]
    listed = plain("Kustomization")["resources"]
    assert sorted(listed) == sorted(p.name for p in PLAIN.glob("*.yaml") if p.name != "kustomization.yaml")


def test_plain_deployment_matches_the_chart() -> None:
    chart, rendered = container(one("serving-deployment.yaml", "Deployment")), container(plain("Deployment"))
    defaults = values()["serving"]
    assert env_names(rendered) == env_names(chart)
    assert {p["name"]: p["containerPort"] for p in rendered["ports"]} == {
        "grpc": defaults["grpcPort"],
        "rest": defaults["restPort"],
    }
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert rendered[probe]["httpGet"] == {**chart[probe]["httpGet"], "scheme": "HTTPS"}
    assert set(SGX_RESOURCES) <= rendered["resources"]["limits"].keys()
    assert rendered["resources"]["limits"]["sgx.intel.com/epc"] == defaults["sgxEpc"]
    flags = [a.split("=")[0] for a in rendered["args"]]
    assert set(flags) <= {a.split("=")[0] for a in chart["args"]}
    assert flags == list(dict.fromkeys(a.split("=")[0] for a in chart["args"] if a.split("=")[0] in flags))
    assert "--model=resnet50=/models/resnet50" in rendered["args"]
    assert "--keys-from=broker=$(ENCLAVEML_BROKER_URL)" in rendered["args"]
    assert [f"--key={k}" for k in defaults["keys"]] == [a for a in rendered["args"] if a.startswith("--key=")]
    assert "--tls-cert=/etc/enclaveml/tls/tls.crt" in rendered["args"]
    assert plain("Deployment")["spec"]["replicas"] == defaults["replicas"]


def test_plain_service_and_ingress_match_the_chart() -> None:
    service = plain("Service")
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("grpc", "grpc"), ("rest", "rest")]
    ingress = plain("Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert annotations["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert ingress["spec"]["rules"][0]["host"] == values()["serving"]["ingress"]["host"]
    assert "tls" not in ingress["spec"]  # passthrough: the certificate is the enclave's
