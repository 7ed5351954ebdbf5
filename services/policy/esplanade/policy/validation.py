"""Checks across objects: references, IKE identity bindings, and resources that collide.

Each object is valid in itself once decoded (`decode`); here the model as a whole is
checked. Every problem is reported, none stops the check. `locate` maps an object to its
path in the source (the file loader passes list positions so problems get a line); the
default path is ``(kind, id)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from esplanade.policy.model import KINDS, IkeId, IPNetwork, Model, Protocol, Resource
from esplanade.policy.problems import Path, Problem

Locate = Callable[[str, str], Path]


def _default_locate(kind: str, object_id: str) -> Path:
    return (kind, object_id)


def validate_model(
    model: Model, locate: Locate = _default_locate, undecoded: Mapping[str, set[str]] | None = None
) -> list[Problem]:
    """Every cross-object problem of `model`.

    `undecoded` holds ids (by kind) of objects that exist in the source but failed to decode;
    references to them are not reported again as unknown, and a partial resource among them
    is not checked for collisions (its protocol or ports may be placeholders).
    """
    problems: list[Problem] = []
    skip = undecoded or {}

    def known(kind: str, object_id: str) -> bool:
        return object_id in model.kind(kind) or object_id in skip.get(kind, ())

    def report(kind: str, object_id: str, suffix: Path, message: str) -> None:
        problems.append(Problem((*locate(kind, object_id), *suffix), message))

    bound: dict[IkeId, str] = {}
    for identity in model.identities.values():
        label = f"identity '{identity.id}'"
        for i, group in enumerate(identity.groups):
            if not known("groups", group):
                report("identities", identity.id, ("groups", i), f"{label}: unknown group '{group}'")
        for i, ike_id in enumerate(identity.ike_ids):
            owner = bound.setdefault(ike_id, identity.id)
            if owner != identity.id:
                report(
                    "identities",
                    identity.id,
                    ("ike_ids", i),
                    f"{label}: IKE identity '{ike_id}' is already bound to identity '{owner}'",
                )

    for resource in model.resources.values():
        label = f"resource '{resource.id}'"
        site = model.sites.get(resource.site)
        if site is None:
            if not resource.site or resource.site in skip.get("sites", ()):
                continue
            report("resources", resource.id, ("site",), f"{label}: unknown site '{resource.site}'")
            continue
        net = resource.destination.network
        if resource.id in skip.get("resources", ()):
            continue
        if net is not None and site.networks and not any(_inside(net, fronted) for fronted in site.networks):
            report(
                "resources",
                resource.id,
                ("destination",),
                f"{label}: destination {resource.destination} is outside the networks fronted by site '{site.id}'",
            )
    for first, second in overlapping_resources(model, skip.get("resources", set())):
        report(
            "resources",
            second.id,
            ("destination",),
            f"resource '{second.id}': overlaps resource '{first.id}' (same addresses, protocol and ports)"
            f" but is fronted by site '{second.site}', not site '{first.site}'",
        )

    for rule in model.rules.values():
        label = f"rule '{rule.id}'"
        for i, group in enumerate(rule.groups):
            if not known("groups", group):
                report("rules", rule.id, ("groups", i), f"{label}: unknown group '{group}'")
        for i, resource_id in enumerate(rule.resources):
            if not known("resources", resource_id):
                report("rules", rule.id, ("resources", i), f"{label}: unknown resource '{resource_id}'")
    return problems


def _inside(net: IPNetwork, fronted: IPNetwork) -> bool:
    return (
        net.version == fronted.version
        and int(fronted.network_address) <= int(net.network_address)
        and int(net.broadcast_address) <= int(fronted.broadcast_address)
    )


def _protocols_overlap(a: Resource, b: Resource) -> bool:
    return a.protocol is Protocol.ANY or b.protocol is Protocol.ANY or a.protocol is b.protocol


def _ports_overlap(a: Resource, b: Resource) -> bool:
    return any(p.start <= q.end and q.start <= p.end for p in a.port_ranges() for q in b.port_ranges())


def overlapping_resources(
    model: Model, ignore: set[str] | frozenset[str] = frozenset()
) -> list[tuple[Resource, Resource]]:
    """Pairs (earlier, later) of address resources on different sites that share some traffic.

    Such a pair leaves the gateway two places to send one packet. DNS-name resources are not
    checked: their addresses are known only once resolved.
    """
    order = {rid: i for i, rid in enumerate(model.resources)}
    spans = []
    for res in model.resources.values():
        net = res.destination.network
        if net is not None and res.id not in ignore:
            spans.append((net.version, int(net.network_address), int(net.broadcast_address), order[res.id], res))
    spans.sort(key=lambda s: (s[0], s[1], s[3]))
    pairs: list[tuple[Resource, Resource]] = []
    active: list[tuple[int, int, int, Resource]] = []  # (version, hi, order, resource)
    for version, lo, hi, position, res in spans:
        active = [a for a in active if a[0] == version and a[1] >= lo]
        for _, _, other_position, other in active:
            if other.site != res.site and _protocols_overlap(res, other) and _ports_overlap(res, other):
                pair = (other, res) if other_position < position else (res, other)
                pairs.append(pair)
        active.append((version, hi, position, res))
    pairs.sort(key=lambda p: (order[p[1].id], order[p[0].id]))
    return pairs


def object_paths(model: Model) -> dict[tuple[str, str], Path]:
    """(kind, id) -> (kind, position): the paths of objects in a file written in model order."""
    return {(kind, obj.id): (kind, i) for kind in KINDS for i, obj in enumerate(model.kind(kind).values())}
