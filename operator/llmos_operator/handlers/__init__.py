"""kopf handlers, registered into a given registry by `register(registry)`.

Handlers are thin: they fetch the shared state from `memo` (set up by the one startup handler
from the injected `OperatorConfig`) and call the reconcilers in `llmos_operator.controllers`.
"""

from llmos_operator.handlers.registration import register

__all__ = ["register"]
