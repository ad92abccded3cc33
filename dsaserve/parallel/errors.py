"""Errors of the world of ranks that the layers above (engine, server) react to."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """A worker process died or stopped answering; the engine cannot continue and must be shut down."""
