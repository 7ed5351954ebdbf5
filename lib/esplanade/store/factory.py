"""Build a Store from settings.

Settings (environment variables; the config module may fill `StoreSettings` from its own
sources instead):

=============================  ==========================================================
ESPLANADE_STORE                ``embedded`` (default) or ``etcd``
ESPLANADE_STORE_PATH           embedded: the SQLite file (default
                               /var/lib/esplanade/state.db)
ESPLANADE_STORE_SYNCHRONOUS    embedded: FULL (default) or NORMAL
ESPLANADE_ETCD_ENDPOINTS       etcd: comma-separated host:port (or https://host:port)
ESPLANADE_ETCD_CA_FILE         etcd: CA certificate (PEM) that signed etcd's server cert
ESPLANADE_ETCD_CERT_FILE       etcd: client certificate (PEM), for --client-cert-auth
ESPLANADE_ETCD_KEY_FILE        etcd: client key (PEM)
ESPLANADE_STORE_TIMEOUT        seconds per call (default 5)
=============================  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from esplanade.store.base import Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.etcd import EtcdStore, parse_endpoint

DEFAULT_EMBEDDED_PATH = "/var/lib/esplanade/state.db"


class StoreSettingsError(ValueError):
    """A store setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class StoreSettings:
    backend: Literal["embedded", "etcd"] = "embedded"
    path: str = DEFAULT_EMBEDDED_PATH
    synchronous: str = "FULL"
    endpoints: tuple[str, ...] = ()
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = 5.0

    def validate(self) -> None:
        if self.backend not in ("embedded", "etcd"):
            raise StoreSettingsError(f"ESPLANADE_STORE must be 'embedded' or 'etcd', not {self.backend!r}")
        if self.timeout <= 0:
            raise StoreSettingsError("ESPLANADE_STORE_TIMEOUT must be a positive number of seconds")
        if self.backend == "embedded":
            if not self.path:
                raise StoreSettingsError("ESPLANADE_STORE_PATH is empty")
            if self.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
                raise StoreSettingsError("ESPLANADE_STORE_SYNCHRONOUS must be FULL or NORMAL")
            return
        if not self.endpoints:
            raise StoreSettingsError("ESPLANADE_STORE=etcd needs ESPLANADE_ETCD_ENDPOINTS (host:port,...)")
        for endpoint in self.endpoints:
            try:
                parse_endpoint(endpoint)
            except ValueError as exc:
                raise StoreSettingsError(f"ESPLANADE_ETCD_ENDPOINTS: {exc}") from None
        if (self.cert_file is None) != (self.key_file is None):
            raise StoreSettingsError("ESPLANADE_ETCD_CERT_FILE and ESPLANADE_ETCD_KEY_FILE go together")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreSettings:
        env = os.environ if environ is None else environ
        backend = env.get("ESPLANADE_STORE", "embedded").strip().lower() or "embedded"
        try:
            timeout = float(env.get("ESPLANADE_STORE_TIMEOUT", "5"))
        except ValueError:
            raise StoreSettingsError("ESPLANADE_STORE_TIMEOUT must be a number of seconds") from None
        settings = cls(
            backend=backend,  # type: ignore[arg-type]  # validated below
            path=env.get("ESPLANADE_STORE_PATH", DEFAULT_EMBEDDED_PATH),
            synchronous=env.get("ESPLANADE_STORE_SYNCHRONOUS", "FULL").upper(),
            endpoints=tuple(e.strip() for e in env.get("ESPLANADE_ETCD_ENDPOINTS", "").split(",") if e.strip()),
            ca_file=env.get("ESPLANADE_ETCD_CA_FILE") or None,
            cert_file=env.get("ESPLANADE_ETCD_CERT_FILE") or None,
            key_file=env.get("ESPLANADE_ETCD_KEY_FILE") or None,
            timeout=timeout,
        )
        settings.validate()
        return settings


def build_store(settings: StoreSettings) -> Store:
    """A Store for `settings`, not yet connected (`async with build_store(s) as store:`)."""
    settings.validate()
    if settings.backend == "etcd":
        return EtcdStore(
            settings.endpoints,
            ca_file=settings.ca_file,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
            timeout=settings.timeout,
        )
    return EmbeddedStore(settings.path, synchronous=settings.synchronous, busy_timeout=max(settings.timeout, 30.0))
