"""E2E acceptance (INCOMPLETE: needs the keyexchange service, being integrated in parallel).

A connection defined through the API brings up a tunnel with a real strongSwan peer, shows in
`esplanade ctl sas` with live counters, `terminate` makes strongSwan log the delete, and the
SSE stream carries the up/down events.

What it needs from keyexchange (gRPC contract, proto/esplanade/v1/keyexchange.proto):
- LoadConnection(validate_only=true) validating the API's document shape (connection
  documents as stored under config/connections/<name>: swanctl names; `psk` sealed in the
  store, plaintext in the validation call; `local.certs` / `remote.cacerts` are certificate
  and CA ids under config/certs/ and config/cas/);
- keyexchange instances loading connections from the store (watch config/connections/);
- Initiate/Terminate/Rekey/ListSas/WatchEvents as in the fake (tests/api/fake_services.py).
The lead finishes it: start keyexchange + dataplane (userspace) in a netns pair with the
strongSwan reference (/work/shared/reference/strongswan-pair/), then run the steps below.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.strongswan, pytest.mark.netns]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


KEYEXCHANGE_SERVICE = _has("esplanade.keyexchange.service")
DATAPLANE_SERVICE = _has("esplanade.dataplane.service")


# Both services are merged now; the steps below are not written yet (the module doc: the lead
# finishes them). tests/keyexchange/service/ has the pieces: sites.Site runs keyexchange and the
# dataplane service in a netns with their gRPC reachable, interop.Charon runs strongSwan.
@pytest.mark.skip(reason="not written yet: the API e2e steps below (see module doc)")
def test_tunnel_through_the_api() -> None:  # pragma: no cover - finished by the lead
    # 1. netns pair "api-e2e-a"/"api-e2e-b", strongSwan in b (swanctl.conf: PSK, 10.1/16 <-> 10.2/16).
    # 2. esplanade services in a: store, policy, keyexchange (transport=socket), dataplane userspace, api.
    # 3. POST /api/v1/connections {name: gw, remote_addrs: [b], psk, children: {net: {...}}}.
    # 4. `esplanade ctl initiate gw`; wait_until `ctl sas` shows ESTABLISHED/INSTALLED; ping 10.2.0.1
    #    through the tunnel; `ctl counters` bytes_out grows.
    # 5. GET /api/v1/events?limit=... collects ike_up/child_up; `ctl terminate <ike>`;
    #    strongSwan's log shows "received DELETE for IKE_SA"; the stream shows ike_down.
    raise NotImplementedError("finished when keyexchange is merged")
