"""`llmos-operator` / `python -m llmos_operator`: run the operator cluster-wide with kopf."""

from __future__ import annotations

import asyncio

import kopf

from llmos_operator.config import OperatorConfig
from llmos_operator.handlers import register
from llmos_operator.handlers.registration import CONFIG


async def run(config: OperatorConfig, *, liveness_endpoint: str | None = None) -> None:
    registry = register(kopf.OperatorRegistry(), config)
    await kopf.operator(
        registry=registry,
        clusterwide=True,
        standalone=True,
        memo=kopf.Memo({CONFIG: config}),
        liveness_endpoint=liveness_endpoint,
    )


def main() -> None:
    config = OperatorConfig.from_env()
    asyncio.run(run(config, liveness_endpoint="http://0.0.0.0:8080/healthz"))


if __name__ == "__main__":
    main()
