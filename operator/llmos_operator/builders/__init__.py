"""Pure functions from a spec to Kubernetes manifests (dicts): no I/O, unit-tested directly."""

from llmos_operator.builders.gateway import build_gateway_children
from llmos_operator.builders.model import ModelRef, build_loader_job, build_pvc
from llmos_operator.builders.pool import (
    PoolRef,
    ServedModel,
    build_deployment,
    build_pdb,
    build_service,
    build_service_account,
    build_workers_service,
)

__all__ = [
    "ModelRef",
    "PoolRef",
    "ServedModel",
    "build_deployment",
    "build_gateway_children",
    "build_loader_job",
    "build_pdb",
    "build_pvc",
    "build_service",
    "build_service_account",
    "build_workers_service",
]
