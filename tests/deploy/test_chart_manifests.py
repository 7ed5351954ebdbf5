"""The chart renders, lints and validates for every configuration users choose.

Rendering and linting use the real Helm SDK (helm-python-sdk). Every manifest is validated with
kubernetes-validate --strict against Kubernetes 1.30 and the newest version it knows; the
ServiceMonitor, which it has no schema for, against the vendored prometheus-operator CRD schema
(servicemonitor-crd-schema.json, provenance in its $comment).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from esplanade.config.loading import load_settings
from tests.deploy.chart import (
    CHART_DIR,
    VALUE_SETS,
    Rendered,
    component_of,
    render,
    value_set,
)

KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
CRD_SCHEMA = Path(__file__).resolve().parent / "servicemonitor-crd-schema.json"


@pytest.fixture(scope="module", autouse=True)
def cached_kubernetes_schemas() -> Iterator[None]:
    """kubernetes-validate re-reads its multi-megabyte definitions file per object; read each once."""
    original = kubernetes_validate.utils.schema_contents
    kubernetes_validate.utils.schema_contents = functools.cache(original)
    yield
    kubernetes_validate.utils.schema_contents = original


@functools.cache
def rendered(name: str) -> Rendered:
    return render(value_set(name))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict_is_clean(name: str) -> None:
    for kube_version in (f"v{v}.0" for v in KUBERNETES_VERSIONS):
        report = helm.lint(CHART_DIR, value_set(name), strict=True, kube_version=kube_version)
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
        assert not report["errors"], report["errors"]
        assert not problems, problems


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_strictly(name: str, version: str) -> None:
    result = rendered(name)
    assert result.documents
    unknown_kinds = set()
    for document in result.documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown_kinds.add(document["kind"])
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{document['kind']}/{document['metadata']['name']} at {where}: {exc.message}")
    assert unknown_kinds <= {"ServiceMonitor"}, unknown_kinds


def strict(schema: Any) -> Any:
    """Close every object that lists its properties, as kubernetes-validate --strict does."""
    if isinstance(schema, dict):
        closed = {k: strict(v) for k, v in schema.items()}
        if "properties" in closed and "additionalProperties" not in closed:
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def test_service_monitor_matches_the_crd_schema() -> None:
    schema = strict(json.loads(CRD_SCHEMA.read_text()))
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    monitors = [d for name in VALUE_SETS for d in rendered(name).of_kind("ServiceMonitor")]
    assert len(monitors) >= 2, "value sets must cover the ServiceMonitor"
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        errors = sorted(validator.iter_errors(monitor), key=lambda e: list(e.path))
        assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    # The schema is not vacuous: a misspelt field and a bad scheme are caught.
    broken = copy.deepcopy(monitors[0])
    broken["spec"]["endpoints"][0]["scheme"] = "grpc"
    broken["spec"]["endpoints"][0]["intervall"] = "10s"
    assert len(list(validator.iter_errors(broken))) == 2


def test_service_monitor_selects_every_metrics_port() -> None:
    result = rendered("tls-existing-secrets")
    (monitor,) = result.of_kind("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = set()
    for service in result.of_kind("Service"):
        labels = service["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in selector.items()):
            scraped |= {(component_of(service), p["name"]) for p in service["spec"]["ports"]} & {
                (component_of(service), port) for port in endpoint_ports
            }
    assert {c for c, _ in scraped} == {"api", "policy", "keyexchange", "dataplane", "etcd"}


def container_environment(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "fieldRef" in variable.get("valueFrom", {}):
            env[variable["name"]] = "node-or-pod-name"
    return env


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_service_loads_its_configuration(name: str, tmp_path: Path) -> None:
    """The ConfigMap plus each container's environment is a valid Esplanade configuration, and
    every file it names is on a volume mounted into that container."""
    result = rendered(name)
    (config_map,) = result.of_kind("ConfigMap")
    config_path = tmp_path / "esplanade.yaml"
    config_path.write_text(config_map["data"]["esplanade.yaml"])
    seen = set()
    for workload, container in result.containers():
        component = component_of(workload)
        if component == "etcd":
            continue
        seen.add(component)
        env = container_environment(container)
        assert env.pop("ESPLANADE_CONFIG") == "/etc/esplanade/config/esplanade.yaml"
        settings = load_settings(config_path, env)
        assert settings.store.backend == "etcd"
        assert settings.keyexchange.transport == "relay"
        own = getattr(settings.endpoints, component)
        assert own.startswith("0.0.0.0:"), f"{component} listens on {own}"
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        files = [settings.kek.file, settings.api.bootstrap_token_file if component == "api" else None]
        for tls in (settings.grpc.tls, settings.store.etcd_tls):
            if tls.enabled:
                files += [tls.ca_file, tls.cert_file, tls.key_file]
        for file in filter(None, files):
            assert any(str(file).startswith(m + "/") for m in mounts), f"{component}: {file} is not mounted"
        for writable in (settings.dataplane.flow_log_path, settings.api.audit_log_path):
            assert str(writable.parent) in mounts
    assert seen == {"api", "policy", "keyexchange", "dataplane"}


def test_config_points_every_service_at_the_others() -> None:
    result = rendered("default")
    config = yaml.safe_load(result.of_kind("ConfigMap")[0]["data"]["esplanade.yaml"])
    services = {s["metadata"]["name"]: s for s in result.of_kind("Service")}
    for component in ("keyexchange", "dataplane", "policy", "api"):
        host, _, port = config["endpoints"][component].rpartition(":")
        name, namespace = host.split(".")[:2]
        assert namespace == "esplanade"
        assert int(port) in {p["port"] for p in services[name]["spec"]["ports"]}
        assert component_of(services[name]) == component


def _certificate(secret: dict[str, Any], key: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(secret["data"][key]))


def test_generated_grpc_certificates_name_the_service_addresses() -> None:
    result = rendered("default")
    config = yaml.safe_load(result.of_kind("ConfigMap")[0]["data"]["esplanade.yaml"])
    for component in ("api", "policy", "keyexchange", "dataplane"):
        secret = result.named("Secret", f"esp-esplanade-{component}-grpc-tls")
        certificate = _certificate(secret, "tls.crt")
        ca = _certificate(secret, "ca.crt")
        certificate.verify_directly_issued_by(ca)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert config["endpoints"][component].rpartition(":")[0] in names.get_values_for_type(x509.DNSName)
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)


def test_generated_etcd_certificates_name_every_member() -> None:
    result = rendered("default")
    secret = result.named("Secret", "esp-esplanade-etcd-server-tls")
    names = (
        _certificate(secret, "tls.crt")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.DNSName)
    )
    statefulset = result.named("StatefulSet", "esp-esplanade-etcd")
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    members = [m.split("=", 1)[1] for m in cluster.removeprefix("--initial-cluster=").split(",")]
    assert len(members) == statefulset["spec"]["replicas"] == 3
    for url in members:
        host = url.split("://")[1].rsplit(":", 1)[0]
        assert "*." + host.split(".", 1)[1] in names
    assert "esp-esplanade-etcd.esplanade.svc.cluster.local" in names
    client = result.named("Secret", "esp-esplanade-etcd-client-tls")
    _certificate(client, "tls.crt").verify_directly_issued_by(_certificate(secret, "ca.crt"))


def test_names_fit_kubernetes_limits_with_the_longest_prefix() -> None:
    """fullnameOverride takes up to 40 characters; every name the chart derives must still fit."""
    result = render({"fullnameOverride": "a" * 40})
    label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for document in result.documents:
        name = document["metadata"]["name"]
        assert len(name) <= 63 and label.match(name), f"{document['kind']}/{name}"
    statefulset = result.named("StatefulSet", "a" * 40 + "-etcd")
    # A StatefulSet's pods carry a controller-revision-hash label of <name>-<10 characters>.
    assert len(statefulset["metadata"]["name"]) + 11 <= 63
