#!/usr/bin/env python3
"""Publishes the demo's sample events like the Python services do (aio-pika,
snake_case envelope, routing key = event_type, persistent JSON, publisher
confirms).

  RABBITMQ_URL       default amqp://guest:guest@127.0.0.1:5672/
  RABBITMQ_EXCHANGE  default draft-genie.events

Needs Debian's python3-aio-pika: run it with /usr/bin/python3.
"""
import asyncio
import json
import os
import sys
import uuid
from datetime import datetime, timezone

try:
    import aio_pika
except ImportError:  # another python3 first on PATH: use Debian's package
    sys.path.append("/usr/lib/python3/dist-packages")
    import aio_pika

URL = os.environ.get("RABBITMQ_URL") or "amqp://guest:guest@127.0.0.1:5672/"
EXCHANGE = os.environ.get("RABBITMQ_EXCHANGE") or "draft-genie.events"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(event_type: str, aggregate_id: str, aggregate_type: str, payload: dict, correlation_id: str) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "aggregate_id": aggregate_id,
        "aggregate_type": aggregate_type,
        "correlation_id": correlation_id,
        "timestamp": now(),
        "version": 1,
        "payload": payload,
    }


def samples() -> list:
    cid = str(uuid.uuid4())
    return [
        event("speaker.onboarded", "123", "Speaker",
              {"speaker_id": "123", "external_id": "ext-123", "name": "John Doe", "bucket": "GOOD"}, cid),
        event("draft.ingested", "draft-456", "Draft",
              {"draft_id": "draft-456", "speaker_id": "123", "source": "demo", "word_count": 312}, cid),
        event("rag.dfn_generated", "dfn-789", "DraftGenieNote",
              {"dfn_id": "dfn-789", "speaker_id": "123", "draft_id": "draft-456"}, cid),
        event("evaluation.completed", "eval-321", "Evaluation",
              {"evaluation_id": "eval-321", "dfn_id": "dfn-789", "score": 0.92}, cid),
    ]


async def main() -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()  # publisher confirms on by default
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        for ev in samples():
            message = aio_pika.Message(
                body=json.dumps(ev).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=ev["event_id"],
                correlation_id=ev["correlation_id"],
                timestamp=datetime.now(timezone.utc),
                type=ev["event_type"],
            )
            await exchange.publish(message, routing_key=ev["event_type"])
            print("published %s event_id=%s (aio-pika, snake_case)" % (ev["event_type"], ev["event_id"]))


if __name__ == "__main__":
    asyncio.run(main())
