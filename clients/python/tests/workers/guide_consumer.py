"""The guide's "Consuming Events" handler, unchanged, behind event-router.

Only the consumer differs: a Worker instead of EventConsumer (the daemon owns
the broker connection, the queue and the prefetch)."""
from event_router import Worker

consumer = Worker()

# --- from event-infrastructure-guide.md, "Python Usage" / "Consuming Events" ---
# Define event handler
async def handle_speaker_onboarded(event_data: dict) -> None:
    speaker_id = event_data["payload"]["speaker_id"]
    print(f"Speaker onboarded: {speaker_id}")
    # Process event...

# Register handler
consumer.register_handler("speaker.onboarded", handle_speaker_onboarded)
# --- end of the guide's code ---

if __name__ == "__main__":
    consumer.run()
