"""Shared helpers for the event-router integration tests.

Every test runs the real daemon binary against the local RabbitMQ broker.
Isolation: each test gets a unique name prefix ("it-<test>-<random>") used for
its exchange and all its queues, its own temp dir (config file, daemon log,
handler records), and deletes everything it declared when it ends.

Environment:
  ER_BINARY      the daemon (default $ER_BUILD_DIR/event-router)
  ER_BUILD_DIR   the build tree (default <source>/build)
  ER_SOURCE_DIR  the source tree (default: two levels above this file)
  ER_AMQP_URL    broker URL for daemon and publishers
                 (default $RABBITMQ_URL, else amqp://guest:guest@127.0.0.1:5672/)
  ER_KEEP_TMP=1  keep each test's temp dir (its path is printed)
  ER_SHOW_LOGS=1 print the daemon logs of every test, not only failed ones
"""
import asyncio
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

try:
    import aio_pika
except ImportError:  # another python3 (e.g. pyenv) first on PATH: use Debian's python3-aio-pika
    _DIST = "/usr/lib/python3/dist-packages"
    if os.path.isdir(os.path.join(_DIST, "aio_pika")) and _DIST not in sys.path:
        sys.path.append(_DIST)
    try:
        import aio_pika
    except ImportError as exc:
        raise ImportError(
            "aio_pika is missing: install python3-aio-pika (scripts/install-deps.sh) and run the "
            "tests with /usr/bin/python3 (%s): %s" % (sys.executable, exc)) from exc

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.abspath(os.environ.get("ER_SOURCE_DIR") or os.path.join(HERE, "..", ".."))
BUILD_DIR = os.path.abspath(os.environ.get("ER_BUILD_DIR") or os.path.join(SOURCE_DIR, "build"))
BINARY = os.path.abspath(os.environ.get("ER_BINARY") or os.path.join(BUILD_DIR, "event-router"))
AMQP_URL = (os.environ.get("ER_AMQP_URL") or os.environ.get("RABBITMQ_URL")
            or "amqp://guest:guest@127.0.0.1:5672/")
AMQP_PASSWORD = urlsplit(AMQP_URL).password or ""
RECORD_HANDLER = os.path.join(HERE, "handlers", "record.py")
NODE_PUBLISHER = os.path.join(HERE, "publish_amqplib.js")
KEEP_TMP = os.environ.get("ER_KEEP_TMP") == "1"
SHOW_LOGS = os.environ.get("ER_SHOW_LOGS") == "1"

# `<time> <level> ready ...`
READY_RE = r"(?m)^\S+ \S+ ready(?:\s|$)"

# What AddressSanitizer, LeakSanitizer and UBSan write to stderr when they find
# something (build-asan/, -DER_SANITIZE=address,undefined). UBSan's line is
# `file:line:col: runtime error: ...` (`<unknown>: runtime error:` without a
# location); a handler's own stderr that the daemon logs is quoted in a field
# and does not match.
SANITIZER_RE = re.compile(r"ERROR: (?:AddressSanitizer|LeakSanitizer)|(?::\d+:\d+|<unknown>): runtime error: "
                          r"|SUMMARY: UndefinedBehaviorSanitizer")


def sanitizer_report(text: str, lines: int = 40) -> Optional[str]:
    """The first `lines` lines of a sanitizer report in `text`, or None."""
    m = SANITIZER_RE.search(text)
    if not m:
        return None
    start = text.rfind("\n", 0, m.start()) + 1
    return "\n".join(text[start:].splitlines()[:lines])


# ---------------------------------------------------------------------------
# Small utilities


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_yaml(value: Any, indent: int = 0) -> str:
    """A tiny block-style YAML emitter. Strings are JSON-quoted (valid YAML
    double-quoted scalars); lists of scalars are emitted in flow style."""
    pad = "  " * indent

    def scalar(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    def is_scalar(v: Any) -> bool:
        return not isinstance(v, (dict, list, tuple))

    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            if is_scalar(v):
                out.append("%s%s: %s\n" % (pad, k, scalar(v)))
            elif not v:
                out.append("%s%s: %s\n" % (pad, k, "{}" if isinstance(v, dict) else "[]"))
            elif isinstance(v, (list, tuple)) and all(is_scalar(x) for x in v):
                out.append("%s%s: [%s]\n" % (pad, k, ", ".join(scalar(x) for x in v)))
            else:
                out.append("%s%s:\n%s" % (pad, k, to_yaml(v, indent + 1)))
    elif isinstance(value, (list, tuple)):
        for item in value:
            if is_scalar(item):
                out.append("%s- %s\n" % (pad, scalar(item)))
            else:
                sub = to_yaml(item, indent + 1)
                out.append(pad + "- " + sub[len(pad) + 2:])
    else:
        out.append(pad + scalar(value) + "\n")
    return "".join(out)


_LOG_LINE_RE = re.compile(r'^(\S+) (\S+) ("(?:[^"\\]|\\.)*"|\S+)(.*)$')
_LOG_FIELD_RE = re.compile(r'(?:^|\s)([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)')


def _unquote(v: str) -> str:
    if len(v) < 2 or not (v.startswith('"') and v.endswith('"')):
        return v
    s, out, i = v[1:-1], [], 0
    simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            n = s[i + 1]
            if n in simple:
                out.append(simple[n]); i += 2; continue
            if n == "x" and i + 3 < len(s):
                try:
                    out.append(chr(int(s[i + 2:i + 4], 16))); i += 4; continue
                except ValueError:
                    pass
        out.append(c); i += 1
    return "".join(out)


@dataclass
class LogRecord:
    time: str
    level: str
    msg: str
    fields: Dict[str, str]
    line: str


def parse_log_line(line: str) -> Optional[LogRecord]:
    """Parses `<time> <level> <message> k=v k="quoted v" ...`."""
    m = _LOG_LINE_RE.match(line.rstrip("\n"))
    if not m:
        return None
    fields = {k: _unquote(v) for k, v in _LOG_FIELD_RE.findall(m.group(4))}
    return LogRecord(m.group(1), m.group(2), _unquote(m.group(3)), fields, line.rstrip("\n"))


def _hdr(v: Any) -> Any:
    """Normalizes an AMQP header value (bytes -> str, nested tables too)."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, dict):
        return {k: _hdr(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_hdr(x) for x in v]
    return v


@dataclass
class GotMessage:
    body: bytes
    headers: Dict[str, Any]
    message_id: Optional[str]
    correlation_id: Optional[str]
    content_type: Optional[str]
    delivery_mode: Optional[int]
    type: Optional[str]
    timestamp: Any
    routing_key: Optional[str]
    exchange: Optional[str]
    redelivered: bool

    def json(self) -> Any:
        return json.loads(self.body)


def run_rabbitmqctl(*args: str, timeout: float = 60) -> str:
    p = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError("rabbitmqctl %s failed (%d): %s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))
    return p.stdout


def rabbitmqctl_json(*args: str) -> List[Dict[str, Any]]:
    out = run_rabbitmqctl(*args, "-q", "--formatter", "json")
    out = out.strip()
    return json.loads(out) if out else []


_NPM_READY = False


def ensure_node_modules() -> None:
    """Runs `npm ci` (or `npm install` without a lock file) in this folder once
    if amqplib or express is not installed. A file lock keeps parallel runs apart."""
    global _NPM_READY
    if _NPM_READY:
        return
    markers = [os.path.join(HERE, "node_modules", m, "package.json") for m in ("amqplib", "express")]
    with open(os.path.join(tempfile.gettempdir(), "er-it-npm.lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not all(os.path.exists(m) for m in markers):
            has_lock = os.path.exists(os.path.join(HERE, "package-lock.json"))
            cmd = ["npm", "ci" if has_lock else "install", "--no-audit", "--no-fund", "--loglevel=error"]
            p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                raise RuntimeError("%s failed in %s:\n%s%s" % (" ".join(cmd), HERE, p.stdout, p.stderr))
    _NPM_READY = True


# ---------------------------------------------------------------------------
# The daemon process


class Daemon:
    """One running event-router with its stderr (the log) captured to a file."""

    def __init__(self, argv: List[str], log_path: str, out_path: str, env: Dict[str, str], cwd: str):
        self.argv = argv
        self.log_path = log_path
        self.out_path = out_path
        self._err = open(log_path, "wb")
        self._out = open(out_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                     env=env, cwd=cwd)
        self.returncode: Optional[int] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stdout(self) -> str:
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def lines(self) -> List[str]:
        return self.log().splitlines()

    def records(self, msg: Optional[str] = None, **fields: str) -> List[LogRecord]:
        """Parsed log records, filtered by message and exact field values."""
        out = []
        for line in self.lines():
            r = parse_log_line(line)
            if r is None or (msg is not None and r.msg != msg):
                continue
            if all(r.fields.get(k) == str(v) for k, v in fields.items()):
                out.append(r)
        return out

    def sanitizer_report(self) -> Optional[str]:
        """The start of an ASan/LSan/UBSan report in this daemon's log, or None."""
        return sanitizer_report(self.log())

    def tail(self, n: int = 60) -> str:
        lines = self.lines()
        return "\n".join(lines[-n:])

    def running(self) -> bool:
        return self.poll() is None

    def poll(self) -> Optional[int]:
        rc = self.proc.poll()
        if rc is not None:
            self.returncode = rc
            self._close()
        return rc

    def _close(self) -> None:
        for f in (self._err, self._out):
            try:
                f.close()
            except Exception:
                pass

    async def wait_for_log(self, pattern: str, timeout: float = 20.0, start: int = 0) -> "re.Match":
        """Waits until a log line matches `pattern` (re.M; searched from
        character `start` of the log). Fails early if the daemon exits."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.poll() is not None
            m = rx.search(self.log(), start)
            if m:
                return m
            if exited:
                raise AssertionError("daemon exited (status %s) before logging /%s/; log:\n%s"
                                     % (self.returncode, pattern, self.tail()))
            if time.monotonic() > deadline:
                raise AssertionError("no log line matched /%s/ within %.0fs; log:\n%s"
                                     % (pattern, timeout, self.tail()))
            await asyncio.sleep(0.05)

    async def wait_for_record(self, msg: str, timeout: float = 20.0, count: int = 1, **fields: str) -> List[LogRecord]:
        """Waits for at least `count` parsed log records with this message and fields."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.poll() is not None
            recs = self.records(msg, **fields)
            if len(recs) >= count:
                return recs
            if exited or time.monotonic() > deadline:
                raise AssertionError("%s: wanted %d log record(s) msg=%r %r, found %d; log:\n%s"
                                     % ("daemon exited (status %s)" % self.returncode if exited else "timeout",
                                        count, msg, fields, len(recs), self.tail()))
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float = 30.0) -> Optional[int]:
        """The exit status, or None if still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.poll()
            if rc is not None:
                return rc
            await asyncio.sleep(0.05)
        return self.poll()

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.poll() is None:
            self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Sends `sig` and returns the exit status (negative = killed by a
        signal). Fails if the daemon does not exit within `timeout`."""
        self.send_signal(sig)
        rc = await self.wait_exit(timeout)
        if rc is None:
            self.kill()
            raise AssertionError("daemon did not exit within %.0fs of signal %d; log:\n%s" % (timeout, sig, self.tail()))
        return rc

    def kill(self) -> None:
        if self.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.poll()


def run_check(config_path: Optional[str], env: Optional[Dict[str, str]] = None, extra_args=(),
              timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs `event-router [--config FILE] --check` and returns the result (text)."""
    argv = [BINARY]
    if config_path is not None:
        argv += ["--config", config_path]
    argv += ["--check", *extra_args]
    e = dict(os.environ if env is None else env)
    e.pop("EVENT_ROUTER_PLUGIN_DIR", None)
    p = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    report = sanitizer_report(p.stderr)
    if report:
        raise AssertionError("sanitizer report from %s:\n%s" % (" ".join(argv), report))
    return p


_RETRY_SUPPORTED: Optional[bool] = None


def retry_config_supported() -> bool:
    """Whether this daemon accepts a queue-level `retry:` block (delayed
    retries). Decided once per process with `--check` on a tiny config."""
    global _RETRY_SUPPORTED
    if _RETRY_SUPPORTED is None:
        d = tempfile.mkdtemp(prefix="er-it-probe-")
        try:
            path = os.path.join(d, "probe.yaml")
            with open(path, "w") as f:
                f.write(to_yaml({
                    "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/"},
                    "exchange": {"name": "it-probe.events", "type": "topic"},
                    "queues": [{"name": "it-probe.q", "bindings": ["x.*"], "retry": {"max_attempts": 1},
                                "handlers": [{"name": "h", "events": ["#"], "exec": ["/bin/true"]}]}],
                }))
            _RETRY_SUPPORTED = run_check(path).returncode == 0
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return _RETRY_SUPPORTED


def no_retry() -> Dict[str, Any]:
    """Queue settings that make a retry verdict dead-letter at once: `retry:
    {max_attempts: 1}` where the daemon knows retries, nothing otherwise."""
    return {"retry": {"max_attempts": 1}} if retry_config_supported() else {}


# A retry verdict (exit 3/75, signal, timeout) that ends in the DLQ: at once
# before retries existed ("handler_failed"), after the last attempt now
# ("max_attempts", detail "gave up after N attempts; last error: ...").
RETRY_EXHAUSTED_REASONS = ("handler_failed", "max_attempts")


# ---------------------------------------------------------------------------
# The base test case


class RouterTestCase(unittest.IsolatedAsyncioTestCase):
    """Base class: unique names, temp dir, broker connection, daemon control,
    publishing and queue inspection, cleanup."""

    maxDiff = None

    @classmethod
    def setUpClass(cls) -> None:
        if not os.access(BINARY, os.X_OK):
            msg = "daemon binary not found or not executable: %s (build it, or set ER_BINARY)" % BINARY
            if os.environ.get("ER_ALLOW_SKIP") == "1":
                raise unittest.SkipTest(msg)
            raise AssertionError(msg)

    async def asyncSetUp(self) -> None:
        short = re.sub(r"[^a-z0-9]+", "-", self._testMethodName.lower().replace("test_", "", 1)).strip("-")
        self.prefix = "it-%s-%s" % (short[:40], secrets.token_hex(3))
        self.exchange = self.prefix + ".events"
        self.tmp = tempfile.mkdtemp(prefix=self.prefix + "-")
        self._queues: List[str] = []
        self._daemons: List[Daemon] = []
        self._record_files: List[str] = []
        self.conn = await aio_pika.connect(AMQP_URL)
        self._pub_channel = None
        self._pub_exchange = None
        self.addAsyncCleanup(self._cleanup)

    # -- names and config ----------------------------------------------------

    def queue_name(self, short: str) -> str:
        """A unique queue name for this test; remembered (with .dlq) for cleanup."""
        name = "%s.%s" % (self.prefix, short)
        self.track_queue(name)
        return name

    def track_queue(self, name: str) -> None:
        for n in (name, name + ".dlq"):
            if n not in self._queues:
                self._queues.append(n)

    def record_file(self, name: str = "records") -> str:
        path = os.path.join(self.tmp, name + ".jsonl")
        self._record_files.append(path)
        return path

    def recorder(self, name: str = "rec", events=("#",), record: Optional[str] = None, args=(),
                 **extra: Any) -> Dict[str, Any]:
        """An exec handler entry running handlers/record.py. Its record file is
        `record` (default: <tmp>/<name>.jsonl), available as handler["_record"]
        until config() strips it."""
        record = record or self.record_file(name)
        if record not in self._record_files:
            self._record_files.append(record)
        h: Dict[str, Any] = {"name": name, "events": list(events), "exec": [RECORD_HANDLER, record, *args]}
        h.update(extra)
        return h

    def config(self, queues: List[Dict[str, Any]], **top: Any) -> Dict[str, Any]:
        """A full config dict for this test's exchange. Queue names are used as
        given (use queue_name() to make them) and tracked for cleanup."""
        for q in queues:
            self.track_queue(q["name"])
        cfg: Dict[str, Any] = {
            "broker": {"url": AMQP_URL, "heartbeat": "30s"},
            "exchange": {"name": self.exchange, "type": "topic"},
            "shutdown_timeout": "10s",
            # The copy key (and a dedupe store) live here: nothing outside the test.
            "state_dir": os.path.join(self.tmp, "state"),
            "queues": queues,
        }
        cfg.update(top)
        return cfg

    def write_config(self, cfg: Any, name: str = "router.yaml") -> str:
        """Writes a config (a dict, emitted as YAML, or YAML text) into the temp dir."""
        path = os.path.join(self.tmp, name)
        text = cfg if isinstance(cfg, str) else to_yaml(cfg)
        with open(path, "w") as f:
            f.write(text)
        return path

    # -- the daemon -------------------------------------------------------------

    def daemon_env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ)
        # Plugins must be found next to the binary, not through an override.
        env.pop("EVENT_ROUTER_PLUGIN_DIR", None)
        env.pop("EVENT_ROUTER_CONFIG", None)
        if extra:
            env.update(extra)
        return env

    async def start_daemon(self, config_path: Optional[str], env: Optional[Dict[str, str]] = None, args=(),
                           wait_ready: bool = True, ready_timeout: float = 30.0) -> Daemon:
        """Starts the daemon (stderr -> <tmp>/daemon-N.log) and by default
        waits for its `ready` log line."""
        n = len(self._daemons) + 1
        argv = [BINARY] + (["--config", config_path] if config_path else []) + list(args)
        d = Daemon(argv, os.path.join(self.tmp, "daemon-%d.log" % n), os.path.join(self.tmp, "daemon-%d.out" % n),
                   self.daemon_env(env), self.tmp)
        self._daemons.append(d)
        if wait_ready:
            await d.wait_for_log(READY_RE, timeout=ready_timeout)
        return d

    def assertNoPasswordLeak(self, text: str, password: str = AMQP_PASSWORD) -> None:
        if password:
            self.assertNotIn(":%s@" % password, text, "broker password appears in the output")

    # -- publishing -------------------------------------------------------------

    def make_event(self, event_type: Optional[str], payload: Optional[Dict[str, Any]] = None,
                   **fields: Any) -> Dict[str, Any]:
        """A snake_case envelope as the Python services write it."""
        agg = (event_type or "thing").split(".")[0].capitalize()
        ev: Dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "event_type": event_type,
            "aggregate_id": "agg-" + secrets.token_hex(4),
            "aggregate_type": agg,
            "correlation_id": "corr-" + str(uuid.uuid4()),
            "timestamp": utc_now_iso(),
            "version": 1,
            "payload": payload if payload is not None else {},
        }
        if event_type is None:
            del ev["event_type"]
        ev.update(fields)
        return ev

    def make_camel_event(self, event_type: str, payload: Optional[Dict[str, Any]] = None,
                         **fields: Any) -> Dict[str, Any]:
        """A camelCase envelope as the TypeScript services write it."""
        ev: Dict[str, Any] = {
            "eventId": str(uuid.uuid4()),
            "eventType": event_type,
            "aggregateId": "agg-" + secrets.token_hex(4),
            "aggregateType": event_type.split(".")[0].capitalize(),
            "timestamp": utc_now_iso(),
            "version": 1,
            "correlationId": "corr-" + str(uuid.uuid4()),
            "payload": payload if payload is not None else {},
        }
        ev.update(fields)
        return ev

    async def _exchange_for_publish(self):
        if self._pub_exchange is None or self._pub_channel is None or self._pub_channel.is_closed:
            self._pub_channel = await self.conn.channel(publisher_confirms=True)
            self._pub_exchange = await self._pub_channel.get_exchange(self.exchange, ensure=True)
        return self._pub_exchange

    async def publish_raw(self, body: bytes, routing_key: str, *, content_type: Optional[str] = "application/json",
                          message_id: Optional[str] = None, correlation_id: Optional[str] = None,
                          headers: Optional[Dict[str, Any]] = None, type: Optional[str] = None) -> bytes:
        """Publishes `body` to this test's exchange (persistent, confirmed)."""
        ex = await self._exchange_for_publish()
        msg = aio_pika.Message(body=body, content_type=content_type,
                               delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id,
                               correlation_id=correlation_id, headers=headers, type=type,
                               timestamp=datetime.now(timezone.utc))
        await ex.publish(msg, routing_key=routing_key, mandatory=False)
        return body

    async def publish(self, event: Dict[str, Any], routing_key: Optional[str] = None,
                      headers: Optional[Dict[str, Any]] = None) -> bytes:
        """Publishes a snake_case event like the Python services (aio-pika):
        routing key = event_type, message_id = event_id, correlation_id."""
        body = json.dumps(event).encode()
        return await self.publish_raw(body, routing_key or event["event_type"], message_id=event.get("event_id"),
                                      correlation_id=event.get("correlation_id"), headers=headers,
                                      type=event.get("event_type"))

    async def publish_camel(self, events: List[Dict[str, Any]], declare: bool = False) -> List[Dict[str, Any]]:
        """Publishes camelCase events with the Node amqplib publisher. Returns
        its output: [{"eventId", "routingKey", "body"}] per event."""
        await asyncio.to_thread(ensure_node_modules)
        argv = ["node", NODE_PUBLISHER, AMQP_URL, self.exchange, json.dumps(events)]
        if declare:
            argv.append("--declare")
        p = await asyncio.create_subprocess_exec(*argv, cwd=HERE, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 60)
        if p.returncode != 0:
            raise AssertionError("node publisher failed (%d): %s %s" % (p.returncode, out.decode(), err.decode()))
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]

    # -- queue inspection -------------------------------------------------------

    async def message_count(self, queue: str) -> Optional[int]:
        """Ready messages in `queue` (passive declare), or None if it doesn't exist."""
        ch = await self.conn.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
            return q.declaration_result.message_count
        except aio_pika.exceptions.ChannelClosed:
            return None
        finally:
            if not ch.is_closed:
                await ch.close()

    async def wait_message_count(self, queue: str, at_least: int, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = await self.message_count(queue)
            if n is not None and n >= at_least:
                return n
            if time.monotonic() > deadline:
                self.fail("queue %s: wanted at least %d ready message(s), have %s%s"
                          % (queue, at_least, n, self._daemon_tail()))
            await asyncio.sleep(0.1)

    async def get_all(self, queue: str, expect: Optional[int] = None, timeout: float = 20.0) -> List[GotMessage]:
        """Takes (basic.get, auto-ack) every ready message from `queue`. With
        `expect`, first waits until at least that many are there."""
        if expect:
            await self.wait_message_count(queue, expect, timeout)
        ch = await self.conn.channel()
        out: List[GotMessage] = []
        try:
            q = await ch.get_queue(queue, ensure=True)
            while True:
                m = await q.get(no_ack=True, fail=False)
                if m is None:
                    break
                out.append(GotMessage(
                    body=m.body, headers={k: _hdr(v) for k, v in (m.headers or {}).items()},
                    message_id=m.message_id, correlation_id=m.correlation_id, content_type=m.content_type,
                    delivery_mode=int(m.delivery_mode) if m.delivery_mode is not None else None,
                    type=m.type, timestamp=m.timestamp, routing_key=m.routing_key, exchange=m.exchange,
                    redelivered=bool(m.redelivered)))
        finally:
            if not ch.is_closed:
                await ch.close()
        return out

    async def queue_info(self, name: str) -> Optional[Dict[str, Any]]:
        """rabbitmqctl's view of one queue: name, durable, arguments,
        messages_ready, messages_unacknowledged, consumers (or None)."""
        rows = await asyncio.to_thread(rabbitmqctl_json, "list_queues", "name", "durable", "arguments",
                                       "messages_ready", "messages_unacknowledged", "consumers")
        for r in rows:
            if r.get("name") == name:
                return r
        return None

    async def wait_queue_counts(self, name: str, ready: int = 0, unacked: int = 0,
                                timeout: float = 15.0) -> Dict[str, Any]:
        """Polls until the queue has exactly `ready` ready and `unacked` unacked messages."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.queue_info(name)
            if info is not None and info.get("messages_ready") == ready and \
                    info.get("messages_unacknowledged") == unacked:
                return info
            if time.monotonic() > deadline:
                self.fail("queue %s: wanted ready=%d unacked=%d, have %r%s"
                          % (name, ready, unacked, info, self._daemon_tail()))
            await asyncio.sleep(0.2)

    async def exchanges(self) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(rabbitmqctl_json, "list_exchanges", "name", "type", "durable",
                                       "auto_delete", "internal")

    async def bindings(self) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(rabbitmqctl_json, "list_bindings", "source_name", "source_kind",
                                       "destination_name", "destination_kind", "routing_key")

    # -- handler records ----------------------------------------------------------

    def read_records(self, path: str, phase: str = "start") -> List[Dict[str, Any]]:
        """Lines the recording handler wrote (phase "start": one per invocation;
        "done": after a sleep). Each start record: env, body, argv, pid, time."""
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if phase is None or r.get("phase") == phase:
                        out.append(r)
        return out

    async def wait_records(self, path: str, count: int, timeout: float = 20.0,
                           phase: str = "start") -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.read_records(path, phase)
            if len(recs) >= count:
                return recs
            if time.monotonic() > deadline:
                self.fail("handler records %s: wanted %d (%s), have %d%s"
                          % (os.path.basename(path), count, phase, len(recs), self._daemon_tail()))
            await asyncio.sleep(0.05)

    # -- misc -------------------------------------------------------------------

    def _daemon_tail(self) -> str:
        if not self._daemons:
            return ""
        return "\nlast daemon log:\n" + self._daemons[-1].tail()

    def _test_failed(self) -> bool:
        """Whether this test has already failed (cleanups run after the test
        body, with their own fresh outcome, so look at the result object)."""
        result = getattr(getattr(self, "_outcome", None), "result", None)
        for entries in (getattr(result, "failures", None) or [], getattr(result, "errors", None) or []):
            if any(t is self for t, _ in entries):
                return True
        return False

    async def _cleanup(self) -> None:
        for d in self._daemons:
            d.kill()
        # Handlers a killed/timed-out daemon may have left behind (our own children's children).
        for path in self._record_files:
            for r in self.read_records(path, None):
                pid = r.get("pid")
                if not pid:
                    continue
                try:
                    with open("/proc/%d/cmdline" % pid, "rb") as f:
                        if RECORD_HANDLER.encode() not in f.read():
                            continue
                    os.kill(pid, signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        # A sanitizer report in any daemon's log fails the test, whatever the
        # test itself checked (it may never look at the exit status, or the
        # report may come from a daemon it killed or one that exited early).
        reports = [(i, d.sanitizer_report()) for i, d in enumerate(self._daemons, 1)]
        reports = [(i, r) for i, r in reports if r]
        failed = self._test_failed() or bool(reports)
        if (failed or SHOW_LOGS) and self._daemons:
            for i, d in enumerate(self._daemons, 1):
                sys.stderr.write("\n----- %s: daemon %d (%s) exit=%s log -----\n%s\n"
                                 % (self.id(), i, " ".join(d.argv[1:]), d.returncode, d.tail(200)))
        try:
            # Everything with our prefix (queues the daemon made that we did not track, too).
            names = set(self._queues)
            try:
                rows = await asyncio.to_thread(rabbitmqctl_json, "list_queues", "name")
                names.update(r["name"] for r in rows if str(r.get("name", "")).startswith(self.prefix))
            except Exception:
                pass
            for n in sorted(names):
                try:
                    ch = await self.conn.channel()
                    await ch.queue_delete(n)
                    await ch.close()
                except Exception:
                    pass
            try:
                ch = await self.conn.channel()
                await ch.exchange_delete(self.exchange)
                await ch.close()
            except Exception:
                pass
        finally:
            await self.conn.close()
        if KEEP_TMP or failed:
            sys.stderr.write("(kept temp dir %s)\n" % self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if reports:
            raise AssertionError("sanitizer report in the daemon's stderr:\n" + "\n\n".join(
                "daemon %d (%s):\n%s" % (i, self._daemons[i - 1].log_path, r) for i, r in reports))
