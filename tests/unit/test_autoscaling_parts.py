"""The autoscaler's I/O edges: the HPA builder (schema-valid), the scraper, metrics and logs."""

from __future__ import annotations

import io
import json
import logging

import httpx
import kubernetes_validate
import pytest

from llmos_operator.autoscaling import ScrapeTarget, build_hpa, format_quantity, scrape
from llmos_operator.logging import JsonFormatter, configure_logging, log_context
from llmos_operator.metrics import OperatorMetrics

TEXT = (
    "# TYPE llmos_num_requests_waiting gauge\n"
    'llmos_num_requests_waiting{model_name="m"} 3.0\n'
    "# TYPE llmos_kv_cache_usage_perc gauge\n"
    'llmos_kv_cache_usage_perc{model_name="m"} NaN\n'
)


def test_hpa_is_a_valid_autoscaling_v2_object() -> None:
    hpa = build_hpa(
        pool_name="chat",
        namespace="team-a",
        metric="kvCacheUsage",
        target=0.7,
        min_replicas=0,
        max_replicas=5,
        scale_down_window_s=7200,
        owner_uid="u-1",
    )
    kubernetes_validate.validate(hpa, "1.33", strict=True)
    assert hpa["spec"]["minReplicas"] == 1  # no scale-to-zero without the alpha gate
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 3600
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "700m"
    assert [format_quantity(v) for v in (4, 0.5, 0.0005)] == ["4", "500m", "1m"]


async def test_scrape_reports_unknown_with_a_reason_never_zero() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return {
            "ok": httpx.Response(200, text=TEXT),
            "down": httpx.Response(503, text="draining"),
            "junk": httpx.Response(200, text="{not prometheus"),
        }[request.url.host]

    targets = [ScrapeTarget(h, f"http://{h}/metrics") for h in ("ok", "down", "junk")]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        waiting = await scrape(client, targets, "llmos_num_requests_waiting")
        kv = await scrape(client, targets[:1], "llmos_kv_cache_usage_perc")
        other = await scrape(client, targets[:1], "llmos_num_requests_waiting", model_name="x")
    assert [r.value for r in waiting] == [3.0, None, None]
    assert "503" in (waiting[1].error or "") and waiting[2].error
    assert kv[0].value is None  # NaN is unknown, not a number to scale on
    assert other[0].value is None


async def test_scrape_timeout_is_unknown() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        (result,) = await scrape(client, [ScrapeTarget("p", "http://p/metrics")], "x", timeout=0.1)
    assert result.value is None and "ReadTimeout" in (result.error or "")


def test_metrics_reconcile_outcomes_and_forgetting() -> None:
    m = OperatorMetrics()
    with m.reconcile("InferencePool"):
        pass
    with pytest.raises(RuntimeError), m.reconcile("InferencePool"):
        raise RuntimeError("boom")
    m.record_pool("ns", "p", replicas=3, ready=1)
    m.record_model_phase("ns", "m", "Failed")
    m.record_model_phase("ns", "m", "Failed")  # same phase again is not a second failure
    text = m.render().decode()
    assert 'llmos_operator_reconciles_total{kind="InferencePool",outcome="success"} 1.0' in text
    assert 'llmos_operator_reconciles_total{kind="InferencePool",outcome="error"} 1.0' in text
    assert 'llmos_operator_model_load_failures_total{model="m",namespace="ns"} 1.0' in text
    m.forget_pool("ns", "p")
    assert 'pool="p"' not in m.render().decode()


def test_json_logs_carry_pool_and_request_ids() -> None:
    stream = io.StringIO()
    handler = configure_logging("json", stream=stream)
    try:
        with log_context(namespace="ns", pool="chat"):
            logging.getLogger("llmos").info("scaled %d", 3, extra={"request_id": "r-1"})
        logging.getLogger("kopf.objects").info(
            "done", extra={"k8s_ref": {"kind": "LLMModel", "name": "m", "namespace": "ns"}}
        )
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "scaled 3"
    assert (first["pool"], first["namespace"], first["request_id"]) == ("chat", "ns", "r-1")
    assert second["model"] == "m" and "pool" not in second
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
