"""Every transform and SA option goes into a real kernel and dumps back identical.

Each case is built from a `SecurityAssociation` by the backend's mapping, added with
XFRM_MSG_NEWSA, read back with GETSA and with a dump, compared field by field (keys,
ICV/truncation lengths, ESN and replay window, encapsulation, lifetimes, mark, if_id,
TFC padding, selector), then deleted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from esplanade.dataplane.backend import AlreadyExists, InvalidArgument, NotFound, Unsupported
from esplanade.dataplane.kernel.xfrm_client import XfrmClient
from esplanade.dataplane.kernel.xfrm_sa import XfrmAlgorithm, XfrmSa, xfrm_sa_from_association
from esplanade.dataplane.kernel.xfrm_socket import XfrmNetlinkError, XfrmSocket
from esplanade.ipsec.sa import Lifetime, TfcPolicy
from esplanade.ipsec.transforms import Direction, Mode
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS, TRANSFORMS_BY_LABEL, Peer, security_association
from tests.dataplane.kernel.netns_topology import netns

pytestmark = pytest.mark.vm

A4, B4 = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
A6, B6 = Peer("2001:db8::1", "fd01::1"), Peer("2001:db8::2", "fd02::1")


@pytest.fixture
def client() -> Iterator[XfrmClient]:
    with netns("sa") as ns, XfrmSocket(ns) as sock:
        yield XfrmClient(sock)


def _cases() -> list[tuple[str, XfrmSa]]:
    cases: list[tuple[str, XfrmSa]] = []
    spi = 0x1000
    for transform in TRANSFORMS:
        for direction in (Direction.OUT, Direction.IN):
            spi += 1
            src, dst = (A4, B4) if direction == Direction.OUT else (B4, A4)
            sa = security_association(spi, direction, src, dst, transform)
            cases.append((f"{transform.label}-{direction.name}", xfrm_sa_from_association(sa, reqid=spi)))
    gcm = TRANSFORMS_BY_LABEL["aes128gcm16"]
    cbc = TRANSFORMS_BY_LABEL["aes256-sha512"]
    variants = {
        "legacy-window-32": dict(esn=False, replay_window=32),
        "no-anti-replay": dict(esn=False, replay_window=0),
        "esn-window-1024": dict(esn=True, replay_window=1024),
        "esn-window-4096": dict(esn=True, replay_window=4096),
        "window-128-no-esn": dict(esn=False, replay_window=128),
        "esp-in-udp": dict(encap=True),
        "lifetimes": dict(
            lifetime=Lifetime(
                soft_bytes=1_000_000,
                hard_bytes=2_000_000,
                soft_packets=1000,
                hard_packets=2000,
                soft_seconds=3000,
                hard_seconds=3600,
            )
        ),
        "mark-and-if-id": dict(mark=0x42, if_id=7),
        "transport": dict(mode=Mode.TRANSPORT),
    }
    for name, options in variants.items():
        for transform in (gcm, cbc):
            spi += 1
            sa = security_association(spi, Direction.IN, B4, A4, transform, **options)  # type: ignore[arg-type]
            cases.append((f"{name}-{transform.label}", xfrm_sa_from_association(sa, reqid=1)))
    for label in ("aes256gcm16", "aes128-sha256", "ah-sha384"):
        for mode in (Mode.TUNNEL, Mode.TRANSPORT):
            spi += 1
            sa = security_association(spi, Direction.OUT, A6, B6, TRANSFORMS_BY_LABEL[label], mode=mode)
            cases.append((f"ipv6-{mode.name}-{label}", xfrm_sa_from_association(sa, reqid=2)))
    spi += 1
    padded = dataclasses.replace(security_association(spi, Direction.OUT, A4, B4, gcm), tfc=TfcPolicy(pad_to=1200))
    cases.append(("tfc-padding", xfrm_sa_from_association(padded, reqid=3)))
    return cases


CASES = _cases()


def test_every_transform_and_option_dumps_back_identical(client: XfrmClient) -> None:
    mismatches = []
    for name, sa in CASES:
        client.add_sa(sa)
        got = client.get_sa(sa.id, mark=sa.mark).sa
        if got != sa:
            diff = {f.name: (getattr(sa, f.name), getattr(got, f.name)) for f in dataclasses.fields(sa)}
            mismatches.append((name, {k: v for k, v in diff.items() if v[0] != v[1]}))
    dumped = {state.sa.id: state.sa for state in client.dump_sas()}
    assert len(dumped) == len(CASES)
    for name, sa in CASES:
        if dumped.get(sa.id) != sa:
            mismatches.append((f"dump:{name}", dumped.get(sa.id)))
    assert not mismatches, mismatches
    for _, sa in CASES:
        client.delete_sa(sa.id, mark=sa.mark)
    assert client.dump_sas() == []


def test_aead_keys_carry_the_salt_and_cbc_keys_do_not(client: XfrmClient) -> None:
    gcm = dict(CASES)["aes128gcm16-OUT"]
    assert gcm.aead is not None and len(gcm.aead.key) == 20 and gcm.aead.bits == 128
    cbc = dict(CASES)["aes256-sha384-OUT"]
    assert cbc.crypt is not None and len(cbc.crypt.key) == 32
    assert cbc.auth is not None and len(cbc.auth.key) == 48 and cbc.auth.bits == 192
    client.add_sa(gcm)
    assert client.get_sa(gcm.id).sa.aead == gcm.aead


def test_kernel_refusals_are_typed_and_leave_nothing(client: XfrmClient) -> None:
    sa = dict(CASES)["aes128gcm16-OUT"]
    client.add_sa(sa)
    with pytest.raises(AlreadyExists):
        client.add_sa(sa)
    unknown = dataclasses.replace(sa, spi=0x7777, aead=XfrmAlgorithm("rfc4106(gcm(nosuchcipher))", bytes(20), 128))
    with pytest.raises(Unsupported) as refused:
        client.add_sa(unknown)
    assert isinstance(refused.value.__cause__, XfrmNetlinkError)
    assert "rfc4106(gcm(nosuchcipher))" in str(refused.value)
    bad_icv = dataclasses.replace(sa, spi=0x7778, aead=XfrmAlgorithm("rfc4106(gcm(aes))", bytes(20), 40))
    with pytest.raises(Unsupported):  # the kernel looks AEADs up by name and ICV length
        client.add_sa(bad_icv)
    bad_key = dataclasses.replace(sa, spi=0x7779, aead=XfrmAlgorithm("rfc4106(gcm(aes))", bytes(17), 128))
    with pytest.raises(InvalidArgument):
        client.add_sa(bad_key)
    with pytest.raises(NotFound):
        client.delete_sa(dataclasses.replace(sa, spi=0x9999).id)
    assert [s.sa.id for s in client.dump_sas()] == [sa.id]
    # none of the refusals mention key material
    assert sa.aead is not None and sa.aead.key.hex() not in str(refused.value)


def test_update_sa_changes_lifetimes_in_place(client: XfrmClient) -> None:
    sa = dict(CASES)["lifetimes-aes128gcm16"]
    client.add_sa(sa)
    longer = dataclasses.replace(sa, lifetime=dataclasses.replace(sa.lifetime, hard_add_seconds=7200))
    client.update_sa(longer)
    assert client.get_sa(sa.id).sa.lifetime.hard_add_seconds == 7200
