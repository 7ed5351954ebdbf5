"""Telemetry set-up shared by every service: JSON logs, OpenTelemetry traces and metrics."""
