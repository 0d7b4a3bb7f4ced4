"""Typed llmos.dev/v1alpha1 API: one module per kind, re-exported here."""

from llmos_operator.api.common import API_VERSION, GROUP, VERSION, ApiModel, Condition
from llmos_operator.api.inferencepool import InferencePoolSpec, InferencePoolStatus
from llmos_operator.api.llmmodel import LLMModelSpec, LLMModelStatus
from llmos_operator.api.quotapolicy import QuotaPolicySpec, QuotaPolicyStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ApiModel",
    "Condition",
    "InferencePoolSpec",
    "InferencePoolStatus",
    "LLMModelSpec",
    "LLMModelStatus",
    "QuotaPolicySpec",
    "QuotaPolicyStatus",
]
