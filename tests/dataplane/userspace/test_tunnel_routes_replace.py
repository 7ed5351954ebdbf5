"""A policy re-pointed to a new Child SA (a rekey) keeps its route: no gap without a route."""

from __future__ import annotations

from typing import Any

from esplanade.dataplane.userspace.tunnel_routes import TunnelRoutes
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection, SpdPolicy
from tests.dataplane.child_sa_records import record


class FakeLinks:
    def __init__(self, calls: list[tuple[str, str]]) -> None:
        self.calls = calls

    def __enter__(self) -> FakeLinks:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def local_addresses(self, version: int) -> list[str]:
        return ["10.1.0.1"]

    def replace_route(self, network: str, name: str, **kw: Any) -> None:
        self.calls.append(("replace", network))

    def delete_route(self, network: str, name: str, **kw: Any) -> None:
        self.calls.append(("delete", network))

    def pin_host_route(self, address: str) -> None:
        self.calls.append(("pin", address))

    def delete_host_route(self, address: str) -> None:
        self.calls.append(("unpin", address))


def _policy(child: str, remote: str = "10.2.0.0/16") -> SpdPolicy:
    return SpdPolicy(
        id="conn.net.0-abcd.out",
        direction=PolicyDirection.OUT,
        local_ts=TrafficSelector.parse("10.1.0.0/16"),
        remote_ts=TrafficSelector.parse(remote),
        child_sa=child,
        tunnel_src="192.0.2.1",
        tunnel_dst="192.0.2.2",
    )


def test_rekey_keeps_the_route_and_a_selector_change_moves_it() -> None:
    calls: list[tuple[str, str]] = []
    routes = TunnelRoutes("esp0", 1400, 1500, configurator=lambda: FakeLinks(calls))  # type: ignore[arg-type,return-value]
    old = _policy("child-1")
    routes.add_policy(old, None, set())
    assert calls == [("replace", "10.2.0.0/16")]
    calls.clear()
    new = _policy("child-2")
    routes.replace_policy(old, new, None, set())
    assert ("delete", "10.2.0.0/16") not in calls
    assert [r["network"] for r in routes.routes()] == ["10.2.0.0/16"]
    moved = _policy("child-2", remote="10.3.0.0/16")
    routes.replace_policy(new, moved, None, set())
    assert ("delete", "10.2.0.0/16") in calls and ("replace", "10.3.0.0/16") in calls
    assert [r["network"] for r in routes.routes()] == ["10.3.0.0/16"]


class MtuLinks(FakeLinks):
    def replace_route(self, network: str, name: str, **kw: Any) -> None:
        self.calls.append(("replace", f"{network} mtu {kw.get('mtu')}"))


def test_the_route_keeps_its_mtu_while_the_named_child_sa_is_unknown_and_follows_a_real_change() -> None:
    calls: list[tuple[str, str]] = []
    routes = TunnelRoutes("esp0", 1500, 1500, configurator=lambda: MtuLinks(calls))  # type: ignore[arg-type,return-value]
    first, same, smaller = (
        record("child-1", 0x1000, encap=False),
        record("child-2", 0x1000, encap=False),
        record("child-3", 0x1000),
    )
    mtu, mtu_encap = routes.mtu_for(first), routes.mtu_for(smaller)
    assert 0 < mtu_encap < mtu < 1500
    policy = _policy("child-1")
    routes.add_policy(policy, first, set())
    assert calls == [("replace", f"10.2.0.0/16 mtu {mtu}")]
    calls.clear()
    # the Child SA goes (a setup torn down, the policy still names it): no route replace, the MTU stays
    routes.update_child([policy], None)
    # re-pointed to a Child SA not installed yet: the same
    repointed = _policy("child-2")
    routes.replace_policy(policy, repointed, None, set())
    assert calls == []
    assert routes.routes()[0]["mtu"] == mtu
    # it arrives with the same transforms: nothing to change
    routes.update_child([repointed], same)
    assert calls == []
    # a Child SA whose transforms need a smaller MTU (UDP encapsulation): the route follows
    third = _policy("child-3")
    routes.replace_policy(repointed, third, smaller, set())
    assert calls == [("replace", f"10.2.0.0/16 mtu {mtu_encap}")]
    assert routes.routes()[0]["mtu"] == mtu_encap
    calls.clear()
    routes.update_child([third], first)
    assert calls == [("replace", f"10.2.0.0/16 mtu {mtu}")]
