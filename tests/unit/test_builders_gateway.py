"""Gateway and canary builders: every child validates against Kubernetes 1.33 and meets
"restricted"; the gateway gets the settings its CLI reads; Services, Deployments and
NetworkPolicies select exactly the pods they are meant to."""

from __future__ import annotations

from typing import Any

import pytest

from llmos_gateway import cli
from llmos_operator.api import InferencePoolSpec
from llmos_operator.builders.gateway import (
    build_gateway_children,
    build_gateway_deployment,
    build_gateway_network_policy,
    build_gateway_pdb,
    build_gateway_role,
    build_gateway_role_binding,
    build_gateway_service_account,
)
from llmos_operator.builders.pool import (
    PoolRef,
    ServedModel,
    build_deployment,
    build_network_policy,
    build_service,
    build_workers_service,
)
from llmos_operator.config import OperatorConfig
from tests.unit.k8s_schema import validate
from tests.unit.pss import violations

CONFIG = OperatorConfig()
REF = PoolRef(name="chat", namespace="team-a", uid="uid-pool")
STABLE = ServedModel("smollm2", "smollm2-weights", "v-0123456789", "1", "sha256:" + "0" * 64)
NEXT = ServedModel("smollm2-next", "smollm2-next-weights", "v-abcdef", "2", "sha256:" + "1" * 64)
TEAM_A = {"matchLabels": {"team": "a"}}
OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llmos-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llmos-operator"}},
}
MONITORING_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
}
GATEWAY_LABELS = {"app.kubernetes.io/name": "llmos-gateway", "app.kubernetes.io/instance": "chat"}
STABLE_SELECTOR = {"app.kubernetes.io/name": "llmos-worker", "app.kubernetes.io/instance": "chat"}
GATEWAY_PEER = {"podSelector": {"matchLabels": GATEWAY_LABELS}}

PLAIN: dict[str, Any] = {"modelRef": "smollm2"}
FULL: dict[str, Any] = {
    "modelRef": "smollm2",
    "replicas": 3,
    "access": {
        "namespaceSelectors": [TEAM_A],
        "apiKeySecretRef": {"name": "chat-keys", "key": "keys.json"},
    },
    "routing": {
        "strategy": "least-load",
        "loadFactor": 1.5,
        "minLoadBound": 2,
        "holdTimeoutSeconds": 30,
        "idleScaleToZeroSeconds": 600,
        "gateway": {"replicas": 2, "resources": {"cpu": "500m", "memory": "256Mi"}},
    },
    "canary": {"modelRef": "smollm2-next", "weight": 10, "replicas": 2},
}


def spec(raw: dict[str, Any]) -> InferencePoolSpec:
    return InferencePoolSpec.model_validate(raw)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def template_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _children() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for raw in (PLAIN, FULL):
        pool = spec(raw)
        out += build_gateway_children(REF, pool, CONFIG)
        out += [build_workers_service(REF, CONFIG), build_network_policy(REF, pool, CONFIG)]
    full = spec(FULL)
    out += [
        build_workers_service(REF, CONFIG, canary=True),
        build_deployment(REF, full, NEXT, CONFIG, canary=True),
        build_service(REF, CONFIG, gateway=True),
    ]
    return out


@pytest.mark.parametrize("child", _children(), ids=lambda c: f"{c['kind']}-{c['metadata']['name']}")
def test_child_validates_is_owned_and_restricted(child: dict[str, Any]) -> None:
    validate(child)
    meta = child["metadata"]
    assert meta["namespace"] == "team-a"
    [owner] = meta["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("InferencePool", "uid-pool", True)
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "llmos-operator"
    assert meta["labels"]["llmos.dev/pool"] == "chat"
    template = child.get("spec", {}).get("template")
    if template:
        assert violations(template["spec"]) == []


def test_gateway_children_are_named_after_the_pool() -> None:
    kinds = [
        (c["kind"], c["metadata"]["name"]) for c in build_gateway_children(REF, spec(PLAIN), CONFIG)
    ]
    assert kinds == [
        ("ServiceAccount", "chat-gateway"),
        ("Role", "chat-gateway"),
        ("RoleBinding", "chat-gateway"),
        ("NetworkPolicy", "chat-gateway"),
        ("PodDisruptionBudget", "chat-gateway"),
        ("Deployment", "chat-gateway"),
    ]  # fmt: skip
    for child in build_gateway_children(REF, spec(PLAIN), CONFIG):
        assert child["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
        assert child["metadata"]["labels"]["app.kubernetes.io/name"] == "llmos-gateway"


def test_gateway_rbac_reads_endpointslices_and_patches_only_its_pool() -> None:
    role = build_gateway_role(REF)
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["llmos.dev"], "resources": ["inferencepools"], "resourceNames": ["chat"],
         "verbs": ["get", "patch"]},
    ]  # fmt: skip
    binding = build_gateway_role_binding(REF)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "chat-gateway",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "chat-gateway", "namespace": "team-a"}
    ]
    # the gateway calls the API, so its token is mounted (the workers' is not)
    assert build_gateway_service_account(REF)["automountServiceAccountToken"] is True
    pod = build_gateway_deployment(REF, spec(PLAIN), CONFIG)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "chat-gateway"
    assert pod["automountServiceAccountToken"] is True


def test_gateway_runs_with_the_routing_settings_canary_and_api_keys() -> None:
    dep = build_gateway_deployment(REF, spec(FULL), CONFIG)
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    [gateway] = pod["containers"]
    assert gateway["command"] == ["llmos-gateway"]
    assert gateway["image"] == CONFIG.worker_image
    assert env_of(gateway) == {
        "LLMOS_GATEWAY_HOST": "0.0.0.0",
        "LLMOS_GATEWAY_PORT": "8000",
        "LLMOS_GATEWAY_STRATEGY": "least-load",
        "LLMOS_GATEWAY_LOAD_FACTOR": "1.5",
        "LLMOS_GATEWAY_MIN_LOAD_BOUND": "2",
        "LLMOS_GATEWAY_HOLD_TIMEOUT": "30",
        "LLMOS_GATEWAY_IDLE_SCALE_TO_ZERO": "600",
        "LLMOS_GATEWAY_POOL_NAME": "chat",
        "LLMOS_GATEWAY_MAX_INFLIGHT_PER_REPLICA": "64",
        "LLMOS_GATEWAY_POOL_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "LLMOS_GATEWAY_DISCOVER": "stable=chat-workers,canary=chat-canary-workers",
        "LLMOS_GATEWAY_WORKER_METRICS_PORT": "9090",
        "LLMOS_GATEWAY_METRICS_PORT": "9090",
        "LLMOS_GATEWAY_TENANTS_FILE": "/etc/llmos/ratelimits/ratelimits.json",
        "LLMOS_GATEWAY_CANARY_WEIGHT": "10",
        "LLMOS_GATEWAY_API_KEYS_FILE": "/etc/llmos/api-keys/keys.json",
        "HOME": "/tmp",
    }
    assert gateway["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    amounts = {"cpu": "500m", "memory": "256Mi"}
    assert gateway["resources"] == {"requests": amounts, "limits": amounts}
    # the same Secret key the workers mount
    worker_pod = build_deployment(REF, spec(FULL), STABLE, CONFIG)["spec"]["template"]["spec"]
    [keys] = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert keys in worker_pod["volumes"]
    [limits] = [v for v in pod["volumes"] if "configMap" in v]
    assert limits in worker_pod["volumes"] and limits["configMap"]["name"] == "chat-ratelimits"
    assert {"name": "api-keys", "mountPath": "/etc/llmos/api-keys", "readOnly": True} in (
        gateway["volumeMounts"]
    )


def test_gateway_defaults_without_canary_or_keys() -> None:
    [gateway] = build_gateway_deployment(REF, spec(PLAIN), CONFIG)["spec"]["template"]["spec"][
        "containers"
    ]
    env = env_of(gateway)
    assert env["LLMOS_GATEWAY_STRATEGY"] == "prefix"
    assert float(env["LLMOS_GATEWAY_LOAD_FACTOR"]) == 1.25
    assert env["LLMOS_GATEWAY_HOLD_TIMEOUT"] == "120"
    assert env["LLMOS_GATEWAY_IDLE_SCALE_TO_ZERO"] == "0"
    assert env["LLMOS_GATEWAY_DISCOVER"] == "stable=chat-workers"
    assert "LLMOS_GATEWAY_CANARY_WEIGHT" not in env
    assert "LLMOS_GATEWAY_API_KEYS_FILE" not in env
    own = OperatorConfig(gateway_image="registry.example/llmos-gateway:1")
    [gateway] = build_gateway_deployment(REF, spec(PLAIN), own)["spec"]["template"]["spec"][
        "containers"
    ]
    assert gateway["image"] == "registry.example/llmos-gateway:1"
    assert OperatorConfig.from_env({"LLMOS_OPERATOR_GATEWAY_IMAGE": "x/gw:2"}).gateway_image == (
        "x/gw:2"
    )


def test_routing_change_rolls_the_gateway() -> None:
    base = build_gateway_deployment(REF, spec(PLAIN), CONFIG)
    changed = build_gateway_deployment(
        REF, spec({**PLAIN, "routing": {"strategy": "round-robin"}}), CONFIG
    )
    assert changed["spec"]["template"] != base["spec"]["template"]
    assert build_gateway_deployment(REF, spec(PLAIN), CONFIG) == base  # deterministic


def test_services_and_deployments_select_the_right_pods() -> None:
    full = spec(FULL)
    stable = build_deployment(REF, full, STABLE, CONFIG)
    canary = build_deployment(REF, full, NEXT, CONFIG, canary=True)
    gateway = build_gateway_deployment(REF, full, CONFIG)
    pods = {
        "stable": template_labels(stable),
        "canary": template_labels(canary),
        "gateway": template_labels(gateway),
    }

    def selected(selector: dict[str, str]) -> set[str]:
        return {name for name, labels in pods.items() if selects(selector, labels)}

    # each Deployment owns its own pods only (overlapping selectors make Deployments fight)
    assert selected(stable["spec"]["selector"]["matchLabels"]) == {"stable"}
    assert selected(canary["spec"]["selector"]["matchLabels"]) == {"canary"}
    assert selected(gateway["spec"]["selector"]["matchLabels"]) == {"gateway"}
    pdb = build_gateway_pdb(REF)
    assert selected(pdb["spec"]["selector"]["matchLabels"]) == {"gateway"}
    # the client-facing Service: the gateway when enabled, the workers without one
    assert selected(build_service(REF, CONFIG, gateway=True)["spec"]["selector"]) == {"gateway"}
    assert selected(build_service(REF, CONFIG)["spec"]["selector"]) == {"stable"}
    workers = build_workers_service(REF, CONFIG)
    canary_workers = build_workers_service(REF, CONFIG, canary=True)
    assert (workers["metadata"]["name"], canary_workers["metadata"]["name"]) == (
        "chat-workers",
        "chat-canary-workers",
    )
    assert selected(workers["spec"]["selector"]) == {"stable"}
    assert selected(canary_workers["spec"]["selector"]) == {"canary"}
    for service in (workers, canary_workers):
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert ports == {"http": (8000, "http"), "metrics": (9090, "metrics")}
    assert pods["stable"]["llmos.dev/version"] == "stable"
    assert pods["canary"]["llmos.dev/version"] == "canary"
    # the NetworkPolicies guard what they mean to
    workers_policy = build_network_policy(REF, full, CONFIG)
    assert selected(workers_policy["spec"]["podSelector"]["matchLabels"]) == {"stable", "canary"}
    gateway_policy = build_gateway_network_policy(REF, full, CONFIG)
    assert selected(gateway_policy["spec"]["podSelector"]["matchLabels"]) == {"gateway"}
    [_, to_workers, _] = gateway_policy["spec"]["egress"]
    [peer] = to_workers["to"]
    assert selected(peer["podSelector"]["matchLabels"]) == {"stable", "canary"}
    assert selected(GATEWAY_PEER["podSelector"]["matchLabels"]) == {"gateway"}


def test_canary_deployment_serves_its_model_under_the_stable_name() -> None:
    full = spec(FULL)
    dep = build_deployment(REF, full, NEXT, CONFIG, canary=True)
    assert dep["metadata"]["name"] == "chat-canary"
    assert dep["spec"]["replicas"] == 2  # spec.canary.replicas, not spec.replicas
    pod = dep["spec"]["template"]["spec"]
    [model] = [v for v in pod["volumes"] if v["name"] == "model"]
    assert model["persistentVolumeClaim"]["claimName"] == "smollm2-next-weights"
    [worker] = pod["containers"]
    assert worker["args"][:2] == ["--model", "/models/v-abcdef"]
    assert env_of(worker)["LLMOS_SERVED_MODEL_NAME"] == "smollm2"
    assert template_labels(dep)["llmos.dev/model"] == "smollm2-next"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["llmos.dev/model-version"] == "2"
    stable = build_deployment(REF, full, STABLE, CONFIG)
    assert stable["metadata"]["name"] == "chat" and stable["spec"]["replicas"] == 3
    assert (
        env_of(stable["spec"]["template"]["spec"]["containers"][0])["LLMOS_SERVED_MODEL_NAME"]
        == "smollm2"
    )
    # a pool scaled to zero runs no canary either
    idle = full.model_copy(update={"replicas": 0})
    assert build_deployment(REF, idle, NEXT, CONFIG, canary=True)["spec"]["replicas"] == 0
    with pytest.raises(ValueError, match=r"spec\.canary"):
        build_deployment(REF, spec(PLAIN), NEXT, CONFIG, canary=True)


def test_worker_policy_admits_only_the_gateway_and_the_operator_on_the_api_port() -> None:
    policy = build_network_policy(REF, spec(FULL), CONFIG)
    api, metrics = policy["spec"]["ingress"]
    assert api == {
        "from": [GATEWAY_PEER, OPERATOR_PEER],
        "ports": [{"protocol": "TCP", "port": 8000}],
    }
    assert metrics == {
        "from": [OPERATOR_PEER, MONITORING_PEER, GATEWAY_PEER],
        "ports": [{"protocol": "TCP", "port": 9090}],
    }
    # until a gateway pod is ready the pool's Service selects the workers: callers keep access
    api, _ = build_network_policy(REF, spec(FULL), CONFIG, gateway_live=False)["spec"]["ingress"]
    assert api["from"] == [GATEWAY_PEER, {"namespaceSelector": TEAM_A}, OPERATOR_PEER]
    # without the gateway the access peers call the workers, as before
    direct = {**FULL, "routing": {"gateway": {"enabled": False}}}
    direct.pop("canary")
    api, metrics = build_network_policy(REF, spec(direct), CONFIG)["spec"]["ingress"]
    assert api["from"] == [{"namespaceSelector": TEAM_A}, OPERATOR_PEER]
    assert metrics["from"] == [OPERATOR_PEER, MONITORING_PEER]


def test_gateway_policy_takes_the_access_peers_and_reaches_workers_dns_and_the_api() -> None:
    policy = build_gateway_network_policy(REF, spec(FULL), CONFIG)
    assert policy["metadata"]["name"] == "chat-gateway"
    ingress, scrape = policy["spec"]["ingress"]
    assert ingress == {
        "from": [{"namespaceSelector": TEAM_A}, OPERATOR_PEER],
        "ports": [{"protocol": "TCP", "port": 8000}],
    }
    # the gateway's own metrics port: the operator and monitoring, never the clients
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert OPERATOR_PEER in scrape["from"] and {"namespaceSelector": TEAM_A} not in scrape["from"]
    dns, workers, api = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert workers["ports"] == [
        {"protocol": "TCP", "port": 8000},
        {"protocol": "TCP", "port": 9090},
    ]
    assert "to" not in api and {p["port"] for p in api["ports"]} == {443, 6443}
    # no access named: the pool's own namespace
    ingress, _ = build_gateway_network_policy(REF, spec(PLAIN), CONFIG)["spec"]["ingress"]
    assert ingress["from"] == [{"podSelector": {}}, OPERATOR_PEER]


def test_every_gateway_variable_is_a_flag_of_the_gateway_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contract with `llmos-gateway`: each LLMOS_GATEWAY_* variable the operator sets is the
    default of one of its flags, and the values parse to the spec's settings."""
    [container] = build_gateway_deployment(REF, spec(FULL), CONFIG)["spec"]["template"]["spec"][
        "containers"
    ]
    env = env_of(container)
    env["LLMOS_GATEWAY_POOL_NAMESPACE"] = "team-a"  # what the downward API fills in
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = cli.parser()
    dests = {action.dest for action in parser._actions}
    flags = {
        n.removeprefix("LLMOS_GATEWAY_").lower() for n in env if n.startswith("LLMOS_GATEWAY_")
    }
    assert flags - dests == set(), "variables the gateway does not read"
    args = parser.parse_args([])
    assert (args.host, args.port, args.strategy) == ("0.0.0.0", 8000, "least-load")
    assert (args.load_factor, args.hold_timeout, args.idle_scale_to_zero) == (1.5, 30, 600)
    assert args.min_load_bound == 2
    assert (args.pool_name, args.pool_namespace) == ("chat", "team-a")
    assert args.discover == "stable=chat-workers,canary=chat-canary-workers"
    assert cli.parse_discover(args.discover) == {
        "stable": "chat-workers",
        "canary": "chat-canary-workers",
    }
    assert (args.worker_metrics_port, args.metrics_port, args.canary_weight) == (9090, 9090, 10)
    assert args.max_inflight_per_replica == 64  # the workers' maxNumSeqs
    assert args.api_keys_file == "/etc/llmos/api-keys/keys.json"
    assert args.tenants_file == "/etc/llmos/ratelimits/ratelimits.json"


def test_the_stable_selector_is_the_one_existing_deployments_have() -> None:
    """A Deployment's selector is immutable: pools created before the gateway and the canary
    keep theirs, so only the pod template (one rollout) changes on upgrade."""
    for raw in (PLAIN, FULL):
        dep = build_deployment(REF, spec(raw), STABLE, CONFIG)
        assert dep["spec"]["selector"] == {"matchLabels": STABLE_SELECTOR}
