"""`llmos-operator` / `python -m llmos_operator`: run the operator cluster-wide with kopf."""

from __future__ import annotations

import asyncio
import os

import kopf

from llmos_operator.app import build_registry
from llmos_operator.config import OperatorConfig
from llmos_operator.handlers.registration import CONFIG
from llmos_operator.logging import configure_logging


async def run(config: OperatorConfig, *, liveness_endpoint: str | None = None) -> None:
    await kopf.operator(
        registry=build_registry(config),
        clusterwide=True,
        standalone=True,
        memo=kopf.Memo({CONFIG: config}),
        liveness_endpoint=liveness_endpoint,
    )


def main() -> None:
    fmt = os.environ.get("LLMOS_OPERATOR_LOG_FORMAT", "text")
    if fmt not in ("json", "text"):
        raise SystemExit(f"LLMOS_OPERATOR_LOG_FORMAT must be json or text, not {fmt!r}")
    configure_logging("json" if fmt == "json" else "text")
    config = OperatorConfig.from_env()
    asyncio.run(run(config, liveness_endpoint="http://0.0.0.0:8080/healthz"))


if __name__ == "__main__":
    main()
