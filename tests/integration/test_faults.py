"""Fault injection: the real daemon against real brokers while things break.

Every scenario publishes N events with unique event_ids (persistent, with
publisher confirms) and records every event id the daemon hands to a plugin
(handlers/record_ids.c, compiled into the test's temp dir): one line
`<event_id> <unix_us> <attempt> <redelivered>` per handled event, with one
O_APPEND write() each. It then asserts that

  - every published id was handled at least once,
  - with dedupe on (`dedupe: {ttl: 1h}`, state_dir in the temp dir), exactly once,
  - nothing went to any dead-letter queue,

and prints a line `FAULT-RESULT <test> ...` with the event count, the
duplicates seen, and the time the daemon needed to resume after the fault
(from the record file's timestamps and the daemon's log timestamps).

Faults:
  1a  `rabbitmqctl -n NODE stop_app` / `start_app` mid-stream      (second node)
  1b  kill -9 of the node's beam.smp, then a fresh start, same data (second node)
  2   connections cut by tcp_proxy.py at random moments             (main broker)
  3   the daemon killed with SIGKILL mid-stream, then restarted     (main broker)
  4   the broker down when the daemon starts, up 10 s later         (second node)
  5   the consumed queue deleted under the daemon                   (main broker)
  6   broker.urls: a refusing first URL, a working second one       (main broker)

Broker restarts ALWAYS happen on a second RabbitMQ node that the test starts
itself (as the rabbitmq user, own node name, ports, mnesia and log dirs) and
removes afterwards; the main broker is never stopped. Every rabbitmqctl call
of this file that changes a node's state names that node with `-n`, and
refuses any node name that is not one of ours.

Timing is reported, never asserted as an upper bound (shared 2-core machine).
Run:  cd tests/integration && /usr/bin/python3 -m unittest -v test_faults
Knobs: ER_FAULT_N (events per scenario, default 2000; the proxy test uses at least 4000),
ER_FAULT_LOG_LEVEL (daemon log level, default info; debug shows dropped stale results).
"""
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from harness import (AMQP_URL, SOURCE_DIR, RouterTestCase, READY_RE, aio_pika)
from tcp_proxy import TcpProxy

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_SOURCE = os.path.join(HERE, "handlers", "record_ids.c")
N = int(os.environ.get("ER_FAULT_N", "2000"))
ROUTING_KEY = "fault.happened"
BINDING = "fault.*"
NODE_PREFIX = "erfault"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_time(ts: str) -> float:
    """`2026-11-28T04:19:35.493Z` -> unix seconds."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def summarize(xs: List[float]) -> Dict[str, Any]:
    xs = sorted(xs)
    return {"n": len(xs), "min": xs[0], "p10": xs[len(xs) // 10], "p50": xs[len(xs) // 2],
            "p90": xs[len(xs) * 9 // 10], "max": xs[-1]}


def result_line(test: str, **fields: Any) -> None:
    parts = []
    for k, v in fields.items():
        if isinstance(v, float):
            v = "%.3f" % v
        parts.append("%s=%s" % (k, json.dumps(v) if isinstance(v, (list, dict)) else v))
    sys.stderr.write("\nFAULT-RESULT %s %s\n" % (test, " ".join(parts)))
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# A second RabbitMQ node (broker restarts never touch the main broker)
#
# tests/integration/broker_node.py (BrokerNode) when it is there; otherwise the
# minimal stand-in below, with the same small API: url, nodename, proc,
# start(), ctl(*args) -> stdout, close().

try:
    from broker_node import BrokerNode as _NodeClass
except ImportError:  # pragma: no cover - only without broker_node.py
    _NodeClass = None


class _MinimalNode:
    """A throwaway node as the rabbitmq user: own name, ports, mnesia and log
    dirs under a temp dir that survives restarts."""

    def __init__(self) -> None:
        self.nodename = "%s%s@localhost" % (NODE_PREFIX, secrets.token_hex(3))
        self.port, self.dist_port = free_port(), free_port()
        self.base = tempfile.mkdtemp(prefix="er-fault-node-")
        os.chmod(self.base, 0o755)
        for sub in ("mnesia", "log"):
            os.makedirs(os.path.join(self.base, sub))
        for name, text in (("enabled_plugins", "[].\n"), ("rabbitmq-env.conf", ""), ("advanced.config", "[].\n"),
                           ("rabbitmq.conf", "listeners.tcp.default = %d\n" % self.port)):
            with open(os.path.join(self.base, name), "w") as f:
                f.write(text)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", self.base], check=True)
        self.url = "amqp://guest:guest@127.0.0.1:%d/" % self.port
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 90) -> None:
        b = self.base
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/var/lib/rabbitmq", "LANG": "C.UTF-8",
               "RABBITMQ_NODENAME": self.nodename, "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": os.path.join(b, "mnesia"),
               "RABBITMQ_LOG_BASE": os.path.join(b, "log"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(b, "enabled_plugins"),
               "RABBITMQ_CONF_ENV_FILE": os.path.join(b, "rabbitmq-env.conf"),
               "RABBITMQ_CONFIG_FILE": os.path.join(b, "rabbitmq.conf"),
               "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(b, "advanced.config")}
        with open(os.path.join(b, "server.out"), "ab") as out:
            self.proc = subprocess.Popen(["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=env, cwd=b,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         user="rabbitmq", group="rabbitmq", extra_groups=[],
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while subprocess.run(["rabbitmqctl", "-n", self.nodename, "await_startup", "--timeout", "10"],
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("node %s did not start" % self.nodename)
            time.sleep(0.5)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        p = subprocess.run(["rabbitmqctl", "-n", self.nodename, *args], capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError("rabbitmqctl -n %s %s failed: %s%s" % (self.nodename, " ".join(args), p.stdout,
                                                                     p.stderr))
        return p.stdout

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.ctl("stop")
            except Exception:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def new_node():
    return _NodeClass() if _NodeClass is not None else _MinimalNode()


def node_ctl(node, *args: str, timeout: float = 90) -> str:
    """rabbitmqctl -n <our node>; refuses the main broker's name."""
    if node.nodename.startswith("rabbit@") or not node.nodename:
        raise AssertionError("refusing to act on node %r" % node.nodename)
    return node.ctl(*args, timeout=timeout)


def kill9_beam(node) -> int:
    """kill -9 of the node's beam.smp (pid from the node itself, checked in
    /proc); waits until it is gone and its start script has exited."""
    pid = int(node_ctl(node, "eval", "os:getpid().").strip().strip('"'))
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        cmd = f.read()
    with open("/proc/%d/environ" % pid, "rb") as f:
        environ = f.read().split(b"\0")
    if b"beam" not in cmd or ("RABBITMQ_NODENAME=" + node.nodename).encode() not in environ:
        raise AssertionError("pid %d is not the beam of %s: %r" % (pid, node.nodename, cmd[:200]))
    os.kill(pid, signal.SIGKILL)
    t_kill = time.time()
    if node.proc is not None:
        node.proc.wait(30)  # rabbitmq-server (sh) waits on its beam: exits right after it
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid, t_kill


def node_queue_counts(node, queue: str) -> Optional[Tuple[int, int]]:
    out = node_ctl(node, "list_queues", "-q", "--formatter", "json", "name", "messages_ready",
                   "messages_unacknowledged").strip()
    for r in json.loads(out) if out else []:
        if r["name"] == queue:
            return r["messages_ready"], r["messages_unacknowledged"]
    return None


# ---------------------------------------------------------------------------


def read_recs(path: str) -> List[Tuple[str, float, int, int]]:
    """(event_id, unix seconds, attempt, redelivered) per handled event."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4:
                out.append((parts[0], int(parts[1]) / 1e6, int(parts[2]), int(parts[3])))
    return out


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


class FaultTestCase(RouterTestCase):

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        self.plugin = os.path.join(self.tmp, "librecord_ids.so")
        p = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden",
                            "-I" + os.path.join(SOURCE_DIR, "include"), "-o", self.plugin, PLUGIN_SOURCE],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError("compiling record_ids.c failed:\n" + p.stderr)
        self._conns: List[Any] = []

    # -- helpers --------------------------------------------------------------------

    def second_node(self):
        node = new_node()

        async def destroy():
            await asyncio.to_thread(node.close)

        self.addAsyncCleanup(destroy)
        return node

    def fault_config(self, url, queue: str, record: str, dedupe: bool, sleep_us: int = 0,
                     prefetch: int = 20, workers: int = 2, urls: Optional[List[str]] = None) -> Dict[str, Any]:
        q: Dict[str, Any] = {
            "name": queue,
            "bindings": [BINDING],
            "prefetch": prefetch,
            "handlers": [{"name": "rec", "events": ["#"], "plugin": self.plugin,
                          "config": {"file": record, "sleep_us": sleep_us}}],
        }
        if dedupe:
            q["dedupe"] = {"ttl": "1h"}
        cfg = self.config([q], workers=workers, log={"level": os.environ.get("ER_FAULT_LOG_LEVEL", "info")})
        broker: Dict[str, Any] = {"heartbeat": "5s", "reconnect": {"initial": "200ms", "max": "2s"}}
        if urls:
            broker["urls"] = urls
        else:
            broker["url"] = url
        cfg["broker"] = broker
        if dedupe:
            cfg["state_dir"] = os.path.join(self.tmp, "state")
        return cfg

    async def connect(self, url: str):
        c = await aio_pika.connect(url)
        self._conns.append(c)

        async def close():
            try:
                await c.close()
            except Exception:
                pass

        self.addAsyncCleanup(close)
        return c

    async def declare(self, url: str, queue: str) -> None:
        """The exchange, the queue and its binding as the daemon declares them
        (durable topic exchange, plain durable queue)."""
        conn = await self.connect(url)
        ch = await conn.channel()
        ex = await ch.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(queue, durable=True)
        await q.bind(ex, BINDING)
        await ch.close()

    async def publish_n(self, url: str, n: int, tag: str = "") -> List[str]:
        """Publishes n events (persistent, confirmed) to the test's exchange on
        `url`; returns their event ids."""
        conn = await self.connect(url)
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(self.exchange, ensure=True)
        ids = ["%s%s-%06d-%s" % (self.prefix, tag, i, secrets.token_hex(4)) for i in range(n)]

        async def one(eid: str) -> None:
            ev = self.make_event(ROUTING_KEY, {"n": eid}, event_id=eid)
            await ex.publish(aio_pika.Message(body=json.dumps(ev).encode(), content_type="application/json",
                                              delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=eid),
                             routing_key=ROUTING_KEY)

        for i in range(0, n, 250):
            await asyncio.gather(*(one(e) for e in ids[i:i + 250]))
        await ch.close()
        return ids

    async def ready_count(self, url: str, queue: str) -> Optional[int]:
        conn = await self.connect(url)
        ch = await conn.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
            return q.declaration_result.message_count
        except aio_pika.exceptions.ChannelClosed:
            return None
        finally:
            if not ch.is_closed:
                await ch.close()

    async def wait_lines(self, path: str, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while count_lines(path) < n:
            if time.monotonic() > deadline:
                self.fail("record file has %d lines, wanted %d%s" % (count_lines(path), n, self._daemon_tail()))
            await asyncio.sleep(0.01)

    async def wait_all_handled(self, path: str, ids: List[str], timeout: float = 120) -> None:
        want = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            seen = {r[0] for r in read_recs(path)}
            missing = want - seen
            if not missing:
                return
            if time.monotonic() > deadline:
                self.fail("%d of %d ids never handled (e.g. %s)%s"
                          % (len(missing), len(want), sorted(missing)[:3], self._daemon_tail()))
            await asyncio.sleep(0.2)

    async def wait_settled(self, counts_fn, timeout: float = 60) -> Tuple[int, int]:
        """Polls counts_fn() -> (ready, unacked) until both are 0."""
        deadline = time.monotonic() + timeout
        while True:
            c = await counts_fn()
            if c == (0, 0):
                return c
            if time.monotonic() > deadline:
                self.fail("queue not settled: (ready, unacked) = %r%s" % (c, self._daemon_tail()))
            await asyncio.sleep(0.3)

    def main_counts(self, queue: str):
        async def f():
            info = await self.queue_info(queue)
            if info is None:
                return None
            return info["messages_ready"], info["messages_unacknowledged"]
        return f

    def node_counts(self, node, queue: str):
        async def f():
            return await asyncio.to_thread(node_queue_counts, node, queue)
        return f

    def check_records(self, path: str, ids: List[str], dedupe: bool,
                      ref_times: Optional[List[float]] = None) -> Dict[str, Any]:
        """At least once (asserted here). Returns the figures; the caller
        prints them and then calls assert_exactly_once when dedupe is on.
        ref_times: fault moments (e.g. the daemon's `connection lost` log
        times); each duplicate's first handling is reported in ms relative to
        the nearest one (positive: it finished after that moment)."""
        recs = read_recs(path)
        counts = Counter(r[0] for r in recs)
        published = set(ids)
        missing = [i for i in ids if counts[i] == 0]
        unknown = [i for i in counts if i not in published]
        dups = {i: c for i, c in counts.items() if c > 1}
        self.assertEqual(missing, [], "ids never handled")
        self.assertEqual(unknown, [], "handled ids that were never published")
        figs: Dict[str, Any] = {"handled": len(recs), "unique": len(counts),
                                "duplicates": sum(c - 1 for c in dups.values()), "dup_ids": len(dups)}
        if ref_times and dups:
            first = {}
            for eid, ts, _, _ in recs:
                if eid in dups and eid not in first:
                    first[eid] = ts
            offs = sorted(round(min((t - r for r in ref_times), key=abs) * 1000, 1) for t in first.values())
            figs["dup_first_handled_ms_vs_fault"] = offs if len(offs) <= 30 else summarize(offs)
            figs["dups_first_handled_after_fault"] = sum(1 for o in offs if o >= -1.0)
        self._dups = dups
        return figs

    def assert_exactly_once(self, figs: Dict[str, Any]) -> None:
        dups = getattr(self, "_dups", {})
        self.assertEqual(figs["duplicates"], 0, "dedupe on, yet %d id(s) handled more than once: %s"
                         % (len(dups), sorted(dups.items())[:5]))

    def log_events(self, daemon, msg: str, after: float = 0.0) -> List[float]:
        return [log_time(r.time) for r in daemon.records(msg) if log_time(r.time) >= after]

    def first_record_after(self, path: str, t: float) -> Optional[float]:
        ts = [r[1] for r in read_recs(path) if r[1] >= t]
        return min(ts) if ts else None

    def longest_gap(self, path: str) -> float:
        ts = sorted(r[1] for r in read_recs(path))
        return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)

    # -- 1: broker restarts on a second node ---------------------------------------

    async def _broker_restart(self, node, how: str, dedupe: bool, n: int) -> Dict[str, Any]:
        tag = "dd" if dedupe else "nd"
        queue = self.queue_name(tag)
        record = os.path.join(self.tmp, "records-%s.txt" % tag)
        await self.declare(node.url, queue)
        ids = await self.publish_n(node.url, n, tag)
        cfg = self.fault_config(node.url, queue, record, dedupe, sleep_us=4000)
        d = await self.start_daemon(self.write_config(cfg, "router-%s.yaml" % tag))
        await self.wait_lines(record, int(n * 0.3))
        t_fault = time.time()
        at = count_lines(record)
        if how == "stop_app":
            await asyncio.to_thread(node_ctl, node, "stop_app")
            t_down = time.time()
            await asyncio.sleep(3)  # down long enough for the backoff to grow
            t_restart = time.time()
            await asyncio.to_thread(node_ctl, node, "start_app")
        else:
            pid, t_fault = await asyncio.to_thread(kill9_beam, node)  # the fault is the kill itself
            t_down = time.time()
            self.assertFalse(os.path.exists("/proc/%d" % pid), "beam %d still there" % pid)
            await asyncio.sleep(1)
            t_restart = time.time()
            await asyncio.to_thread(node.start)  # same name, ports and data dir
        t_up = time.time()
        await self.wait_all_handled(record, ids)
        await self.wait_settled(self.node_counts(node, queue))
        await asyncio.sleep(0.5)
        self.assertEqual(await self.ready_count(node.url, queue + ".dlq"), 0, "events in the DLQ")
        self.assertTrue(d.running(), "daemon exited")
        readies = self.log_events(d, "ready", after=t_fault)
        lost = self.log_events(d, "connection lost", after=t_fault - 0.01)
        figs = self.check_records(record, ids, dedupe, ref_times=lost[:1])
        self.assertTrue(readies, "no `ready` after the fault")
        first = self.first_record_after(record, readies[0])
        figs.update({
            "events": n, "fault_at_handled": at, "dedupe": dedupe, "fault": how,
            "detect_s": (lost[0] - t_fault) if lost else None,
            "broker_down_s": t_up - t_down,
            "broker_start_s": t_up - t_restart,
            "ready_after_up_s": readies[0] - t_up,
            "resume_after_up_s": first - t_up,
            "fault_to_resume_s": first - t_fault,
            "reconnect_attempts": len(self.log_events(d, "broker unavailable, retrying", after=t_fault)),
            "longest_record_gap_s": self.longest_gap(record),
        })
        await d.stop()
        return figs

    async def _run_restart(self, how: str) -> None:
        node = self.second_node()
        await asyncio.to_thread(node.start)
        for dedupe in (False, True):
            with self.subTest(dedupe=dedupe):
                figs = await self._broker_restart(node, how, dedupe, N)
                result_line(self._testMethodName, **figs)
                if dedupe:
                    self.assert_exactly_once(figs)

    async def test_broker_stop_app_start_app(self):
        await self._run_restart("stop_app")

    async def test_broker_kill9_and_fresh_start(self):
        await self._run_restart("kill9")

    # -- 2: connections cut by a proxy -------------------------------------------------

    async def _proxy_cuts(self, dedupe: bool, n: int) -> Dict[str, Any]:
        tag = "dd" if dedupe else "nd"
        queue = self.queue_name(tag)
        record = os.path.join(self.tmp, "records-%s.txt" % tag)
        u = AMQP_URL.split("@", 1)[1].split("/", 1)[0]
        host, port = (u.rsplit(":", 1) + ["5672"])[:2]
        proxy = TcpProxy(host, int(port)).start()
        self.addCleanup(proxy.stop)
        creds = AMQP_URL.split("//", 1)[1].split("@", 1)[0]
        url = "amqp://%s@127.0.0.1:%d/" % (creds, proxy.port)
        await self.declare(AMQP_URL, queue)
        half = n // 2
        ids = await self.publish_n(AMQP_URL, half, tag + "a")
        cfg = self.fault_config(url, queue, record, dedupe, sleep_us=2000)
        d = await self.start_daemon(self.write_config(cfg, "router-%s.yaml" % tag))
        await self.wait_lines(record, int(half * 0.1))
        proxy.start_random_cuts(0.5, 2.0)
        # the second half goes straight to the broker while the cuts go on
        ids += await self.publish_n(AMQP_URL, n - half, tag + "b")
        # keep cutting until everything was handled, and at least 5 cuts
        want = set(ids)
        deadline = time.monotonic() + 120
        while True:
            cuts = [c for c in proxy.cuts if c[1] > 0]
            if len(cuts) >= 5 and want <= {r[0] for r in read_recs(record)}:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        proxy.stop_random_cuts()
        await self.wait_all_handled(record, ids)
        await self.wait_settled(self.main_counts(queue))
        await asyncio.sleep(0.5)
        self.assertEqual(await self.message_count(queue + ".dlq"), 0, "events in the DLQ")
        self.assertTrue(d.running(), "daemon exited")
        figs = self.check_records(record, ids, dedupe, ref_times=[c[0] for c in proxy.cuts if c[1] > 0])
        readies = self.log_events(d, "ready")
        resumes = []
        for t_cut, k in proxy.cuts:
            if k == 0:
                continue
            later = [r for r in readies if r >= t_cut]
            if not later:
                continue
            first = self.first_record_after(record, later[0])
            if first is not None:
                resumes.append(round(first - t_cut, 3))
        effective = [c for c in proxy.cuts if c[1] > 0]
        self.assertGreaterEqual(len(effective), 3, "too few cuts hit a live connection")
        figs.update({
            "events": n, "dedupe": dedupe, "cuts": len(proxy.cuts), "cuts_with_connection": len(effective),
            "proxy_connections": proxy.accepted,
            "reconnects": len(readies) - 1,
            "resume_after_cut_s": resumes,
            "resume_max_s": max(resumes) if resumes else None,
            "longest_record_gap_s": self.longest_gap(record),
        })
        await d.stop()
        return figs

    async def test_connections_cut_by_proxy(self):
        for dedupe in (False, True):
            with self.subTest(dedupe=dedupe):
                figs = await self._proxy_cuts(dedupe, max(N, 4000))
                result_line(self._testMethodName, **figs)
                if dedupe:
                    self.assert_exactly_once(figs)

    async def test_silent_partition_detected_by_heartbeat(self):
        """The proxy stops forwarding on the live connection without closing
        it (no RST/FIN): only heartbeats (5 s) can tell. New connections pass."""
        queue = self.queue_name("q")
        record = os.path.join(self.tmp, "records.txt")
        u = AMQP_URL.split("@", 1)[1].split("/", 1)[0]
        host, port = (u.rsplit(":", 1) + ["5672"])[:2]
        proxy = TcpProxy(host, int(port)).start()
        self.addCleanup(proxy.stop)
        creds = AMQP_URL.split("//", 1)[1].split("@", 1)[0]
        url = "amqp://%s@127.0.0.1:%d/" % (creds, proxy.port)
        await self.declare(AMQP_URL, queue)
        n = N
        ids = await self.publish_n(AMQP_URL, n)
        cfg = self.fault_config(url, queue, record, dedupe=False, sleep_us=2000)
        d = await self.start_daemon(self.write_config(cfg))
        await self.wait_lines(record, int(n * 0.3))
        t_freeze = time.time()
        frozen = proxy.freeze_current()
        self.assertEqual(frozen, 1)
        await d.wait_for_record("connection lost", timeout=60)
        t_lost = log_time(d.records("connection lost")[0].time)
        await self.wait_all_handled(record, ids, timeout=180)
        proxy.cut_all()  # the frozen one; the broker requeues what it still held
        await self.wait_settled(self.main_counts(queue), timeout=90)
        await asyncio.sleep(0.5)
        self.assertEqual(await self.message_count(queue + ".dlq"), 0)
        readies = self.log_events(d, "ready", after=t_freeze)
        self.assertTrue(readies)
        first = self.first_record_after(record, readies[0])
        figs = self.check_records(record, ids, dedupe=False, ref_times=[t_freeze])
        figs.update({"events": n, "heartbeat_s": 5, "detect_s": t_lost - t_freeze,
                     "resume_after_freeze_s": first - t_freeze,
                     "lost_reason": d.records("connection lost")[0].fields.get("reason")})
        result_line(self._testMethodName, **figs)
        self.assertTrue(d.running())
        await d.stop()

    # -- 3: the daemon killed with SIGKILL ------------------------------------------------

    async def _daemon_kill(self, dedupe: bool, n: int, kills=(0.15, 0.3, 0.45, 0.6, 0.75)) -> Dict[str, Any]:
        tag = "dd" if dedupe else "nd"
        queue = self.queue_name(tag)
        record = os.path.join(self.tmp, "records-%s.txt" % tag)
        await self.declare(AMQP_URL, queue)
        ids = await self.publish_n(AMQP_URL, n, tag)
        cfg = self.fault_config(AMQP_URL, queue, record, dedupe, sleep_us=2000)
        path = self.write_config(cfg, "router-%s.yaml" % tag)
        d = await self.start_daemon(path)
        kill_times, resumes = [], []
        for frac in kills:
            await self.wait_lines(record, int(n * frac))
            t_kill = time.time()
            d.send_signal(signal.SIGKILL)
            rc = await d.wait_exit(10)
            self.assertEqual(rc, -signal.SIGKILL)
            kill_times.append(t_kill)
            d = await self.start_daemon(path)
            await self.wait_lines(record, count_lines(record) + 1)
            first = self.first_record_after(record, t_kill + 1e-6)
            resumes.append(round(first - t_kill, 3))
        await self.wait_all_handled(record, ids)
        await self.wait_settled(self.main_counts(queue))
        await asyncio.sleep(0.5)
        self.assertEqual(await self.message_count(queue + ".dlq"), 0, "events in the DLQ")
        figs = self.check_records(record, ids, dedupe, ref_times=kill_times)
        figs.update({"events": n, "dedupe": dedupe, "kills": len(kills), "resume_after_kill_s": resumes})
        if dedupe:
            figs["dedupe_commit_window_ms"] = 100
        result_line(self._testMethodName, **figs)
        self.assertTrue(d.running())
        await d.stop()
        return figs

    async def test_daemon_sigkill_and_restart(self):
        for dedupe in (False, True):
            with self.subTest(dedupe=dedupe):
                figs = await self._daemon_kill(dedupe, N)
                if dedupe and figs["duplicates"]:
                    # The documented window (dedupe/store.hpp): records are committed every
                    # 100 ms, so an id handled in the last ~100 ms before SIGKILL may run
                    # again. Duplicates are reported in the FAULT-RESULT line (offsets in ms,
                    # negative = first handled before the kill); outside that window, fail.
                    offs = figs["dup_first_handled_ms_vs_fault"]
                    offs = offs if isinstance(offs, list) else [offs["min"], offs["max"]]
                    outside = [o for o in offs if not -150.0 <= o <= 5.0]
                    self.assertEqual(outside, [], "dedupe on: duplicates first handled outside the last "
                                                  "~100 ms before a SIGKILL (ms vs kill): %s" % offs)

    # -- 4: broker down when the daemon starts ------------------------------------------

    async def test_broker_down_at_start(self):
        node = self.second_node()  # not started yet: nothing listens on its port
        queue = self.queue_name("q")
        record = os.path.join(self.tmp, "records.txt")
        cfg = self.fault_config(node.url, queue, record, dedupe=False)
        d = await self.start_daemon(self.write_config(cfg), wait_ready=False)
        await d.wait_for_record("broker unavailable, retrying", timeout=10)
        await asyncio.sleep(10)
        self.assertTrue(d.running(), "the daemon gave up while the broker was down:\n" + d.tail())
        retries_down = len(d.records("broker unavailable, retrying"))
        self.assertEqual(d.records("ready"), [])
        t_start = time.time()
        await asyncio.to_thread(node.start)
        t_up = time.time()
        await d.wait_for_log(READY_RE, timeout=30)
        t_ready = log_time(d.records("ready")[0].time)
        n = max(2000, N // 2)
        ids = await self.publish_n(node.url, n)
        await self.wait_all_handled(record, ids)
        await self.wait_settled(self.node_counts(node, queue))
        self.assertEqual(await self.ready_count(node.url, queue + ".dlq"), 0)
        figs = self.check_records(record, ids, dedupe=False)
        self.assertEqual(figs["duplicates"], 0)
        figs.update({"events": n, "retries_while_down": retries_down, "broker_start_s": t_up - t_start,
                     "ready_after_up_s": t_ready - t_up})
        result_line(self._testMethodName, **figs)
        await d.stop()

    # -- 5: the queue deleted while consumed -------------------------------------------------

    async def test_queue_deleted_while_consuming(self):
        queue = self.queue_name("q")
        record = os.path.join(self.tmp, "records.txt")
        cfg = self.fault_config(AMQP_URL, queue, record, dedupe=False, sleep_us=2000)
        await self.declare(AMQP_URL, queue)
        n1 = 2000
        before = await self.publish_n(AMQP_URL, n1, "pre")
        d = await self.start_daemon(self.write_config(cfg))
        await self.wait_lines(record, int(n1 * 0.3))
        t_del = time.time()
        ch = await self.conn.channel()
        await ch.queue_delete(queue)
        await ch.close()
        handled_at_delete = count_lines(record)
        await d.wait_for_record("consuming", count=2, timeout=30, queue=queue)
        t_back = log_time(d.records("consuming", queue=queue)[1].time)
        # the queue is back, with its binding: these are routed and handled
        n2 = max(2000, N)
        ids = await self.publish_n(AMQP_URL, n2, "post")
        await self.wait_all_handled(record, ids)
        await self.wait_settled(self.main_counts(queue))
        await asyncio.sleep(0.3)
        self.assertEqual(await self.message_count(queue + ".dlq"), 0)
        recs = read_recs(record)
        counts = Counter(r[0] for r in recs)
        post = [i for i in ids if counts[i] != 1]
        self.assertEqual(post, [], "events published after the re-declare not handled exactly once")
        lost_pre = sum(1 for i in before if counts[i] == 0)
        figs = {"events_before": n1, "handled_before_delete": handled_at_delete,
                "deleted_with_queue": lost_pre, "events_after": n2,
                "redeclared_after_s": t_back - t_del,
                "channel_lost_logged": len(d.records("queue channel lost, recovering")),
                "connection_lost_logged": len(d.records("connection lost"))}
        result_line(self._testMethodName, **figs)
        self.assertTrue(d.running())
        await d.stop()

    # -- 6: broker.urls failover ---------------------------------------------------------

    async def test_urls_first_refuses_second_works(self):
        queue = self.queue_name("q")
        record = os.path.join(self.tmp, "records.txt")
        closed = free_port()  # nothing listens there
        creds = AMQP_URL.split("//", 1)[1].split("@", 1)[0]
        bad = "amqp://%s@127.0.0.1:%d/" % (creds, closed)
        cfg = self.fault_config(None, queue, record, dedupe=False, urls=[bad, AMQP_URL])
        t0 = time.time()
        d = await self.start_daemon(self.write_config(cfg))
        ready = d.records("ready")[0]
        self.assertNotIn(":%d/" % closed, ready.fields.get("broker", ""))
        refused = d.records("broker unavailable, retrying")
        self.assertGreaterEqual(len(refused), 1)
        self.assertIn(":%d" % closed, refused[0].fields.get("reason", ""))
        n = max(2000, N // 2)
        ids = await self.publish_n(AMQP_URL, n)
        await self.wait_all_handled(record, ids)
        await self.wait_settled(self.main_counts(queue))
        self.assertEqual(await self.message_count(queue + ".dlq"), 0)
        figs = self.check_records(record, ids, dedupe=False)
        self.assertEqual(figs["duplicates"], 0)
        figs.update({"events": n, "failed_attempts_before_ready": len(refused),
                     "ready_after_start_s": log_time(ready.time) - t0, "broker": ready.fields.get("broker")})
        result_line(self._testMethodName, **figs)
        await d.stop()


if __name__ == "__main__":
    unittest.main()
