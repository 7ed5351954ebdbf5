"""What the chart promises about security, checked on every configuration users choose."""

from __future__ import annotations

import base64
import functools
from typing import Any

import pytest
import yaml

from tests.deploy.chart import (
    VALUE_SETS,
    Rendered,
    component_of,
    pod_labels,
    pod_spec,
    render,
    value_set,
    workload_of,
)

SERVICES = ("api", "policy", "keyexchange", "dataplane")


@functools.cache
def rendered(name: str) -> Rendered:
    return render(value_set(name))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_only_the_dataplane_gets_net_admin(name: str) -> None:
    result = rendered(name)
    for workload, container in result.containers():
        capabilities = container["securityContext"]["capabilities"]
        assert capabilities["drop"] == ["ALL"]
        added = set(capabilities.get("add", []))
        if component_of(workload) == "dataplane":
            host_network = pod_spec(workload).get("hostNetwork", False)
            # Low ports in the node's namespace need NET_BIND_SERVICE; in the pod's own
            # namespace the safe sysctl ip_unprivileged_port_start does it.
            assert added == ({"NET_ADMIN", "NET_BIND_SERVICE"} if host_network else {"NET_ADMIN"})
        else:
            assert not added, f"{component_of(workload)} adds {added}"
        assert container["securityContext"].get("privileged", False) is False


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_are_locked_down(name: str) -> None:
    result = rendered(name)
    for workload, container in result.containers():
        component = component_of(workload)
        pod = pod_spec(workload)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        account = result.named("ServiceAccount", pod["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False
        assert component_of(account) == component, "one ServiceAccount per service"
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        # Claimed for every container: each writes only to its emptyDir or volume mounts.
        assert context["readOnlyRootFilesystem"] is True
        if component == "dataplane":
            # Documented: NET_ADMIN reaches the effective set only for UID 0.
            assert pod["securityContext"]["runAsUser"] == 0
        else:
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] != 0
            assert context.get("runAsUser", 1) != 0
        assert not pod.get("hostPID") and not pod.get("hostIPC")
        if pod.get("hostNetwork"):
            assert component == "dataplane"
            assert "sysctls" not in pod["securityContext"], "net.* sysctls are refused with hostNetwork"
            assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        host_paths = [v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v]
        assert host_paths in ([], ["/dev/net/tun"])
        if host_paths:
            assert component == "dataplane"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_has_liveness_and_readiness_probes(name: str) -> None:
    for workload, container in rendered(name).containers():
        component = component_of(workload)
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{component} has no {probe}"
        if component in ("policy", "keyexchange", "dataplane"):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert container["readinessProbe"]["grpc"] == {"port": ports["grpc"]}
            assert container["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
        if component == "api":
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_replicated_services_have_budgets_and_spread(name: str) -> None:
    result = rendered(name)
    budgets = {component_of(b) for b in result.of_kind("PodDisruptionBudget")}
    values = value_set(name)
    for component in ("api", "policy", "keyexchange"):
        workload = workload_of(result, component)
        assert workload["kind"] == "Deployment"
        wanted = values.get(component, {}).get("podDisruptionBudget", {}).get("enabled", True)
        assert (component in budgets) == wanted
        anti = pod_spec(workload)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
        assert pod_spec(workload)["containers"][0]["resources"]["requests"]


def test_hpa_targets_the_dataplane_deployment() -> None:
    result = rendered("hpa-external-etcd")
    (hpa,) = result.of_kind("HorizontalPodAutoscaler")
    dataplane = workload_of(result, "dataplane")
    assert dataplane["kind"] == "Deployment"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dataplane["metadata"]["name"],
    }
    assert "replicas" not in dataplane["spec"], "the HPA owns the replica count"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    for name in VALUE_SETS:
        if name != "hpa-external-etcd":
            assert not rendered(name).of_kind("HorizontalPodAutoscaler")


def test_daemonset_dataplane_on_host_network() -> None:
    result = rendered("daemonset-hostnetwork")
    dataplane = workload_of(result, "dataplane")
    assert dataplane["kind"] == "DaemonSet"
    assert pod_spec(dataplane)["hostNetwork"] is True
    assert pod_spec(dataplane)["nodeSelector"] == {"esplanade.io/gateway": "true"}
    limits = pod_spec(dataplane)["containers"][0]["resources"]["limits"]
    assert limits["squat.ai/tun"] == "1"
    assert not [s for s in result.of_kind("Service") if s["metadata"]["name"].endswith("-udp")]
    node = [e for e in pod_spec(dataplane)["containers"][0]["env"] if e["name"] == "ESPLANADE_DATAPLANE__NODE"]
    assert node[0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_udp_500_and_4500_reach_the_dataplane() -> None:
    default = rendered("default")
    (udp,) = [s for s in default.of_kind("Service") if s["metadata"]["name"].endswith("-udp")]
    assert udp["spec"]["type"] == "LoadBalancer"
    assert udp["spec"]["externalTrafficPolicy"] == "Local"
    assert {(p["port"], p["protocol"]) for p in udp["spec"]["ports"]} == {(500, "UDP"), (4500, "UDP")}
    assert udp["spec"]["selector"] == workload_of(default, "dataplane")["spec"]["selector"]["matchLabels"]
    host_ports = workload_of(rendered("bundled-etcd"), "dataplane")
    ports = {p["name"]: p for p in pod_spec(host_ports)["containers"][0]["ports"]}
    assert (ports["ike"]["hostPort"], ports["natt"]["hostPort"]) == (500, 4500)
    for name in VALUE_SETS:
        for workload in rendered(name).workloads():
            for container in pod_spec(workload)["containers"]:
                udp_ports = [p for p in container["ports"] if p["protocol"] == "UDP"]
                assert not udp_ports or component_of(workload) == "dataplane"


# --- NetworkPolicies ------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def peer_matches(peer: dict[str, Any], source: dict[str, str] | None) -> bool:
    """`source` is a pod's labels in the release namespace, or None for anything outside it."""
    if "ipBlock" in peer or "namespaceSelector" in peer:
        return source is None
    return source is not None and selects(peer["podSelector"], source)


def port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports)


def allowed(
    policies: list[dict[str, Any]],
    source: dict[str, str] | None,
    target: dict[str, str] | None,
    port: int,
    protocol: str,
) -> bool:
    """Whether `source` may reach `target` on port/protocol: the target's ingress and the source's egress."""

    def direction(pod: dict[str, str], kind: str, peer_key: str, other: dict[str, str] | None) -> bool:
        applying = [p for p in policies if selects(p["spec"]["podSelector"], pod) and kind in p["spec"]["policyTypes"]]
        if not applying:
            return True
        for policy in applying:
            for rule in policy["spec"].get(kind.lower(), []):
                peers = rule.get(peer_key)
                if port_matches(rule, port, protocol) and (not peers or any(peer_matches(p, other) for p in peers)):
                    return True
        return False

    ingress_ok = target is None or direction(target, "Ingress", "from", source)
    egress_ok = source is None or direction(source, "Egress", "to", target)
    return ingress_ok and egress_ok


def labels_of(result: Rendered) -> dict[str, dict[str, str]]:
    return {component_of(w): pod_labels(w) for w in result.workloads()}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_network_policies_cover_every_pod(name: str) -> None:
    result = rendered(name)
    policies = result.of_kind("NetworkPolicy")
    for component, labels in labels_of(result).items():
        covering = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert covering, f"no NetworkPolicy selects the {component} pods"
        assert all(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in covering)


ARCHITECTURE_PATHS = [
    ("api", "keyexchange", 50061),
    ("api", "dataplane", 50062),
    ("api", "policy", 50063),
    ("dataplane", "keyexchange", 50061),  # IKE relay
    ("keyexchange", "dataplane", 50062),  # SA control
    *[(c, "etcd", 2379) for c in SERVICES],
]
FORBIDDEN_PATHS = [
    ("keyexchange", "policy", 50063),
    ("dataplane", "policy", 50063),
    ("policy", "keyexchange", 50061),
    ("policy", "dataplane", 50062),
    ("keyexchange", "api", 8080),
    ("policy", "etcd", 2380),
    ("api", "etcd", 2380),
]


def test_network_policies_allow_the_architecture_and_nothing_else() -> None:
    result = rendered("default")
    policies = result.of_kind("NetworkPolicy")
    pods = labels_of(result)
    for source, target, port in ARCHITECTURE_PATHS:
        assert allowed(policies, pods[source], pods[target], port, "TCP"), f"{source} -> {target}:{port} blocked"
    for source, target, port in FORBIDDEN_PATHS:
        assert not allowed(policies, pods[source], pods[target], port, "TCP"), f"{source} -> {target}:{port} open"
    assert allowed(policies, pods["etcd"], pods["etcd"], 2380, "TCP")
    for port in (500, 4500):
        assert allowed(policies, None, pods["dataplane"], port, "UDP")
        for other in ("api", "policy", "keyexchange", "etcd"):
            assert not allowed(policies, None, pods[other], port, "UDP")
    for component, port in (("keyexchange", 50061), ("policy", 50063), ("etcd", 2379)):
        assert not allowed(policies, None, pods[component], port, "TCP"), f"outside reaches {component}"
    assert allowed(policies, None, pods["api"], 8080, "TCP"), "the REST API is for users"
    for component, port in (("keyexchange", 51061), ("dataplane", 51062), ("policy", 51063), ("etcd", 2381)):
        assert allowed(policies, None, pods[component], port, "TCP"), f"metrics of {component} not scrapable"
    for component in pods:
        assert allowed(policies, pods[component], None, 53, "UDP"), f"{component} has no DNS"


def test_host_network_dataplane_is_admitted_by_node_address() -> None:
    result = rendered("daemonset-hostnetwork")
    policies = result.of_kind("NetworkPolicy")
    pods = labels_of(result)
    for target, port in (("keyexchange", 50061), ("etcd", 2379)):
        rules = [
            rule
            for p in policies
            if selects(p["spec"]["podSelector"], pods[target])
            for rule in p["spec"]["ingress"]
            if port_matches(rule, port, "TCP")
        ]
        cidrs = {peer["ipBlock"]["cidr"] for rule in rules for peer in rule.get("from", []) if "ipBlock" in peer}
        assert cidrs == {"192.0.2.0/24", "2001:db8::/64"}


def test_external_etcd_egress_uses_its_ports_and_peers() -> None:
    result = rendered("hpa-external-etcd")
    policies = result.of_kind("NetworkPolicy")
    assert not result.of_kind("StatefulSet")
    pods = labels_of(result)
    for component in SERVICES:
        assert allowed(policies, pods[component], None, 2379, "TCP"), f"{component} cannot reach etcd"
        if component != "dataplane":  # its egress to protected networks is any port
            assert not allowed(policies, pods[component], None, 2380, "TCP")
    (dataplane_policy,) = [p for p in policies if selects(p["spec"]["podSelector"], pods["dataplane"])]
    assert {} not in dataplane_policy["spec"]["egress"], "dataplane egress was narrowed"
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]} in dataplane_policy["spec"]["egress"]
    assert allowed(policies, pods["policy"], None, 4317, "TCP"), "OTLP collector unreachable"


# --- Secrets ----------------------------------------------------------------------------------

PLANTED_RING = "kplanted:" + base64.b64encode(b"P" * 32).decode()
PLANTED_TOKEN = "planted-bootstrap-token-2f1c9e7d4b"


def _non_secret_text(result: Rendered) -> str:
    return "\n".join(yaml.safe_dump(d) for d in result.documents if d["kind"] != "Secret") + result.notes


@pytest.mark.parametrize("where", ["explicit-values", "existing-secrets"])
def test_no_secret_reaches_a_configmap_env_or_notes(where: str) -> None:
    if where == "explicit-values":
        values = {"kek": {"ring": PLANTED_RING}, "bootstrapToken": {"value": PLANTED_TOKEN}}
    else:
        values = value_set("tls-existing-secrets")
    result = render(values)
    text = result.manifest_text() + result.notes
    outside_secrets = _non_secret_text(result)
    for secret in (PLANTED_RING, PLANTED_TOKEN):
        assert secret not in text, "a secret is written in clear text"
        encoded = base64.b64encode(secret.encode()).decode()[:24]
        assert encoded not in outside_secrets
    assert "PRIVATE KEY" not in text
    for document in result.documents:
        if document["kind"] == "Secret":
            continue
        for fragment in ("tls.key", "ring", "token"):
            # only as a file/key name, never with data next to it
            assert f"{fragment}: LS0t" not in str(document)
    for _, container in result.containers():
        for variable in container.get("env", []):
            assert "KEK__VALUE" not in variable["name"]
            assert "secretKeyRef" not in str(variable.get("valueFrom", {})), "secrets come as files"
            value = variable.get("value", "")
            assert PLANTED_TOKEN not in value and PLANTED_RING not in value
    if where == "explicit-values":
        kek = result.named("Secret", "esp-esplanade-kek")
        assert base64.b64decode(kek["data"]["ring"]).decode().strip() == PLANTED_RING
        token = result.named("Secret", "esp-esplanade-bootstrap-token")
        assert base64.b64decode(token["data"]["token"]).decode() == PLANTED_TOKEN
        assert kek["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    else:
        assert not result.of_kind("Secret"), "existing secrets: the chart generates nothing"
        api = workload_of(result, "api")
        volumes = {v["name"]: v for v in pod_spec(api)["volumes"]}
        assert volumes["kek"]["secret"] == {
            "secretName": "esplanade-kek",
            "defaultMode": 0o440,
            "items": [{"key": "kek-ring", "path": "ring"}],
        }
        assert volumes["bootstrap-token"]["secret"]["items"] == [{"key": "admin-token", "path": "token"}]
        assert volumes["grpc-tls"]["secret"]["secretName"] == "esplanade-api-tls"
        assert volumes["etcd-tls"]["secret"]["secretName"] == "esplanade-etcd-client-tls"
        etcd = pod_spec(workload_of(result, "etcd"))
        assert {v["name"]: v for v in etcd["volumes"]}["tls"]["secret"]["secretName"] == "esplanade-etcd-member-tls"


def test_generated_secrets_are_random_and_well_formed() -> None:
    first, second = render({}), render({})
    rings = [base64.b64decode(r.named("Secret", "esp-esplanade-kek")["data"]["ring"]).decode() for r in (first, second)]
    assert rings[0] != rings[1]
    for ring in rings:
        key_id, _, key = ring.strip().partition(":")
        assert key_id and len(base64.b64decode(key)) == 32
    token = base64.b64decode(first.named("Secret", "esp-esplanade-bootstrap-token")["data"]["token"])
    assert len(token) == 48
    assert token.decode() not in first.notes
