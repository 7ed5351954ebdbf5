"""GET /api/v1/nodes and the SA listings show scale-out ownership from the store."""

from __future__ import annotations

import json

from esplanade.store import schema
from esplanade.v1 import keyexchange_pb2
from tests.api.stack import ApiStack


def test_nodes_count_their_owned_sas_and_child_sas_name_their_node(fresh_stack: ApiStack) -> None:
    stack = fresh_stack

    async def write() -> None:
        for node in ("dp0", "dp1"):
            document = {"node": node, "backend": "userspace", "capacity": {"workers": 1}, "accepting": True}
            await stack.store.put(schema.dataplane_node(node), json.dumps(document).encode())
        for child, node in (("ike-1.c1", "dp0"), ("ike-1.c2", "dp1"), ("ike-2.c1", "dp1")):
            await stack.store.put(schema.sa_owner(child), json.dumps({"node": node}).encode())

    stack.run(write)
    stack.keyexchange.sas["ike-1"] = keyexchange_pb2.IkeSaInfo(
        id="ike-1",
        connection="site",
        state="ESTABLISHED",
        children=[keyexchange_pb2.ChildSaInfo(id="ike-1.c1"), keyexchange_pb2.ChildSaInfo(id="ike-1.c2")],
    )
    with stack.client() as client:
        nodes = client.get("/api/v1/nodes").json()
        assert {n["name"]: n["owned_sas"] for n in nodes["items"]} == {"dp0": 1, "dp1": 2}
        assert client.get("/api/v1/nodes/dp1").json()["owned_sas"] == 2
        sas = client.get("/api/v1/sas").json()
        children = {c["id"]: c["node"] for sa in sas["items"] for c in sa["children"]}
        assert children == {"ike-1.c1": "dp0", "ike-1.c2": "dp1"}
