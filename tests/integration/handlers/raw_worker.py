#!/usr/bin/python3
"""A worker written against the raw protocol (docs/worker-protocol.md), stdlib only.

    raw_worker.py RECORD_FILE [--protocol N] [--ignore-eof] [--ignore-term] [--fail-start-if FILE]

Appends one JSON line per happening to RECORD_FILE: {"phase": "ready"|"start"|"done"|"eof",
"pid", ...}; a start record carries the event's id, event_id, attempt and `inflight`, the
number of events this process had started and not answered at that moment (itself included).

Each event's payload steers it (misbehaviour only on attempt 1, so a retry succeeds):
  verdict ("ack" | "retry" | "dead_letter"), reason, detail, retry_delay_ms, emit (a list)
  verdicts     a verdict per attempt (the last one repeats), instead of verdict
  sleep_ms     wait this long before answering
  stdout, stderr  print these lines (from "user code", to fds 1 and 2)
  crash        exit(3) before answering
  hang         never answer this event
  garbage      write this text (a line) on fd 4 instead of the answer
  twice        answer twice
  unknown_id   answer an id it was never given
  huge         write a line of this many bytes on fd 4 instead of the answer
--ignore-eof keeps it running after end of input, --ignore-term ignores SIGTERM,
--fail-start-if FILE exits 5 before its ready while FILE exists.
"""
import json
import os
import signal
import sys
import threading
import time

RECORD = sys.argv[1]
PROTOCOL = int(sys.argv[sys.argv.index("--protocol") + 1]) if "--protocol" in sys.argv else 1

IN_FD = int(os.environ.get("ER_WORKER_IN_FD", "3"))
OUT_FD = int(os.environ.get("ER_WORKER_OUT_FD", "4"))
out_lock = threading.Lock()
rec_lock = threading.Lock()
inflight = 0


def record(**fields):
    fields["pid"] = os.getpid()
    fields["time"] = time.time()
    line = (json.dumps(fields) + "\n").encode()
    with rec_lock:
        fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def send(obj_or_text):
    data = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    data = (data + "\n").encode()
    with out_lock:
        while data:
            n = os.write(OUT_FD, data)
            data = data[n:]


def handle(msg):
    global inflight
    payload = (msg.get("event") or {}).get("payload") or {}
    first = msg.get("attempt") == 1
    with rec_lock:
        inflight += 1
        now = inflight
    record(phase="start", id=msg["id"], event_id=msg.get("event_id"), event_type=msg.get("event_type"),
           attempt=msg.get("attempt"), inflight=now, meta={k: v for k, v in msg.items() if k != "event"})
    for line in payload.get("stdout", []):
        print(line, flush=True)
    for line in payload.get("stderr", []):
        print(line, file=sys.stderr, flush=True)
    if payload.get("sleep_ms"):
        time.sleep(payload["sleep_ms"] / 1000.0)
    if first and payload.get("crash"):
        os._exit(3)
    if first and payload.get("hang"):
        time.sleep(3600)
    verdict = payload.get("verdict", "ack")
    if payload.get("verdicts"):
        verdict = payload["verdicts"][min(msg.get("attempt", 1), len(payload["verdicts"])) - 1]
    result = {"type": "result", "id": msg["id"], "verdict": verdict}
    for k in ("reason", "detail", "emit"):
        if k in payload:
            result[k] = payload[k]
    if "retry_delay_ms" in payload:
        result["delay_ms"] = payload["retry_delay_ms"]
    with rec_lock:
        inflight -= 1
    record(phase="done", id=msg["id"], event_id=msg.get("event_id"), attempt=msg.get("attempt"))
    if first and payload.get("huge"):
        send("x" * payload["huge"])
        return
    if first and "garbage" in payload:
        send(payload["garbage"])
        return
    if first and payload.get("unknown_id"):
        result["id"] = msg["id"] + 1000000
    send(result)
    if first and payload.get("twice"):
        send(result)


def main():
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threads = []
    buf = b""
    while True:
        chunk = os.read(IN_FD, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg["type"] == "hello":
                if "--fail-start-if" in sys.argv and os.path.exists(sys.argv[sys.argv.index("--fail-start-if") + 1]):
                    record(phase="refused")
                    print("refusing to start", file=sys.stderr, flush=True)
                    os._exit(5)
                record(phase="ready", hello=msg)
                send({"type": "ready", "protocol": PROTOCOL})
            elif msg["type"] == "event":
                t = threading.Thread(target=handle, args=(msg,), daemon=True)
                t.start()
                threads.append(t)
                threads = [x for x in threads if x.is_alive()]
    for t in threads:
        t.join()
    record(phase="eof")
    if "--ignore-eof" in sys.argv:
        time.sleep(3600)


if __name__ == "__main__":
    main()
