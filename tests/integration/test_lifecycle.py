"""Lifecycle safety: the daemon stays alive, answers /healthz and pings the
watchdog while the broker misbehaves, and never strands, doubles or loses an
event across reconnects and reloads.

1. The broker stops answering in the middle of a 4 MB delivery (tcp_proxy's
   freeze_after): /healthz answers, WATCHDOG=1 keeps coming, the connection
   is dropped as stalled within rpc_timeout + slack, and after the reconnect
   the event is handled exactly once.
2. The broker stops answering mid-declare (freeze_new_after_method, right
   after exchange.declare-ok) and during the login (freeze): the daemon
   gives up within its bound and retries, /healthz 200 and /readyz 503
   meanwhile; once the broker answers again it becomes ready and handles events.
3. CONNECTION_FORCED again and again while the daemon reconnects and declares
   (an Erlang loop on the broker closes every connection of the test's own
   vhost for ~5 s): the daemon never exits, becomes ready, handles events.
4. A prefetch change on reload is visible on the broker (list_consumers).
5. A reload that retires a consumer strands none of its prefetched messages.
6. Two copies of one event in flight with dedupe on never run side by side;
   one success in total, also when the first run fails and is retried.
7. A failed reload (plugin init fails; state_dir unusable) keeps handlers,
   dedupe store and consumers working.

Timing: assertions are upper bounds only, each the configured bound plus
slack (rpc_timeout, WATCHDOG_USEC, 1 s per /healthz request).
Run:  cd tests/integration && /usr/bin/python3 -m unittest -v test_lifecycle
"""
import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import unittest
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import aio_pika

from harness import (AMQP_URL, HERE, READY_RE, SOURCE_DIR, parse_log_line, rabbitmqctl_json,
                     run_rabbitmqctl)
from broker_node import http_get, publish_events
from tcp_proxy import TcpProxy
from test_notify import NotifyTestBase

RPC_TIMEOUT_S = 2.0
STALLED_REASON = "frames stopped arriving"

TWIN_HANDLER = r'''#!/usr/bin/python3
# usage: twin.py RECORD_FILE FAIL_FLAG|-   (records start and end of each run)
import fcntl, json, os, sys, time
def append(path, rec):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)
rec, flag = sys.argv[1], sys.argv[2]
body = sys.stdin.buffer.read()
eid = json.loads(body).get("event_id")
fail = False
if flag != "-":
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        fail = True  # the very first run of this handler fails
    except FileExistsError:
        pass
append(rec, {"phase": "start", "t": time.time(), "pid": os.getpid(), "event_id": eid,
             "attempt": os.environ.get("ATTEMPT")})
time.sleep(1.0)
code = 75 if fail else 0
append(rec, {"phase": "end", "t": time.time(), "pid": os.getpid(), "event_id": eid, "exit": code})
sys.exit(code)
'''


def split_url(url: str) -> Tuple[str, str, int]:
    """(credentials, host, port) of an amqp:// URL."""
    creds, rest = url.split("//", 1)[1].split("@", 1)
    hostport = rest.split("/", 1)[0]
    host, _, port = hostport.partition(":")
    return creds, host, int(port or 5672)


def ctl_json(*args: str) -> List[Dict[str, Any]]:
    """rabbitmqctl_json, tried again when a listing fails because another
    user's queue or channel went away while it was being listed (rc 70,
    noproc): the broker is shared."""
    for i in range(6):
        try:
            return rabbitmqctl_json(*args)
        except RuntimeError:
            if i == 5:
                raise
            time.sleep(0.3)
    return []


def read_ids(path: str) -> List[str]:
    """Event ids from handlers/record_ids.c's lines `<id> <us> <attempt> <redelivered>`."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def read_tags(path: str) -> List[Tuple[str, ...]]:
    """handlers/record_tag.c's lines `<id> <tag> <queue>`."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.split()) for line in f if line.strip()]


class LifecycleTest(NotifyTestBase):
    """NotifyTestBase: listener() and a daemon env without inherited NOTIFY_SOCKET/WATCHDOG_*."""

    # -- helpers ----------------------------------------------------------------

    def compile_plugin(self, name: str) -> str:
        out = os.path.join(self.tmp, "lib%s.so" % name)
        if not os.path.exists(out):
            p = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden",
                                "-I" + os.path.join(SOURCE_DIR, "include"), "-o", out,
                                os.path.join(HERE, "handlers", name + ".c")], capture_output=True, text=True)
            if p.returncode != 0:
                raise AssertionError("compiling %s.c failed:\n%s" % (name, p.stderr))
        return out

    def proxy(self) -> Tuple[TcpProxy, str]:
        """A TcpProxy to the broker and the daemon's URL through it."""
        creds, host, port = split_url(AMQP_URL)
        p = TcpProxy(host, port).start()
        self.addCleanup(p.stop)
        return p, "amqp://%s@127.0.0.1:%d/" % (creds, p.port)

    async def http_port(self, d) -> int:
        """The port of `http: {listen: 127.0.0.1:0}`, from the `http listening` record."""
        rec = (await d.wait_for_record("http listening", timeout=20))[0]
        return int(rec.fields["port"])

    async def probe(self, port: int, path: str) -> Tuple[Optional[int], float, str]:
        """(status or None, seconds, error) of one GET with a 1 s timeout."""
        t = time.monotonic()
        try:
            st, _, body = await asyncio.to_thread(http_get, "http://127.0.0.1:%d%s" % (port, path), 1.0)
            return st, time.monotonic() - t, body.strip()
        except OSError as e:
            return None, time.monotonic() - t, repr(e)

    def ready_lines_after(self, d, start: int) -> List[str]:
        return re.findall(READY_RE, d.log()[start:])

    async def consumers(self, queue: str) -> List[Dict[str, Any]]:
        rows = await asyncio.to_thread(ctl_json, "list_consumers", "-p", "/", "queue_name", "channel_pid",
                                       "consumer_tag", "prefetch_count")
        return [r for r in rows if r.get("queue_name") == queue]

    async def channels(self) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(ctl_json, "list_channels", "pid", "connection", "number",
                                       "consumer_count", "messages_unacknowledged", "prefetch_count")

    def reload_path(self) -> str:
        return os.path.join(self.tmp, "router.yaml")

    def install(self, cfg) -> None:
        tmp = self.reload_path() + ".new"
        self.write_config(cfg, os.path.basename(tmp))
        os.replace(tmp, self.reload_path())

    async def reload(self, d, cfg, ok: bool = True, timeout: float = 30.0):
        msg = "reloaded" if ok else "reload failed; keeping the running config"
        before = len(d.records(msg))
        self.install(cfg)
        d.send_signal(signal.SIGHUP)
        return (await d.wait_for_record(msg, timeout=timeout, count=before + 1))[before]

    # -- 1: the broker stops answering mid-delivery ---------------------------------

    async def test_broker_silent_mid_delivery(self):
        proxy, url = self.proxy()
        q = self.queue_name("big")
        record = os.path.join(self.tmp, "ids.txt")
        plugin = self.compile_plugin("record_ids")
        cfg = self.config([{"name": q, "bindings": ["big.*"], "max_message_bytes": "8MiB",
                            "handlers": [{"name": "rec", "events": ["#"], "plugin": plugin,
                                          "config": {"file": record}}]}])
        cfg["broker"] = {"url": url, "heartbeat": "30s", "rpc_timeout": "2s",
                         "reconnect": {"initial": "200ms", "max": "1s"}}
        cfg["http"] = {"listen": "127.0.0.1:0"}
        ln = self.listener()
        watchdog_usec = 2_000_000
        d = await self.start_daemon(self.write_config(cfg), env=self.notify_env(ln, watchdog_usec))
        port = await self.http_port(d)
        warm = self.make_event("big.small")
        await self.publish(warm)
        await d.wait_for_record("handled", event_id=warm["event_id"], outcome="ack")

        armed = proxy.freeze_after(1_000_000)
        self.assertEqual(armed, 1, "the daemon should have one connection through the proxy")
        log_start = len(d.log())
        big = self.make_event("big.large", {"blob": "x" * (4 * 1024 * 1024)})
        t0 = time.monotonic()
        await self.publish(big)
        while proxy.held_count() < 1:
            if time.monotonic() - t0 > 15:
                self.fail("the proxy never held the 4 MB delivery (1 MB forwarded)" + self._daemon_tail())
            await asyncio.sleep(0.02)
        t_hold = time.monotonic()

        # While held and until the event is handled after the reconnect:
        # /healthz answers each request within 1 s; the watchdog keeps pinging.
        # The held connection is released only once the daemon is ready on a
        # new one (the broker gives the event back when the old one closes).
        probes: List[Tuple[float, Optional[int], float, str]] = []
        lost_at = None
        released = False
        while True:
            st, took, err = await self.probe(port, "/healthz")
            probes.append((time.monotonic() - t_hold, st, took, err))
            if lost_at is None and d.records("connection lost"):
                lost_at = time.monotonic() - t_hold
            if not released and (self.ready_lines_after(d, log_start) or
                                 time.monotonic() - t_hold > RPC_TIMEOUT_S + 10.0):
                proxy.freeze(False)
                released = True
            if read_ids(record).count(big["event_id"]) >= 1 and len(probes) >= 5:
                break
            if time.monotonic() - t_hold > RPC_TIMEOUT_S + 30.0 or not d.running():
                break
            await asyncio.sleep(0.25)
        t_end = time.monotonic()
        self.assertTrue(d.running(), "daemon exited:\n" + d.tail())
        # Every check is evaluated; the failures are reported together.
        problems = []
        lost = d.records("connection lost")
        if not lost:
            problems.append("no `connection lost` within %.0f s of the hold" % (t_end - t_hold))
        else:
            if STALLED_REASON not in lost[0].fields.get("reason", ""):
                problems.append("first `connection lost` is not the stall: " + lost[0].line)
            if lost_at > RPC_TIMEOUT_S + 5.0:
                problems.append("stalled delivery noticed %.1f s after the hold (rpc_timeout 2 s)" % lost_at)
        bad = [(round(a, 2), b, round(c, 2), e) for a, b, c, e in probes if b != 200 or c > 1.0]
        if bad:
            problems.append("/healthz requests not answered 200 within 1 s (s since hold, status, seconds, "
                            "error): %r; all probes (s, status, seconds): %r"
                            % (bad, [(round(a, 2), b, round(c, 2)) for a, b, c, _ in probes]))
        pings = [n.at for n in ln.all() if n.has("WATCHDOG", "1") and t_hold - 2.0 <= n.at <= t_end]
        edges = [t_hold] + [p for p in pings if p >= t_hold] + [t_end]
        gaps = [round(b - a, 2) for a, b in zip(edges, edges[1:])]
        if max(gaps) > watchdog_usec / 1e6:
            problems.append("WATCHDOG=1 gaps (s) from the hold on exceed WATCHDOG_USEC=2s: %r" % gaps)
        if not self.ready_lines_after(d, log_start):
            problems.append("no `ready` after the reconnect")
        handled = read_ids(record).count(big["event_id"])
        if handled == 1:
            await d.wait_for_record("handled", event_id=big["event_id"], outcome="ack", timeout=20)
            await self.wait_queue_counts(q, 0, 0, timeout=20)
            await asyncio.sleep(1.0)
            handled = read_ids(record).count(big["event_id"])
        if handled != 1:
            problems.append("the 4 MB event was handled %d time(s)" % handled)
        if problems:
            self.fail("\n".join(problems) + "\n" + d.tail(30))
        self.assertEqual(await self.message_count(q + ".dlq"), 0)
        self.assertEqual(await d.stop(), 0, d.tail())

    # -- 2: the broker stops answering mid-declare / during the login ------------------

    async def _silent_during_setup(self, hold, bound_s: float, what: str):
        proxy, url = self.proxy()
        q = self.queue_name("decl")
        rec = self.recorder("rec")
        cfg = self.config([{"name": q, "bindings": ["d.*"], "handlers": [rec]}])
        cfg["broker"] = {"url": url, "heartbeat": "30s", "rpc_timeout": "2s",
                         "reconnect": {"initial": "200ms", "max": "1s"}}
        cfg["http"] = {"listen": "127.0.0.1:0"}
        hold(proxy)
        t0 = time.monotonic()
        d = await self.start_daemon(self.write_config(cfg), wait_ready=False)
        port = await self.http_port(d)
        probes = []
        attempts_at = []
        # Two attempts given up (each within its bound), probing all along.
        while True:
            for path, want in (("/healthz", 200), ("/readyz", 503)):
                st, took, err = await self.probe(port, path)
                probes.append((round(time.monotonic() - t0, 2), path, st, round(took, 2), err[:80], want))
            n = len(d.records("broker unavailable, retrying"))
            while len(attempts_at) < n:
                attempts_at.append(time.monotonic() - t0)
            if n >= 2 or not d.running() or time.monotonic() - t0 > 30:
                break
            await asyncio.sleep(0.2)
        self.assertTrue(d.running(), "daemon exited:\n" + d.tail())
        self.assertEqual(d.records("ready"), [], "ready although the broker never answered:\n" + d.tail())
        self.assertGreaterEqual(len(attempts_at), 1, "the daemon did not give up %s within 30 s:\n%s"
                                % (what, d.tail()))
        # Every check is evaluated; the failures are reported together.
        problems = []
        if len(attempts_at) < 2:
            problems.append("only %d attempt given up within 30 s" % len(attempts_at))
        if attempts_at[0] > bound_s + 5.0:
            problems.append("first attempt given up %.1f s after start; the bound is %.0f s + 5 s slack (%s)"
                            % (attempts_at[0], bound_s, what))
        bad = [p for p in probes if p[2] != p[5] or p[3] > 1.0]
        if bad:
            problems.append("probes not answered as wanted within 1 s (s since start, path, status, seconds, "
                            "error, wanted): %r; %d probes in all" % (bad, len(probes)))
        reasons = [r.fields.get("reason", "") for r in d.records("broker unavailable, retrying")]

        # The broker answers again: ready, events handled.
        proxy.freeze_new_after_method(None)
        proxy.freeze(False)
        await d.wait_for_log(READY_RE, timeout=bound_s + 10)
        st, _, _ = await self.probe(port, "/readyz")
        if st != 200:
            problems.append("/readyz %s once ready" % st)
        ev = self.make_event("d.after")
        await self.publish(ev)
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await asyncio.sleep(0.5)
        recs = self.read_records(rec["exec"][1])
        if len(recs) != 1:
            problems.append("the event after recovery ran %d times" % len(recs))
        if problems:
            self.fail("%s:\n%s\n%s" % (what, "\n".join(problems), d.tail(40)))
        self.assertEqual(await d.stop(), 0, d.tail())
        return reasons

    async def test_broker_silent_mid_declare(self):
        # Hold every new connection right after the broker's exchange.declare-ok:
        # the queue declare gets no answer.
        reasons = await self._silent_during_setup(lambda p: p.freeze_new_after_method(40, 11),
                                                     RPC_TIMEOUT_S, "mid-declare (rpc_timeout 2 s)")
        self.assertTrue(any("queue" in r for r in reasons), reasons)

    async def test_broker_silent_during_login(self):
        # Frozen from the TCP accept on: connection.start never arrives. The
        # login is a broker call from the event loop too (consume/link.hpp:
        # "Every broker call it makes is bounded by broker.rpc_timeout");
        # rabbitmq-c's own login default would be 12 s.
        await self._silent_during_setup(lambda p: p.freeze(True), RPC_TIMEOUT_S, "login (rpc_timeout 2 s)")

    # -- 3: CONNECTION_FORCED while reconnecting and declaring ---------------------------

    async def test_connection_forced_during_reconnects(self):
        vhost = self.prefix + "-vh"
        await asyncio.to_thread(run_rabbitmqctl, "add_vhost", vhost)

        async def drop_vhost():
            try:
                await asyncio.to_thread(run_rabbitmqctl, "delete_vhost", vhost)
            except Exception:
                pass

        self.addAsyncCleanup(drop_vhost)
        await asyncio.to_thread(run_rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        creds, host, port = split_url(AMQP_URL)
        url = "amqp://%s@%s:%d/%s" % (creds, host, port, quote(vhost, safe=""))
        q = self.queue_name("forced")
        rec = self.recorder("rec")
        cfg = self.config([{"name": q, "bindings": ["f.*"], "handlers": [rec]}])
        cfg["broker"] = {"url": url, "heartbeat": "30s", "rpc_timeout": "2s",
                         "reconnect": {"initial": "50ms", "max": "200ms"}}
        d = await self.start_daemon(self.write_config(cfg))
        # Close every connection of the vhost every 5 ms for 5 s, on the broker.
        expr = ('V = <<"%s">>, D = erlang:monotonic_time(millisecond) + 5000, '
                'L = fun Loop(N) -> case erlang:monotonic_time(millisecond) > D of true -> N; false -> '
                'Ps = [P || P <- rabbit_networking:connections(), '
                '(catch rabbit_networking:connection_info(P, [vhost])) =:= [{vhost, V}]], '
                '[rabbit_networking:close_connection(P, "lifecycle test") || P <- Ps], '
                'timer:sleep(5), Loop(N + length(Ps)) end end, L(0).' % vhost)
        out = await asyncio.to_thread(run_rabbitmqctl, "eval", expr)
        closes = int(out.strip())
        self.assertGreaterEqual(closes, 3, "the loop closed only %d connection(s)" % closes)
        self.assertTrue(d.running(), "daemon exited (%s) under CONNECTION_FORCED:\n%s" % (d.returncode, d.tail()))
        lost = d.records("connection lost") + d.records("broker unavailable, retrying")
        self.assertTrue(lost, d.tail())
        # Ready again after the last forced close.
        deadline = time.monotonic() + 30
        while True:
            msgs = [r.msg for r in (parse_log_line(x) for x in d.lines()) if r]
            fails = [i for i, m in enumerate(msgs) if m in ("connection lost", "broker unavailable, retrying")]
            if "ready" in msgs[(fails[-1] if fails else 0):] and d.running():
                break
            if time.monotonic() > deadline or not d.running():
                self.fail("not ready again after the forced closes (running=%s):\n%s" % (d.running(), d.tail()))
            await asyncio.sleep(0.1)
        evs = [self.make_event("f.after", {"i": i}) for i in range(5)]
        await publish_events(url, self.exchange, evs)
        for ev in evs:
            await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack", timeout=20)
        await asyncio.sleep(0.5)
        got = Counter(json.loads(r["body"])["event_id"] for r in self.read_records(rec["exec"][1]))
        self.assertEqual({e["event_id"]: got[e["event_id"]] for e in evs}, {e["event_id"]: 1 for e in evs})
        fatal = [r.line for r in (parse_log_line(x) for x in d.lines())
                 if r and r.msg != "handled" and re.search(r"exit|fatal|cannot start|gave up|stopping", r.line, re.I)]
        self.assertEqual(fatal, [], "fatal-looking records under CONNECTION_FORCED")
        forced = [r.fields.get("reason", "") for r in d.records("connection lost") +
                  d.records("broker unavailable, retrying") if "CONNECTION_FORCED" in r.fields.get("reason", "")
                  or "lifecycle test" in r.fields.get("reason", "")]
        self.assertTrue(forced, d.tail())
        sys_reasons = Counter(re.sub(r"'[^']*'", "'…'", r)[:90] for r in forced)
        sys.stderr.write("\nLIFECYCLE-RESULT forced closes=%d reasons=%s\n" % (closes, dict(sys_reasons)))
        self.assertEqual(await d.stop(), 0, d.tail())

    # -- 4: a prefetch change on reload is visible on the broker ---------------------------

    def tag_queue(self, q: str, record: str, tag: str, prefetch: int, sleep_us: int = 0,
                  concurrency: Optional[int] = None, **extra) -> Dict[str, Any]:
        h = {"name": "rec", "events": ["#"], "plugin": self.compile_plugin("record_tag"),
             "config": {"file": record, "tag": tag, "sleep_us": sleep_us}}
        if concurrency:
            h["concurrency"] = concurrency
        qd = {"name": q, "bindings": ["p.*"], "prefetch": prefetch, "handlers": [h]}
        qd.update(extra)
        return qd

    async def wait_tagged(self, record: str, ids, what: str, timeout: float = 20.0) -> None:
        """Waits until every id in `ids` is in the record_tag file `record`."""
        deadline = time.monotonic() + timeout
        while not set(ids) <= {r[0] for r in read_tags(record)}:
            if time.monotonic() > deadline:
                self.fail(what + self._daemon_tail())
            await asyncio.sleep(0.1)

    async def wait_consumers(self, q: str, prefetches: List[int], timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.consumers(q)
            if sorted(r.get("prefetch_count") for r in rows) == sorted(prefetches):
                return rows
            if time.monotonic() > deadline:
                self.fail("consumers of %s: wanted prefetch %r, have %r%s" % (q, prefetches, rows,
                                                                             self._daemon_tail()))
            await asyncio.sleep(0.3)

    async def test_prefetch_change_on_reload_is_visible(self):
        q = self.queue_name("pf")
        record = os.path.join(self.tmp, "tags.txt")
        self.install(self.config([self.tag_queue(q, record, "v1", 10)]))
        d = await self.start_daemon(self.reload_path())
        await self.wait_consumers(q, [10])
        ids = ["pf-%03d-%s" % (i, secrets.token_hex(3)) for i in range(60)]

        async def stream():
            for i, eid in enumerate(ids):
                await self.publish(self.make_event("p.x", {"i": i}, event_id=eid))
                await asyncio.sleep(0.02)

        pub = asyncio.create_task(stream())
        await asyncio.sleep(0.4)
        await self.reload(d, self.config([self.tag_queue(q, record, "v2", 37)]))
        await pub
        rows = await self.wait_consumers(q, [37])
        self.assertEqual(len(rows), 1, rows)
        self.assertTrue(d.records("stopped a replaced consumer", queue=q, prefetch="10"), d.tail())
        after = ["pf-late-%02d-%s" % (i, secrets.token_hex(3)) for i in range(10)]
        for eid in after:
            await self.publish(self.make_event("p.x", event_id=eid))
        want = set(ids + after)
        deadline = time.monotonic() + 30
        while not want <= {r[0] for r in read_tags(record)}:
            if time.monotonic() > deadline:
                self.fail("not all handled: missing %d" % len(want - {r[0] for r in read_tags(record)}))
            await asyncio.sleep(0.1)
        await self.wait_queue_counts(q, 0, 0)
        await asyncio.sleep(0.5)
        counts = Counter(r[0] for r in read_tags(record))
        self.assertEqual({k: v for k, v in counts.items() if v != 1}, {}, "handled more than once")
        self.assertEqual(set(counts), want)
        self.assertEqual({r[1] for r in read_tags(record) if r[0] in set(after)}, {"v2"})
        rows = await self.wait_consumers(q, [37])
        self.assertEqual(await d.stop(), 0, d.tail())

    # -- 3b: a queue the broker refuses to declare now is local and retried ---------

    async def test_queue_refused_at_declare_is_retried_alone(self):
        # An exclusive queue of another connection makes the broker refuse the
        # daemon's declare of that name (RESOURCE_LOCKED closes the channel),
        # as NOT_FOUND does for a queue whose home node is down: a refusal a
        # retry can fix, and that concerns that queue alone.
        qa = self.queue_name("ok")
        qb = self.queue_name("locked")
        rec_a = os.path.join(self.tmp, "a.txt")
        rec_b = os.path.join(self.tmp, "b.txt")
        owner = await aio_pika.connect(AMQP_URL)
        och = await owner.channel()
        await och.declare_queue(qb, exclusive=True)
        b = self.tag_queue(qb, rec_b, "b", 10, bindings=["l.*"])
        b["handlers"][0]["name"] = "rec-b"
        cfg = self.config([self.tag_queue(qa, rec_a, "a", 10), b])
        cfg["broker"]["reconnect"] = {"initial": "300ms", "max": "1s"}
        d = await self.start_daemon(self.write_config(cfg))
        await d.wait_for_record("cannot declare a queue now; its consumer retries", queue=qb, timeout=20)
        await d.wait_for_record("ready", timeout=20)
        # The other queue is consumed meanwhile.
        ids = ["ok-%02d-%s" % (i, secrets.token_hex(3)) for i in range(5)]
        for eid in ids:
            await self.publish(self.make_event("p.x", event_id=eid))
        await self.wait_tagged(rec_a, ids, "queue A not consumed while B was refused")
        self.assertTrue(d.records("queue channel lost, recovering", queue=qb), d.tail())
        self.assertEqual(d.records("connection lost"), [])
        self.assertTrue(d.running())
        # The owner leaves, its exclusive queue goes: the daemon declares and consumes it.
        await owner.close()
        await self.wait_consumers(qb, [10], timeout=30)
        later = ["lk-%02d-%s" % (i, secrets.token_hex(3)) for i in range(5)]
        for eid in later:
            await self.publish(self.make_event("l.x", event_id=eid))
        await self.wait_tagged(rec_b, later, "queue B not consumed after the refusal went away")
        self.assertEqual(d.records("connection lost"), [])
        self.assertEqual(await d.stop(), 0, d.tail())

    # -- 5: nothing stranded on reload --------------------------------------------------------

    async def test_reload_strands_no_prefetched_messages(self):
        q = self.queue_name("strand")
        record = os.path.join(self.tmp, "tags.txt")
        # 1 s per event, 2 at a time, 20 prefetched: 18 wait for a handler slot.
        self.install(self.config([self.tag_queue(q, record, "v1", 20, sleep_us=1_000_000, concurrency=2)]))
        d = await self.start_daemon(self.reload_path())
        old = (await d.wait_for_record("consuming", queue=q))[0]
        old_ch = int(old.fields["channel"])
        ids = ["st-%03d-%s" % (i, secrets.token_hex(3)) for i in range(30)]
        for i, eid in enumerate(ids):
            await self.publish(self.make_event("p.x", {"i": i}, event_id=eid))
        deadline = time.monotonic() + 60
        while True:  # the prefetch is full: 20 unacked, the rest ready
            info = await self.queue_info(q)
            if info and info.get("messages_unacknowledged") == 20 and info.get("messages_ready", 0) >= 1:
                break
            if time.monotonic() > deadline:
                self.fail("prefetch never filled: %r%s" % (info, self._daemon_tail()))
            await asyncio.sleep(0.1)
        await self.reload(d, self.config([self.tag_queue(q, record, "v2", 21, sleep_us=1_000_000, concurrency=2)]))
        t_reload = time.monotonic()
        rows = await self.wait_consumers(q, [21])
        # The old channel: the daemon's connection is the one of the new consumer's channel.
        chans = await self.channels()
        new_pid = rows[0]["channel_pid"]
        conn = next(c["connection"] for c in chans if c["pid"] == new_pid)

        def old_channel(cs):
            return next((c for c in cs if c["connection"] == conn and c["number"] == old_ch), None)

        # Within a few seconds the old channel holds only what is running on it
        # (<= 2). Every check is evaluated; the failures are reported together.
        problems = []
        history = []
        deadline = t_reload + 4.0
        while True:
            oc = old_channel(await self.channels())
            unacked = oc["messages_unacknowledged"] if oc else 0
            history.append((round(time.monotonic() - t_reload, 2), unacked))
            if unacked <= 2:
                break
            if time.monotonic() > deadline:
                problems.append("old consumer's channel %d still holds %d unacked message(s) %.1f s after the "
                                "reload (only the <= 2 running ones should be left); history (s, unacked): %r"
                                % (old_ch, unacked, time.monotonic() - t_reload, history))
                break
            await asyncio.sleep(0.3)
        want = set(ids)
        deadline = time.monotonic() + 60
        while not want <= {r[0] for r in read_tags(record)}:
            if time.monotonic() > deadline:
                self.fail("not all handled: missing %d%s" % (len(want - {r[0] for r in read_tags(record)}),
                                                            self._daemon_tail()))
            await asyncio.sleep(0.2)
        await self.wait_queue_counts(q, 0, 0, timeout=15)
        await asyncio.sleep(0.5)
        counts = Counter(r[0] for r in read_tags(record))
        dups = {k: v for k, v in counts.items() if v != 1}
        if dups:
            problems.append("handled more than once: %r" % dups)
        if old_channel(await self.channels()) is not None:
            problems.append("the retired consumer's channel is still open after everything was handled")
        old_runs = Counter(r[1] for r in read_tags(record))
        sys.stderr.write("\nLIFECYCLE-RESULT strand old_channel_unacked=%r runs_by_config=%r\n"
                         % (history, dict(old_runs)))
        if problems:
            self.fail("\n".join(problems) + "\n" + d.tail(40))
        self.assertEqual(await d.stop(), 0, d.tail())

    # -- 6: copies of one event in flight, dedupe on -------------------------------------------

    async def test_twin_copies_never_run_side_by_side(self):
        handler = os.path.join(self.tmp, "twin.py")
        with open(handler, "w") as f:
            f.write(TWIN_HANDLER)
        os.chmod(handler, 0o755)
        q_ok, q_ff = self.queue_name("ok"), self.queue_name("ff")
        rec_ok, rec_ff = os.path.join(self.tmp, "ok.jsonl"), os.path.join(self.tmp, "ff.jsonl")
        flag = os.path.join(self.tmp, "failed-once")
        retry = {"max_attempts": 3, "delay": "200ms", "multiplier": 1, "max_delay": "200ms"}
        cfg = self.config([
            {"name": q_ok, "bindings": ["ok.*"], "prefetch": 10, "dedupe": {"ttl": "1h"}, "retry": retry,
             "handlers": [{"name": "twin", "events": ["#"], "exec": [handler, rec_ok, "-"]}]},
            {"name": q_ff, "bindings": ["ff.*"], "prefetch": 10, "dedupe": {"ttl": "1h"}, "retry": retry,
             "handlers": [{"name": "twin-ff", "events": ["#"], "exec": [handler, rec_ff, flag]}]},
        ])
        d = await self.start_daemon(self.write_config(cfg))
        ev_ok = self.make_event("ok.x")
        ev_ff = self.make_event("ff.x")
        for ev in (ev_ok, ev_ok, ev_ff, ev_ff):
            await self.publish(ev)

        def runs(path):
            recs = []
            if os.path.exists(path):
                with open(path) as f:
                    recs = [json.loads(line) for line in f if line.strip()]
            starts = {r["pid"]: r for r in recs if r["phase"] == "start"}
            ends = {r["pid"]: r for r in recs if r["phase"] == "end"}
            return sorted(((s["t"], ends.get(p, {}).get("t"), ends.get(p, {}).get("exit"), s.get("attempt"))
                           for p, s in starts.items()), key=lambda r: r[0])

        # Success first time: the second copy is skipped, not run.
        await d.wait_for_record("handled", event_id=ev_ok["event_id"], outcome="ack", timeout=20)
        # Failure first: the other copy runs after it; the retry copy is a duplicate.
        deadline = time.monotonic() + 30
        while not any(r[2] == 0 for r in runs(rec_ff)):
            if time.monotonic() > deadline:
                self.fail("fail-first event never succeeded: %r%s" % (runs(rec_ff), self._daemon_tail()))
            await asyncio.sleep(0.1)
        await self.wait_queue_counts(q_ok, 0, 0, timeout=15)
        await self.wait_queue_counts(q_ff, 0, 0, timeout=15)
        await asyncio.sleep(2.0)  # a late retry copy or redelivery would run now

        for name, path, want_runs in (("success", rec_ok, 1), ("fail-first", rec_ff, 2)):
            rs = runs(path)
            for a, b in zip(rs, rs[1:]):
                self.assertIsNotNone(a[1], "%s: a run never ended: %r" % (name, rs))
                self.assertGreaterEqual(b[0], a[1], "%s: two runs of one event overlapped: %r" % (name, rs))
            self.assertEqual(sum(1 for r in rs if r[2] == 0), 1, "%s: successes: %r" % (name, rs))
            self.assertEqual(len(rs), want_runs, "%s: runs (start, end, exit, ATTEMPT): %r" % (name, rs))
        self.assertEqual(runs(rec_ff)[0][2], 75)
        # The run after the failure is the other original copy (ATTEMPT 1); the
        # retry copy (ATTEMPT 2) came while it ran, or after: skipped either way.
        self.assertEqual(runs(rec_ff)[1][3], "1", runs(rec_ff))
        for q in (q_ok, q_ff):
            self.assertEqual(await self.message_count(q + ".dlq"), 0)
        rows = await asyncio.to_thread(ctl_json, "list_queues", "name", "messages")
        left = {r["name"]: r["messages"] for r in rows if r["name"].startswith(self.prefix) and r["messages"]}
        self.assertEqual(left, {}, "messages left in the test's queues (retry/delay queues too)")
        self.assertEqual(await d.stop(), 0, d.tail())

    # -- 7: a failed reload leaves everything live ---------------------------------------------

    async def test_failed_reload_keeps_handlers_dedupe_and_consumers(self):
        q = self.queue_name("keep")
        record = os.path.join(self.tmp, "tags.txt")
        good = self.config([self.tag_queue(q, record, "v1", 10, dedupe={"ttl": "1h"})])
        self.install(good)
        d = await self.start_daemon(self.reload_path())
        seen = self.make_event("p.seen")
        await self.publish(seen)
        await d.wait_for_record("handled", event_id=seen["event_id"], outcome="ack")
        consumers_before = await self.wait_consumers(q, [10])

        async def still_live(step: str):
            # The same id again: skipped by the (old) dedupe store.
            await self.publish(seen)
            fresh = self.make_event("p.fresh")
            await self.publish(fresh)
            deadline = time.monotonic() + 20
            while fresh["event_id"] not in {r[0] for r in read_tags(record)}:
                if time.monotonic() > deadline:
                    self.fail("%s: a new event was not handled after the failed reload%s" % (step, self._daemon_tail()))
                await asyncio.sleep(0.1)
            await self.wait_queue_counts(q, 0, 0)
            await asyncio.sleep(0.3)
            tags = read_tags(record)
            self.assertEqual([r[1] for r in tags if r[0] == fresh["event_id"]], ["v1"], step)
            self.assertEqual([r[0] for r in tags].count(seen["event_id"]), 1,
                             "%s: dedupe no longer skips an already handled id" % step)
            rows = await self.wait_consumers(q, [10])
            self.assertEqual([r["consumer_tag"] for r in rows], [r["consumer_tag"] for r in consumers_before],
                             "%s: the consumer changed" % step)

        # The plugin's init fails (record_tag needs `file`).
        bad = self.config([self.tag_queue(q, record, "v2", 10, dedupe={"ttl": "1h"})])
        bad["queues"][0]["handlers"][0]["config"] = {"tag": "v2"}
        failed = await self.reload(d, bad, ok=False)
        self.assertIn("record_tag: config needs", failed.line)
        await still_live("plugin init failed")

        # state_dir cannot be created (below a regular file).
        blocker = os.path.join(self.tmp, "not-a-dir")
        with open(blocker, "w") as f:
            f.write("x")
        bad2 = self.config([self.tag_queue(q, record, "v2", 10, dedupe={"ttl": "1h"})],
                           state_dir=os.path.join(blocker, "state"))
        failed = await self.reload(d, bad2, ok=False)
        self.assertIn("not-a-dir", failed.line)
        await still_live("state_dir unusable")
        self.assertEqual(d.records("reloaded"), [])
        self.assertTrue(d.running())
        self.assertEqual(await d.stop(), 0, d.tail())


if __name__ == "__main__":
    unittest.main()
