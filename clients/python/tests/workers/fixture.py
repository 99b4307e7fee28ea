"""A worker with one handler per behaviour the tests drive (by event type).

Handlers append JSON lines to $RECORD_FILE: their own record of what ran,
when, on which thread, with how many events in flight at the time.
"""
import asyncio
import contextvars
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import threading
import time

from event_router import DeadLetter, Retry, Worker, current, emit

RECORD = os.environ["RECORD_FILE"]
_lock = threading.Lock()
in_flight = 0


def record(**fields):
    fields.update(time=time.monotonic(), thread=threading.current_thread().name)
    with _lock, open(RECORD, "a") as f:
        f.write(json.dumps(fields) + "\n")


def payload(event_data):
    return event_data["payload"]


worker = Worker()


# --- verdicts ----------------------------------------------------------------
@worker.on("ack.*")
async def ack(event_data):
    record(phase="ack", id=current().id, event_id=event_data["event_id"])


@worker.on("retry.after")
async def retry_after(event_data):
    p = payload(event_data)
    raise Retry(after=p["seconds"], reason=p.get("reason"), detail=p.get("detail"))


@worker.on("retry.timedelta")
async def retry_timedelta(event_data):
    raise Retry(datetime.timedelta(minutes=1, milliseconds=payload(event_data)["ms"]), reason="later")


@worker.on("retry.bare")
async def retry_bare(event_data):
    raise Retry()


class LazyRetry(Retry):
    def __init__(self, why):  # never calls Retry.__init__
        self.why = why


class LazyDeadLetter(DeadLetter):
    def __init__(self):
        pass


@worker.on("retry.subclass")
async def retry_subclass(event_data):
    raise LazyRetry("no reason given")


@worker.on("retry.mutated")
async def retry_mutated(event_data):
    e = Retry(5, "ok")
    e.reason, e.detail, e.delay_ms = "bad reason!", "\udcff" * 3, -7
    raise e


@worker.on("dead.subclass")
async def dead_subclass(event_data):
    raise LazyDeadLetter()


@worker.on("dead.*")
async def dead(event_data):
    p = payload(event_data)
    raise DeadLetter(p["reason"], detail=p.get("detail"))


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("str() refused")


@worker.on("fail.value")
async def fail_value(event_data):
    raise ValueError(payload(event_data)["message"])


@worker.on("fail.unprintable")
async def fail_unprintable(event_data):
    raise Unprintable()


@worker.on("fail.exit")
async def fail_exit(event_data):
    sys.exit(3)


# --- plain functions (thread pool) -------------------------------------------
def sync_ack(event_data):
    record(phase="sync", id=current().id, thread_is_main=threading.current_thread() is threading.main_thread())


def sync_fail(event_data):
    raise KeyError("missing")


def sync_dead(event_data):
    raise DeadLetter("sync_rejected")


worker.register_handler("sync.ack", sync_ack)
worker.register_handler("sync.fail", sync_fail)
worker.register_handler("sync.dead", sync_dead)


# --- concurrency: every handler waits until all `n` have started ---------------
gate = None
started = 0


@worker.on("wait.async")
async def wait_async(event_data):
    global gate, started, in_flight
    n = payload(event_data)["n"]
    gate = gate or asyncio.Event()
    started += 1
    in_flight += 1
    record(phase="start", id=current().id, in_flight=in_flight)
    if started == n:
        gate.set()
    await asyncio.wait_for(gate.wait(), 10)
    in_flight -= 1
    record(phase="end", id=current().id)


barrier = None


@worker.on("wait.sync")
def wait_sync(event_data):
    global barrier
    n = payload(event_data)["n"]
    with _lock:
        barrier = barrier or threading.Barrier(n)
    record(phase="start", id=current().id)
    barrier.wait(10)
    record(phase="end", id=current().id)


@worker.on("sleep.*")
async def sleep(event_data):
    global in_flight
    in_flight += 1
    record(phase="start", id=current().id, in_flight=in_flight)
    await asyncio.sleep(payload(event_data)["seconds"])
    in_flight -= 1
    record(phase="end", id=current().id)


# --- emit ----------------------------------------------------------------------
@worker.on("emit.interleave")
async def emit_interleave(event_data):
    p = payload(event_data)
    for i in range(p["count"]):
        emit("follow.up", {"tag": p["tag"], "i": i}, aggregate_id=p["tag"])
        await asyncio.sleep(0.002)  # let the other events emit in between
    if p.get("retry"):
        raise Retry(1)


@worker.on("emit.subtask")
async def emit_subtask(event_data):
    tag = payload(event_data)["tag"]

    async def part(i):
        await asyncio.sleep(0.001 * i)
        emit("follow.part", {"tag": tag, "i": i})
    await asyncio.gather(*(part(i) for i in range(3)))


@worker.on("emit.full")
async def emit_full(event_data):
    emit("rag.dfn_generated", {"dfn": "é\u2028\n"}, aggregate_id="d-1", aggregate_type="Draft",
         routing_key="rag.custom")
    emit("rag.empty")


@worker.on("emit.sync")
def emit_sync(event_data):
    emit("follow.sync", {"tag": payload(event_data)["tag"]})


@worker.on("emit.bad")
async def emit_bad(event_data):
    kind = payload(event_data)["kind"]
    if kind == "list":
        emit("x.y", [1, 2])
    elif kind == "nan":
        emit("x.y", {"v": float("nan")})
    elif kind == "surrogate":
        emit("x.y", {"v": "\udcff"})
    elif kind == "object":
        emit("x.y", {"v": object()})


@worker.on("emit.big")
async def emit_big(event_data):
    emit("big.one", {"blob": "x" * payload(event_data)["bytes"]})


@worker.on("emit.late")
async def emit_late(event_data):
    async def later():
        await asyncio.sleep(0.05)
        try:
            emit("too.late")
        except RuntimeError as e:
            record(phase="late", error=str(e))
    asyncio.get_running_loop().create_task(later())


# --- each event its own context -------------------------------------------------
request_id = contextvars.ContextVar("request_id", default=None)


@worker.on("ctxvar.*")
async def ctxvar(event_data):
    seen = request_id.get()
    request_id.set(event_data["event_id"])  # as structlog.contextvars.bind_contextvars does
    await asyncio.sleep(0.01)
    record(phase="ctxvar", id=current().id, seen=seen, after=request_id.get())


# --- protocol safety --------------------------------------------------------------
@worker.on("print.*")
async def prints(event_data):
    print('{"type":"result","id":%d,"verdict":"dead_letter"}' % current().id)
    print("plain text from the handler")
    sys.stdout.write("no newline at the end")
    print("x" * 200000)
    print("to stderr", file=sys.stderr)
    os.write(1, b"raw write to fd 1\n")
    record(phase="printed", id=current().id)


@worker.on("child.fds")
async def child_fds(event_data):
    # What a program the handler starts inherits (close_fds=False: all it can).
    out = subprocess.run(["/bin/sh", "-c", "ls /proc/$$/fd"], close_fds=False, capture_output=True, text=True)
    record(phase="child", fds=sorted(int(x) for x in out.stdout.split()))


@worker.on("meta.*")
async def meta(event_data):
    record(phase="meta", context=dataclasses.asdict(current()), event=event_data)


if __name__ == "__main__":
    worker.run()
