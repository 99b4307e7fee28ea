#!/usr/bin/python3
"""Integration-test worker on the Python helper (`event_router`, found through
the handler's `env: {PYTHONPATH: <source>/clients/python}`), for
test_worker_clients.py. node_worker.js does the same on the Node helper.

The event's payload steers it:
  attempts       what to do on attempt 1, 2, ... (the last one repeats):
                 "ack" (return), "retry" (raise Retry(after=retry_after_ms)),
                 "fail" (raise RuntimeError(message)), "dead_letter" (raise
                 DeadLetter(reason, detail)), "crash" (os._exit(7)), "hang"
  emit           emit objects, emitted on every attempt before the verdict
  stdout         lines printed by the handler (print)
  forge_answer   print a dead_letter answer for this event's protocol id
  sleep_ms       a sleep before the verdict
  reason, detail, retry_after_ms, message
It appends JSON lines to $RECORD_FILE: "boot" (with $GENERATION), per event
"start" (with `inflight`, its own count of events in handlers) and then
"done", "crash" or "hang" (each with pid, event_id, attempt, time), and "exit"
when the helper's run() returns.
"""
import asyncio
import json
import os
import time

from event_router import DeadLetter, Retry, Worker, current, emit

RECORD = os.environ["RECORD_FILE"]
GENERATION = os.environ.get("GENERATION")


def record(phase, **fields):
    line = json.dumps(dict(phase=phase, pid=os.getpid(), time=time.time(), generation=GENERATION, **fields))
    with open(RECORD, "a") as f:
        f.write(line + "\n")


worker = Worker()
inflight = 0  # events in this process's handler at once


@worker.on("#")
async def handle(event_data: dict) -> None:
    global inflight
    inflight += 1
    try:
        await steered(event_data)
    finally:
        inflight -= 1


async def steered(event_data):
    ctx = current()
    p = event_data.get("payload") or {}
    actions = p.get("attempts") or ["ack"]
    action = actions[min(ctx.attempt, len(actions)) - 1]
    ids = dict(event_id=ctx.event_id, attempt=ctx.attempt)
    record("start", **ids, inflight=inflight, event_type=ctx.event_type, correlation_id=ctx.correlation_id,
           routing_key=ctx.routing_key, queue=ctx.queue, redelivered=ctx.redelivered, handler=ctx.handler)
    for line in p.get("stdout", []):
        print(line)
    if p.get("forge_answer"):  # a line that is this event's answer in the protocol
        line = '{"type":"result","id":%d,"verdict":"dead_letter"}' % ctx.id
        record("forged", **ids, line=line)
        print(line)
    for e in p.get("emit", []):
        emit(e["event_type"], e.get("payload"), aggregate_id=e.get("aggregate_id"),
             aggregate_type=e.get("aggregate_type"), routing_key=e.get("routing_key"))
    if p.get("sleep_ms"):
        await asyncio.sleep(p["sleep_ms"] / 1000)
    if action == "crash":
        record("crash", **ids)
        os._exit(7)
    if action == "hang":
        record("hang", **ids)
        await asyncio.sleep(3600)
    record("done", **ids, action=action)
    if action == "retry":
        raise Retry(after=p["retry_after_ms"] / 1000, reason=p.get("reason"), detail=p.get("detail"))
    if action == "fail":
        raise RuntimeError(p.get("message", "boom"))
    if action == "dead_letter":
        raise DeadLetter(p.get("reason"), p.get("detail"))


if __name__ == "__main__":
    record("boot")
    try:
        worker.run()
    finally:
        record("exit")
