"""Autoscaling of InferencePools on engine signals: decision, metrics scraping, HPA rendering.

`decide` turns per-pod metric samples into desired replicas (pure, injected time); `scrape`
fetches the samples from worker pods over HTTP; `build_hpa` renders the autoscaling/v2 HPA used
in mode `hpa`. The kopf handler that ties them together is `llmos_operator.handlers.autoscaling`.
"""

from llmos_operator.autoscaling.decision import (
    Autoscaler,
    AutoscalingPolicyError,
    Decision,
    Observation,
    Recommendation,
    ScalerState,
    ScalingPolicy,
    decide,
)
from llmos_operator.autoscaling.hpa import build_hpa, format_quantity, hpa_name
from llmos_operator.autoscaling.scrape import (
    METRIC_SERIES,
    ScrapeResult,
    ScrapeTarget,
    parse_value,
    scrape,
    scrape_one,
    series_for,
    values_of,
)

__all__ = [
    "METRIC_SERIES",
    "Autoscaler",
    "AutoscalingPolicyError",
    "Decision",
    "Observation",
    "Recommendation",
    "ScalerState",
    "ScalingPolicy",
    "ScrapeResult",
    "ScrapeTarget",
    "build_hpa",
    "decide",
    "format_quantity",
    "hpa_name",
    "parse_value",
    "scrape",
    "scrape_one",
    "series_for",
    "values_of",
]
