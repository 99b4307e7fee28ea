"""The guide's "Handle Errors Gracefully" example, unchanged, behind
event-router, with its undefined `logger` stubbed (structlog-style keywords)."""
import json
import os

from event_router import Worker

RECORD = os.environ["RECORD_FILE"]


class _Logger:
    def error(self, msg, **kw):
        with open(RECORD, "a") as f:
            f.write(json.dumps(dict(log="error", msg=msg, **kw)) + "\n")


logger = _Logger()


# --- from event-infrastructure-guide.md, "Best Practices" / "2. Handle Errors Gracefully" ---
async def handle_event(event_data: dict) -> None:
    try:
        # Process event
        pass
    except Exception as e:
        logger.error("Failed to process event", error=str(e))
        # Re-raise to trigger message requeue
        raise
# --- end of the guide's code ---

worker = Worker()
worker.register_handler("#", handle_event)

if __name__ == "__main__":
    worker.run()
