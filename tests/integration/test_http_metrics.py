"""The HTTP endpoint (`http: {listen: host:port}`): /healthz, /readyz,
/metrics (Prometheus text format, parsed with prometheus_client), and the
`event-router health [--ready]` client.

- Counters match the events exactly: received per queue, handled per
  queue/handler/outcome, dead letters per queue/reason, handler duration
  histogram counts; build_info and connected are there.
- /readyz follows the broker: 503 with a reason while it is down, 200 again
  once the daemon has reconnected. That part stops and starts a second
  RabbitMQ node of our own (broker_node.BrokerNode), never the shared one.
"""
import asyncio
import subprocess
import time
import unittest
from typing import Dict, Optional, Tuple

from harness import BINARY, RouterTestCase

from broker_node import BrokerNode, free_port, http_get, publish_events

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as exc:  # pragma: no cover
    raise ImportError("prometheus_client is missing: apt-get install python3-prometheus-client "
                      "(scripts/install-deps.sh): %s" % exc) from exc


Labels = Tuple[Tuple[str, str], ...]


def parse_metrics(text: str) -> Dict[str, Dict[Labels, float]]:
    """{sample name: {sorted label items: value}} of a /metrics page."""
    out: Dict[str, Dict[Labels, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def families(text: str) -> Dict[str, str]:
    """{family name: type}."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(m: Dict[str, Dict[Labels, float]], name: str, **labels: str) -> Optional[float]:
    return m.get(name, {}).get(tuple(sorted(labels.items())))


class HttpTestBase(RouterTestCase):
    def http_config(self, cfg) -> str:
        self.http_port = free_port()
        cfg["http"] = {"listen": "127.0.0.1:%d" % self.http_port}
        return self.write_config(cfg)

    def get(self, path: str):
        return http_get("http://127.0.0.1:%d%s" % (self.http_port, path))

    async def aget(self, path: str):
        return await asyncio.to_thread(self.get, path)

    async def metrics(self) -> Dict[str, Dict[Labels, float]]:
        status, ctype, body = await self.aget("/metrics")
        self.assertEqual(status, 200, body)
        return parse_metrics(body)

    async def wait_status(self, path: str, status: int, timeout: float = 30.0) -> Tuple[int, str]:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                st, _, body = await self.aget(path)
                last = (st, body)
                if st == status:
                    return st, body
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                self.fail("GET %s: wanted %d within %.0fs, last answer %r%s"
                          % (path, status, timeout, last, self._daemon_tail()))
            await asyncio.sleep(0.1)

    async def health(self, config: str, ready: bool = False) -> subprocess.CompletedProcess:
        argv = [BINARY, "health"] + (["--ready"] if ready else []) + ["--config", config]
        return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=30,
                                       stdin=subprocess.DEVNULL, env=self.daemon_env())


class HttpMetricsTest(HttpTestBase):
    async def test_health_ready_and_metrics_count_every_outcome_exactly(self):
        q = self.queue_name("m")
        good = self.recorder("good", events=["good.*"])
        bad = self.recorder("bad", events=["bad.*"], args=["--exit", "65"])
        path = self.http_config(self.config([{
            "name": q, "bindings": ["good.*", "bad.*", "other.*"], "handlers": [good, bad]}]))
        d = await self.start_daemon(path)

        st, ctype, body = await self.aget("/healthz")
        self.assertEqual((st, body.strip()), (200, "ok"))
        await self.wait_status("/readyz", 200, 10)
        st, ctype, body = await self.aget("/metrics")
        self.assertEqual(st, 200)
        self.assertTrue(ctype.startswith("text/plain; version=0.0.4"), ctype)
        types = families(body)
        for name, typ in [("event_router_build_info", "gauge"), ("event_router_connected", "gauge"),
                          ("event_router_events_received", "counter"), ("event_router_events_handled", "counter"),
                          ("event_router_dead_letters", "counter"),
                          ("event_router_handler_duration_seconds", "histogram")]:
            self.assertEqual(types.get(name), typ, "family %s: %r" % (name, sorted(types.items())))
        m = parse_metrics(body)
        build = m.get("event_router_build_info", {})
        self.assertEqual(len(build), 1, build)
        (labels, v), = build.items()
        self.assertEqual(v, 1)
        self.assertIn("version", dict(labels))
        self.assertEqual(value(m, "event_router_connected"), 1)
        # Series of configured queues and handlers exist from the start, at 0.
        self.assertEqual(value(m, "event_router_events_received_total", queue=q), 0)
        self.assertEqual(value(m, "event_router_events_handled_total", queue=q, handler="good", outcome="ack"), 0)
        st, _, body = await self.aget("/nope")
        self.assertEqual(st, 404)

        N, M, K = 5, 3, 2
        ids = []
        for i in range(N):
            ev = self.make_event("good.thing", {"i": i}); ids.append(ev["event_id"]); await self.publish(ev)
        for i in range(M):
            ev = self.make_event("bad.thing", {"i": i}); ids.append(ev["event_id"]); await self.publish(ev)
        for i in range(K):
            ev = self.make_event("other.thing", {"i": i}); ids.append(ev["event_id"]); await self.publish(ev)
        await self.wait_records(good["exec"][1], N)
        await self.wait_records(bad["exec"][1], M)
        await self.wait_message_count(q + ".dlq", M + K)
        await self.wait_queue_counts(q, 0, 0)

        want = {
            ("event_router_events_received_total", (("queue", q),)): N + M + K,
            ("event_router_events_handled_total", (("handler", "good"), ("outcome", "ack"), ("queue", q))): N,
            ("event_router_events_handled_total", (("handler", "good"), ("outcome", "dead-letter"), ("queue", q))): 0,
            ("event_router_events_handled_total", (("handler", "good"), ("outcome", "retry"), ("queue", q))): 0,
            ("event_router_events_handled_total", (("handler", "bad"), ("outcome", "dead-letter"), ("queue", q))): M,
            ("event_router_events_handled_total", (("handler", "bad"), ("outcome", "ack"), ("queue", q))): 0,
            ("event_router_events_handled_total", (("handler", "bad"), ("outcome", "retry"), ("queue", q))): 0,
            ("event_router_dead_letters_total", (("queue", q), ("reason", "handler_failed"))): M,
            ("event_router_dead_letters_total", (("queue", q), ("reason", "unhandled"))): K,
            ("event_router_handler_duration_seconds_count", (("handler", "good"), ("queue", q))): N,
            ("event_router_handler_duration_seconds_count", (("handler", "bad"), ("queue", q))): M,
            ("event_router_connected", ()): 1,
            ("event_router_in_flight_events", ()): 0,
        }
        deadline = time.monotonic() + 15
        while True:
            m = await self.metrics()
            have = {k: value(m, k[0], **dict(k[1])) for k in want}
            if have == want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.assertEqual(have, want, d.tail())
        # No other dead-letter reasons, no retries of this queue.
        reasons = {dict(l)["reason"]: v for l, v in m.get("event_router_dead_letters_total", {}).items()
                   if dict(l).get("queue") == q}
        self.assertEqual(reasons, {"handler_failed": M, "unhandled": K})
        self.assertFalse([v for l, v in m.get("event_router_retries_total", {}).items()
                          if dict(l).get("queue") == q and v], m.get("event_router_retries_total"))
        # The histogram is consistent: cumulative buckets, +Inf = count, sum >= 0.
        for h, n in (("good", N), ("bad", M)):
            buckets = sorted(((float(dict(l)["le"]), v) for l, v in
                              m["event_router_handler_duration_seconds_bucket"].items()
                              if dict(l).get("handler") == h and dict(l).get("queue") == q))
            self.assertTrue(buckets, "no buckets for %s" % h)
            self.assertEqual(buckets[-1], (float("inf"), n))
            counts = [v for _, v in buckets]
            self.assertEqual(counts, sorted(counts), "buckets not cumulative: %r" % buckets)
            s = value(m, "event_router_handler_duration_seconds_sum", queue=q, handler=h)
            self.assertIsNotNone(s)
            self.assertGreater(s, 0)
        # Confirmed DLQ copies show up as publish confirms.
        self.assertGreaterEqual(value(m, "event_router_publish_confirms_total", result="ack") or 0, M + K)

        # The `health` client.
        p = await self.health(path)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertTrue(p.stdout.startswith("200"), p.stdout)
        p = await self.health(path, ready=True)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertTrue(p.stdout.startswith("200"), p.stdout)
        self.assertEqual(await d.stop(), 0, d.tail())
        # Nobody answers any more: health fails.
        p = await self.health(path)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("no answer", p.stderr)

    async def test_health_without_http_section_explains(self):
        q = self.queue_name("nohttp")
        path = self.write_config(self.config([{"name": q, "bindings": ["x.*"], "handlers": [self.recorder()]}]))
        p = await self.health(path)
        self.assertEqual(p.returncode, 1)
        self.assertIn("http", p.stderr)


    async def test_readyz_503_while_first_connect_fails(self):
        # A URL where nothing listens: never ready, /healthz fine, the daemon retries.
        q = self.queue_name("never")
        cfg = self.config([{"name": q, "bindings": ["n.*"], "handlers": [self.recorder()]}])
        cfg["broker"] = {"url": "amqp://guest:guest@127.0.0.1:%d/" % free_port(),
                         "reconnect": {"initial": "200ms", "max": "1s"}}
        path = self.http_config(cfg)
        d = await self.start_daemon(path, wait_ready=False)
        await d.wait_for_record("broker unavailable, retrying", count=2, timeout=20)
        await self.wait_status("/healthz", 200, 10)
        st, body = await self.wait_status("/readyz", 503, 10)
        self.assertIn("not connected", body)
        m = await self.metrics()
        self.assertEqual(value(m, "event_router_connected"), 0)
        self.assertEqual((await self.health(path, ready=True)).returncode, 1)
        self.assertEqual(await d.stop(), 0, d.tail())


class ReadyzBrokerOutageTest(HttpTestBase):
    """Uses a second RabbitMQ node that the test stops and starts."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.node = BrokerNode.for_class(cls)

    async def test_readyz_503_while_broker_down_and_200_once_back(self):
        node = self.node
        if not node.running():
            await asyncio.to_thread(node.start)
        q = self.queue_name("outage")
        rec = self.recorder("rec", events=["#"])
        cfg = self.config([{"name": q, "bindings": ["o.*"], "handlers": [rec]}])
        cfg["broker"] = {"url": node.url, "heartbeat": "5s", "reconnect": {"initial": "200ms", "max": "2s"}}
        path = self.http_config(cfg)
        d = await self.start_daemon(path)
        await self.wait_status("/readyz", 200, 10)
        m = await self.metrics()
        self.assertEqual(value(m, "event_router_connected"), 1)
        self.assertEqual((await self.health(path, ready=True)).returncode, 0)
        await publish_events(node.url, self.exchange, [self.make_event("o.before")])
        await self.wait_records(rec["exec"][1], 1)

        await asyncio.to_thread(node.stop)
        st, body = await self.wait_status("/readyz", 503, 30)
        self.assertIn("not connected", body, "503 without a reason")
        st, _, body = await self.aget("/healthz")
        self.assertEqual(st, 200, "healthz follows liveness, not the broker")
        m = await self.metrics()
        self.assertEqual(value(m, "event_router_connected"), 0)
        p = await self.health(path)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        p = await self.health(path, ready=True)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertTrue(p.stdout.startswith("503"), p.stdout)
        self.assertIn("not connected", p.stdout)
        await d.wait_for_record("broker unavailable, retrying", timeout=20)
        self.assertTrue(d.running(), d.tail())

        await asyncio.to_thread(node.start)
        await self.wait_status("/readyz", 200, 60)
        m = await self.metrics()
        self.assertEqual(value(m, "event_router_connected"), 1)
        self.assertGreaterEqual(value(m, "event_router_reconnects_total") or 0, 1)
        self.assertEqual((await self.health(path, ready=True)).returncode, 0)
        # And it consumes again (durable queue, redeclared topology).
        ev = self.make_event("o.after")
        await publish_events(node.url, self.exchange, [ev])
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack", timeout=20)
        m = await self.metrics()
        self.assertEqual(value(m, "event_router_events_received_total", queue=q), 2)
        self.assertEqual(value(m, "event_router_events_handled_total", queue=q, handler="rec", outcome="ack"), 2)
        self.assertEqual(await d.stop(), 0, d.tail())


if __name__ == "__main__":
    unittest.main()
