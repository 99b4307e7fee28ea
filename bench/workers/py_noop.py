#!/usr/bin/python3
"""Bench worker: what the aio-pika peer does (parse, dispatch by type, no-op)
behind event-router, with the Python helper. The daemon parses nothing for it
beyond the envelope; the helper json.loads each event line."""
from event_router import Worker


async def on_speaker_onboarded(event: dict) -> None: ...
async def on_speaker_updated(event: dict) -> None: ...
async def on_draft_ingested(event: dict) -> None: ...
async def on_dfn_generated(event: dict) -> None: ...
async def on_evaluation_completed(event: dict) -> None: ...


worker = Worker()
worker.register_handler("speaker.onboarded", on_speaker_onboarded)
worker.register_handler("speaker.updated", on_speaker_updated)
worker.register_handler("draft.ingested", on_draft_ingested)
worker.register_handler("rag.dfn_generated", on_dfn_generated)
worker.register_handler("evaluation.completed", on_evaluation_completed)
worker.run()
