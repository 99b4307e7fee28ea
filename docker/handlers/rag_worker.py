#!/usr/bin/python3
"""Example worker handler for the rag.* queue.

Handlers in the style of the services' event guide (`async def
handle(event_data: dict) -> None`; return to ack, raise to retry), run by
event-router in one long-running Python process (`worker:` in router.yaml)
instead of a new interpreter per event. See clients/python/README.md.

The event comes from the publisher and is untrusted: check its shape before
use, and print bounded, escaped text only (the line goes to the daemon's log).
"""
import os
import sys

try:
    from event_router import DeadLetter, Worker, current, emit
except ImportError:  # a source checkout (scripts/demo.sh), not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "clients", "python"))
    from event_router import DeadLetter, Worker, current, emit

worker = Worker()


def text(value, limit=130):
    """Publisher data for a log line: escaped and bounded."""
    return ascii(value[:limit] if isinstance(value, str) else value)[:limit]


@worker.on("rag.dfn_generated")
async def handle_dfn_generated(event_data: dict) -> None:
    payload = event_data.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("dfn_id"), str) or not payload["dfn_id"]:
        # Retrying would not help: dead-letter it with a reason.
        raise DeadLetter("bad_payload", "payload.dfn_id (a non-empty string) is missing")
    dfn_id = payload["dfn_id"][:128]
    print(f"DFN generated: dfn_id={text(dfn_id)} draft_id={text(payload.get('draft_id'))} "
          f"attempt={text(current().attempt, 12)}")
    # The follow-up is published by the daemon, with this event's correlation
    # id, and only if this handler returns (the original is acked after it).
    emit("evaluation.started", {"evaluation_id": f"eval-{dfn_id}", "dfn_id": dfn_id},
         aggregate_id=f"eval-{dfn_id}", aggregate_type="Evaluation")


@worker.on("rag.#")
async def handle_other(event_data: dict) -> None:
    print(f"rag event {text(current().event_type)}: nothing to do")


if __name__ == "__main__":
    worker.run()
