"""LLM OS worker: a paged-memory inference engine and its OpenAI-compatible server."""

__version__ = "0.1.0"
