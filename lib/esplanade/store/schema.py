"""The etcd key schema: every key Esplanade writes, in one place.

All keys live under ``/esplanade/v1/``. Values are UTF-8 JSON documents unless noted.
Secret fields inside documents (PSKs, private keys, SA keys) are sealed by
`esplanade.store.sealing` with the document's key bound in as associated data, so a raw
dump of the store shows no secret and a sealed value copied to another key fails to open.

Only state lives here. Flow and audit logs, which grow with traffic, never do: etcd's
default quota is 2 GiB and a full etcd stops the platform.

======================================  ==================================================
key                                     value
======================================  ==================================================
config/connections/<name>               connection (swanctl.conf model): addresses, auth,
                                        IKE proposals, DPD, start action, children; sealed
                                        PSK and private key
config/pools/<name>                     virtual IP pool (remote access)
config/certs/<id>                       certificate (PEM) and sealed private key, if any
config/cas/<id>                         CA certificate (PEM)
config/crls/<id>                        CRL (PEM/DER, base64)
policy/identities/<id>                  user or device, bound to IKE identities
policy/groups/<id>                      group (members: each identity lists its groups)
policy/resources/<id>                   host/CIDR/DNS, protocol, ports, fronting site
policy/sites/<id>                       site or connector
policy/rules/<id>                       access rule: groups -> resources, conditions
policy/compiled/<identity>              compiled selectors and dataplane filters
                                        (format: esplanade.policy.compiled)
policy/_meta/generation                 {"generation": n, "applying": null | {...}}: every
                                        policy object write bumps it in the same
                                        transaction (CAS), which serializes policy writes
                                        across policy instances; "applying" marks a
                                        chunked apply in progress (see policy/apply.py)
policy/_apply/<apply id>/<n>            before-images of a chunked apply (rollback journal),
                                        deleted when the apply ends
sas/child/<child_sa_id>                 `ChildSaRecord`: inbound + outbound SA, sealed keys
sas/ike/<ike_sa_id>                     IKE SA state for takeover by another instance
spd/<policy_id>                         `SpdPolicy`
spi/<spi hex>                           SPI allocation (created with CAS: unique platform-wide)
dataplane/nodes/<node>                  membership (under the node's lease): capacity, backend
dataplane/owners/<child_sa_id>          owner node of an SA pair (under the owner's lease)
dataplane/seq/<spi hex>                 highest outbound sequence number ever reserved
dataplane/replay/<spi hex>              inbound anti-replay high-water mark (block granular)
dataplane/acks/<child_sa_id>/<node>     "inbound SA installed" acknowledgement
keyexchange/instances/<id>              keyexchange membership (under its lease)
keyexchange/owners/<ike_sa_id>          owner instance of an IKE SA (under its lease)
api/tokens/<id>                         API token: name, scope, salt and SHA-256 of the
                                        token (never the token), created/expires/last use
meta/kek                                key ids of the KEKs that sealed data (no key material)
======================================  ==================================================
"""

from __future__ import annotations

ROOT = "/esplanade/v1/"


def _key(*parts: str) -> str:
    for part in parts:
        if not part or "/" in part or part in (".", ".."):
            raise ValueError(f"invalid key component {part!r}")
    return ROOT + "/".join(parts)


def prefix(*parts: str) -> str:
    """The prefix that every key below `parts` starts with (ends with '/')."""
    return _key(*parts) + "/" if parts else ROOT


def connection(name: str) -> str:
    return _key("config", "connections", name)


def pool(name: str) -> str:
    return _key("config", "pools", name)


def certificate(cert_id: str) -> str:
    return _key("config", "certs", cert_id)


def ca(ca_id: str) -> str:
    return _key("config", "cas", ca_id)


def crl(crl_id: str) -> str:
    return _key("config", "crls", crl_id)


def policy_object(kind: str, object_id: str) -> str:
    """kind is one of identities, groups, resources, sites, rules."""
    if kind not in POLICY_KINDS:
        raise ValueError(f"unknown policy object kind {kind!r}")
    return _key("policy", kind, object_id)


POLICY_KINDS = ("identities", "groups", "resources", "sites", "rules")


def compiled_policy(identity: str) -> str:
    return _key("policy", "compiled", identity)


POLICY_GENERATION = ROOT + "policy/_meta/generation"


def policy_apply_journal(apply_id: str, chunk: int) -> str:
    return _key("policy", "_apply", apply_id, str(chunk))


def policy_apply_prefix(apply_id: str) -> str:
    return prefix("policy", "_apply", apply_id)


def child_sa(child_sa_id: str) -> str:
    return _key("sas", "child", child_sa_id)


def ike_sa(ike_sa_id: str) -> str:
    return _key("sas", "ike", ike_sa_id)


def spd_policy(policy_id: str) -> str:
    return _key("spd", policy_id)


def spi_allocation(spi: int) -> str:
    return _key("spi", f"{spi:08x}")


def dataplane_node(node: str) -> str:
    return _key("dataplane", "nodes", node)


def sa_owner(child_sa_id: str) -> str:
    return _key("dataplane", "owners", child_sa_id)


def sequence_reservation(spi: int) -> str:
    return _key("dataplane", "seq", f"{spi:08x}")


def replay_high_water(spi: int) -> str:
    return _key("dataplane", "replay", f"{spi:08x}")


def install_ack(child_sa_id: str, node: str) -> str:
    return _key("dataplane", "acks", child_sa_id, node)


def keyexchange_instance(instance: str) -> str:
    return _key("keyexchange", "instances", instance)


def ike_sa_owner(ike_sa_id: str) -> str:
    return _key("keyexchange", "owners", ike_sa_id)


def api_token(token_id: str) -> str:
    return _key("api", "tokens", token_id)


KEK_META = ROOT + "meta/kek"
