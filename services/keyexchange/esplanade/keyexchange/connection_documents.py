"""Connection and pool documents as the store holds them (`config/connections/<name>`,
`config/pools/<name>`), and their way to `ConnectionConfig`.

A connection document is the swanctl-like dictionary `ConnectionConfig.from_dict` takes,
as JSON. Its secrets are `bytes` on the way in, so `SealedDocuments` seals them under their
dotted path (`psk`, `local.private_key`); certificates are PEM strings. What the API lists
is the document without its secrets (`public_view`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2.errors import ConfigError

# dotted paths of the secret fields of a connection document
SECRET_FIELDS = (("psk",), ("local", "private_key"))
_PEM_LISTS = (("cacerts",), ("local", "certs"), ("remote", "certs"))
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class DocumentError(ValueError):
    """A document that cannot become a connection or pool; `field` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def check_name(kind: str, name: str) -> None:
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS or name in (".", ".."):
        raise DocumentError("name", f"a {kind} name is 1-64 characters of [A-Za-z0-9_.-]")


def _plain(value: Any) -> Any:
    """Struct values as JSON would have them: integral floats back to ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def document_from_request(config: Mapping[str, Any]) -> dict[str, Any]:
    """The store document for an API request: secrets as bytes (to be sealed), PEM as text."""
    doc: dict[str, Any] = _plain(dict(config))
    for path in SECRET_FIELDS:
        parent = _parent(doc, path)
        if parent is not None and isinstance(parent.get(path[-1]), str):
            parent[path[-1]] = parent[path[-1]].encode()
    return doc


def _parent(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = doc
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and path[-1] in node else None


def public_view(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The document without its secrets (sealed or not)."""
    out: dict[str, Any] = _copy(doc)
    for path in SECRET_FIELDS:
        parent = _parent(out, path)
        if parent is not None:
            del parent[path[-1]]
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def connection_config(name: str, doc: Mapping[str, Any], pools: Mapping[str, PoolConfig]) -> ConnectionConfig:
    """Validate an opened document (secrets as bytes); raise DocumentError naming the field."""
    d: dict[str, Any] = _copy(doc)
    for path in _PEM_LISTS:
        parent = _parent(d, path)
        if parent is not None:
            value = parent[path[-1]]
            items = value if isinstance(value, list) else [value]
            parent[path[-1]] = [v.encode() if isinstance(v, str) else v for v in items]
    key_parent = _parent(d, ("local", "private_key"))
    if key_parent is not None and isinstance(key_parent["private_key"], str):
        key_parent["private_key"] = key_parent["private_key"].encode()
    if isinstance(d.get("psk"), bytes):
        pass
    try:
        return ConnectionConfig.from_dict(name, d, pools=pools)
    except ConfigError as exc:
        raise DocumentError(exc.field, exc.reason) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # from_dict validates field by field; anything it did not foresee is still the document's fault
        raise DocumentError(f"connections.{name}", f"malformed connection: {type(exc).__name__}") from None


def pool_config(name: str, doc: Mapping[str, Any]) -> PoolConfig:
    f = f"pools.{name}"
    try:
        addrs = ipaddress.ip_network(str(doc["addrs"]), strict=False)
    except KeyError:
        raise DocumentError(f"{f}.addrs", "missing") from None
    except ValueError:
        raise DocumentError(f"{f}.addrs", "not a CIDR") from None
    try:
        dns = tuple(ipaddress.ip_address(str(a)) for a in doc.get("dns", []))
    except ValueError:
        raise DocumentError(f"{f}.dns", "not an IP address") from None
    try:
        subnets = tuple(ipaddress.ip_network(str(n), strict=False) for n in doc.get("subnets", []))
    except ValueError:
        raise DocumentError(f"{f}.subnets", "not a CIDR") from None
    unknown = set(doc) - {"addrs", "dns", "subnets"}
    if unknown:
        raise DocumentError(f"{f}.{sorted(unknown)[0]}", "unknown setting")
    return PoolConfig(name, addrs, dns, subnets)
