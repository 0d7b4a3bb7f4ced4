"""Reconcilers: from one custom object's body to its children and its status (no kopf here)."""

from llmos_operator.controllers.errors import InvalidSpec, WaitingForDependency
from llmos_operator.controllers.inferencepool import cleanup_pool, reconcile_pool
from llmos_operator.controllers.llmmodel import cleanup_model, reconcile_model

__all__ = [
    "InvalidSpec",
    "WaitingForDependency",
    "cleanup_model",
    "cleanup_pool",
    "reconcile_model",
    "reconcile_pool",
]
