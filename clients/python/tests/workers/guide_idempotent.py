"""The guide's "Idempotent Handlers" example, unchanged, behind event-router.

The guide calls helpers it never defines; they are stubbed here, recording
what they are asked: a set stands in for the database, and process_speaker
fails once for ids starting with "flaky" (the database being down)."""
import json
import os

from event_router import Worker

RECORD = os.environ["RECORD_FILE"]


def record(**fields):
    with open(RECORD, "a") as f:
        f.write(json.dumps(fields) + "\n")


class _Logger:
    def info(self, msg, **kw):
        record(log="info", msg=msg, **kw)

    def error(self, msg, **kw):
        record(log="error", msg=msg, **kw)


logger = _Logger()
_processed = set()
_failed_once = set()


async def is_already_processed(speaker_id):
    return speaker_id in _processed


async def process_speaker(speaker_id):
    if speaker_id.startswith("flaky") and speaker_id not in _failed_once:
        _failed_once.add(speaker_id)
        raise ConnectionError("database unavailable")
    record(processed=speaker_id)


async def mark_as_processed(speaker_id):
    _processed.add(speaker_id)


# --- from event-infrastructure-guide.md, "Best Practices" / "3. Idempotent Handlers" ---
async def handle_speaker_onboarded(event_data: dict) -> None:
    speaker_id = event_data["payload"]["speaker_id"]
    
    # Check if already processed
    if await is_already_processed(speaker_id):
        logger.info("Event already processed", speaker_id=speaker_id)
        return
    
    # Process event
    await process_speaker(speaker_id)
    
    # Mark as processed
    await mark_as_processed(speaker_id)
# --- end of the guide's code ---

consumer = Worker()
consumer.register_handler("speaker.onboarded", handle_speaker_onboarded)

if __name__ == "__main__":
    consumer.run()
