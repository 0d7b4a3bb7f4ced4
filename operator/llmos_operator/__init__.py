"""LLM OS operator: reconciles LLMModel, InferencePool and QuotaPolicy into Kubernetes objects."""

__version__ = "0.1.0"
