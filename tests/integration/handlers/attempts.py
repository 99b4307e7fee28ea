#!/usr/bin/python3
"""Exec handler whose verdict depends on the attempt (for retry tests).

usage: attempts.py RECORD_FILE [--default ACTION]

Appends one JSON line per invocation to RECORD_FILE, in the format of
record.py ({"phase": "start", "env", "body", "argv", "pid", "time"}), so the
harness's read_records / wait_records work on it. Then acts.

The action for attempt N (the ATTEMPT variable the daemon passes) comes from
the event's payload:
  payload.actions   a list; entry N-1 is the action of attempt N; past its
                    end, the last entry applies
  payload.ok_flag   a path: while that file exists, the action is "0"
                    (lets a test "fix" the handler)
  otherwise --default ACTION (default "0").
An action is an exit code ("0", "75", 65, ...), "signal:N" (kill itself with
signal N) or "sleep:S" (sleep S seconds, then write a "done" line, exit 0).
payload.stderr is written to stderr before acting.
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
            if item:
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


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: attempts.py RECORD_FILE [--default ACTION]\n")
        return 2
    path = argv[1]
    default = "0"
    if "--default" in argv[2:]:
        default = argv[argv.index("--default") + 1]
    body_bytes = sys.stdin.buffer.read()
    env = read_environ()
    payload = {}
    try:
        doc = json.loads(body_bytes)
        if isinstance(doc, dict) and isinstance(doc.get("payload"), dict):
            payload = doc["payload"]
    except ValueError:
        pass
    try:
        attempt = int(env.get("ATTEMPT", "1"))
    except ValueError:
        attempt = 1
    action = default
    actions = payload.get("actions")
    if isinstance(actions, list) and actions:
        action = actions[min(attempt, len(actions)) - 1]
    flag = payload.get("ok_flag")
    if flag and os.path.exists(flag):
        action = "0"
    action = str(action)

    append(path, {"phase": "start", "env": env, "body": body_bytes.decode("utf-8", "replace"),
                  "argv": argv, "pid": os.getpid(), "time": time.time(), "action": action})
    if "stderr" in payload:
        sys.stderr.write(str(payload["stderr"]) + "\n")
        sys.stderr.flush()
    if action.startswith("signal:"):
        sys.stdout.flush()
        os.kill(os.getpid(), int(action.split(":", 1)[1]))
        time.sleep(5)
        return 0
    if action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
        append(path, {"phase": "done", "pid": os.getpid(), "time": time.time()})
        return 0
    return int(action)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
