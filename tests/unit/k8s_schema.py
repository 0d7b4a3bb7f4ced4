"""One pinned Kubernetes version for schema validation of everything the project renders."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

KUBERNETES_VERSION = "1.33.0"


def validate(manifest: dict[str, Any]) -> None:
    """Raise if `manifest` is not a valid object of its kind in KUBERNETES_VERSION (strict)."""
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
