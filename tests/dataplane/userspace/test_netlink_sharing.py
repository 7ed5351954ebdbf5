"""Routes and cleartext-guard policies are shared by the SPD entries that want them: a change
that leaves the kernel as it is sends no netlink message, and one entry's removal never takes
away what another still needs."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from esplanade.dataplane.backend import DataplaneError
from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicy, XfrmPolicyKey
from esplanade.dataplane.userspace.cleartext_guard import CleartextGuard
from esplanade.dataplane.userspace.tunnel_routes import TunnelRoutes
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection, SpdPolicy


class FakeLinks:
    opened = 0

    def __init__(self, calls: list[tuple[str, str]]) -> None:
        self.calls = calls
        FakeLinks.opened += 1

    def __enter__(self) -> FakeLinks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.calls.append(("close", ""))

    def local_addresses(self, version: int) -> list[str]:
        self.calls.append(("addresses", str(version)))
        return ["10.1.0.1"]

    def replace_route(self, network: str, name: str, **kw: Any) -> None:
        self.calls.append(("replace", f"{network} mtu {kw.get('mtu', 0)}"))

    def delete_route(self, network: str, name: str, **kw: Any) -> None:
        self.calls.append(("delete", network))

    def pin_host_route(self, address: str) -> None:
        self.calls.append(("pin", address))

    def delete_host_route(self, address: str) -> None:
        self.calls.append(("unpin", address))


def _policy(
    pid: str, child: str, direction: PolicyDirection = PolicyDirection.OUT, remote: str = "10.2.0.0/16"
) -> SpdPolicy:
    return SpdPolicy(
        id=pid,
        direction=direction,
        local_ts=TrafficSelector.parse("10.1.0.0/16"),
        remote_ts=TrafficSelector.parse(remote),
        child_sa=child,
        tunnel_src="192.0.2.1",
        tunnel_dst="192.0.2.2",
    )


def test_routes_open_one_netlink_socket_and_skip_changes_the_kernel_has() -> None:
    calls: list[tuple[str, str]] = []
    FakeLinks.opened = 0
    routes = TunnelRoutes("esp0", 1400, 1500, configurator=lambda: FakeLinks(calls))  # type: ignore[arg-type,return-value]
    a, b = _policy("a.out", "c1"), _policy("b.out", "c2")
    routes.add_policy(a, None, set())
    assert calls == [("addresses", "4"), ("replace", "10.2.0.0/16 mtu 0")]
    calls.clear()
    routes.add_policy(b, None, set())  # the same network, routed already
    routes.replace_policy(a, replace(a, child_sa="c3"), None, set())  # re-pointed, same MTU
    routes.remove_policy(b)  # a still holds the route
    assert calls == []
    routes.remove_policy(replace(a, child_sa="c3"))
    assert calls == [("delete", "10.2.0.0/16")]
    assert routes.routes() == []
    routes.add_policy(a, None, set())
    assert FakeLinks.opened == 1  # one configurator for all of it
    routes.close()
    assert calls[-1] == ("close", "")


class FakeXfrm:
    def __init__(self) -> None:
        self.kernel: dict[XfrmPolicyKey, XfrmPolicy] = {}
        self.messages: list[str] = []
        self.fail_next_update = False

    def update_policy(self, policy: XfrmPolicy) -> None:
        if self.fail_next_update:
            self.fail_next_update = False
            raise DataplaneError("refused")
        self.messages.append("update")
        self.kernel[policy.key] = policy

    def delete_policy(self, key: XfrmPolicyKey) -> None:
        self.messages.append("delete")
        self.kernel.pop(key, None)


def _guard() -> tuple[CleartextGuard, FakeXfrm]:
    guard = CleartextGuard("esp0")
    fake = FakeXfrm()
    guard._client = fake  # type: ignore[assignment]
    return guard, fake


def test_guard_policies_are_shared_and_go_with_their_last_holder() -> None:
    guard, fake = _guard()
    inbound = _policy("x.in", "c1", PolicyDirection.IN)
    forward = _policy("x.fwd", "c1", PolicyDirection.FWD)

    async def scenario() -> None:
        await guard.add(inbound)
        assert fake.messages == ["update", "update"]  # BLOCK in + BLOCK fwd
        await guard.add(forward)  # the same selectors: the kernel has them already
        await guard.add(replace(inbound, child_sa="c2"))  # re-pointed at a new Child SA
        assert fake.messages == ["update", "update"]
        await guard.remove("x.in")  # x.fwd still needs the guard
        assert len(fake.kernel) == 2 and fake.messages == ["update", "update"]
        await guard.remove("x.fwd")
        assert fake.kernel == {} and fake.messages == ["update", "update", "delete", "delete"]

    asyncio.run(scenario())


def test_guard_content_follows_the_latest_holder_and_comes_back_when_it_goes() -> None:
    guard, fake = _guard()
    low = _policy("low.in", "c1", PolicyDirection.IN)
    high = replace(_policy("high.in", "c2", PolicyDirection.IN), priority=low.priority + 10)

    async def scenario() -> None:
        await guard.add(low)
        await guard.add(high)
        assert {p.priority for p in fake.kernel.values()} == {high.priority}
        await guard.remove("high.in")
        assert {p.priority for p in fake.kernel.values()} == {low.priority}
        assert {p.priority for p in guard.kernel_policies()} == {low.priority}

    asyncio.run(scenario())


def test_guard_change_is_all_or_nothing() -> None:
    guard, fake = _guard()
    low = _policy("low.in", "c1", PolicyDirection.IN)
    high = replace(_policy("high.in", "c2", PolicyDirection.IN), priority=low.priority + 10)
    other = _policy("other.in", "c3", PolicyDirection.IN, remote="10.3.0.0/16")

    async def scenario() -> None:
        await guard.add(low)
        before = dict(fake.kernel)
        fake.fail_next_update = True
        with pytest.raises(DataplaneError):
            await guard.add(high)
        assert fake.kernel == before and {p.priority for p in guard.kernel_policies()} == {low.priority}
        # the second of two updates fails: the first is taken back
        fake.messages.clear()
        real = fake.update_policy
        count = 0

        def second_fails(policy: XfrmPolicy) -> None:
            nonlocal count
            count += 1
            if count == 2:
                raise DataplaneError("refused")
            real(policy)

        fake.update_policy = second_fails  # type: ignore[method-assign]
        with pytest.raises(DataplaneError):
            await guard.add(other)
        assert fake.kernel == before
        assert "other.in" not in guard._installed

    asyncio.run(scenario())


def test_guard_mirrors_are_remembered_per_what_they_depend_on() -> None:
    """The remembered BLOCK policies are the ones built afresh, for entries that differ in
    anything the kernel policy depends on (and those that differ only in id or Child SA)."""
    from esplanade.dataplane.kernel.xfrm_policy import xfrm_policies_from_spd
    from esplanade.ipsec.spd import PolicyAction
    from esplanade.ipsec.spd import PolicyDirection as D

    def built(policy: SpdPolicy) -> list[XfrmPolicy]:
        out: list[XfrmPolicy] = []
        for direction in (D.IN, D.FWD):
            block = replace(policy, direction=direction, action=PolicyAction.DISCARD, trap=False, reqid=0)
            out += xfrm_policies_from_spd(block, reqid=0)
        return out

    guard, _ = _guard()
    base = _policy("a.in", "c1", D.IN)
    variants = [
        base,
        replace(base, id="b.in", child_sa="c2"),
        replace(base, priority=base.priority + 1),
        replace(base, mark=7),
        replace(base, if_id=3),
        _policy("a.in", "c1", D.IN, remote="10.3.0.0/16"),
        _policy("a.in", "c1", D.IN, remote="10.3.0.0/16"),
    ]
    for policy in variants + variants:  # the second round comes from what was remembered
        assert guard._kernel_policies(policy) == built(policy)
    assert len(guard._blocks) == 5
