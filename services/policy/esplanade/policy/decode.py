"""Plain data (a store JSON document, or a YAML file's tree) -> model objects, and back.

One decoder serves both the store and the policy file, so a field means the same thing and
is checked with the same words in both. The decoder never raises on bad input: it reports
every problem through a callback (with a path into the document, so the file loader can add
the line and column) and returns None for an object it could not build.

`object_to_document` / `object_from_document` are the store's JSON form under
``policy/<kind>/<id>`` (`esplanade.store.schema.policy_object`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from esplanade.policy.model import (
    DAY_NAMES,
    KIND_OF,
    KINDS,
    MAX_PORT,
    MINUTES_PER_DAY,
    SINGULAR,
    Conditions,
    Destination,
    Group,
    IcmpMatch,
    Identity,
    IdentityKind,
    IkeId,
    IkeIdKind,
    IPNetwork,
    PolicyObject,
    PortRange,
    Protocol,
    Resource,
    Rule,
    Site,
    TimeWindow,
    format_minutes,
)
from esplanade.policy.problems import Path, PolicyError, Problem

# report(path, message, at_key): at_key points the problem at a mapping key, not its value.
Report = Callable[[Path, str, bool], None]

FIELDS: dict[str, tuple[str, ...]] = {
    "sites": ("id", "description", "networks"),
    "groups": ("id", "description"),
    "identities": ("id", "kind", "description", "ike_ids", "groups"),
    "resources": ("id", "description", "destination", "protocol", "ports", "icmp_types", "site"),
    "rules": ("id", "description", "groups", "resources", "conditions"),
}
CONDITION_FIELDS = ("time_window", "source_networks", "posture")
TIME_WINDOW_FIELDS = ("days", "start", "end", "timezone")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"(\d+)(?:-(\d+))?")
_ICMP = re.compile(r"(\d+)(?:/(\d+))?")
_TIME = re.compile(r"(\d\d):(\d\d)")
_DN_SPLIT = re.compile(r"(?<!\\),")


def unknown_field_message(label: str, key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{label}: unknown field '{key}'{hint}"


# -- scalar parsers: return the value, or raise ValueError with the problem's words ----------


def parse_network(text: str) -> IPNetwork:
    """A CIDR or a single address (a full-length prefix); host bits must be clear."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR '{text}'") from None
    raise ValueError(f"invalid CIDR '{text}': host bits are set (did you mean '{loose}'?)")


def parse_dns_name(text: str) -> str | None:
    """The normalized DNS name, or None if `text` is not one (an address-looking text is not)."""
    name = text.lower().removesuffix(".")
    if not name or len(name) > 253 or "." not in name:
        return None
    labels = name.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


def parse_destination(text: str) -> Destination:
    looks_like_address = "/" in text or ":" in text or all(c.isdigit() or c == "." for c in text)
    if looks_like_address:  # not a DNS name either: say what is wrong with the address
        return Destination(network=parse_network(text))
    name = parse_dns_name(text)
    if name is None:
        raise ValueError(f"destination '{text}' is neither an IP address, a CIDR nor a DNS name")
    return Destination(dns_name=name)


def parse_port_range(raw: object) -> PortRange:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"invalid port '{raw}': use a number or a range like 8000-8080")
    if isinstance(raw, int):
        start = end = raw
    else:
        m = _PORT.fullmatch(raw.strip())
        if not m:
            raise ValueError(f"invalid port '{raw}': use a number or a range like 8000-8080")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
    for port in (start, end):
        if not 0 <= port <= MAX_PORT:
            raise ValueError(f"port {port} is out of range (0-65535)")
    if start > end:
        raise ValueError(f"port range {start}-{end} is empty (start is after end)")
    return PortRange(start, end)


def parse_icmp_match(raw: object) -> IcmpMatch:
    bad = f"invalid ICMP type '{raw}': use TYPE or TYPE/CODE with numbers 0-255"
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(bad)
    m = _ICMP.fullmatch(str(raw).strip())
    if not m:
        raise ValueError(bad)
    icmp_type = int(m.group(1))
    code = int(m.group(2)) if m.group(2) is not None else None
    if icmp_type > 255 or (code is not None and code > 255):
        raise ValueError(bad)
    return IcmpMatch(icmp_type, code)


def _normalize_dn(value: str) -> str | None:
    parts = []
    for rdn in _DN_SPLIT.split(value):
        attr, eq, val = rdn.partition("=")
        attr, val = attr.strip(), val.strip()
        if not eq or not attr or not val:
            return None
        parts.append(f"{attr.upper()}={val}")
    return ", ".join(parts)


def parse_ike_id(text: str) -> IkeId:
    """``TYPE:VALUE`` -> a normalized `IkeId` (the form the IKE side must look up)."""
    kind_text, sep, value = text.partition(":")
    kinds = {k.value: k for k in IkeIdKind} | {"rfc822": IkeIdKind.EMAIL}
    kind = kinds.get(kind_text.strip().lower())
    value = value.strip()
    if not sep or kind is None or not value:
        raise ValueError(f"invalid IKE identity '{text}': use TYPE:VALUE with TYPE one of fqdn, email, ip, dn")
    if kind is IkeIdKind.IP:
        try:
            return IkeId(kind, str(ipaddress.ip_address(value)))
        except ValueError:
            raise ValueError(f"invalid IKE identity '{text}': not an IP address") from None
    if kind is IkeIdKind.FQDN:
        name = parse_dns_name(value)
        if name is None:
            raise ValueError(f"invalid IKE identity '{text}': not a DNS name")
        return IkeId(kind, name)
    if kind is IkeIdKind.EMAIL:
        local, at, domain = value.rpartition("@")
        if not at or not local or parse_dns_name(domain) is None:
            raise ValueError(f"invalid IKE identity '{text}': not an email address (user@domain)")
        return IkeId(kind, f"{local}@{domain.lower().removesuffix('.')}")
    dn = _normalize_dn(value)
    if dn is None:
        raise ValueError(f"invalid IKE identity '{text}': not a distinguished name (ATTR=value, ...)")
    return IkeId(kind, dn)


def parse_time_of_day(text: str) -> int:
    m = _TIME.fullmatch(text.strip())
    if m:
        hours, minutes = int(m.group(1)), int(m.group(2))
        if minutes < 60 and (hours < 24 or (hours == 24 and minutes == 0)):
            return hours * 60 + minutes
    raise ValueError(f"invalid time '{text}': use HH:MM from 00:00 to 24:00")


def parse_days(raw: str) -> list[int]:
    text = raw.strip().lower()
    first, dash, last = text.partition("-")
    if first in DAY_NAMES and (not dash or last in DAY_NAMES):
        a = DAY_NAMES.index(first)
        b = DAY_NAMES.index(last) if dash else a
        return [(a + i) % 7 for i in range((b - a) % 7 + 1)]
    raise ValueError(f"invalid day '{raw}': use mon, tue, wed, thu, fri, sat, sun or a range like mon-fri")


def check_timezone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone '{name}'") from None


# -- the structural decoder ----------------------------------------------------------------


class _Decoder:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.failed = False

    def problem(self, path: Path, message: str, at_key: bool = False) -> None:
        self.failed = True
        self.report(path, message, at_key)

    def mapping(self, data: Any, path: Path, allowed: tuple[str, ...], label: str, what: str) -> dict[str, Any] | None:
        if not isinstance(data, dict):
            self.problem(path, f"{what} must be a mapping")
            return None
        for key in data:
            if key not in allowed:
                self.problem((*path, key), unknown_field_message(label, str(key), allowed), True)
        return data

    def string(self, data: dict[str, Any], key: str, path: Path, label: str, *, required: bool = False) -> str | None:
        value = data.get(key)
        if value is None:
            if required:
                self.problem(path, f"{label}: missing field '{key}'")
            return None
        if not isinstance(value, str):
            self.problem((*path, key), f"{label}: '{key}' must be a string")
            return None
        return value

    def items(self, data: dict[str, Any], key: str, path: Path, label: str) -> list[tuple[Path, Any]]:
        value = data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem((*path, key), f"{label}: '{key}' must be a list")
            return []
        return [((*path, key, i), item) for i, item in enumerate(value)]

    def parsed(self, path: Path, label: str, parse: Callable[[Any], Any], raw: Any) -> Any:
        try:
            return parse(raw)
        except ValueError as exc:
            self.problem(path, f"{label}: {exc}")
            return None

    def id_list(self, data: dict[str, Any], key: str, path: Path, label: str, what: str) -> tuple[str, ...]:
        out: list[str] = []
        for item_path, item in self.items(data, key, path, label):
            if not isinstance(item, str):
                self.problem(item_path, f"{label}: '{key}' must be a list of {what} ids")
            elif item in out:
                self.problem(item_path, f"{label}: {what} '{item}' is listed twice")
            else:
                out.append(item)
        return tuple(out)

    def networks(self, data: dict[str, Any], key: str, path: Path, label: str) -> tuple[IPNetwork, ...]:
        out: list[IPNetwork] = []
        for item_path, item in self.items(data, key, path, label):
            net = self.parsed(item_path, label, parse_network, str(item))
            if net is not None:
                out.append(net)
        return tuple(out)

    # -- objects ----------------------------------------------------------------------------
    def object(self, kind: str, data: Any, path: Path) -> PolicyObject | None:
        """The object; when `self.failed` is set afterwards, a best-effort partial one."""
        singular = SINGULAR[kind]
        raw_id = data.get("id") if isinstance(data, dict) else None
        label = f"{singular} '{raw_id}'" if isinstance(raw_id, str) and raw_id else f"{singular} {format_index(path)}"
        self.failed = False
        fields = self.mapping(data, path, FIELDS[kind], label, label)
        if fields is None:
            return None
        object_id = self.string(fields, "id", path, label, required=True)
        if object_id is not None and not _ID.fullmatch(object_id):
            self.problem(
                (*path, "id"),
                f"{label}: invalid id: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        description = self.string(fields, "description", path, label) or ""
        build = getattr(self, f"_{kind}")
        obj: PolicyObject = build(fields, path, label, object_id or "", description)
        return obj

    def _sites(self, d: dict[str, Any], path: Path, label: str, object_id: str, description: str) -> Site:
        return Site(object_id, self.networks(d, "networks", path, label), description)

    def _groups(self, d: dict[str, Any], path: Path, label: str, object_id: str, description: str) -> Group:
        return Group(object_id, description)

    def _identities(self, d: dict[str, Any], path: Path, label: str, object_id: str, description: str) -> Identity:
        kind = IdentityKind.USER
        kind_text = self.string(d, "kind", path, label)
        if kind_text is not None:
            try:
                kind = IdentityKind(kind_text)
            except ValueError:
                self.problem((*path, "kind"), f"{label}: kind must be 'user' or 'device', not '{kind_text}'")
        ike_ids: list[IkeId] = []
        for item_path, item in self.items(d, "ike_ids", path, label):
            ike_id = self.parsed(item_path, label, parse_ike_id, str(item))
            if ike_id is not None:
                if ike_id in ike_ids:
                    self.problem(item_path, f"{label}: IKE identity '{ike_id}' is listed twice")
                else:
                    ike_ids.append(ike_id)
        groups = self.id_list(d, "groups", path, label, "group")
        return Identity(object_id, kind, tuple(ike_ids), groups, description)

    def _resources(self, d: dict[str, Any], path: Path, label: str, object_id: str, description: str) -> Resource:
        dest_text = self.string(d, "destination", path, label, required=True)
        destination = None
        if dest_text is not None:
            destination = self.parsed((*path, "destination"), label, parse_destination, dest_text)
        protocol = Protocol.ANY
        proto_text = self.string(d, "protocol", path, label, required=True)
        if proto_text is not None:
            try:
                protocol = Protocol(proto_text.lower())
            except ValueError:
                self.problem(
                    (*path, "protocol"), f"{label}: protocol must be one of tcp, udp, icmp, any, not '{proto_text}'"
                )
        ports: list[PortRange] = []
        for item_path, item in self.items(d, "ports", path, label):
            port_range = self.parsed(item_path, label, parse_port_range, item)
            if port_range is not None:
                ports.append(port_range)
        if d.get("ports") and proto_text is not None and protocol not in (Protocol.TCP, Protocol.UDP):
            self.problem((*path, "ports"), f"{label}: ports apply only to tcp and udp")
        icmp: list[IcmpMatch] = []
        for item_path, item in self.items(d, "icmp_types", path, label):
            match = self.parsed(item_path, label, parse_icmp_match, item)
            if match is not None:
                icmp.append(match)
        if d.get("icmp_types") and proto_text is not None and protocol is not Protocol.ICMP:
            self.problem((*path, "icmp_types"), f"{label}: icmp_types apply only to protocol icmp")
        site = self.string(d, "site", path, label, required=True)
        if destination is None:
            destination = Destination(dns_name="invalid.invalid")  # never returned: self.failed is set
        return Resource(object_id, destination, site or "", protocol, tuple(ports), tuple(icmp), description)

    def _rules(self, d: dict[str, Any], path: Path, label: str, object_id: str, description: str) -> Rule:
        groups = self.id_list(d, "groups", path, label, "group")
        resources = self.id_list(d, "resources", path, label, "resource")
        for key, what in (("groups", "groups"), ("resources", "resources")):
            if not d.get(key):
                self.problem((*path, key) if key in d else path, f"{label}: names no {what}")
        conditions = Conditions()
        if d.get("conditions") is not None:
            conditions = self._conditions(d["conditions"], (*path, "conditions"), label)
        return Rule(object_id, groups, resources, conditions, description)

    def _conditions(self, data: Any, path: Path, label: str) -> Conditions:
        c = self.mapping(data, path, CONDITION_FIELDS, label, f"{label}: 'conditions'")
        if c is None:
            return Conditions()
        window = None
        if c.get("time_window") is not None:
            window = self._time_window(c["time_window"], (*path, "time_window"), label)
        sources = self.networks(c, "source_networks", path, label)
        posture: list[str] = []
        for item_path, item in self.items(c, "posture", path, label):
            tag = str(item)
            if not _TAG.fullmatch(tag):
                self.problem(
                    item_path,
                    f"{label}: invalid posture tag '{tag}': use up to 64 letters, digits, '.', '_', ':' or '-'",
                )
            elif tag in posture:
                self.problem(item_path, f"{label}: posture tag '{tag}' is listed twice")
            else:
                posture.append(tag)
        return Conditions(window, sources, tuple(posture))

    def _time_window(self, data: Any, path: Path, label: str) -> TimeWindow | None:
        w = self.mapping(data, path, TIME_WINDOW_FIELDS, label, f"{label}: 'time_window'")
        if w is None:
            return None
        days: set[int] = set()
        for item_path, item in self.items(w, "days", path, label):
            parsed = self.parsed(item_path, label, parse_days, str(item))
            days.update(parsed or ())
        if not w.get("days"):
            self.problem(path, f"{label}: time window names no days")
        start_text = self.string(w, "start", path, label, required=True)
        end_text = self.string(w, "end", path, label, required=True)
        start = self.parsed((*path, "start"), label, parse_time_of_day, start_text) if start_text else None
        end = self.parsed((*path, "end"), label, parse_time_of_day, end_text) if end_text else None
        if start == MINUTES_PER_DAY:
            self.problem((*path, "start"), f"{label}: a time window cannot start at 24:00")
        elif start is not None and start == end:
            self.problem(path, f"{label}: time window is empty: start and end are both {format_minutes(start)}")
        timezone = self.string(w, "timezone", path, label) or "UTC"
        self.parsed((*path, "timezone"), label, check_timezone, timezone)
        if start is None or end is None:
            return None
        return TimeWindow(tuple(sorted(days)), start, end, timezone)


def format_index(path: Path) -> str:
    return f"#{path[-1] + 1}" if path and isinstance(path[-1], int) else "(no id)"


def decode_object(kind: str, data: Any, path: Path, report: Report) -> PolicyObject | None:
    """Build one object of `kind` from plain data, reporting every problem; None if any."""
    decoder = _Decoder(report)
    obj = decoder.object(kind, data, path)
    return None if decoder.failed else obj


def decode_partial_object(kind: str, data: Any, path: Path, report: Report) -> tuple[PolicyObject | None, bool]:
    """Like `decode_object`, but also return what could be built of a bad object, and whether it is whole.

    The file loader checks a partial object's references too, so one pass reports all problems.
    """
    decoder = _Decoder(report)
    obj = decoder.object(kind, data, path)
    return obj, obj is not None and not decoder.failed


# -- store documents -----------------------------------------------------------------------


def object_to_document(obj: PolicyObject) -> dict[str, Any]:
    """The JSON document of `obj`. Empty optional fields are left out; the revision is the key's."""
    doc: dict[str, Any] = {"id": obj.id}
    if obj.description:
        doc["description"] = obj.description
    if isinstance(obj, Site):
        doc["networks"] = [str(n) for n in obj.networks]
    elif isinstance(obj, Identity):
        doc["kind"] = obj.kind.value
        doc["ike_ids"] = [str(i) for i in obj.ike_ids]
        doc["groups"] = list(obj.groups)
    elif isinstance(obj, Resource):
        doc["destination"] = str(obj.destination)
        doc["protocol"] = obj.protocol.value
        if obj.ports:
            doc["ports"] = [p.start if p.start == p.end else str(p) for p in obj.ports]
        if obj.icmp_types:
            doc["icmp_types"] = [m.type if m.code is None else str(m) for m in obj.icmp_types]
        doc["site"] = obj.site
    elif isinstance(obj, Rule):
        doc["groups"] = list(obj.groups)
        doc["resources"] = list(obj.resources)
        conditions = conditions_to_document(obj.conditions)
        if conditions:
            doc["conditions"] = conditions
    return doc


def conditions_to_document(c: Conditions) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if c.time_window is not None:
        w = c.time_window
        doc["time_window"] = {
            "days": [DAY_NAMES[d] for d in w.days],
            "start": format_minutes(w.start),
            "end": format_minutes(w.end),
            "timezone": w.timezone,
        }
    if c.source_networks:
        doc["source_networks"] = [str(n) for n in c.source_networks]
    if c.posture:
        doc["posture"] = list(c.posture)
    return doc


def object_from_document(kind: str, doc: Any, revision: int = 0) -> PolicyObject:
    """Decode a store document; raise `PolicyError` naming every problem."""
    if kind not in KINDS:
        raise ValueError(f"unknown policy object kind {kind!r}")
    problems: list[Problem] = []
    obj = decode_object(kind, doc, (), lambda path, message, _at_key: problems.append(Problem(path, message)))
    if obj is None or problems:
        raise PolicyError(problems)
    return replace(obj, revision=revision)


def encode_document(doc: dict[str, Any]) -> bytes:
    """Canonical bytes of a document (sorted keys, compact): equal content, equal bytes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def kind_of(obj: PolicyObject) -> str:
    return KIND_OF[type(obj)]


def decode_conditions(data: Any) -> Conditions:
    """Decode a `conditions` mapping (as in a rule document); raise `PolicyError` if bad."""
    problems: list[Problem] = []
    decoder = _Decoder(lambda path, message, _at_key: problems.append(Problem(path, message)))
    conditions = decoder._conditions(data, ("conditions",), "conditions")
    if problems:
        raise PolicyError(problems)
    return conditions
