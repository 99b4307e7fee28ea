"""The daemon's side of the worker protocol, for the helper's tests.

WorkerProcess starts a worker script the way event-router does: the script's
own process group, stdin /dev/null, events on fd 3, answers read from fd 4
(the defaults: ER_WORKER_IN_FD/ER_WORKER_OUT_FD are not set), stdout and
stderr captured. Every line the worker writes on fd 4 must be a JSON object:
anything else fails the test at once.
"""
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.dirname(HERE)          # clients/python: the package under test
WORKERS = os.path.join(HERE, "workers")
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _high(fd):
    # Above 4, so the shell's `3<&N 4>&M` cannot overwrite one with the other.
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class WorkerProcess:
    def __init__(self, script, env=None, args=()):
        ev_r, self.ev_w = map(_high, os.pipe())
        self.res_r, res_w = map(_high, os.pipe())
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": CLIENT_DIR,
                    "ER_WORKER_PROTOCOL": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        full_env.update(env or {})
        cmd = 'exec "$0" "$@" 3<&%d 4>&%d %d<&- %d>&-' % (ev_r, res_w, ev_r, res_w)
        self.proc = subprocess.Popen(["/bin/bash", "-c", cmd, PYTHON, os.path.join(WORKERS, script), *args],
                                     env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, pass_fds=(ev_r, res_w), process_group=0)
        os.close(ev_r)
        os.close(res_w)
        self._buf = b""
        self.lines = []          # every raw line read from fd 4
        self._stdout, self._stderr = [], []
        self._readers = [threading.Thread(target=self._drain, args=(s, out), daemon=True)
                         for s, out in ((self.proc.stdout, self._stdout), (self.proc.stderr, self._stderr))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _drain(stream, out):
        for chunk in iter(lambda: stream.read1(65536), b""):
            out.append(chunk)

    def stdout(self):
        return b"".join(self._stdout).decode("utf-8", "replace")

    def stderr(self):
        return b"".join(self._stderr).decode("utf-8", "replace")

    # --- the daemon's side ---------------------------------------------------
    def send(self, msg):
        data = msg if isinstance(msg, bytes) else (json.dumps(msg) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.ev_w, view):]

    def hello(self, concurrency=16, protocol=1, handler="test-worker", queue="test.events"):
        self.send({"type": "hello", "protocol": protocol, "handler": handler, "queue": queue,
                   "concurrency": concurrency})
        return self.read()

    def event(self, id, event_type, payload=None, event_id=None, attempt=1, **extra):
        event_id = event_id or "ev-%d" % id
        body = {"event_id": event_id, "event_type": event_type, "aggregate_id": "agg-%d" % id,
                "aggregate_type": "Test", "correlation_id": "corr-%d" % id, "timestamp": "2026-12-01T10:00:00Z",
                "version": 1, "payload": payload if payload is not None else {}}
        msg = {"type": "event", "id": id, "event_type": event_type, "event_id": event_id,
               "aggregate_id": body["aggregate_id"], "aggregate_type": "Test",
               "correlation_id": body["correlation_id"], "routing_key": event_type,
               "exchange": "test.exchange", "queue": "test.events", "attempt": attempt,
               "redelivered": attempt > 1, "event": body}
        msg.update(extra)
        self.send(msg)
        return body

    def handle(self, *event_types):
        """Sends one event of each type (ids 1, 2, ...) and returns the results by id."""
        for id, event_type in enumerate(event_types, 1):
            self.event(id, event_type)
        return self.results(len(event_types))

    def close_input(self):
        if self.ev_w is not None:
            os.close(self.ev_w)
            self.ev_w = None

    def read(self, timeout=15):
        """The next message on fd 4 (a dict), or None at end of file."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no answer within %ss; stderr:\n%s" % (timeout, self.stderr()))
            if select.select([self.res_r], [], [], left)[0]:
                chunk = os.read(self.res_r, 1 << 20)
                if not chunk:
                    if self._buf:
                        raise AssertionError("unterminated last line on fd 4: %r" % self._buf[:200])
                    return None
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self.lines.append(line)
        try:
            msg = json.loads(line)
        except ValueError:
            raise AssertionError("the worker wrote a line that is not JSON on fd 4: %r" % line[:300])
        if not isinstance(msg, dict):
            raise AssertionError("the worker wrote a non-object on fd 4: %r" % line[:300])
        return msg

    def results(self, n, timeout=15):
        """The next n results, by id; fails on a duplicate answer."""
        out = {}
        deadline = time.monotonic() + timeout
        while len(out) < n:
            msg = self.read(max(deadline - time.monotonic(), 0.01))
            if msg is None:
                raise AssertionError("fd 4 closed after %d of %d results; stderr:\n%s" % (len(out), n, self.stderr()))
            if msg.get("type") != "result":
                raise AssertionError("expected a result, got %r" % msg)
            if msg["id"] in out:
                raise AssertionError("id %s answered twice: %r and %r" % (msg["id"], out[msg["id"]], msg))
            out[msg["id"]] = msg
        return out

    def wait(self, timeout=15):
        try:
            return self.proc.wait(timeout)
        finally:
            for t in self._readers:
                t.join(5)

    def wait_stderr(self, text, timeout=15):
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            if time.monotonic() > deadline:
                raise AssertionError("%r not on stderr within %ss; stderr:\n%s" % (text, timeout, self.stderr()))
            if self.proc.poll() is not None and text not in self.stderr():
                time.sleep(0.1)  # let the reader thread catch up once
                if text not in self.stderr():
                    raise AssertionError("worker exited (%s) before %r; stderr:\n%s"
                                         % (self.proc.returncode, text, self.stderr()))
            time.sleep(0.02)

    def close(self):
        self.close_input()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for t in self._readers:
            t.join(5)
        os.close(self.res_r)
        self.proc.stdout.close()
        self.proc.stderr.close()


class Records:
    """The JSON lines the test workers append to $RECORD_FILE."""

    def __init__(self, path):
        self.path = path

    def all(self):
        try:
            with open(self.path) as f:
                return [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []

    def wait(self, predicate, count, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.all() if predicate(r)]
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError("%d of %d records within %ss: %r" % (len(got), count, timeout, self.all()))
            time.sleep(0.02)


class WorkerTestCase(unittest.TestCase):
    """Gives each test a temp dir and a record file, and cleans up workers."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="er-pyclient-")
        self.records = Records(os.path.join(self.tmp.name, "records.jsonl"))
        self.addCleanup(self.tmp.cleanup)

    def start(self, script="fixture.py", env=None, args=()):
        w = WorkerProcess(script, dict({"RECORD_FILE": self.records.path}, **(env or {})), args)
        self.addCleanup(w.close)
        return w

    def started(self, script="fixture.py", concurrency=16, **kw):
        """A worker past the handshake."""
        w = self.start(script, **kw)
        self.assertEqual(w.hello(concurrency), {"type": "ready", "protocol": 1})
        return w
