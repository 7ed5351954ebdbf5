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
from dataclasses import dataclass, field
from typing import Any

from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2.errors import ConfigError

# dotted paths of the secret fields of a connection document
SECRET_FIELDS = (("psk",), ("local", "private_key"))
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


@dataclass(frozen=True)
class StoredObjects:
    """Certificates and CAs a connection may refer to by id (`config/certs/<id>`, `config/cas/<id>`),
    as the REST API stores connections: certificate ids in `local.certs`/`remote.certs`, CA ids in
    `local.cacerts`/`remote.cacerts` (or PEM text in the same places)."""

    certs: Mapping[str, tuple[bytes, bytes | None]] = field(default_factory=dict)  # id -> (PEM, PEM key)
    cas: Mapping[str, bytes] = field(default_factory=dict)


def _pem_or_ref(value: Any, table: Mapping[str, Any], what: str, where: str) -> Any:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    if isinstance(value, str) and value in table:
        return table[value]
    raise DocumentError(where, f"no {what} {value!r}" if isinstance(value, str) else f"not a {what}")


def _resolve_dynamic(d: dict[str, Any], name: str) -> None:
    """swanctl's `dynamic` selector: this end's IKE address, or anything to be narrowed by the
    responder (a virtual IP requested, or handed out from a pool)."""
    locals_ = [a for a in d.get("local_addrs", []) if isinstance(a, str) and "/" not in a and a != "%any"]
    remotes = [a for a in d.get("remote_addrs", []) if isinstance(a, str) and "/" not in a and a != "%any"]
    children = d.get("children", {})
    if not isinstance(children, dict):
        return
    for cname, child in children.items():
        if not isinstance(child, dict):
            continue
        for key, addrs, wide in (
            ("local_ts", locals_, bool(d.get("vips"))),
            ("remote_ts", remotes, bool(d.get("pools"))),
        ):
            value = child.get(key)
            items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
            if items is None or "dynamic" not in items:
                continue
            out = []
            for item in items:
                if item != "dynamic":
                    out.append(item)
                elif wide or not addrs:
                    out.append("0.0.0.0/0")  # narrowed to the virtual IP during the exchange
                elif len(addrs) == 1:
                    out.append(addrs[0])
                else:
                    raise DocumentError(f"connections.{name}.children.{cname}.{key}", "'dynamic' needs one address")
            child[key] = out


def connection_config(
    name: str,
    doc: Mapping[str, Any],
    pools: Mapping[str, PoolConfig],
    objects: StoredObjects | None = None,
) -> ConnectionConfig:
    """Validate an opened document (secrets as bytes); raise DocumentError naming the field."""
    objects = objects or StoredObjects()
    d: dict[str, Any] = _copy(doc)
    f = f"connections.{name}"
    cacerts = list(_listed(d.pop("cacerts", [])))
    for side in ("local", "remote"):
        sd = d.get(side)
        if isinstance(sd, dict):
            cacerts += _listed(sd.pop("cacerts", []))
            if "certs" in sd:
                refs = _listed(sd["certs"])
                resolved = [_pem_or_ref(c, objects.certs, "certificate", f"{f}.{side}.certs") for c in refs]
                sd["certs"] = [r[0] if isinstance(r, tuple) else r for r in resolved]
                stored_key = resolved[0][1] if resolved and isinstance(resolved[0], tuple) else None
                if side == "local" and "private_key" not in sd and stored_key is not None:
                    sd["private_key"] = stored_key
            if isinstance(sd.get("private_key"), str):
                sd["private_key"] = sd["private_key"].encode()
            if sd.get("id") is None:
                sd.pop("id", None)
    if cacerts:
        d["cacerts"] = [_pem_or_ref(c, objects.cas, "CA", f"{f}.cacerts") for c in cacerts]
    _resolve_dynamic(d, name)
    try:
        return ConnectionConfig.from_dict(name, d, pools=pools)
    except ConfigError as exc:
        raise DocumentError(exc.field, exc.reason) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # from_dict validates field by field; anything it did not foresee is still the document's fault
        raise DocumentError(f, f"malformed connection: {type(exc).__name__}") from None


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


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
