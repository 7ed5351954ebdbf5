"""OpenTelemetry metrics, exported as Prometheus text on /metrics and optionally via OTLP.

Instrument names follow the OpenTelemetry conventions (dotted, unit suffix left to the
exporter); the Prometheus exporter turns `esplanade.ike.sas` into `esplanade_ike_sas`.
Labels stay low-cardinality: connection names, states and reasons, never SPIs or addresses.
"""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry


def configure_metrics(
    service: str,
    otlp_endpoint: str | None = None,
    insecure: bool = True,
    extra_readers: list[MetricReader] | None = None,
) -> tuple[MeterProvider, CollectorRegistry]:
    """Set the global MeterProvider; return it and the registry to serve on /metrics."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    # Each service (and each test) serves its own registry, not prometheus_client's global one.
    registry = CollectorRegistry(auto_describe=True)
    prometheus_reader = PrometheusMetricReader(registry=registry)
    readers: list[MetricReader] = [prometheus_reader, *(extra_readers or [])]
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint, insecure=insecure)))
    provider = MeterProvider(resource=Resource.create({"service.name": f"esplanade-{service}"}), metric_readers=readers)
    metrics.set_meter_provider(provider)
    return provider, registry


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(f"esplanade.{name}")


def policy_decisions() -> metrics.Counter:
    """`esplanade.policy.decisions` by `decision` (allow, deny) and `point` (check: the policy
    service's Check; dataplane: a per-identity filter on a flow). One instrument, two callers."""
    return meter("policy").create_counter(
        "esplanade.policy.decisions", description="Policy decisions by decision and decision point"
    )
