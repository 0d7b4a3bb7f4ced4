"""Operator settings from the environment: typed by field, empty optional values read as None."""

from __future__ import annotations

import pytest

from llmos_operator.config import OperatorConfig
from llmos_operator.handlers.autoscaling import AutoscalerSettings


def test_operator_config_reads_typed_values() -> None:
    config = OperatorConfig.from_env(
        {
            "LLMOS_OPERATOR_WORKER_PORT": "9000",
            "LLMOS_OPERATOR_RECONCILE_INTERVAL_S": "2.5",
            "LLMOS_OPERATOR_API_SERVER": "https://10.0.0.1:6443",
            "LLMOS_OPERATOR_MONITORING_NAMESPACE": "",
            "UNRELATED": "x",
        }
    )
    assert config.worker_port == 9000
    assert config.reconcile_interval_s == 2.5
    assert config.api_server == "https://10.0.0.1:6443"
    assert config.monitoring_namespace == ""  # a plain str field keeps the empty string
    assert config.finalizer == OperatorConfig().finalizer


def test_autoscaler_settings_read_optional_ints() -> None:
    assert (
        AutoscalerSettings.from_env({"LLMOS_OPERATOR_AUTOSCALE_METRICS_PORT": ""}).metrics_port
        is None
    )
    settings = AutoscalerSettings.from_env(
        {
            "LLMOS_OPERATOR_AUTOSCALE_METRICS_PORT": "9100",
            "LLMOS_OPERATOR_AUTOSCALE_INTERVAL_S": "3",
        }
    )
    assert settings.metrics_port == 9100 and settings.interval_s == 3.0


def test_malformed_numbers_are_refused() -> None:
    with pytest.raises(ValueError):
        OperatorConfig.from_env({"LLMOS_OPERATOR_WORKER_PORT": "eighty"})
