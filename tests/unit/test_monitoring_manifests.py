"""manifests/monitoring/: every file parses, and every metric its PromQL names really exists.

The exported names are collected from the real registries - the worker's `ServerMetrics` (with
an engine snapshot, so its scrape-time collector yields its families too) and the operator's
`OperatorMetrics` - and expanded by metric type the way the exposition format names samples
(`_total` for counters, `_bucket`/`_sum`/`_count` for histograms). The PromQL in the alert rules
and in the dashboard is tokenised by a small scanner that keeps only metric-name selectors
(skipping functions, aggregations, keywords, label matchers, ranges, strings and numbers).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from llmos_operator.api.inferencepool import InferencePoolSpec
from llmos_operator.autoscaling import METRIC_SERIES
from llmos_operator.builders.pool import PoolRef, ServedModel, build_deployment
from llmos_operator.config import OperatorConfig
from llmos_operator.metrics import OperatorMetrics
from llmos_worker.engine.outputs import EngineStats
from llmos_worker.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(0x[0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+)((ms|s|m|h|d|w|y)\b)*")


def registry_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def exported_names() -> set[str]:
    stats = EngineStats(**{f.name: 0 for f in dataclasses.fields(EngineStats)})
    worker = ServerMetrics("m", lambda: stats)
    return registry_names(worker.registry) | registry_names(OperatorMetrics().registry)


def _skip_group(expr: str, i: int, open_: str, close: str) -> int:
    """Index just past the `close` matching the `open_` at expr[i] (strings respected)."""
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            end = expr.find(c, i + 1)
            if end < 0:
                raise ValueError(f"unterminated string in {expr!r}")
            i = end + 1
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_}{close} in {expr!r}")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression."""
    names: set[str] = set()
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "\"'`":
            end = expr.find(c, i + 1)
            if end < 0:
                raise ValueError(f"unterminated string in {expr!r}")
            i = end + 1
        elif c == "{":
            i = _skip_group(expr, i, "{", "}")
        elif c == "[":
            i = _skip_group(expr, i, "[", "]")
        elif c == "$":  # Grafana variable outside a matcher (e.g. a threshold)
            i = _IDENT.match(expr, i + 1).end() if _IDENT.match(expr, i + 1) else i + 1
        elif (m := _NUMBER.match(expr, i)) and not (c.isalpha() or c == "_"):
            i = m.end()
        elif m := _IDENT.match(expr, i):
            word = m.group()
            i = m.end()
            rest = expr[i:].lstrip()
            if word in LABEL_LISTS:
                if rest.startswith("("):
                    i = _skip_group(expr, len(expr) - len(rest), "(", ")")
            elif word in AGGREGATIONS or word in KEYWORDS or rest.startswith("("):
                continue
            else:
                names.add(word)
        elif c in "()+-*/%^=!<>,@":
            i += 1
        else:
            raise ValueError(f"unexpected {c!r} at {i} in {expr!r}")
    if expr.count("(") != expr.count(")"):
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    return names


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def alert_rules() -> list[dict[str, Any]]:
    (rule,) = load_yaml_docs(MONITORING / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MONITORING / "dashboards" / "llmos-pool.json").read_text())
    return data


def test_scanner_finds_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (namespace, pool, le) (rate(a_bucket{x="y}"}[5m])))'
        " > 2 and on (pool) b offset 5m unless max without (le) (c) * 1e3"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b", "c"}
    with pytest.raises(ValueError, match="unbalanced"):
        promql_metric_names("sum(rate(x[5m])")


def test_worker_and_operator_registries_export_the_expected_series() -> None:
    names = exported_names()
    assert {"llmos_kv_cache_usage_perc", "llmos_time_to_first_token_seconds_bucket"} <= names
    assert {"llmos_operator_pool_ready_replicas", "llmos_operator_reconciles_total"} <= names
    # the builtin autoscaler scrapes series the worker really exports
    assert set(METRIC_SERIES.values()) <= names


def test_kustomization_lists_files_that_exist_and_parse() -> None:
    (kustomization,) = load_yaml_docs(MONITORING / "kustomization.yaml")
    for resource in kustomization["resources"]:
        docs = load_yaml_docs(MONITORING / resource)
        assert docs and all("apiVersion" in d and "kind" in d for d in docs), resource
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (MONITORING / file).is_file()


def test_alert_rules_cover_the_issue_and_name_only_exported_metrics() -> None:
    rules = alert_rules()
    alerts = {r["alert"]: r for r in rules}
    for wanted in (
        "LLMOSPoolNotReady",
        "LLMOSKVCacheSaturated",
        "LLMOSTimeToFirstTokenP99High",
        "LLMOSQuotaExhausted",
        "LLMOSModelLoadFailed",
    ):
        assert wanted in alerts
    exported = exported_names()
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: unknown {names - exported}"


def test_dashboard_panels_per_pool_and_name_only_exported_metrics() -> None:
    dash = dashboard()
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"namespace", "pool"} <= variables
    exported = exported_names()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "first token", "per output token", "kv cache", "queue", "ready"):
        assert topic in titles
    seen: set[str] = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names <= exported, f"{panel['title']}: unknown {names - exported}"
            assert 'pool=~"$pool"' in target["expr"], "every panel is per pool"
            seen |= names
    assert "llmos_operator_pool_desired_replicas" in seen
    assert "llmos_operator_pool_ready_replicas" in seen


def test_adapter_rules_serve_the_autoscaling_series() -> None:
    (config_map,) = load_yaml_docs(MONITORING / "prometheus-adapter-rules.yaml")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    (rule,) = config["rules"]
    served = set(re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1).split("|"))
    assert served == set(METRIC_SERIES.values())


def test_pod_monitor_selects_the_pods_the_operator_renders() -> None:
    (monitor,) = load_yaml_docs(MONITORING / "podmonitor-workers.yaml")
    spec = InferencePoolSpec.model_validate({"modelRef": "m"})
    served = ServedModel(name="m", claim_name="m-weights", path="/models/m/v1", version="v1",
                         digest="sha256:00")  # fmt: skip
    deployment = build_deployment(PoolRef("p", "ns", "uid"), spec, served, OperatorConfig())
    template = deployment["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names


def test_gateway_pod_monitor_selects_the_gateway_pods_on_their_metrics_port() -> None:
    from llmos_operator.builders.gateway import (
        build_gateway_deployment,
        build_gateway_network_policy,
    )

    (monitor,) = load_yaml_docs(MONITORING / "podmonitor-gateways.yaml")
    assert "podmonitor-gateways.yaml" in (MONITORING / "kustomization.yaml").read_text()
    spec = InferencePoolSpec.model_validate({"modelRef": "m"})
    ref, config = PoolRef("p", "ns", "uid"), OperatorConfig()
    template = build_gateway_deployment(ref, spec, config)["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # the NetworkPolicy admits scrapers on that port, and the gateway serves /metrics there
    policy = build_gateway_network_policy(ref, spec, config)
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports["metrics"] in admitted
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMOS_GATEWAY_METRICS_PORT"] == str(ports["metrics"])
