"""Wrong values fail at render time with a message that names the value to change.

Two layers: values.schema.json (types, enums, ranges; Helm applies it before rendering) and the
chart's `fail` checks (combinations, and the ranges again for renders that skip the schema).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.deploy.chart import CHART_DIR, render_error

EXTERNAL_ETCD = {"etcd": {"enabled": False}, "externalEtcd": {"endpoints": ["etcd.db.svc:2379"]}}


@pytest.fixture(scope="module")
def chart_without_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[helm.Chart]:
    """The chart as `helm install --skip-schema-validation` sees it. (helm lint cannot show
    `fail`: in lint mode Helm logs template failures instead of failing.)"""
    copy = tmp_path_factory.mktemp("chart") / "esplanade"
    shutil.copytree(CHART_DIR, copy)
    (copy / "values.schema.json").unlink()
    with helm.Chart.load(copy) as chart:
        yield chart


def render_error_without_schema(chart: helm.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as info:
        chart.render(values, name="esp", namespace="esplanade")
    return str(info.value)


@pytest.mark.parametrize("component", ["api", "policy", "keyexchange", "dataplane"])
def test_negative_replicas_are_refused_by_schema_and_by_template(
    component: str, chart_without_schema: helm.Chart
) -> None:
    values = {component: {"replicas": -1}}
    message = render_error(values)
    assert f"/{component}/replicas" in message
    assert "minimum" in message
    # Without the schema the template check still names it.
    message = render_error_without_schema(chart_without_schema, values)
    assert f"{component}.replicas must be 0 or more (got -1)" in message


FAILURES = [
    pytest.param(
        {"dataplane": {"kind": "DaemonSet", "autoscaling": {"enabled": True}}},
        "dataplane.autoscaling.enabled cannot be true with dataplane.kind=DaemonSet",
        id="hpa-and-daemonset",
    ),
    pytest.param(
        {"etcd": {"enabled": False}},
        "externalEtcd.endpoints is required when etcd.enabled is false",
        id="no-etcd-endpoint",
    ),
    pytest.param(
        {**EXTERNAL_ETCD, "externalEtcd": {"endpoints": ["etcd.db.svc:2379"], "tls": {"enabled": True}}},
        "externalEtcd.tls.existingSecret is required when externalEtcd.tls.enabled is true",
        id="external-etcd-tls-without-material",
    ),
    pytest.param(
        {"tls": {"grpc": {"enabled": True, "generate": False}}},
        "tls.grpc.enabled is true without material",
        id="grpc-tls-without-material",
    ),
    pytest.param(
        {"tls": {"grpc": {"existingSecrets": {"api": "api-tls", "policy": "policy-tls"}}}},
        "tls.grpc.existingSecrets.keyexchange is required",
        id="grpc-tls-partial-secrets",
    ),
    pytest.param(
        {"etcd": {"tls": {"existingSecret": "etcd-member-tls"}}},
        "etcd.tls.clientExistingSecret is required",
        id="etcd-server-secret-without-client-secret",
    ),
    pytest.param(
        {"etcd": {"replicas": 2}},
        "etcd.replicas must be odd",
        id="even-etcd-members",
    ),
    pytest.param(
        {"externalEtcd": {"endpoints": ["etcd.db.svc:2379"]}},
        "externalEtcd.endpoints is set while etcd.enabled is true",
        id="both-etcds",
    ),
    pytest.param(
        {"dataplane": {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}}},
        "dataplane.resources.requests.cpu is required",
        id="hpa-without-cpu-request",
    ),
    pytest.param(
        {"dataplane": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}},
        "dataplane.autoscaling.maxReplicas (3) must be at least dataplane.autoscaling.minReplicas (5)",
        id="hpa-min-above-max",
    ),
    pytest.param(
        {"dataplane": {"udpService": {"enabled": False}}},
        "nothing exposes UDP 500/4500",
        id="dataplane-unreachable",
    ),
    pytest.param(
        {"dataplane": {"hostNetwork": True, "udpService": {"enabled": False}}},
        "dataplane.sysctls must be [] with dataplane.hostNetwork",
        id="sysctls-with-host-network",
    ),
    pytest.param(
        {"dataplane": {"hostNetwork": True, "sysctls": []}},
        "networkPolicy.nodeCIDRs is required with dataplane.hostNetwork",
        id="host-network-without-node-cidrs",
    ),
    pytest.param(
        {"kek": {"generate": False}},
        "set kek.existingSecret, kek.ring or kek.generate=true",
        id="no-kek",
    ),
    pytest.param(
        {"kek": {"ring": "not a ring"}},
        "kek.ring must hold lines key-id:base64(32 bytes)",
        id="malformed-kek",
    ),
    pytest.param(
        {"bootstrapToken": {"generate": False}},
        "set bootstrapToken.existingSecret, bootstrapToken.value or bootstrapToken.generate=true",
        id="no-bootstrap-token",
    ),
    pytest.param(
        {"settings": {"store": {"backend": "embedded"}}},
        "settings.store is set by the chart",
        id="settings-overrides-store",
    ),
    pytest.param(
        {"settings": {"keyexchange": {"transport": "socket"}}},
        "settings.keyexchange.transport is set by the chart",
        id="settings-overrides-transport",
    ),
]


@pytest.mark.parametrize(("values", "message"), FAILURES)
def test_wrong_combinations_fail_naming_the_value(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


SCHEMA_FAILURES = [
    pytest.param({"dataplane": {"kind": "StatefulSet"}}, "/dataplane/kind", id="dataplane-kind-enum"),
    pytest.param({"telemetry": {"logFormat": "xml"}}, "/telemetry/logFormat", id="log-format-enum"),
    pytest.param({"dataplane": {"udpService": {"type": "NodePort"}}}, "/dataplane/udpService/type", id="nodeport"),
    pytest.param({"api": {"service": {"port": 70000}}}, "/api/service/port", id="port-range"),
    pytest.param({"dataplane": {"autoscaling": {"maxReplicas": 0}}}, "/dataplane/autoscaling/maxReplicas", id="max"),
    pytest.param({"externalEtcd": {"endpoints": ["no-port"]}}, "/externalEtcd/endpoints/0", id="endpoint-form"),
    pytest.param({"dataplane": {"hostNetwork": "yes"}}, "/dataplane/hostNetwork", id="boolean-type"),
    pytest.param({"dataplne": {"replicas": 1}}, "dataplne", id="unknown-top-level-key"),
    pytest.param({"api": {"replica": 1}}, "replica", id="unknown-nested-key"),
]


@pytest.mark.parametrize(("values", "path"), SCHEMA_FAILURES)
def test_schema_refuses_bad_types_enums_and_ranges(values: dict[str, Any], path: str) -> None:
    message = render_error(values)
    assert "schema" in message
    assert path in message
