"""Build the Store and the KEK ring from settings (`esplanade.config.settings`)."""

from __future__ import annotations

from esplanade.config.settings import KekSettings, StoreSettings
from esplanade.store.base import Store
from esplanade.store.measured import MeasuredStore
from esplanade.store.sealing import Keyring, KeyringError, Sealer

KEK_FILE_SETTING = "kek.file (ESPLANADE_KEK__FILE)"
KEK_VALUE_SETTING = "kek.value (ESPLANADE_KEK__VALUE)"


def open_store(settings: StoreSettings) -> Store:
    """A Store for `settings`, not yet connected (`async with open_store(s) as store:`); every
    request it serves is measured (`esplanade.store.request.duration`)."""
    return MeasuredStore(_open_backend(settings))


def _open_backend(settings: StoreSettings) -> Store:
    if settings.backend == "etcd":
        from esplanade.store.etcd import EtcdStore  # aetcd and its gRPC stubs only when etcd is used

        tls = settings.etcd_tls
        return EtcdStore(
            list(settings.etcd_endpoints),
            ca_file=str(tls.ca_file) if tls.enabled and tls.ca_file else None,
            cert_file=str(tls.cert_file) if tls.enabled and tls.cert_file else None,
            key_file=str(tls.key_file) if tls.enabled and tls.key_file else None,
            timeout=settings.timeout_seconds,
        )
    from esplanade.store.embedded import EmbeddedStore

    return EmbeddedStore(settings.path, busy_timeout=max(settings.timeout_seconds, 30.0))


def load_keyring(settings: KekSettings) -> Keyring:
    """The KEK ring from `kek.file` or else `kek.value`; errors name the setting."""
    if settings.file is not None:
        return Keyring.from_file(settings.file, setting=KEK_FILE_SETTING)
    if settings.value is not None:
        return Keyring.parse(settings.value.get_secret_value(), KEK_VALUE_SETTING)
    raise KeyringError(
        f"no key-encryption key: set {KEK_FILE_SETTING} to a keyring file or {KEK_VALUE_SETTING} to its text"
        " (lines kid:base64-of-32-random-bytes, first = active)"
    )


def open_sealer(settings: KekSettings) -> Sealer:
    return Sealer(load_keyring(settings))
