"""Run Python event handlers behind event-router as a worker handler.

    from event_router import Worker, Retry, DeadLetter, emit, current

See clients/python/README.md and docs/worker-protocol.md.
"""
from ._verdicts import DeadLetter, EventContext, Retry, current, emit
from ._worker import PROTOCOL, Worker

__all__ = ["Worker", "Retry", "DeadLetter", "emit", "current", "EventContext", "PROTOCOL"]
