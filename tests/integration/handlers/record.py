#!/usr/bin/python3
"""Recording exec handler for the event-router integration tests.

usage: record.py RECORD_FILE [--exit N] [--sleep SECONDS] [--stderr TEXT]
                 [--stdout TEXT] [--ignore-payload-sleep] [--done]

Reads the event body from stdin and appends one JSON line to RECORD_FILE:
  {"phase": "start", "env": {...}, "body": "...", "argv": [...], "pid": N, "time": T}
The environment is read from /proc/self/environ, i.e. exactly what the daemon
passed to execve (Python's own locale coercion would otherwise add LC_CTYPE).

Then it optionally sleeps and exits. The body's payload may override the
arguments: payload.exit_code, payload.sleep, payload.stderr, payload.stdout.
After a sleep it appends a second line {"phase": "done", "pid": N, ...}.
payload.kill_signal: the handler then kills itself with that signal.
payload.fail_attempts: N: exit 75 (retry) while the ATTEMPT it was given is
at most N (so the event succeeds on attempt N + 1).
--done: always append the "done" line, with "exit" (the exit code it is about
to return); start and done lines then also carry "event_id", "aggregate_id"
and "attempt" (from ATTEMPT), so that runs can be paired without the body.

Emits (docs/handlers.md#emit), written to the fd named by ER_EMIT_FD before
it exits: payload.emit, a list of emit objects (one JSON line each);
payload.emit_raw, text written as is, payload.emit_raw_repeat times (default 1);
payload.emit_big: N, one emit whose payload holds a string of N bytes.
"""
import fcntl
import json
import os
import sys
import time


def read_environ():
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
        env = {}
        for item in raw.split(b"\0"):
            if not item:
                continue
            key, _, value = item.partition(b"=")
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        return env
    except OSError:
        return dict(os.environ)


def append(path, record):
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def emit(payload):
    fd = int(os.environ.get("ER_EMIT_FD", "3"))
    for e in payload.get("emit") or []:
        write_all(fd, (json.dumps(e) + "\n").encode("utf-8"))
    if payload.get("emit_big"):
        big = {"event_type": "follow.big", "payload": {"s": "x" * int(payload["emit_big"])}}
        write_all(fd, (json.dumps(big) + "\n").encode("utf-8"))
    raw = payload.get("emit_raw")
    if raw is not None:
        write_all(fd, raw.encode("utf-8") * int(payload.get("emit_raw_repeat", 1)))


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: record.py RECORD_FILE [--exit N] [--sleep S] [--stderr TEXT]\n")
        return 2
    path = argv[1]
    exit_code = 0
    sleep = 0.0
    err_text = None
    out_text = None
    ignore_payload_sleep = False
    always_done = False
    args = argv[2:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--exit":
            exit_code = int(args[i + 1]); i += 2
        elif a == "--sleep":
            sleep = float(args[i + 1]); i += 2
        elif a == "--stderr":
            err_text = args[i + 1]; i += 2
        elif a == "--stdout":
            out_text = args[i + 1]; i += 2
        elif a == "--ignore-payload-sleep":
            ignore_payload_sleep = True; i += 1
        elif a == "--done":
            always_done = True; i += 1
        else:
            i += 1  # unknown extra args are just recorded

    body_bytes = sys.stdin.buffer.read()
    body = body_bytes.decode("utf-8", "replace")
    payload = {}
    doc = None
    try:
        doc = json.loads(body_bytes)
        if isinstance(doc, dict) and isinstance(doc.get("payload"), dict):
            payload = doc["payload"]
    except ValueError:
        pass
    env = read_environ()
    ids = {}
    if always_done:
        doc = doc if isinstance(doc, dict) else {}
        ids = {"event_id": doc.get("event_id", doc.get("eventId")),
               "aggregate_id": doc.get("aggregate_id", doc.get("aggregateId")),
               "attempt": int(env.get("ATTEMPT", "0") or 0)}
    if "exit_code" in payload:
        exit_code = int(payload["exit_code"])
    if "sleep" in payload and not ignore_payload_sleep:
        sleep = float(payload["sleep"])
    if "stderr" in payload:
        err_text = str(payload["stderr"])
    if "stdout" in payload:
        out_text = str(payload["stdout"])
    if "fail_attempts" in payload and int(env.get("ATTEMPT", "1") or 1) <= int(payload["fail_attempts"]):
        exit_code = 75

    append(path, dict(ids, **{
        "phase": "start",
        "env": env,
        "body": body,
        "argv": argv,
        "pid": os.getpid(),
        "time": time.time(),
    }))
    if out_text:
        sys.stdout.write(out_text + "\n")
        sys.stdout.flush()
    if err_text:
        sys.stderr.write(err_text + "\n")
        sys.stderr.flush()
    emit(payload)  # also when it then fails (fail_attempts): a failed run's emits are dropped
    if sleep > 0:
        time.sleep(sleep)
    if sleep > 0 or always_done:
        append(path, dict(ids, phase="done", pid=os.getpid(), time=time.time(), exit=exit_code))
    if "kill_signal" in payload:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), int(payload["kill_signal"]))
        time.sleep(5)
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
