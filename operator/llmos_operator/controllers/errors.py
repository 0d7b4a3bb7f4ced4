"""Why a reconcile stopped short; the kopf handlers map these to retry or give-up decisions."""

from __future__ import annotations


class ReconcileStopped(Exception):
    """A reconcile ended early; the status already says why."""


class InvalidSpec(ReconcileStopped):
    """The spec can never work as written (the message names the field); no retry helps."""


class WaitingForDependency(ReconcileStopped):
    """Something the object needs is not ready yet (e.g. a pool's model); retry later."""
